"""The scripts on real Redis: ``TIME`` inside a script on redis-server 7 (replicated by its
effects: a replica holds the very lease the master wrote), on a Redis Cluster (the scripts
touch one slot), many reapers racing for one expired lease, and a batch of typed events
published at once and read back as ``GET /v1/generations/{id}`` shows it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import RedisClient, Store, connect
from tests.support.cluster import RedisClusterServers
from tests.support.procs import RedisServer, eventually, wait_until

HEALTHY = 3600.0


@pytest.fixture(params=["redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url = cluster.url
    else:
        url = request.getfixturevalue("redis_server").url
    settings = Settings(redis_url=url)
    client = connect(settings, "lease-scripts-test")
    yield Store(client, settings)
    await close(client)


async def close(client: RedisClient) -> None:
    await client.aclose()
    if isinstance(client, aioredis.Redis):  # its pool was given to it: not closed with it
        await client.connection_pool.disconnect()


async def redis_ms(store: Store, gen_id: str) -> int:
    """Redis's clock on the node that serves ``gen_id``."""
    if store.cluster:
        node = store.redis.get_node_from_key(protocol.meta_key(gen_id))  # type: ignore[union-attr]
        seconds, micros = await store.redis.time(target_nodes=node)  # type: ignore[call-arg]
    else:
        seconds, micros = await store.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def queued(store: Store) -> str:
    """A queued generation with no job: the session's workers on these servers must not
    claim it before the test does."""
    gen_id = protocol.new_generation_id()
    await store.redis.hset(protocol.meta_key(gen_id), mapping=protocol.new_meta("m"))
    await store.redis.pexpire(protocol.meta_key(gen_id), 60_000)
    return gen_id


async def running(store: Store, lease_ttl: float) -> str:
    gen_id = await queued(store)
    assert await store.claim(gen_id, "w1", lease_ttl) == "ok"
    return gen_id


async def test_claim_and_heartbeat_write_redis_time_plus_the_ttl(store: Store) -> None:
    gen_id = await queued(store)
    before = await redis_ms(store, gen_id)
    assert await store.claim(gen_id, "w1", 5.0) == "ok"
    after = await redis_ms(store, gen_id)
    lease = int(await store.redis.hget(protocol.meta_key(gen_id), "lease"))
    assert before + 5000 <= lease <= after + 5000

    assert await store.heartbeat(gen_id, "w1", 7.0) == "run"
    renewed = int(await store.redis.hget(protocol.meta_key(gen_id), "lease"))
    assert after + 7000 <= renewed <= await redis_ms(store, gen_id) + 7000

    check = await store.reap(gen_id, "edge", HEALTHY)
    assert check.outcome == "running" and 6.0 < check.wait <= 7.0 and check.lease_ttl == 7.0


async def test_the_stream_meta_read_checks_the_lease_and_answers_the_meta(store: Store) -> None:
    """STREAM_META_SCRIPT on redis-server and on a cluster: REAP_SCRIPT's answer, and the meta
    as ``Store.meta`` reads it (the reply nests the hash's flat list)."""
    gen_id = await running(store, 5.0)
    meta, check = await store.stream_meta(gen_id, "edge", HEALTHY)
    assert meta == await store.meta(gen_id)
    assert meta is not None and meta.status == "running" and meta.seq == 0
    assert check.outcome == "running" and 4.0 < check.wait <= 5.0 and check.lease_ttl == 5.0
    unknown = protocol.new_generation_id()
    assert await store.stream_meta(unknown, "edge", HEALTHY) == (
        None, protocol.LeaseCheck("", 0.0, 0.0))


async def test_many_reapers_racing_for_an_expired_lease_end_it_once(store: Store) -> None:
    gen_id = await running(store, 0.001)
    lease = int(await store.redis.hget(protocol.meta_key(gen_id), "lease"))

    async def lease_over() -> bool:
        return await redis_ms(store, gen_id) > lease

    await eventually(lease_over, 2, "a 1 ms lease to run out")
    checks = await asyncio.gather(*(store.reap(gen_id, f"reaper-{i}", HEALTHY)
                                    for i in range(20)))
    assert [c.outcome for c in checks].count("reaped") == 1
    assert {c.outcome for c in checks} == {"reaped", "failed"}
    events = await store.read_log(gen_id, 0, 10)
    assert [(e.seq, e.kind) for e in events] == [(1, "error")]
    assert json.loads(events[0].data)["code"] == "worker_lost"
    assert events[0].published_ms > lease


async def test_a_replica_holds_the_lease_the_master_wrote() -> None:
    """Effects replication: the replica gets the HSET with the value TIME gave on the master,
    not the script to run again against its own clock."""
    master = RedisServer().start()
    replica = RedisServer("--replicaof", "127.0.0.1", str(master.port)).start()
    settings = Settings(redis_url=master.url)
    client = connect(settings, "lease-replication-test")
    try:
        wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up",
                   10, "the replica to sync")
        store = Store(client, settings)
        gen_id = await running(store, 5.0)
        await store.heartbeat(gen_id, "w1", 5.0)
        assert await client.execute_command("WAIT", 1, 5000) == 1
        key = protocol.meta_key(gen_id)
        on_master = await client.hgetall(key)
        assert replica.client().hgetall(key) == on_master
        assert int(on_master[b"lease"]) > 0 and on_master[b"lease_ttl"] == b"5000"
    finally:
        await close(client)
        replica.stop()
        master.stop()


async def test_a_batch_of_every_kind_is_published_at_once_and_read_back(store: Store) -> None:
    """Every key a publish touches shares the generation's slot (a cluster refuses a script
    whose keys do not), and the snapshot reads them back in one round trip."""
    gen_id = await running(store, 60.0)
    first = [protocol.new_reasoning("Think 🤔. "), protocol.new_message("Hi\u2028there. ")]
    rest = [
        protocol.new_tool_call(0, "call_1", "get_weather", '{"city":"東京"}'),
        protocol.new_tool_result("call_1", {"temp": 21}),
        protocol.new_data("sources", ["https://example.com"]),
        protocol.new_reasoning("Done."),
        protocol.new_end("tool_calls", None),
    ]
    assert await store.publish(gen_id, "w1", 1, first) == 1
    assert await store.publish(gen_id, "w1", 1, first) == 0  # a retry
    assert await store.publish(gen_id, "w1", 3, rest) == 1
    events = await store.read_log(gen_id, 0, 100)
    assert [e.kind for e in events] == [e.kind for e in first + rest]
    assert [e.seq for e in events] == list(range(1, 8))
    snapshot = await store.snapshot(gen_id)
    assert snapshot is not None
    assert snapshot.text == "Hi\u2028there. " and snapshot.reasoning == "Think 🤔. Done."
    assert snapshot.tool_calls == [
        {"index": 0, "id": "call_1", "name": "get_weather", "arguments": '{"city":"東京"}'}]
    assert snapshot.meta.status == "completed" and snapshot.meta.finish_reason == "tool_calls"
    assert snapshot.meta.event_counts() == {
        "message": 1, "reasoning": 2, "tool_call": 1, "tool_result": 1, "data": 1}
    assert await store.snapshot(protocol.new_generation_id()) is None
