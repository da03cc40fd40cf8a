"""The ``broker`` command and what serves development and tests: ``broker dev``, the local
cluster, the HAProxy configuration, the mock LLM. May import anything; nothing imports it but
the entry points (``broker/__main__.py``, ``worker/__main__.py``, the ``broker`` script)."""
