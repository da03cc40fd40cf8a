"""Stopping asyncio tasks for sure."""

from __future__ import annotations

import asyncio
from typing import Any

RECANCEL_INTERVAL = 0.5


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until every one of them has ended.

    A cancel can be lost. On Python 3.11, ``asyncio.wait_for`` returns the inner result
    instead of raising ``CancelledError`` when the cancel lands in the same loop iteration as
    the inner awaitable completes, and redis-py (8.x: ``socket_timeout`` defaults to 5 s)
    wraps every socket write in it. A task cancelled while it sends a Redis command then
    carries on as if nothing happened: ``cancel(); await gather(task)`` waits forever for a
    loop such as a heartbeat. So cancel again, every ``RECANCEL_INTERVAL``, until it ends.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL)
    await asyncio.gather(*tasks, return_exceptions=True)  # (retrieves their exceptions)
