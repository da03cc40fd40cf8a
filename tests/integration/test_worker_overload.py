"""An overloaded worker is slow, never lost: its leases are renewed however busy (or blocked)
its event loop is, and it leaves jobs queued while its loop runs late (issue 17)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.core import protocol
from broker.core.metrics import Metrics
from broker.core.settings import Settings
from broker.core.store import Store, connect
from tests.support.fakellm import FakeLLM
from tests.support.procs import RedisServer
from worker import admission
from worker.leases import TICKS_PER_LEASE, blocking_client
from worker.llm import LLM
from worker.loop import Worker

LEASE_TTL = 1.5  # renewed every half second: a margin a loaded 2-core CI host keeps
ADMIT_MAX_LAG = 0.05


@pytest.fixture
async def worker(own_redis: RedisServer, fake_llm: FakeLLM) -> AsyncIterator[Worker]:
    """A worker in this test's process and loop (so the test can load and block that loop),
    its leases renewed from their own thread and connection as ``broker worker`` does."""
    settings = Settings(
        redis_url=own_redis.url, openai_base_url=fake_llm.base_url, openai_api_key="k",
        lease_ttl=LEASE_TTL, admit_max_lag=ADMIT_MAX_LAG,
    )
    redis = connect(settings, "test-worker")
    llm = LLM(settings)
    w = Worker(Store(redis, settings), llm, settings, Metrics(), name="w-overload",
               lease_redis=lambda: blocking_client(settings, "test-worker-leases"))
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, 30)
        await llm.aclose()
        await redis.aclose()
        await redis.connection_pool.disconnect()


async def create(worker: Worker, fake_llm: FakeLLM, prompt: str, **reply: Any) -> str:
    fake_llm.script(prompt, "One sentence here. And another one.", **reply)
    gen_id = protocol.new_generation_id()
    await worker.store.create(gen_id, {"messages": [{"role": "user", "content": prompt}]}, "m")
    return gen_id


async def status_of(worker: Worker, gen_id: str) -> str:
    meta = await worker.store.meta(gen_id)
    return meta.status if meta else ""


async def until_status(worker: Worker, gen_id: str, wanted: set[str], within: float) -> str:
    deadline = time.monotonic() + within
    while (status := await status_of(worker, gen_id)) not in wanted:
        assert time.monotonic() < deadline, f"{gen_id} is {status!r}, not {wanted}"
        await asyncio.sleep(0.01)
    return status


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return value or 0.0


async def test_a_blocked_worker_loop_keeps_its_leases(
    worker: Worker, fake_llm: FakeLLM, own_redis: RedisServer,
) -> None:
    prompt = f"blocked-loop {protocol.new_generation_id()}"
    gen_id = await create(worker, fake_llm, prompt, hold_at=2)
    await until_status(worker, gen_id, {"running"}, 10)
    reply = fake_llm.reply_for(prompt)
    client = own_redis.client()
    meta = protocol.meta_key(gen_id)

    # The worker's loop does nothing but this, synchronously, for twice a lease: without
    # renewals from elsewhere the lease would run out within the block.
    margins: list[float] = []
    leases: set[bytes] = set()
    blocked_until = time.monotonic() + 2 * LEASE_TTL
    while time.monotonic() < blocked_until:
        lease = client.hget(meta, "lease")
        seconds, micros = client.time()
        assert lease is not None
        leases.add(lease)
        margins.append(int(lease) / 1000 - (seconds + micros / 1e6))
        sum(i * i for i in range(20_000))  # CPU work, holding the GIL but for switches
    client.close()

    assert min(margins) > 0, f"the lease ran out while the loop was blocked: {min(margins):.3f}"
    # Renewed during the block, about once per tick (a lease lasts TICKS_PER_LEASE ticks).
    assert len(leases) >= TICKS_PER_LEASE
    reply.release.set()
    assert await until_status(worker, gen_id, {"completed", "failed"}, 10) == "completed"
    assert sample(worker.metrics, "broker_workers_lost_total") == 0


async def test_a_late_loop_leaves_jobs_queued_until_it_keeps_time(
    worker: Worker, fake_llm: FakeLLM,
) -> None:
    first_prompt = f"admission-first {protocol.new_generation_id()}"
    first = await create(worker, fake_llm, first_prompt, hold_at=2)
    await until_status(worker, first, {"running"}, 10)

    # Load the loop: each round blocks it three times the admission limit.
    loaded = True

    async def load() -> None:
        while loaded:
            time.sleep(3 * ADMIT_MAX_LAG)  # noqa: ASYNC251 (blocking the loop is the point)
            await asyncio.sleep(0)

    loader = asyncio.create_task(load())
    try:
        await asyncio.sleep(admission.WINDOW)  # the lag meter sees it
        second = await create(worker, fake_llm, f"admission-second {protocol.new_generation_id()}")
        queued_at = time.monotonic()
        # Two whole lag windows: a worker admitting by max_concurrency alone (64 free slots)
        # would have claimed it within one loop round.
        while time.monotonic() - queued_at < 2 * admission.WINDOW:
            assert await status_of(worker, second) == "queued"
            await asyncio.sleep(admission.SAMPLE_INTERVAL)
        assert sample(worker.metrics, "broker_admission_waits_total") > 0
    finally:
        loaded = False
        await loader
    waited = time.monotonic() - queued_at
    assert await until_status(worker, second, {"completed"}, 10) == "completed"
    fake_llm.reply_for(first_prompt).release.set()
    assert await until_status(worker, first, {"completed"}, 10) == "completed"
    # Its queue wait is in the metrics (both generations: two observations).
    assert sample(worker.metrics, "broker_queue_wait_seconds_count") == 2
    assert sample(worker.metrics, "broker_queue_wait_seconds_sum") >= waited
