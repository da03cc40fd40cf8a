"""A stopping worker ends its runs for sure before its LLM client and Redis are closed under
them, and a run never swallows its own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from broker.core.settings import Settings
from worker import loop
from worker.generation import _outcome
from worker.loop import Worker


async def test_drain_returns_only_once_every_run_has_ended(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(loop, "SHUTDOWN_PUBLISH_TIMEOUT", 0.05)
    worker = Worker(store=None, llm=None, settings=Settings(drain_timeout=0.05))  # type: ignore[arg-type]
    cleaned_up = asyncio.Event()

    async def stuck_run() -> None:
        try:
            await asyncio.Event().wait()  # ignores the shutdown request
        finally:
            await asyncio.sleep(0.05)  # its cleanup still uses the LLM client and Redis
            cleaned_up.set()

    worker._tasks.add(asyncio.create_task(stuck_run()))
    await asyncio.sleep(0)
    await worker._drain()
    assert cleaned_up.is_set()


async def test_the_outcome_of_a_stopped_llm_call_is_none():
    llm_call = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    llm_call.cancel()
    assert await _outcome(llm_call) is None


async def test_the_outcome_does_not_swallow_the_runs_own_cancellation():
    llm_call = asyncio.create_task(asyncio.sleep(10))
    run = asyncio.create_task(_outcome(llm_call))
    await asyncio.sleep(0)
    run.cancel()  # a shutdown cancelling the run while it waits for the LLM
    with pytest.raises(asyncio.CancelledError):
        await run
    assert llm_call.cancelled()
