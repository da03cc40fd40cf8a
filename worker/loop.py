"""The worker: takes jobs from the consumer group and runs many generations at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import (
    ClusterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from broker.core import logs, protocol
from broker.core.backoff import Backoff
from broker.core.external import ExternalStore
from broker.core.metrics import Metrics
from broker.core.protocol import Job, JobEntry
from broker.core.pubsub import PushConnection, subscribe_forever
from broker.core.settings import Settings
from broker.core.store import Store
from broker.core.tasks import cancel_and_wait
from worker.admission import Admission
from worker.batch import PublishBatcher
from worker.generation import GenerationRun
from worker.leases import LeaseKeeper, SyncRedis
from worker.llm import LLM

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500
REAP_INTERVAL = 1.0
# A job-group consumer idle for this many leases, holding no job, belonged to a worker that is
# gone (its jobs were reclaimed after one lease): the reaper deletes it.
CONSUMER_GONE_AFTER_LEASES = 3
# How long a stopping worker tries to remove its consumer from the job groups.
LEAVE_TIMEOUT = 2.0
# How long generations cut short by a stop get to publish their worker_shutdown event.
SHUTDOWN_PUBLISH_TIMEOUT = 10.0
# What a Redis Cluster answers while a failover (CLUSTERDOWN) or a slot migration (TRYAGAIN)
# is under way: an outage that passes, like a lost connection, not a reason to exit.
CLUSTER_IN_TRANSITION = (ClusterDownError, TryAgainError)


class Worker:
    def __init__(
        self, store: Store, llm: LLM, settings: Settings, metrics: Metrics | None = None,
        name: str | None = None, lease_redis: Callable[[], SyncRedis] | None = None,
    ) -> None:
        """``lease_redis``: makes a blocking Redis client of its own for the lease renewals'
        thread (``worker.leases.blocking_client``); without it they run on this worker's
        loop."""
        self.store = store
        self.llm = llm
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.name = name or settings.worker_name()
        self.leases = LeaseKeeper(store, self.name, settings, self.metrics, lease_redis)
        self.admission = Admission(settings, self.metrics)
        # The cancel listener's connection on one Redis while it is up: publishes go there.
        self._listener: PushConnection | None = None
        self.batcher = PublishBatcher(store, self._publish_caller)
        self.running: dict[str, GenerationRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reserved = 0  # slots a shard reader is reading jobs for right now
        self._stopping = asyncio.Event()
        self._draining: int | None = None  # generations running when stop() came
        # Reaping waits until this worker has seen Redis healthy for a whole lease: after an
        # outage, live owners must get the chance to renew before anyone judges them dead.
        self._healthy_since = time.monotonic()

    def stop(self) -> None:
        """Stop taking jobs; ``run`` then drains (see ``drain_timeout``) and returns."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._draining = len(self._tasks)  # no job starts after this (see _read_shard)
        log.info(
            "worker %s stopping: taking no more jobs, draining %d generation(s) for up to %g s "
            "(BROKER_DRAIN_TIMEOUT), then ending the rest with worker_shutdown",
            self.name, self._draining, self.settings.drain_timeout,
        )

    async def run(self, burst: bool = False) -> None:
        """Take jobs until ``stop()`` (or, with ``burst``, until the queue is empty and idle)."""
        log.info("worker %s taking jobs (max %d at once)", self.name, self.settings.max_concurrency)
        background = [
            asyncio.create_task(self._listen_for_cancels()),
            asyncio.create_task(self._reap_forever()),
            asyncio.create_task(self.admission.measure_forever()),
            asyncio.create_task(self._sweep_producers_forever()),
        ]
        self.leases.start()
        try:
            await self._take_jobs(burst)
        finally:
            await self._drain()  # the leases are renewed until every run has ended
            await cancel_and_wait(*background)
            await self.leases.stop()
            await self._leave_job_groups()

    async def _leave_job_groups(self) -> None:
        """Delete this worker's consumer from every shard's group (unless it still holds a job:
        a run whose end could not be published leaves its job for a reaper), so a restarted
        worker, which has a new name, does not leave one behind."""
        try:
            # Bounded: a worker stopping while Redis is down must not wait out every retry.
            async with asyncio.timeout(LEAVE_TIMEOUT):
                for stream in self.store.job_streams:
                    await self.store.forget_consumers(stream, 0, self.name)
        except (RedisError, OSError, TimeoutError) as e:
            # Redis down or slow: a live worker's reaper deletes the consumer later.
            log.info("could not remove this worker from the job groups: %r", e)

    async def _take_jobs(self, burst: bool) -> None:
        """One reader per job shard; they share this worker's capacity."""
        await asyncio.gather(*(self._read_shard(s, burst) for s in self.store.job_streams))

    async def _read_shard(self, stream: str, burst: bool) -> None:
        backoff = Backoff()
        group_ready = False
        # Each reader asks for at most its share, so one shard's blocking read does not hold
        # every free slot while jobs wait on another.
        share = max(1, self.settings.max_concurrency // len(self.store.job_streams))
        while not self._stopping.is_set():
            taken = len(self._tasks) + self._reserved
            free = min(share, self.settings.max_concurrency - taken)
            if free <= 0:
                if self._tasks:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(READ_BLOCK_MS / 1000)  # the others' reads hold it
                continue
            free = self.admission.allowance(free, taken)
            if free <= 0:
                # The loop runs late: the jobs wait in the queue (for any worker) until it
                # keeps time again.
                self.metrics.admission_waits.inc()
                await self.admission.next_sample()
                continue
            self._reserved += free  # so readers of other shards do not take the same slots
            try:
                if not group_ready:
                    await self.store.ensure_job_group(stream)
                    group_ready = True
                jobs = await self.store.read_jobs(stream, self.name, free, READ_BLOCK_MS)
                backoff.reset()
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    group_ready = False  # Redis lost its data: recreate the group
                    continue
                if not isinstance(e, CLUSTER_IN_TRANSITION):
                    raise
                await self._outage(e, backoff)
                continue
            except (RedisError, OSError) as e:
                await self._outage(e, backoff)
                continue
            finally:
                self._reserved -= free
            if self._stopping.is_set():
                break  # read after the stop: left pending, another worker's reaper takes them
            for entry, job in jobs:
                self._start(entry, job)
            if burst and not jobs and not self._tasks:
                return
            if jobs and self.admission.limited:
                await self.admission.next_sample()  # what these cost, before more are read

    async def _outage(self, error: Exception, backoff: Backoff) -> None:
        """Reading jobs failed for a reason that passes (Redis down, a failover): wait, retry."""
        self._healthy_since = time.monotonic()
        self.metrics.redis_errors.labels("jobs").inc()
        log.warning("reading jobs failed (%s); retrying in %.2fs", error, backoff.delay)
        await backoff.sleep()

    def _start(self, entry: JobEntry, job: Job) -> None:
        task = asyncio.create_task(self._run_job(entry, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, entry: JobEntry, job: Job) -> None:
        gen_id = job["gen"]
        logs.generation.set(gen_id)  # this task's log records carry the generation id
        # Registered before the claim, so a cancel notice (sent only for a running generation,
        # so after the claim) finds it: no read of the cancel flag after the claim is needed.
        registered = self._new_run(gen_id, entry, job)
        self.running[gen_id] = registered
        run: GenerationRun | None = None
        try:
            status = await self.store.claim(gen_id, self.name, self.settings.lease_ttl,
                                            job=f"{entry.stream} {entry.entry_id}")
            if status == "ok":
                # Renewed from now (no await since the claim) until the run has published its
                # terminal event: the claim's lease lasts a whole BROKER_LEASE_TTL, the keeper
                # renews it within a third of that.
                run = registered
                self.leases.hold(gen_id, entry, run.lease_state)
                waited = max(0, protocol.now_ms() - protocol.entry_time_ms(entry.entry_id))
                self.metrics.queue_wait.observe(waited / 1000)
            if job.get("producer"):
                # Taken (or never to run): it no longer counts against its producer's quota.
                # A failure here must not stop the run: a stale entry ages out of the quota.
                try:
                    await self.store.release_queue_slot(job["producer"], gen_id)
                except (RedisError, OSError):
                    self.metrics.redis_errors.labels("quota").inc()
            if run is not None:
                if not await self._run_generation(run):
                    # Its publish was refused: the generation is gone, or Redis's history went
                    # back behind this run (a lossy failover or restore) and the meta may still
                    # say running. Not acked: a reaper finds the job once the lease ran out and
                    # ends the generation with worker_lost if nothing else ended it.
                    return
            else:
                log.info("skipping generation %s: it is %s", gen_id, status or "gone")
            await self.store.ack_job(entry)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not acked: the job stays pending, where a lease reaper can find it.
            log.exception("generation %s failed in the worker", gen_id)
        finally:
            if run is not None:
                self.leases.release(gen_id)
            if self.running.get(gen_id) is registered:
                del self.running[gen_id]

    def _new_run(self, gen_id: str, entry: JobEntry, job: Job) -> GenerationRun:
        return GenerationRun(
            gen_id, job["request"], job_entry=entry, owner=self.name, store=self.store,
            llm=self.llm, settings=self.settings, metrics=self.metrics,
            on_published=self.admission.note_publish, batcher=self.batcher,
        )

    async def _run_generation(self, run: GenerationRun) -> bool:
        """Run it to its end; False if it stopped on a refused publish (``run.stopped``)."""
        gen_id = run.gen_id
        self.metrics.generations_running.inc()
        try:
            await run.run()
        finally:
            if self.running.get(gen_id) is run:
                del self.running[gen_id]
            self.metrics.generations_running.dec()
        log.info(
            "generation %s done: %d tokens in, %d events out, longest buffer wait %.0f ms",
            gen_id, run.tokens_in, run.publisher.seq, run.longest_wait * 1000,
        )
        return not run.stopped

    async def _drain(self) -> None:
        """Let running generations finish up to the drain timeout, then end the rest."""
        draining = len(self._tasks) if self._draining is None else self._draining
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.drain_timeout)
        cut_short = len(self.running)
        for run in self.running.values():
            run.shutdown_requested.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=SHUTDOWN_PUBLISH_TIMEOUT)
        stuck = len(self._tasks)
        # Ended for sure before the caller closes the LLM client and Redis under them.
        await cancel_and_wait(*self._tasks)
        log.info(
            "worker %s stopped: %d generation(s) finished during the drain, %d ended with "
            "worker_shutdown%s", self.name, draining - cut_short, cut_short,
            f", {stuck} cancelled (their end could not be published in "
            f"{SHUTDOWN_PUBLISH_TIMEOUT:g} s)" if stuck else "",
        )

    async def _reap_forever(self) -> None:
        """Find jobs whose worker stopped touching them: run the ones that never started, end
        the ones that did with ``worker_lost``; once a lease, delete the job groups' consumers
        of workers that are gone. Every worker runs this; Redis arbitrates."""
        cursors = dict.fromkeys(self.store.job_streams, "0-0")
        lease_ms = int(self.settings.lease_ttl * 1000)
        consumers_checked = time.monotonic()
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            if time.monotonic() - self._healthy_since < self.settings.lease_ttl:
                continue  # (the queue gauges wait too: they are updated on the same round)
            try:
                depth, oldest = await self.store.queue_stats()
                self.metrics.queue_depth.set(depth)
                self.metrics.oldest_pending_age.set(oldest)
                for stream, cursor in cursors.items():
                    cursors[stream], jobs = await self.store.reclaim_jobs(
                        stream, self.name, lease_ms, cursor, 16
                    )
                    for entry, job in jobs:
                        await self._reclaimed(entry, job)
                if time.monotonic() - consumers_checked >= self.settings.lease_ttl:
                    consumers_checked = time.monotonic()
                    for stream in self.store.job_streams:
                        await self.store.forget_consumers(
                            stream, CONSUMER_GONE_AFTER_LEASES * lease_ms
                        )
            except (RedisError, OSError) as e:
                self._healthy_since = time.monotonic()
                self.metrics.redis_errors.labels("reaper").inc()
                log.warning("reaping failed: %s", e)

    async def _sweep_producers_forever(self) -> None:
        """End external producers' generations whose producer fell silent (``producer_lost``):
        no job of theirs sits in the queue, and nobody may be watching them, so every worker
        (and every edge) sweeps the producers' lease index. Redis arbitrates: one ends each."""
        external = ExternalStore(self.store)

        async def check(gen_id: str) -> protocol.LeaseCheck:
            check = await self.store.reap(gen_id, self.name,
                                          time.monotonic() - self._healthy_since)
            if check.reaped:
                self.metrics.generations_finished.labels("failed").inc()
            return check

        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                await external.sweep(check, hold=4 * REAP_INTERVAL)
            except (RedisError, OSError, protocol.ProtocolError) as e:
                self._healthy_since = time.monotonic()
                self.metrics.redis_errors.labels("reaper").inc()
                log.warning("sweeping the producers' leases failed: %s", e)

    async def _reclaimed(self, entry: JobEntry, job: Job) -> None:
        gen_id = job["gen"]
        meta = await self.store.meta(gen_id)
        if meta is not None and meta.status == "queued":
            taken = len(self._tasks)
            if (not self._stopping.is_set() and taken < self.settings.max_concurrency
                    and self.admission.allowance(1, taken)):
                log.info("taking over generation %s: its worker never started it", gen_id)
                self._start(entry, job)
            return
        if meta is not None and meta.status == "running":
            healthy_for = time.monotonic() - self._healthy_since
            check = await self.store.reap(gen_id, self.name, healthy_for)
            if check.outcome == "running":
                return  # the lease still holds: its owner lives and will touch the job again
            if check.reaped:
                log.warning("generation %s: its worker was lost; ended it with worker_lost",
                            gen_id)
                self.metrics.generations_finished.labels("failed").inc()
                self.metrics.workers_lost.inc()
            # Else it ended since the meta was read (an edge reaped it first): only the job
            # is left to ack.
        await self.store.ack_job(entry)

    async def _listen_for_cancels(self) -> None:
        """Cancel notices arrive within milliseconds; the lease heartbeat is the fallback.

        Classic pub/sub on purpose: a cancel notice is for every worker, and on a cluster a
        PUBLISH reaches the subscribers of every node. After a failure it starts over on a new
        connection (on a cluster, possibly to another node: the old one may be gone). On one
        Redis the connection is the lean one the edge reads (``PushConnection``), and the
        worker's publishes travel on it too while it takes calls (``_publish_caller``)."""
        def failed(error: Exception, retry_in: float) -> None:
            self.metrics.redis_errors.labels("cancel_listener").inc()
            log.warning("the cancel listener's connection to Redis failed (%s); retrying in "
                        "%.2fs", error, retry_in)

        redis = self.store.redis
        if isinstance(redis, aioredis.RedisCluster):
            await subscribe_forever(
                lambda: redis.pubsub(ignore_subscribe_messages=True),
                self._cancel_notices, failed)
        else:
            await subscribe_forever(lambda: PushConnection(redis), self._cancel_pushes, failed)

    async def _cancel_notices(self, pubsub: PubSub, connected: Callable[[], None]) -> None:
        await pubsub.subscribe(protocol.CANCEL_CHANNEL)
        connected()
        while True:
            message = await pubsub.get_message(timeout=None)
            if message and message["type"] == "message":
                self._cancel_requested(protocol.as_text(message["data"]))

    async def _cancel_pushes(self, pubsub: PushConnection, connected: Callable[[], None]) -> None:
        try:
            await pubsub.connect()
            pubsub.send(b"SUBSCRIBE", protocol.CANCEL_CHANNEL)
            self._listener = pubsub
            connected()
            while True:
                for kind, _channel, data in await pubsub.read():
                    if kind == b"message":
                        self._cancel_requested(protocol.as_text(data))
        finally:
            self._listener = None

    def _cancel_requested(self, gen_id: str) -> None:
        run = self.running.get(gen_id)
        if run is not None:
            run.cancel_requested.set()

    def _publish_caller(self) -> PushConnection | None:
        listener = self._listener
        return listener if listener is not None and listener.takes_calls else None
