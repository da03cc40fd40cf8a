"""A conversation as one edge follows it: the notices of its new turns, on one subscription
per conversation per edge however many of its viewers are here (``Hub.watch_conversation``).

A notice only says "look again": the turns index in Redis is the truth, and a viewer re-reads
it after each change (and on every keepalive tick, so a notice lost with a connection delays
a turn by one keepalive interval at most)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class ConversationTopic:
    cid: str
    viewers: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def next_change(self) -> asyncio.Event:
        """An event set at the next change; take it before looking, then wait on it."""
        return self._changed

    def wake(self) -> None:
        """Viewers look at the index again (a notice, a resubscription, the edge closing)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
