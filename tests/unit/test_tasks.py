"""cancel_and_wait: a task that loses (swallows) a cancel is still stopped."""

from __future__ import annotations

import asyncio

import pytest

from broker.core import tasks
from broker.core.tasks import cancel_and_wait


async def test_stops_a_task_that_swallows_the_first_cancel(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tasks, "RECANCEL_INTERVAL", 0.01)
    swallowed = 0

    async def heartbeat() -> None:
        # What asyncio.wait_for does on Python 3.11 when the cancel lands as its inner
        # awaitable completes: the CancelledError never reaches the caller.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled() and swallowed == 1


async def test_waits_for_every_task_and_retrieves_their_errors():
    async def fails() -> None:
        raise RuntimeError("boom")

    async def sleeps() -> None:
        await asyncio.sleep(3600)

    failing, sleeping = asyncio.create_task(fails()), asyncio.create_task(sleeps())
    await asyncio.sleep(0)
    await cancel_and_wait(failing, sleeping)
    assert failing.done() and isinstance(failing.exception(), RuntimeError)
    assert sleeping.cancelled()
