"""One Redis round trip for the publishes of every generation that are ready together.

Each generation publishes its events with one script call (``PUBLISH_SCRIPT``), one at a
time. With many generations on one worker, each call paid its own round trip: a Redis
connection from the pool (16 by default: at G = 1000 publishes queued for them), a command
sent as its own ``write`` and its reply read on its own. Here the publishes handed over
during one round of the event loop go to Redis together, in one pipeline, in the loop's next
round (``Store.publish_many``); a publish that is alone goes as before. Each generation still
has at most one publish in flight (its ``Publisher``'s lock), so its events stay in order.

On one Redis the publishes go instead on the worker's cancel-listening connection while it
takes calls (``broker.core.pubsub.PushConnection.call``): a write per loop round for all the
calls of that round and a future each, without redis-py's pool, retry and reply machinery
per command (a quarter of the worker's CPU per token at G = 50, B5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from broker.core.protocol import NewEvent
from broker.core.store import Caller, PublishCall, Store


def _no_caller() -> Caller | None:
    return None


class PublishBatcher:
    def __init__(self, store: Store, caller: Callable[[], Caller | None] = _no_caller) -> None:
        """``caller``: the connection to send publishes on now, or None (then through
        redis-py, batched)."""
        self.store = store
        self.caller = caller
        self._waiting: list[tuple[PublishCall, asyncio.Future[int]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # pipelines sent (tests, benchmarks)

    async def publish(
        self, gen_id: str, owner: str, seq: int, events: Sequence[NewEvent], published_ms: int
    ) -> int:
        """What ``Store.publish`` returns, or raises, for this call."""
        via = self.caller()
        if via is not None:
            return await self.store.publish(gen_id, owner, seq, events, published_ms, via=via)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send)  # the loop's next round: the others ready now join
        self._waiting.append(((gen_id, owner, seq, events, published_ms), done))
        return await done

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        task = asyncio.create_task(self._publish(waiting))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, waiting: list[tuple[PublishCall, asyncio.Future[int]]]) -> None:
        try:
            results = await self.store.publish_many([call for call, _ in waiting])
        except BaseException as e:
            for _, done in waiting:
                if not done.done():
                    done.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        if len(waiting) > 1:
            self.batches += 1
        for (_, done), result in zip(waiting, results, strict=True):
            if done.done():
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)
