"""broker.core.tasks.SharedCalls: one call per key for the callers that wait together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from broker.core.tasks import SharedCalls


class Calls:
    def __init__(self) -> None:
        self.made: list[str] = []
        self.release = asyncio.Event()

    def of(
        self, key: str, result: str = "", fail: bool = False
    ) -> Callable[[], Coroutine[Any, Any, str]]:
        async def call() -> str:
            self.made.append(key)
            await self.release.wait()
            if fail:
                raise RuntimeError("the call failed")
            return result or key
        return call


async def test_callers_together_share_one_call_and_know_who_started_it() -> None:
    calls = Calls()
    shared: SharedCalls[str, str] = SharedCalls()
    waiters = [asyncio.create_task(shared.get("k", calls.of("k"))) for _ in range(20)]
    await asyncio.sleep(0)
    calls.release.set()
    answers = await asyncio.gather(*waiters)
    assert calls.made == ["k"]
    assert [a for a, _ in answers] == ["k"] * 20
    assert [s for _, s in answers] == [False] + [True] * 19
    assert len(shared) == 0  # forgotten once done: the next caller calls afresh
    await shared.get("k", calls.of("k"))
    assert calls.made == ["k", "k"]


async def test_a_caller_leaving_cancels_only_its_own_wait() -> None:
    calls = Calls()
    shared: SharedCalls[str, str] = SharedCalls()
    leaving = asyncio.create_task(shared.get("k", calls.of("k")))
    staying = asyncio.create_task(shared.get("k", calls.of("k")))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    calls.release.set()
    assert await staying == ("k", True)
    assert leaving.cancelled()


async def test_a_failure_reaches_every_waiter_and_is_not_kept() -> None:
    calls = Calls()
    shared: SharedCalls[str, str] = SharedCalls(keep=lambda _: True, capacity=4)
    waiters = [asyncio.create_task(shared.get("k", calls.of("k", fail=True))) for _ in range(3)]
    await asyncio.sleep(0)
    calls.release.set()
    for waiter in waiters:
        with pytest.raises(RuntimeError):
            await waiter
    assert len(shared) == 0


async def test_kept_results_are_bounded_least_recently_asked_first_and_cleared() -> None:
    calls = Calls()
    calls.release.set()
    shared: SharedCalls[str, str] = SharedCalls(keep=lambda r: r != "short", capacity=2)
    for key in ("a", "b"):
        await shared.get(key, calls.of(key))
    await shared.get("a", calls.of("a"))  # asked again: kept, and now the most recent
    await shared.get("s", calls.of("s", result="short"))  # not worth keeping
    await shared.get("c", calls.of("c"))  # pushes out the least recently asked ("b")
    assert calls.made == ["a", "b", "s", "c"]
    await shared.get("a", calls.of("a"))
    await shared.get("b", calls.of("b"))
    assert calls.made == ["a", "b", "s", "c", "b"]
    shared.clear()
    await shared.get("a", calls.of("a"))
    assert calls.made[-1] == "a"
