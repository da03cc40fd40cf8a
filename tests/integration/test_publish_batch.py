"""The worker's publish batcher (``worker.batch``) on a real redis-server: the publishes of
several generations handed over together go in one pipeline, each with its own result (a
refused one refuses only itself), and each generation's log is what its calls wrote."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from broker.core import protocol
from broker.core.pubsub import PushConnection
from broker.core.store import Store
from worker.batch import PublishBatcher


async def running(store: Store, owner: str) -> str:
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m")
    assert await store.claim(gen_id, owner, 5.0) == "ok"
    return gen_id


async def test_publishes_ready_together_go_in_one_pipeline_each_with_its_result(
    own_store: Store,
) -> None:
    gens = [await running(own_store, "w1") for _ in range(3)]
    batcher = PublishBatcher(own_store)
    now = protocol.now_ms()
    results = await asyncio.gather(
        batcher.publish(gens[0], "w1", 1, [protocol.new_message("one. ")], now),
        batcher.publish(gens[1], "w1", 1, [protocol.new_message("two. ")], now),
        batcher.publish(gens[2], "someone-else", 1, [protocol.new_message("no. ")], now),
        batcher.publish(gens[0], "w1", 2, [protocol.new_end("stop", None)], now),
    )
    assert results == [1, 1, -2, 1]  # published, published, not ours, published
    assert batcher.batches == 1
    texts = [(await own_store.snapshot(g)) for g in gens]
    assert [s.text if s else None for s in texts] == ["one. ", "two. ", ""]
    assert [s.meta.status if s else None for s in texts] == ["completed", "running", "running"]
    # A repeat (a retry after a lost reply) is harmless, alone or batched.
    assert await batcher.publish(gens[1], "w1", 1, [protocol.new_message("two. ")], now) == 0


async def test_a_lone_publish_goes_as_before(own_store: Store) -> None:
    gen_id = await running(own_store, "w1")
    batcher = PublishBatcher(own_store)
    assert await batcher.publish(gen_id, "w1", 1, [protocol.new_message("a. ")],
                                 protocol.now_ms()) == 1
    assert batcher.batches == 0


async def test_publishes_on_a_given_connection_answer_as_through_redis_py(
    own_store: Store,
) -> None:
    """The worker's publishes on its cancel listener's connection (``PushConnection.call``):
    the same results (a repeat 0, someone else's -2); a Redis that lost its scripts and a
    connection that is gone send the call through redis-py instead."""
    assert isinstance(own_store.redis, aioredis.Redis)  # (one Redis, not a cluster)
    listener = PushConnection(own_store.redis)
    await listener.connect()
    listener.send(b"SUBSCRIBE", protocol.CANCEL_CHANNEL)
    reading = asyncio.create_task(read_forever(listener))
    try:
        gens = [await running(own_store, "w1") for _ in range(2)]
        batcher = PublishBatcher(own_store, lambda: listener)
        now = protocol.now_ms()
        results = await asyncio.gather(
            batcher.publish(gens[0], "w1", 1, [protocol.new_message("one. ")], now),
            batcher.publish(gens[1], "someone-else", 1, [protocol.new_message("no. ")], now),
        )
        assert results == [1, -2] and batcher.batches == 0
        assert await batcher.publish(gens[0], "w1", 1, [protocol.new_message("one. ")], now) == 0
        await own_store.redis.script_flush()
        assert await batcher.publish(gens[0], "w1", 2, [protocol.new_message("two. ")], now) == 1
        await listener.aclose()
        assert await batcher.publish(gens[0], "w1", 3, [protocol.new_end("stop", None)], now) == 1
        snapshot = await own_store.snapshot(gens[0])
        assert snapshot is not None
        assert (snapshot.text, snapshot.meta.status) == ("one. two. ", "completed")
    finally:
        reading.cancel()
        await listener.aclose()


async def read_forever(listener: PushConnection) -> None:
    while True:
        await listener.read()
