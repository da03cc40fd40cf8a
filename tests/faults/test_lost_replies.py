"""A reply lost between a command and its answer (the network cut after the server ran it):
redis-py reconnects and sends the command again, so every script a worker calls must take its
own repeat as the same call. Found by the chaos run's reasoning on ``redis_sever``: a repeated
claim answered "running" (someone runs it), the worker acked the job and left, and the
generation stayed running until reaped as ``worker_lost`` under a live worker."""

from __future__ import annotations

import asyncio
import hashlib

import httpx

from broker.core import protocol
from tests.faults.helpers import assert_exact_once, wait_worker_ready
from tests.support.api import create, events_url, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.sse import read_events
from tests.support.tcpproxy import TcpProxy

LEASE_TTL = 2.0
ANSWER = f"Claimed once, whatever the network did. {TRICKY_TEXT}"


def sha_of(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


async def test_a_claim_whose_reply_was_lost_runs_the_generation(deploy, fake_llm: FakeLLM):
    d = deploy(edges=1, workers=0, broker_lease_ttl=LEASE_TTL)
    proxy = TcpProxy(d.redis.port).start()
    try:
        worker = d.add_worker(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        await wait_worker_ready(d, worker)
        proxy.lose_reply_to(sha_of(protocol.CLAIM_SCRIPT))
        prompt = fake_llm.script(unique("lost claim reply"), ANSWER)
        async with httpx.AsyncClient(timeout=30) as http:
            gen_id = await create(http, d.edges[0].url, prompt)
            # Bounded: the answer takes well under a second; a false worker_lost comes after
            # a lease; three leases leave room for a shared machine.
            got = await asyncio.wait_for(
                read_events(http, events_url(d.edges[0].url, gen_id)), 3 * LEASE_TTL + 5)
        assert proxy.replies_lost == 1  # the fault happened
        assert_exact_once(got, ANSWER)
    finally:
        proxy.stop()

