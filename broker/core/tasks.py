"""Stopping asyncio tasks for sure, sharing one call among the callers that wait for it, and
an ``asyncio.Event`` that costs nothing until awaited."""

from __future__ import annotations

import asyncio
import collections
import functools
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Literal, TypeVar

K = TypeVar("K")
V = TypeVar("V")

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


class SharedCalls(Generic[K, V]):
    """Callers that ask for the same key while a call for it runs share that one call (a
    single flight: a resume storm or a crowd joining reads Redis once, not once each).

    The call runs in a task of its own, so a caller that leaves cancels only its own wait. A
    finished call is forgotten unless ``keep(result)`` says its result stays valid; then it is
    kept for later callers, the ``capacity`` most recently asked for, until ``clear``.
    """

    def __init__(self, keep: Callable[[V], bool] | None = None, capacity: int = 0) -> None:
        self._keep = keep
        self._capacity = capacity
        self._calls: OrderedDict[K, asyncio.Future[V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._calls)

    async def get(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> tuple[V, bool]:
        """The result of the call for ``key`` (``call()`` if none runs or is kept), and
        whether it was shared: started before this caller asked."""
        running = self._calls.get(key)
        if running is None:
            running = asyncio.ensure_future(call())
            self._calls[key] = running
            running.add_done_callback(functools.partial(self._done, key))
            shared = False
        else:
            self._calls.move_to_end(key)
            shared = True
        return await asyncio.shield(running), shared

    def clear(self) -> None:
        """Forget every call: later callers call afresh (those waiting still get theirs)."""
        self._calls.clear()

    def _done(self, key: K, call: asyncio.Future[V]) -> None:
        # The exception is retrieved here: every caller may have left already.
        failed = call.cancelled() or call.exception() is not None
        if failed or self._keep is None or not self._keep(call.result()):
            if self._calls.get(key) is call:
                del self._calls[key]
            return
        kept = [k for k, c in self._calls.items() if c.done()]
        for old in kept[: max(0, len(kept) - self._capacity)]:
            del self._calls[old]


class LazyEvent(asyncio.Event):
    """An ``asyncio.Event`` whose waiter deque is made when someone first waits: until then
    ``set`` iterates an empty tuple. Making one is two attribute stores, not a deque (~600
    bytes) and the loop mixin's setup: uvicorn makes two per streaming connection that almost
    never get awaited, and a topic one per event, mostly set with nobody waiting."""

    def __init__(self) -> None:  # (no super().__init__: it would make the deque)
        self._waiters = ()  # type: ignore[assignment]
        self._value = False

    async def wait(self) -> Literal[True]:
        if not self._value and not self._waiters:
            self._waiters = collections.deque()
        return await super().wait()
