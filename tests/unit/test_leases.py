"""Leases judged by Redis's clock (the scripts, on fakeredis[lua]), the edge's lease watch and
its check scheduling, and the worker's side of a generation an edge reaped."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core import protocol
from broker.core.metrics import Metrics
from broker.core.protocol import Event, LeaseCheck, Meta
from broker.core.settings import Settings
from broker.core.store import Store
from broker.edge.leases import QUEUED_RECHECK_INTERVALS, FirstCheck, LeaseWatch, Schedule
from broker.edge.topic import Frame, Topic
from tests.support.procs import eventually
from worker.llm import LLM
from worker.loop import Worker

HEALTHY = 3600.0  # a caller that has seen Redis healthy for longer than any lease here


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def new_store() -> Store:
    return Store(fakeredis.FakeAsyncRedis(), Settings())


async def redis_ms(store: Store) -> int:
    seconds, micros = await store.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def meta(store: Store, gen_id: str) -> dict[str, str]:
    raw = await store.redis.hgetall(protocol.meta_key(gen_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def log(store: Store, gen_id: str) -> list[Event]:
    return await store.read_log(gen_id, 0, 100)


async def running(store: Store, lease_ttl: float, owner: str = "w1") -> str:
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m")
    assert await store.claim(gen_id, owner, lease_ttl) == "ok"
    return gen_id


async def expire_lease(store: Store, gen_id: str) -> None:
    """Its worker died a while ago: the lease ran out by Redis's clock."""
    await store.redis.hset(protocol.meta_key(gen_id), "lease", await redis_ms(store) - 1)


# -- the scripts: Redis's clock decides ------------------------------------------------------


async def test_claim_and_heartbeat_set_the_lease_by_redis_time() -> None:
    store = new_store()
    before = await redis_ms(store)
    gen_id = await running(store, 5.0)
    fields = await meta(store, gen_id)
    after = await redis_ms(store)
    assert before + 5000 <= int(fields["lease"]) <= after + 5000
    assert fields["lease_ttl"] == "5000" and fields["owner"] == "w1"

    assert await store.heartbeat(gen_id, "w1", 8.0) == "run"
    renewed = await meta(store, gen_id)
    assert after + 8000 <= int(renewed["lease"]) <= await redis_ms(store) + 8000
    assert renewed["lease_ttl"] == "8000"
    assert await store.heartbeat(gen_id, "someone-else", 8.0) == "lost"
    assert (await meta(store, gen_id))["lease"] == renewed["lease"]


@pytest.mark.parametrize("caller_clock_off_by_ms", [-3_600_000, 3_600_000])
async def test_a_callers_clock_plays_no_part(
    monkeypatch: pytest.MonkeyPatch, caller_clock_off_by_ms: int
) -> None:
    """A worker or an edge whose clock is an hour off neither writes a lease that is already
    over (or lasts an hour), nor judges a live one over."""
    store = new_store()
    real_now_ms = protocol.now_ms
    monkeypatch.setattr(protocol, "now_ms", lambda: real_now_ms() + caller_clock_off_by_ms)
    gen_id = await running(store, 5.0)
    lease = int((await meta(store, gen_id))["lease"])
    assert abs(lease - (await redis_ms(store) + 5000)) < 1000
    check = await store.reap(gen_id, "edge", HEALTHY)
    assert check.outcome == "running" and 4.0 < check.wait <= 5.0
    assert await log(store, gen_id) == []


async def test_a_lease_that_holds_is_not_reaped_and_says_how_long_it_holds() -> None:
    store = new_store()
    gen_id = await running(store, 5.0)
    check = await store.reap(gen_id, "edge", HEALTHY)
    assert check == LeaseCheck("running", check.wait, 5.0) and 4.5 < check.wait <= 5.0
    assert (await meta(store, gen_id))["status"] == "running"
    assert await log(store, gen_id) == []


async def test_an_expired_lease_waits_until_the_reaper_saw_redis_healthy_for_a_lease() -> None:
    store = new_store()
    gen_id = await running(store, 5.0)
    await expire_lease(store, gen_id)
    check = await store.reap(gen_id, "edge", healthy_for=1.5)
    assert check == LeaseCheck("running", 3.5, 5.0)  # 5 s of health needed, 1.5 s seen
    assert await log(store, gen_id) == []
    assert (await store.reap(gen_id, "edge", healthy_for=5.0)).reaped


async def test_an_expired_lease_is_reaped_once_with_worker_lost() -> None:
    store = new_store()
    gen_id = await running(store, 5.0)
    assert await store.publish(gen_id, "w1", 1, [protocol.new_message("Half an answer.")]) == 1
    await expire_lease(store, gen_id)
    lease = int((await meta(store, gen_id))["lease"])

    checks = await asyncio.gather(*(store.reap(gen_id, f"edge-{i}", HEALTHY) for i in range(8)))
    assert [c.outcome for c in checks].count("reaped") == 1
    assert {c.outcome for c in checks} == {"reaped", "failed"}

    events = await log(store, gen_id)
    assert [(e.seq, e.kind) for e in events] == [(1, "message"), (2, "error")]
    assert json.loads(events[1].data)["code"] == "worker_lost"
    assert events[1].published_ms >= lease  # Redis's clock, past the lease
    fields = await meta(store, gen_id)
    assert fields["status"] == "failed" and fields["finish_reason"] == "error"
    assert fields["seq"] == "2" and fields["owner"].startswith("edge-")
    # The stalled owner, should it come back: refused, and told it lost the lease.
    assert await store.publish(gen_id, "w1", 2, [protocol.new_message("More.")]) == -2
    assert await store.heartbeat(gen_id, "w1", 5.0) == "lost"
    assert len(await log(store, gen_id)) == 2


async def test_queued_ended_and_unknown_generations_have_no_lease_to_reap() -> None:
    store = new_store()
    queued = protocol.new_generation_id()
    await store.create(queued, {"messages": []}, "m")
    assert await store.reap(queued, "edge", HEALTHY) == LeaseCheck("queued", 0.0, 0.0)
    assert await store.cancel(queued) == "queued"
    assert await store.reap(queued, "edge", HEALTHY) == LeaseCheck("cancelled", 0.0, 0.0)
    unknown = protocol.new_generation_id()
    assert await store.reap(unknown, "edge", HEALTHY) == LeaseCheck("", 0.0, 0.0)
    assert [e.kind for e in await log(store, queued)] == ["end"]


# -- the stream request's meta read, with the lease's first check (STREAM_META_SCRIPT) ----------


async def test_the_stream_meta_read_checks_a_holding_lease_and_answers_the_meta() -> None:
    store = new_store()
    gen_id = await running(store, 5.0)
    assert await store.publish(gen_id, "w1", 1, [protocol.new_message("Hello.")]) == 1
    found, check = await store.stream_meta(gen_id, "edge", HEALTHY)
    assert found == await store.meta(gen_id)  # the same Meta as the plain read
    assert found is not None and found.status == "running" and found.seq == 1
    assert found.counts == {"message": 1}
    assert check == LeaseCheck("running", check.wait, 5.0) and 4.5 < check.wait <= 5.0
    assert [e.kind for e in await log(store, gen_id)] == ["message"]


async def test_the_stream_meta_read_reaps_an_expired_lease_and_answers_the_meta_after() -> None:
    store = new_store()
    gen_id = await running(store, 5.0)
    await expire_lease(store, gen_id)
    found, check = await store.stream_meta(gen_id, "edge", healthy_for=1.5)
    assert check == LeaseCheck("running", 3.5, 5.0)  # not healthy for a lease yet
    assert found is not None and found.status == "running"
    found, check = await store.stream_meta(gen_id, "edge", HEALTHY)
    assert check == LeaseCheck("reaped", 0.0, 5.0)
    assert found is not None and found.status == "failed" and found.seq == 1
    events = await log(store, gen_id)
    assert [(e.seq, e.kind) for e in events] == [(1, "error")]
    assert json.loads(events[0].data)["code"] == "worker_lost"


async def test_the_stream_meta_read_of_queued_ended_and_unknown_generations() -> None:
    store = new_store()
    queued = protocol.new_generation_id()
    await store.create(queued, {"messages": []}, "m")
    found, check = await store.stream_meta(queued, "edge", HEALTHY)
    assert check == LeaseCheck("queued", 0.0, 0.0)
    assert found is not None and found.status == "queued" and found.seq == 0
    await store.cancel(queued)
    found, check = await store.stream_meta(queued, "edge", HEALTHY)
    assert check == LeaseCheck("cancelled", 0.0, 0.0)
    assert found is not None and found.finished and found.seq == 1
    unknown = protocol.new_generation_id()
    assert await store.stream_meta(unknown, "edge", HEALTHY) == (None, LeaseCheck("", 0.0, 0.0))


def test_a_malformed_stream_meta_reply_is_a_protocol_error() -> None:
    for reply in ([b"running", 0, 0], [b"running", 0, 0, [b"status"]], None):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_stream_meta(reply)


def test_a_malformed_lease_check_reply_is_a_protocol_error() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_lease_check([b"running"])
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_lease_check([b"running", b"soon", 5000])


# -- scheduling -------------------------------------------------------------------------------


def test_a_running_lease_is_checked_again_when_it_would_run_out() -> None:
    schedule = Schedule()
    assert schedule.follow(LeaseCheck("running", 3.2, 5.0), now=100.0, interval=1.0)
    assert schedule.at == pytest.approx(103.2)
    assert schedule.quiet == 5.0
    assert schedule.due(last_live=0.0) == pytest.approx(103.2)


def test_live_events_postpone_the_check_until_a_lease_of_quiet() -> None:
    schedule = Schedule()
    schedule.follow(LeaseCheck("running", 1.0, 5.0), now=100.0, interval=1.0)
    assert schedule.due(last_live=99.0) == pytest.approx(104.0)  # quiet since 99: 99 + 5
    assert schedule.due(last_live=110.0) == pytest.approx(115.0)  # still publishing at 110
    assert schedule.due(last_live=90.0) == pytest.approx(101.0)  # quiet for long: the lease


def test_a_queued_generation_is_rechecked_with_a_doubling_delay_up_to_a_cap() -> None:
    schedule, now, delays = Schedule(), 0.0, []
    for _ in range(6):
        assert schedule.follow(LeaseCheck("queued", 0.0, 0.0), now=now, interval=0.5)
        delays.append(schedule.at - now)
        now = schedule.at
    assert delays == [0.5, 1.0, 2.0, QUEUED_RECHECK_INTERVALS * 0.5, 2.0, 2.0]
    # Once it runs, the lease decides, and a later queue phase (none) would start over.
    assert schedule.follow(LeaseCheck("running", 4.0, 5.0), now=now, interval=0.5)
    assert schedule.at == now + 4.0 and schedule.queued_wait == 0.0


@pytest.mark.parametrize("outcome", ["reaped", "completed", "failed", "cancelled", ""])
def test_an_ended_or_unknown_generation_is_not_checked_again(outcome: str) -> None:
    assert not Schedule().follow(LeaseCheck(outcome, 0.0, 5.0), now=1.0, interval=1.0)


# -- the lease watch -----------------------------------------------------------------------------


class CountingStore(Store):
    """fakeredis, counting lease checks; ``failures`` first checks fail like a Redis restart."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(fakeredis.FakeAsyncRedis(), Settings())
        self.checks: list[tuple[float, LeaseCheck | None]] = []
        self.failures = failures

    async def reap(self, gen_id: str, reaper: str, healthy_for: float) -> LeaseCheck:
        if self.failures:
            self.failures -= 1
            self.checks.append((time.monotonic(), None))
            raise RedisConnectionError("Redis restarting")
        check = await super().reap(gen_id, reaper, healthy_for)
        self.checks.append((time.monotonic(), check))
        return check


def lease_watch(store: Store, metrics: Metrics | None = None, interval: float = 0.05,
                healthy: float = HEALTHY) -> LeaseWatch:
    return LeaseWatch(store, metrics or Metrics(), interval=interval, name="edge-test",
                      healthy_for=lambda gen_id: healthy)


async def until_reaped(store: CountingStore, gen_id: str, within: float) -> None:
    """Until the watch's check that reaped ``gen_id`` is on record. Not until the meta shows
    the end: the reap's script writes that before its reply reaches the watch, and a runner
    cancelled in between never records the check."""
    async def reaped() -> bool:
        return any(check is not None and check.reaped for _, check in store.checks)

    await eventually(reaped, within, "the check that reaps the generation")
    assert (await meta(store, gen_id))["status"] == "failed"


async def test_the_watch_checks_at_once_then_when_the_lease_runs_out_and_reaps() -> None:
    store, metrics = CountingStore(), Metrics()
    lease_ttl = 1.0
    gen_id = await running(store, lease_ttl)
    watch = lease_watch(store, metrics)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(Topic(gen_id, 16))
        await until_reaped(store, gen_id, within=lease_ttl + 1)
    finally:
        runner.cancel()
    # Two calls: at once (the lease holds for ~1 s), then when it runs out; no polling.
    assert [c.outcome for _, c in store.checks if c] == ["running", "reaped"]
    first_at, first = store.checks[0]
    assert first is not None
    assert store.checks[1][0] - first_at >= first.wait
    assert [e.kind for e in await log(store, gen_id)] == ["error"]
    assert sample(metrics, "broker_leases_reaped_total") == 1
    assert sample(metrics, "broker_lease_checks_total") == 2


async def test_a_watch_that_starts_from_a_stream_meta_check_does_not_check_again_at_once(
) -> None:
    store, metrics = CountingStore(), Metrics()
    lease_ttl = 1.0
    gen_id = await running(store, lease_ttl)
    watch = lease_watch(store, metrics)
    _, first = await store.stream_meta(gen_id, "edge", HEALTHY)
    watch.checked(gen_id, first)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(Topic(gen_id, 16), FirstCheck(first, time.monotonic()))
        await asyncio.sleep(0.2)
        assert store.checks == []  # the stream's read was the first check
        await until_reaped(store, gen_id, within=lease_ttl + 1)
    finally:
        runner.cancel()
    assert [c.outcome for _, c in store.checks if c] == ["reaped"]  # when the lease ran out
    assert sample(metrics, "broker_lease_checks_total") == 2  # the stream's, the watch's
    assert sample(metrics, "broker_leases_reaped_total") == 1


@pytest.mark.parametrize("outcome", ["reaped", "completed", "failed", ""])
async def test_a_watch_that_starts_from_a_check_of_an_ended_generation_checks_nothing(
    outcome: str,
) -> None:
    store = CountingStore()
    watch = lease_watch(store)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(Topic("gen", 16), FirstCheck(LeaseCheck(outcome, 0.0, 0.0), time.monotonic()))
        await asyncio.sleep(0.1)
    finally:
        runner.cancel()
    assert store.checks == [] and watch._watched == {}


async def test_a_topic_with_live_events_is_not_checked_until_it_goes_quiet() -> None:
    """Events prove the worker alive: while they come, no call; once they stop, the check
    waits a whole lease of quiet."""
    store = CountingStore()
    lease_ttl = 0.5
    gen_id = await running(store, lease_ttl)
    topic = Topic(gen_id, 64)
    watch = lease_watch(store)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(topic)
        started = time.monotonic()
        for seq in range(1, 31):  # 1.5 s of events, 3 leases: the lease is never renewed
            topic.offer(Frame(seq, b"data: x\n\n", False, 0))
            await asyncio.sleep(0.05)
        assert len(store.checks) == 1  # the first one, at once
        await until_reaped(store, gen_id, within=lease_ttl + 1)
    finally:
        runner.cancel()
    reaped_at, reaped = store.checks[-1]
    assert reaped is not None and reaped.reaped and len(store.checks) == 2
    assert reaped_at >= topic.last_live + lease_ttl
    assert reaped_at - started >= 1.5


async def test_a_forgotten_topic_is_not_checked_again() -> None:
    store = CountingStore()
    gen_id = await running(store, 0.1)
    topic = Topic(gen_id, 16)
    watch = lease_watch(store)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(topic)
        async def checked() -> bool:
            return bool(store.checks)

        await eventually(checked, 1, "the first check")
        watch.forget(topic)  # its last viewer left
        await asyncio.sleep(0.3)  # three leases: a watched topic would have been reaped
    finally:
        runner.cancel()
    assert len(store.checks) == 1
    assert (await meta(store, gen_id))["status"] == "running"


async def test_a_failed_check_is_retried_after_the_interval() -> None:
    store = CountingStore(failures=2)
    gen_id = await running(store, 0.05)
    await expire_lease(store, gen_id)
    watch = lease_watch(store, interval=0.05)
    runner = asyncio.create_task(watch.run())
    try:
        watch.watch(Topic(gen_id, 16))
        await until_reaped(store, gen_id, within=1)
    finally:
        runner.cancel()
    assert [c and c.outcome for _, c in store.checks] == [None, None, "reaped"]
    assert store.checks[2][0] - store.checks[0][0] >= 2 * 0.05


async def test_an_edge_that_just_saw_redis_fail_does_not_reap_yet() -> None:
    store = CountingStore()
    gen_id = await running(store, 5.0)
    await expire_lease(store, gen_id)
    check = await lease_watch(store, healthy=0.0).check(gen_id)
    assert check == LeaseCheck("running", 5.0, 5.0)
    assert (await meta(store, gen_id))["status"] == "running"


# -- the worker's side -------------------------------------------------------------------------


def worker_on(store: Store) -> Worker:
    settings = Settings(lease_ttl=5.0)
    return Worker(store, LLM(settings), settings, Metrics(), name="w2")


async def pending_job(store: Store, gen_id: str) -> tuple[Any, Any]:
    """The generation's job as a dead worker left it: read from the group, never acked."""
    stream = store.job_stream_of(gen_id)
    await store.ensure_job_group(stream)
    [(entry, job)] = await store.read_jobs(stream, "w1", 1, 0)
    return entry, job


async def pending_count(store: Store, gen_id: str) -> int:
    pending = await store.redis.xpending(store.job_stream_of(gen_id), protocol.WORKER_GROUP)
    return int(pending["pending"])


async def test_a_worker_acks_the_job_of_a_generation_an_edge_reaped() -> None:
    store = new_store()
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m")
    entry, job = await pending_job(store, gen_id)
    assert await store.claim(gen_id, "w1", 5.0) == "ok"
    await expire_lease(store, gen_id)
    assert (await store.reap(gen_id, "edge", HEALTHY)).reaped

    worker = worker_on(store)
    await worker._reclaimed(entry, job)  # its reaper's step, in isolation
    assert await pending_count(store, gen_id) == 0
    assert [e.kind for e in await log(store, gen_id)] == ["error"]
    assert sample(worker.metrics, "broker_workers_lost_total") == 0
    assert not worker._tasks  # not run again


class EdgeReapsDuringTheRead(Store):
    """A store whose meta read answers `running` while an edge reaps the generation before the
    worker's own reap call (the race of a real read against the edge's script)."""

    async def meta(self, gen_id: str, via: Any = None) -> Meta | None:
        before = await super().meta(gen_id, via)
        assert (await self.reap(gen_id, "edge", HEALTHY)).reaped
        return before


async def test_a_worker_that_loses_the_reap_race_to_an_edge_acks_the_job() -> None:
    store = EdgeReapsDuringTheRead(fakeredis.FakeAsyncRedis(), Settings())
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m")
    entry, job = await pending_job(store, gen_id)
    assert await store.claim(gen_id, "w1", 5.0) == "ok"
    await expire_lease(store, gen_id)

    worker = worker_on(store)
    worker._healthy_since -= 10  # it has seen Redis healthy for two leases
    await worker._reclaimed(entry, job)
    assert await pending_count(store, gen_id) == 0
    assert [e.kind for e in await log(store, gen_id)] == ["error"]
    assert sample(worker.metrics, "broker_workers_lost_total") == 0


async def test_a_worker_leaves_the_job_of_a_live_lease_pending() -> None:
    store = new_store()
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m")
    entry, job = await pending_job(store, gen_id)
    assert await store.claim(gen_id, "w1", 5.0) == "ok"
    await worker_on(store)._reclaimed(entry, job)
    assert await pending_count(store, gen_id) == 1
    assert await log(store, gen_id) == []
