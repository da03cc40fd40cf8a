"""The worker's leases, renewed apart from the generation work.

A worker renews the lease of every generation it runs (``HEARTBEAT_SCRIPT``) and touches its
job (``XCLAIM``) once per third of ``BROKER_LEASE_TTL``. When that renewal shared the event
loop with the generations, an overloaded loop (G = 1000 on one worker) delayed it past the
lease, and the generations of a LIVE worker ended with ``worker_lost``. So the renewals run
in a thread of their own, with a blocking Redis client of their own: however busy or blocked
the generation loop is, the thread gets the interpreter within the GIL's switch interval
(5 ms) and renews every lease in one round trip per tick (one pipeline on one Redis; on a
cluster, one call per generation, since each lives on its own slot). No event loop runs in
the thread: one did (waking to poll its stop flag), and its wake-ups, each taking the
interpreter from the busy generation loop, cost the token→publish p99 at G = 50 100-400 ms.

What a renewal brings back (a cancel flag, a lease lost to another party) is handed to the
generation on its own loop (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.cluster import ClusterNode
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamIdT

from broker.core import protocol
from broker.core.metrics import Metrics
from broker.core.protocol import JobEntry, as_text
from broker.core.settings import Settings
from broker.core.store import Store, cluster_seeds, is_cluster_url

SyncRedis = redis.Redis | redis.RedisCluster

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

    With ``own_redis`` (a factory of a blocking Redis client: ``blocking_client``), the
    renewals run in a thread of their own; without it (an embedded store that lives on one
    loop, as under ``broker dev``) they run as one task on the worker's loop, still one batch
    per tick."""

    def __init__(
        self, store: Store, owner: str, settings: Settings, metrics: Metrics,
        own_redis: Callable[[], SyncRedis] | None = None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.settings = settings
        self.metrics = metrics
        self.own_redis = own_redis
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
        if self.own_redis is None:
            self._task = asyncio.create_task(self._renew_forever())
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
        """The thread: a blocking client, no event loop of its own. It waits on the stop
        event between ticks and on its socket during a round, and holds the interpreter
        only to build one round's commands and read their replies. Nothing ends it but the
        stop: a failed round (Redis down, a cluster failover, anything) is counted, logged
        and tried again at the next tick, with a new client if need be."""
        assert self.own_redis is not None
        client: SyncRedis | None = None
        heartbeat: Script | None = None
        last_round: float | None = None
        while not self._stop.wait(self.period):
            with self._lock:
                held = list(self._held.items())
            if not held:
                last_round = None
                continue
            try:
                if client is None or heartbeat is None:
                    client = self.own_redis()
                    heartbeat = client.register_script(protocol.HEARTBEAT_SCRIPT)
                states = _renew_blocking(client, heartbeat, self.owner, held,
                                         self.settings.lease_ttl)
            except Exception as e:
                self.metrics.redis_errors.labels("heartbeat").inc()
                log.warning("renewing %d lease(s) failed: %r", len(held), e)
                if not isinstance(e, RedisConnectionError | RedisTimeoutError | OSError):
                    _closed(client)  # (a cluster's view may be stale: start over)
                    client = None
                continue
            last_round = self._renewed(held, states, last_round)
        _closed(client)

    async def _renew_forever(self) -> None:
        """The same rounds as the thread's, on the worker's loop (an embedded store)."""
        last_round: float | None = None
        while not self._stop.is_set():
            await asyncio.sleep(self.period)
            with self._lock:
                held = list(self._held.items())
            if not held:
                last_round = None
                continue
            try:
                states = await self.store.renew_leases(
                    self.owner, [(gen_id, h.job) for gen_id, h in held], self.settings.lease_ttl)
            except Exception as e:  # (as in the thread: counted, logged, tried again)
                self.metrics.redis_errors.labels("heartbeat").inc()
                log.warning("renewing %d lease(s) failed: %r", len(held), e)
                continue
            last_round = self._renewed(held, states, last_round)

    def _renewed(
        self, held: list[tuple[str, Held]], states: list[str], last_round: float | None
    ) -> float:
        now = time.monotonic()
        if last_round is not None:
            # What a lease must outlast between two renewals (with the tick, the call).
            self.metrics.lease_renewal_interval.observe(now - last_round)
        self.rounds += 1
        for (gen_id, h), state in zip(held, states, strict=True):
            if state in ("cancel", "lost"):
                self._tell(gen_id, h, state)
        return now

    def _tell(self, gen_id: str, held: Held, state: str) -> None:
        """Hand ``state`` to the generation on the worker's loop, if it still holds it then
        (a renewal that raced the generation's end reports 'lost' for a lease let go)."""
        def deliver() -> None:
            if self._held.get(gen_id) is held:
                held.on_state(state)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(deliver)


def blocking_client(settings: Settings, client_name: str) -> SyncRedis:
    """A blocking client for the renewal thread: one connection (a pipeline per round), a
    socket timeout of a tick, so a stuck call cannot hold the next round back."""
    timeout = settings.lease_ttl / TICKS_PER_LEASE
    if is_cluster_url(settings.redis_url):
        # Every seed of the URL, as the worker's own client takes them (``store.connect``):
        # given whole to redis-py, a URL of several seeds failed every renewal.
        url, more_seeds = cluster_seeds(settings.redis_url)
        return redis.RedisCluster.from_url(
            url, startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                                for host, port in more_seeds],
            socket_connect_timeout=timeout, socket_timeout=timeout, client_name=client_name)
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout,
        client_name=client_name, health_check_interval=15)


def _renew_blocking(
    client: SyncRedis, heartbeat: Script, owner: str, held: list[tuple[str, Held]],
    lease_ttl: float,
) -> list[str]:
    """``Store.renew_leases``, blocking: every lease and every job in one pipeline on one
    Redis; on a cluster one call per generation and one per job stream."""
    ttl_ms = max(0, int(lease_ttl * 1000))
    jobs: dict[str, list[StreamIdT]] = {}
    for _gen_id, h in held:
        jobs.setdefault(h.job.stream, []).append(h.job.entry_id)
    if isinstance(client, redis.RedisCluster):
        states = [as_text(heartbeat(keys=[protocol.meta_key(gen_id)], args=[owner, ttl_ms],
                                    client=client)) for gen_id, _ in held]
        for stream, ids in jobs.items():
            client.xclaim(stream, protocol.WORKER_GROUP, owner, 0, ids, justid=True)
        return states
    with client.pipeline(transaction=False) as pipe:
        for gen_id, _ in held:
            heartbeat(keys=[protocol.meta_key(gen_id)], args=[owner, ttl_ms], client=pipe)
        for stream, ids in jobs.items():
            pipe.xclaim(stream, protocol.WORKER_GROUP, owner, 0, ids, justid=True)
        replies = pipe.execute()
    return [as_text(reply) for reply in replies[: len(held)]]


def _closed(client: SyncRedis | None) -> None:
    if client is not None:
        try:
            client.close()
        except Exception as e:  # closing a broken client: nothing left to do
            log.debug("closing the renewal client: %r", e)
