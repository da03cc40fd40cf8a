"""A cluster seed that is down when a process starts (issue 18, found by hand): with several
seeds in REDIS_URL, edges and workers start from the next one and serve as usual."""

from __future__ import annotations

import asyncio

import httpx

from tests.faults.helpers import assert_exact_once
from tests.support.api import create, events_url, unique
from tests.support.cluster import RedisClusterServers
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import free_port
from tests.support.sse import read_events


async def test_processes_start_while_the_first_seed_is_down(deploy, fake_llm: FakeLLM):
    # A one-second lease and an answer of several: the worker's lease renewals (a blocking
    # client of their own, in a thread) must take the seeds too, or its generation is reaped.
    d = deploy(edges=0, workers=0, cluster=(3, 0), broker_job_shards=3, broker_lease_ttl=1)
    cluster: RedisClusterServers = d.redis
    down = free_port()  # nothing listens there: the first seed is down
    seeds = ",".join(f"127.0.0.1:{port}" for port in [down, *(n.port for n in cluster.nodes)])
    url = f"redis+cluster://{seeds}"
    edge = d.add_edge(redis_url=url)
    worker = d.add_worker(redis_url=url)
    await asyncio.to_thread(worker.wait_for_log, "taking jobs")
    answer = "Seeded. " * 40 + TRICKY_TEXT
    prompt = fake_llm.script(unique("seeds"), answer, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, edge.url, prompt)
        got = await read_events(http, events_url(edge.url, gen_id))
    assert_exact_once(got, answer)
    assert got.terminal_data()["finish_reason"] == "stop"
    assert "renewing" not in worker.output(), worker.output()
