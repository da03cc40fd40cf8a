"""Workers that die or are stopped: nothing hangs, and what can be finished is finished."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import httpx
import pytest
from redis.exceptions import ResponseError

from broker.core import protocol
from broker.core.settings import Settings
from tests.support.api import create, events_url, status, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import TIMER_RESOLUTION, eventually, wait_until
from tests.support.sse import read_events

LONG = TRICKY_TEXT + " This sentence keeps the stream busy for a while." * 60
LEASE_TTL = Settings().lease_ttl  # unless a test sets its own
SHORT = "A short answer that finishes during the drain. It ends here."


async def wait_for_messages(http: httpx.AsyncClient, base: str, gen_id: str) -> None:
    """Until the generation has published text (so it is running on some worker)."""

    async def has_text() -> bool:
        return bool((await status(http, base, gen_id))["text"])

    await eventually(has_text, 10, "the generation to publish text")


async def test_worker_killed_mid_generation_ends_with_worker_lost(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=1, workers=0)
    workers = {name: d.add_worker(broker_worker_id=name) for name in ("w1", "w2")}
    prompt = fake_llm.script(unique("killed"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, d.edges[0].url, prompt)
        viewers = [asyncio.create_task(read_events(http, events_url(d.edges[0].url, gen_id)))
                   for _ in range(3)]
        await wait_for_messages(http, d.edges[0].url, gen_id)
        redis = d.redis.client()
        owner = redis.hget(protocol.meta_key(gen_id), "owner").decode()
        lease_until_ms = int(redis.hget(protocol.meta_key(gen_id), "lease"))

        killed_at = time.monotonic()
        workers[owner].signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*viewers), 15)
        elapsed = time.monotonic() - killed_at

        for got in results:
            assert got.terminal is not None and got.terminal.event == "error"
            assert got.terminal_data()["code"] == "worker_lost"
            assert LONG.startswith(got.text)
        assert len({tuple(r.ids) for r in results}) == 1
        final = await status(http, d.edges[0].url, gen_id)
        assert final["status"] == "failed" and final["text"] == results[0].text
        *_, (entry_id, fields) = redis.xrange(protocol.log_key(gen_id))
        reaped = protocol.decode_log_entry(entry_id, fields)
    # Never before the lease (as it stood at the kill, or later renewed) ran out: the dead
    # worker might have been alive. It ran out within one lease of the kill, and the other
    # worker's reaper, healthy all along, reaps every REAP_INTERVAL: a generation still
    # running a second lease later would mean the reaper itself went a lease without a round.
    assert reaped.kind == "error" and reaped.published_ms > lease_until_ms
    assert elapsed < 2 * LEASE_TTL, f"worker_lost took {elapsed:.1f}s (lease {LEASE_TTL:g}s)"
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"worker killed -> every viewer had worker_lost in {elapsed:.2f}s")


async def test_job_of_a_worker_that_died_before_starting_it_runs_elsewhere(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=1, workers=0, broker_lease_ttl=2)
    prompt = fake_llm.script(unique("orphan"), SHORT)
    redis = d.redis.client()
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, d.edges[0].url, prompt)
        # A "worker" takes the job and dies before claiming it: delivered, never acked.
        with contextlib.suppress(ResponseError):  # the group may exist already
            redis.xgroup_create(protocol.jobs_stream(0), protocol.WORKER_GROUP, id="0")
        taken = redis.xreadgroup(protocol.WORKER_GROUP, "ghost", {protocol.jobs_stream(0): ">"})
        assert taken and taken[0][1], "the ghost should have taken the job"

        started = time.monotonic()
        d.add_worker()
        got = await asyncio.wait_for(read_events(http, events_url(d.edges[0].url, gen_id)), 20)
        elapsed = time.monotonic() - started
    assert got.text == SHORT and got.terminal_data()["finish_reason"] == "stop"
    wait_until(  # acked right after the end event was published
        lambda: redis.xpending(protocol.jobs_stream(0), protocol.WORKER_GROUP)["pending"] == 0,
        5, "the job to be acked",
    )
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"orphaned job completed by another worker {elapsed:.2f}s after it started")


async def test_sigterm_drains_then_ends_the_rest(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    drain_timeout = 2.0
    # The default lease (not a 2 s one): the drain must not depend on renewals keeping a
    # short lease alive on a busy machine (a 2 s lease once ran out there mid-drain).
    d = deploy(edges=1, workers=0)
    worker = d.add_worker(broker_drain_timeout=drain_timeout)
    long_prompt = fake_llm.script(unique("drain-long"), LONG, delay=0.05)
    short_prompt = fake_llm.script(unique("drain-short"), SHORT, delay=0.05)
    base = d.edges[0].url
    async with httpx.AsyncClient(timeout=30) as http:
        long_id = await create(http, base, long_prompt)
        short_id = await create(http, base, short_prompt)
        long_view = asyncio.create_task(read_events(http, events_url(base, long_id)))
        short_view = asyncio.create_task(read_events(http, events_url(base, short_id)))
        await wait_for_messages(http, base, long_id)
        await wait_for_messages(http, base, short_id)

        stopped_at = time.monotonic()
        worker.signal(signal.SIGTERM)
        # Created once the worker has taken the signal (a job its read returned before that
        # is its to run): it must not start here.
        await asyncio.to_thread(worker.wait_for_log, "stopping: taking no more jobs")
        later_id = await create(http, base, unique("after-stop"))

        short_got, long_got = await asyncio.wait_for(asyncio.gather(short_view, long_view), 15)
        elapsed = time.monotonic() - stopped_at
        assert short_got.text == SHORT and short_got.terminal_data()["finish_reason"] == "stop"
        assert long_got.terminal_data()["code"] == "worker_shutdown"
        assert LONG.startswith(long_got.text)
        assert (await status(http, base, long_id))["status"] == "failed"
        assert await asyncio.to_thread(worker.proc.wait, 10) == 0
        assert (await status(http, base, later_id))["status"] == "queued"
        # Its log tells the drain: what it waited for, how it ended.
        output = worker.output()
        assert "stopping: taking no more jobs, draining 2 generation(s) for up to 2 s" in output
        assert "stopped: 1 generation(s) finished during the drain, 1 ended with " \
               "worker_shutdown" in output, output

        d.add_worker()  # the next worker runs what the stopped one never started
        later = await asyncio.wait_for(read_events(http, events_url(base, later_id)), 20)
        assert later.terminal_data()["finish_reason"] == "stop"
    # The long answer ran on for the whole drain (to the event loop's millisecond), and was
    # ended as soon as it ran out (well within a second drain period).
    assert drain_timeout - TIMER_RESOLUTION <= elapsed < 2 * drain_timeout, (
        f"ended after {elapsed:.3f}s")
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"SIGTERM -> drained and ended every stream in {elapsed:.2f}s (drain timeout 2s)")


def test_worker_process_exits_promptly_when_idle(deploy):
    d = deploy(edges=0, workers=1)
    worker = d.workers[0]
    wait_until(
        lambda: any(c["name"].startswith("broker-worker-") and c["cmd"] == "xreadgroup"
                    for c in d.redis.client().client_list()),
        10, "the worker to wait for jobs",
    )
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(5) == 0
