"""The worker's publish batcher (``worker.batch``) on a real redis-server: the publishes of
several generations handed over together go in one pipeline, each with its own result (a
refused one refuses only itself), and each generation's log is what its calls wrote."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.core import protocol, pubsub
from broker.core.pubsub import PushConnection
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.core.tasks import cancel_and_wait
from tests.support.procs import RedisServer, eventually
from tests.support.tcpproxy import TcpProxy
from worker.batch import PublishBatcher
from worker.llm import LLM
from worker.loop import Worker


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


async def test_a_frozen_cancel_listener_costs_one_timeout_and_is_replaced(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's listener stops delivering (a frozen connection): the publish waiting on it
    gives up after ``CALL_TIMEOUT`` and is made again through redis-py (it had run: the
    repeat answers 0), the listener starts over on a new connection, and the publishes after
    go there, at once."""
    monkeypatch.setattr(pubsub, "CALL_TIMEOUT", 0.3)
    proxy = TcpProxy(own_redis.port).start()
    settings = Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0", openai_api_key="k")
    client = connect(settings, "frozen-listener")
    store = Store(client, settings)
    llm = LLM(settings)
    worker = Worker(store, llm, settings)
    listening = asyncio.create_task(worker._listen_for_cancels())

    async def listener() -> PushConnection | None:
        return worker._publish_caller()

    try:
        first = await eventually(listener, what="the cancel listener")
        gen_id = await running(store, "w1")
        publish = worker.batcher.publish
        assert await publish(gen_id, "w1", 1, [protocol.new_message("one. ")], 0) == 1
        assert proxy.freeze_subscribers() == 1
        assert await publish(gen_id, "w1", 2, [protocol.new_message("two. ")], 0) == 0

        async def a_new_listener() -> PushConnection | None:
            now = worker._publish_caller()
            return now if now is not None and now is not first else None

        await eventually(a_new_listener, what="a new cancel listener")
        assert await publish(gen_id, "w1", 3, [protocol.new_end("stop", None)], 0) == 1
        snapshot = await store.snapshot(gen_id)
        assert snapshot is not None
        assert (snapshot.text, snapshot.meta.status) == ("one. two. ", "completed")
    finally:
        await cancel_and_wait(listening)
        await llm.aclose()
        await client.aclose()
        await client.connection_pool.disconnect()
        proxy.stop()
