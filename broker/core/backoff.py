"""Exponential backoff between retries of a Redis call, shared by edge and worker."""

from __future__ import annotations

import asyncio


class Backoff:
    """Delays that double from ``first`` up to ``cap``; ``reset()`` after a success."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)
