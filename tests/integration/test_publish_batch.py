"""The worker's publish batcher (``worker.batch``) on a real redis-server: the publishes of
several generations handed over together go in one pipeline, each with its own result (a
refused one refuses only itself), and each generation's log is what its calls wrote."""

from __future__ import annotations

import asyncio

from broker.core import protocol
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
