"""The job queue spread over several streams: every job runs once, and leases still end."""

from __future__ import annotations

import asyncio
import signal

import httpx

from broker.core import protocol
from tests.support.api import create, events_url, status, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import eventually
from tests.support.sse import read_events

SHARDS = 3
ANSWER = f"Sharded queues still deliver. {TRICKY_TEXT} Every job runs exactly once."


async def test_jobs_spread_over_shards_all_run_once(deploy, fake_llm: FakeLLM):
    d = deploy(edges=1, workers=2, broker_job_shards=SHARDS, broker_max_concurrency=4)
    base = d.edges[0].url
    prompts = [fake_llm.script(unique("shard"), ANSWER, delay=0.002) for _ in range(24)]
    async with httpx.AsyncClient(timeout=30) as http:
        ids = [await create(http, base, p) for p in prompts]
        results = await asyncio.wait_for(
            asyncio.gather(*(read_events(http, events_url(base, i)) for i in ids)), 60
        )
    assert all(r.text == ANSWER and r.terminal_data()["finish_reason"] == "stop"
               for r in results)
    redis = d.redis.client()
    added = [redis.xinfo_stream(protocol.jobs_stream(n))["entries-added"] for n in range(SHARDS)]
    assert sum(added) == len(ids) and all(added), added  # every shard got some, none twice
    for prompt in prompts:  # each LLM request was made once: no job ran twice
        assert sum(1 for r in fake_llm.records if r.body["messages"][0]["content"] == prompt) == 1


async def test_worker_lost_is_found_on_any_shard(deploy, fake_llm: FakeLLM):
    d = deploy(edges=1, workers=0, broker_job_shards=SHARDS)
    workers = {name: d.add_worker(broker_worker_id=name) for name in ("w1", "w2")}
    base = d.edges[0].url
    long_answer = ANSWER * 5  # ~4 s at this pace: running when the worker dies
    redis = d.redis.client()
    async with httpx.AsyncClient(timeout=30) as http:
        ids: list[str] = []
        # At least one past the first shard (ids are random): the reapers must look there.
        while len(ids) < 4 or all(protocol.jobs_shard(i, SHARDS) == 0 for i in ids):
            assert len(ids) < 20, "20 generations, all on shard 0"
            prompt = fake_llm.script(unique("lost"), long_answer, delay=0.03)
            ids.append(await create(http, base, prompt))
        viewers = [asyncio.create_task(read_events(http, events_url(base, i))) for i in ids]

        async def all_running() -> bool:
            return all([(await status(http, base, i))["text"] for i in ids])

        await eventually(all_running, 15, "every generation to publish text")
        owners = {i: redis.hget(protocol.meta_key(i), "owner").decode() for i in ids}
        victim = owners[next(i for i in ids if protocol.jobs_shard(i, SHARDS) != 0)]
        workers[victim].signal(signal.SIGKILL)
        results = dict(zip(ids, await asyncio.wait_for(asyncio.gather(*viewers), 30),
                           strict=True))

    lost = [i for i in ids if owners[i] == victim]
    assert any(protocol.jobs_shard(i, SHARDS) != 0 for i in lost)
    for gen_id, got in results.items():
        if gen_id in lost:
            assert got.terminal_data()["code"] == "worker_lost", gen_id
            assert long_answer.startswith(got.text)
        else:
            assert got.text == long_answer and got.terminal_data()["finish_reason"] == "stop"
    print(f"worker_lost found on shards {sorted({protocol.jobs_shard(i, SHARDS) for i in lost})}")
