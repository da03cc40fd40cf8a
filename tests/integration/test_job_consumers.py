"""The job groups forget gone workers: every worker has a new consumer name per process, so
without this each restart would leave a consumer in every shard's group for good (found by the
chaos run as Redis memory that never came back)."""

from __future__ import annotations

import asyncio
import signal

import fakeredis

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store
from tests.support.fakellm import FakeLLM
from tests.support.procs import BrokerProcess, RedisServer, eventually

STREAM = protocol.jobs_stream(0)
LEASE_TTL = 1.0  # the live worker's lease in the last test: the idle bound is three of them




async def consumers(store: Store, stream: str = STREAM) -> dict[str, int]:
    """The group's consumers: name -> pending jobs."""
    infos = await store.redis.xinfo_consumers(stream, protocol.WORKER_GROUP)
    return {info["name"].decode(): int(info["pending"]) for info in infos}


async def group_with(store: Store, *, holding: str | None, idle: list[str],
                     stream: str = STREAM) -> None:
    """A job group where ``holding`` has one job pending and each of ``idle`` ran one job and
    acked it (Redis makes a consumer when it is first handed an entry)."""
    await store.ensure_job_group(stream)
    for name in [*idle, holding] if holding else idle:
        await store.redis.xadd(stream, {"gen": "g", "request": "{}"})
        reply = await store.redis.xreadgroup(protocol.WORKER_GROUP, name, {stream: ">"}, count=1)
        if name != holding:
            [[_stream, [[entry_id, _fields]]]] = reply
            await store.redis.xack(stream, protocol.WORKER_GROUP, entry_id)
            await store.redis.xdel(stream, entry_id)


async def test_only_consumers_holding_no_job_and_idle_long_enough_are_deleted(own_store: Store):
    await group_with(own_store, holding="busy", idle=["gone-1", "gone-2"])
    assert await own_store.forget_consumers(STREAM, 60_000) == 0  # none idle for a minute yet
    assert await own_store.forget_consumers(STREAM, 0) == 2
    assert await consumers(own_store) == {"busy": 1}  # its job is still pending, still its own
    assert await own_store.forget_consumers(STREAM, 0, "busy") == 0


async def test_a_named_consumer_alone_is_deleted(own_store: Store):
    await group_with(own_store, holding="busy", idle=["me", "other"])
    assert await own_store.forget_consumers(STREAM, 0, "me") == 1
    assert await consumers(own_store) == {"busy": 1, "other": 0}


async def test_no_stream_or_no_group_deletes_nothing(own_store: Store):
    assert await own_store.forget_consumers("{broker:jobs:none}", 0) == 0
    await own_store.redis.xadd(STREAM, {"gen": "g", "request": "{}"})  # a stream without the group
    assert await own_store.forget_consumers(STREAM, 0) == 0


async def test_the_script_runs_on_broker_devs_in_memory_store():
    redis = fakeredis.FakeAsyncRedis()
    store = Store(redis, Settings())
    await group_with(store, holding="busy", idle=["gone"])
    assert await store.forget_consumers(STREAM, 0) == 1
    assert await consumers(store) == {"busy": 1}


def start_worker(redis: RedisServer, llm: FakeLLM, **env: str) -> BrokerProcess:
    worker = BrokerProcess("worker", {
        "REDIS_URL": redis.url, "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "k", **env,
    }, own_metrics_port=False)
    worker.wait_for_log("taking jobs")
    return worker


async def test_a_stopping_worker_leaves_every_job_group(
    own_redis: RedisServer, fake_llm: FakeLLM, own_store: Store,
):
    # As if the worker named "leaving" had run a job in every shard (the lease stays the
    # default, 5 s: its own reaper would need 15 s to delete an idle consumer).
    for stream in own_store.job_streams:
        await group_with(own_store, holding="other", idle=["leaving"], stream=stream)
    worker = start_worker(own_redis, fake_llm, BROKER_WORKER_ID="leaving")
    try:
        worker.signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
        for stream in own_store.job_streams:  # gone at once, the other's pending job untouched
            assert await consumers(own_store, stream) == {"other": 1}
    finally:
        worker.stop()


async def test_a_live_worker_deletes_the_consumers_of_workers_that_are_gone(
    own_redis: RedisServer, fake_llm: FakeLLM, own_store: Store,
):
    # Two workers killed before this one started (one killed holding a job is the reaper's:
    # it takes the job over, then the consumer holds none either).
    for stream in own_store.job_streams:
        await group_with(own_store, holding=None, idle=["killed-1", "killed-2"], stream=stream)
    worker = start_worker(own_redis, fake_llm, BROKER_LEASE_TTL=str(LEASE_TTL))
    try:
        async def forgotten() -> bool:
            return all([await consumers(own_store, s) == {} for s in own_store.job_streams])

        # Idle three leases, checked once a lease: + a reaper round + slack for a busy host.
        bound = 3 * LEASE_TTL + LEASE_TTL + 1.0 + 5.0
        await eventually(forgotten, bound, "the gone workers' consumers to be deleted")
    finally:
        worker.stop()
