"""The worker's leases, renewed apart from the generation work.

A worker renews the lease of every generation it runs (``HEARTBEAT_SCRIPT``) and touches its
job (``XCLAIM``) once per third of ``BROKER_LEASE_TTL``. When that renewal shared the event
loop with the generations, an overloaded loop (G = 1000 on one worker) delayed it past the
lease, and the generations of a LIVE worker ended with ``worker_lost``. So the renewals run
in a thread of their own, on an event loop and a Redis connection of their own: however busy
or blocked the generation loop is, the thread gets the interpreter within the GIL's switch
interval (5 ms) and renews every lease in one round trip per tick (one pipeline on one Redis;
on a cluster, one call per generation, all at once, since each lives on its own slot).

What a renewal brings back (a cancel flag, a lease lost to another party) is handed to the
generation on its own loop (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.metrics import Metrics
from broker.core.protocol import JobEntry
from broker.core.settings import Settings
from broker.core.store import Store

log = logging.getLogger(__name__)

# Ticks per lease: a lease is renewed a third of its length after its last renewal, so two
# renewals in a row may fail (a Redis hiccup) before it runs out.
TICKS_PER_LEASE = 3
STOP_TIMEOUT = 10.0


@dataclass(slots=True)
class Held:
    job: JobEntry
    on_state: Callable[[str], None]  # 'cancel' or 'lost', called on the worker's loop


class LeaseKeeper:
    """Renews the leases this worker holds, every ``lease_ttl / 3``, in one batch.

    With ``own_store`` (a factory of a ``Store`` on a connection of its own), the renewals run
    in a thread of their own; without it (an embedded store that lives on one loop, as under
    ``broker dev``) they run as one task on the worker's loop, still one batch per tick."""

    def __init__(
        self, store: Store, owner: str, settings: Settings, metrics: Metrics,
        own_store: Callable[[], Store] | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.settings = settings
        self.metrics = metrics
        self.own_store = own_store
        self.period = settings.lease_ttl / TICKS_PER_LEASE
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()  # _held is read by the renewal thread
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self.rounds = 0  # renewal rounds that reached Redis (tests, benchmarks)

    # -- the worker's side (its loop) -------------------------------------------------------

    def hold(self, gen_id: str, job: JobEntry, on_state: Callable[[str], None]) -> None:
        """Keep renewing ``gen_id``'s lease (just claimed) until ``release``."""
        with self._lock:
            self._held[gen_id] = Held(job, on_state)

    def release(self, gen_id: str) -> None:
        with self._lock:
            self._held.pop(gen_id, None)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.own_store is None:
            self._task = asyncio.create_task(self._renew_forever(self.store, asyncio.sleep))
            return
        self._thread = threading.Thread(
            target=self._thread_main, name=f"leases-{self.owner}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)

    # -- the renewals --------------------------------------------------------------------------

    def _thread_main(self) -> None:
        assert self.own_store is not None
        store_factory = self.own_store

        async def main() -> None:
            store = store_factory()
            try:
                await self._renew_forever(store, self._sleep_unless_stopped)
            finally:
                await store.redis.aclose()
                if isinstance(store.redis, aioredis.Redis):  # (its pool was passed in: ours)
                    await store.redis.connection_pool.disconnect()

        asyncio.run(main())

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        # The thread's loop runs nothing else: waiting on the event in the loop's executor
        # would cost a thread more; a short sleep polls it well enough for a stop.
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.1))

    async def _renew_forever(
        self, store: Store, sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        last_round: float | None = None
        while not self._stop.is_set():
            await sleep(self.period)
            if self._stop.is_set():
                return
            with self._lock:
                held = list(self._held.items())
            if not held:
                last_round = None
                continue
            try:
                states = await store.renew_leases(
                    self.owner, [(gen_id, h.job) for gen_id, h in held], self.settings.lease_ttl)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                self.metrics.redis_errors.labels("heartbeat").inc()
                log.warning("renewing %d lease(s) failed: %s", len(held), e)
                continue
            now = time.monotonic()
            if last_round is not None:
                # What a lease must outlast between two renewals (with the tick, the call).
                self.metrics.lease_renewal_interval.observe(now - last_round)
            last_round = now
            self.rounds += 1
            for (gen_id, h), state in zip(held, states, strict=True):
                if state in ("cancel", "lost"):
                    self._tell(gen_id, h, state)

    def _tell(self, gen_id: str, held: Held, state: str) -> None:
        """Hand ``state`` to the generation on the worker's loop, if it still holds it then
        (a renewal that raced the generation's end reports 'lost' for a lease let go)."""
        def deliver() -> None:
            if self._held.get(gen_id) is held:
                held.on_state(state)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(deliver)
