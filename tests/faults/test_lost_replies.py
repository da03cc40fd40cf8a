"""A reply lost between a command and its answer (the network cut after the server ran it):
redis-py reconnects and sends the command again, so every script a worker calls must take its
own repeat as the same call. Found by the chaos run's reasoning on ``redis_sever``: a repeated
claim answered "running" (someone runs it), the worker acked the job and left, and the
generation stayed running until reaped as ``worker_lost`` under a live worker. The same class
of gap: a read that fails between the claim and the run."""

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
REDIS_PY_TRIES = 4  # a command and the 3 retries of broker.core.store.connect's Retry
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


async def test_a_cancel_flag_read_that_fails_after_the_claim_does_not_lose_the_run(
    deploy, fake_llm: FakeLLM
):
    """Right after its claim the worker reads the cancel flag; if Redis fails that read (its
    replies lost more times than redis-py retries), the run goes on, and the generation is not
    left running for a reaper to call the worker lost."""
    d = deploy(edges=1, workers=0, broker_lease_ttl=LEASE_TTL)
    proxy = TcpProxy(d.redis.port).start()
    try:
        worker = d.add_worker(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        await wait_worker_ready(d, worker)
        # HGET <meta> cancel: every try of it (redis-py's own retries included) fails.
        proxy.lose_reply_to(b"\r\ncancel\r\n", times=REDIS_PY_TRIES)
        prompt = fake_llm.script(unique("lost cancel flag"), ANSWER)
        async with httpx.AsyncClient(timeout=30) as http:
            gen_id = await create(http, d.edges[0].url, prompt)
            got = await asyncio.wait_for(
                read_events(http, events_url(d.edges[0].url, gen_id)), 3 * LEASE_TTL + 5)
        assert proxy.replies_lost == REDIS_PY_TRIES  # the read failed for the worker
        assert_exact_once(got, ANSWER)
    finally:
        proxy.stop()
