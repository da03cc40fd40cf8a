"""What edge, worker and clients share: the wire contract (``protocol``), the Redis operations
on it (``store``), settings, metrics, logs, SSE framing and decoding, the sentence buffer, and
small asyncio helpers. Imports nothing else of this project (the import contract in
pyproject.toml holds it to that)."""
