"""The last worker dies: with no other worker to reap its lease, the edges must.

One edge, one worker, nothing else, default settings (the smallest deployment, the compose
default). Every bound is derived from the settings under test: a dead worker's lease runs out
at most ``BROKER_LEASE_TTL`` after its last renewal, and the edge's checks run on its own
cadence (``BROKER_PROBE_INTERVAL``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import pytest
import redis

from broker.client import Follower, GenerationFailed
from broker.core import protocol
from broker.core.settings import Settings
from tests.faults.helpers import (
    Viewer,
    assert_exact_once,
    report,
    requests_for,
    wait_worker_ready,
)
from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import FakeLLM
from tests.support.procs import BrokerProcess, eventually, wait_until

DEFAULTS = Settings()
LEASE = DEFAULTS.lease_ttl
# From the kill to the terminal event: the lease runs out at most a lease after the worker's
# last renewal, then the edge's check (scheduled for that moment) ends the generation. The
# margin is two of the edge's own check intervals (scheduling, a busy 2-core machine).
WORKER_LOST_WITHIN = LEASE + 2 * DEFAULTS.probe_interval

# ~30 s of answer at 50 ms a token: the worker is always mid-answer when it is killed.
LONG = "This sentence keeps the stream busy for a while. " * 60


def kill(worker: BrokerProcess) -> float:
    """SIGKILL the worker and wait until it is gone; the moment it died (monotonic)."""
    worker.signal(signal.SIGKILL)
    worker.proc.wait(10)
    return time.monotonic()


def log_events(client: redis.Redis, gen_id: str) -> list[tuple[int, str, dict[str, Any], int]]:
    """The generation's log as (seq, kind, data, publish ms)."""
    return [
        (event.seq, event.kind, json.loads(event.data), event.published_ms)
        for event in (protocol.decode_log_entry(eid, fields)
                      for eid, fields in client.xrange(protocol.log_key(gen_id)))
    ]


def assert_ended_once_with_worker_lost(client: redis.Redis, gen_id: str) -> None:
    """The log holds exactly one terminal event, last, ``worker_lost``, written after the lease
    ran out in Redis's own time; the meta agrees."""
    log = log_events(client, gen_id)
    terminals = [e for e in log if e[1] in protocol.TERMINAL_KINDS]
    assert len(terminals) == 1, terminals
    assert log[-1] is terminals[0]
    seq, kind, data, published_ms = terminals[0]
    assert kind == "error" and data["code"] == "worker_lost", data
    meta = client.hgetall(protocol.meta_key(gen_id))
    assert meta[b"status"] == b"failed" and int(meta[b"seq"]) == seq
    assert published_ms >= int(meta[b"lease"]), "reaped before the lease ran out"


LogEvent = tuple[int, str, dict[str, Any], int]  # seq, kind, data, publish ms


def assert_viewer_saw_worker_lost(got: Any, log: list[LogEvent]) -> None:
    """Exactly the log: its messages (an exact prefix of the answer), then the one error."""
    assert got.terminal is not None and got.terminal.event == "error"
    assert got.terminal_data()["code"] == "worker_lost"
    assert LONG.startswith(got.text)
    assert [protocol.parse_event_id(i) for i in got.ids] == [e[0] for e in log]
    assert got.text == "".join(e[2]["text"] for e in log if e[1] == "message")


async def running_on(client: redis.Redis, gen_id: str, viewer: Viewer | None) -> None:
    """Until the generation is mid-answer: its first message was published (and, with a
    viewer, received)."""
    if viewer is not None:
        await viewer.wait_first_message()
        return

    async def has_text() -> bool:
        return bool(client.get(protocol.text_key(gen_id)))

    await eventually(has_text, 20, "the generation to publish text")


async def lease_expired(client: redis.Redis, gen_id: str) -> None:
    """Until the lease in the meta is in the past by Redis's clock (the one that judges it)."""

    async def expired() -> bool:
        seconds, micros = client.time()
        lease = int(client.hget(protocol.meta_key(gen_id), "lease"))
        return lease < seconds * 1000 + micros // 1000

    await eventually(expired, LEASE + 5, "the dead worker's lease to run out")


@pytest.mark.parametrize("cluster", [None, (3, 0)], ids=["redis", "cluster"])
async def test_the_only_worker_killed_mid_answer_ends_with_worker_lost(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty,
    cluster: tuple[int, int] | None,
):
    d = deploy(edges=1, workers=1, cluster=cluster)
    edge, worker = d.edges[0], d.workers[0]
    client = d.redis.client()
    prompt = fake_llm.script(unique("last-worker"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, edge.url, prompt)
        viewer = Viewer(http, events_url(edge.url, gen_id))
        follower = Follower(http, edge.url + f"/v1/generations/{gen_id}/events")
        followed: list[str] = []

        async def follow() -> str:
            try:
                async for message in follower:
                    followed.append(message.text)
            except GenerationFailed as e:
                return e.code
            return "ended without an error"

        following = asyncio.create_task(follow())
        await running_on(client, gen_id, viewer)

        killed_at = kill(worker)
        got = await viewer.result(within=WORKER_LOST_WITHIN + 1)
        assert viewer.terminal_at is not None
        elapsed = viewer.terminal_at - killed_at
        assert await asyncio.wait_for(following, 5) == "worker_lost"

        log = log_events(client, gen_id)
        assert_viewer_saw_worker_lost(got, log)
        assert "".join(followed) == got.text
        assert_ended_once_with_worker_lost(client, gen_id)
        status = (await http.get(f"{edge.url}/v1/generations/{gen_id}")).json()
        assert status["status"] == "failed" and status["text"] == got.text
        metrics = (await http.get(edge.url + "/metrics")).text
        assert metric(metrics, "broker_leases_reaped_total") == 1
        checks = metric(metrics, "broker_lease_checks_total")
    assert elapsed <= WORKER_LOST_WITHIN, f"worker_lost {elapsed:.2f}s after the kill"
    assert f"generation {gen_id}" in edge.output() and "worker_lost" in edge.output()
    print(f"\n{checks:.0f} lease checks by the edge in all")
    report(record_property, "last worker killed", elapsed, "SIGKILL of the only worker")


@pytest.mark.parametrize("successor_starts", ["after the kill", "before the kill"])
async def test_edges_and_a_new_worker_racing_to_reap_end_it_once(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty, successor_starts: str
):
    """Two edges watch the generation; a second worker's reaper races them for the same
    expired lease. Started right after the kill, the worker waits a lease of Redis health
    before reaping, so it mostly finds the generation ended and only acks the job; started
    before (once the first worker runs the generation), its reaper is armed when the lease
    runs out. One terminal event, everywhere, either way."""
    d = deploy(edges=2, workers=1)
    client = d.redis.client()
    prompt = fake_llm.script(unique("reap-race"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, d.edges[0].url, prompt)
        viewers = [Viewer(http, events_url(d.edges[i % 2].url, gen_id)) for i in range(4)]
        for viewer in viewers:
            await running_on(client, gen_id, viewer)

        if successor_starts == "before the kill":
            successor = d.add_worker()
            await wait_worker_ready(d, successor)
        killed_at = kill(d.workers[0])
        if successor_starts == "after the kill":
            successor = d.add_worker()
        results = [await v.result(within=WORKER_LOST_WITHIN + 1) for v in viewers]
        elapsed = max(v.terminal_at or 0 for v in viewers) - killed_at

        log = log_events(client, gen_id)
        for got in results:
            assert_viewer_saw_worker_lost(got, log)
        assert_ended_once_with_worker_lost(client, gen_id)

        # The new worker's reaper finds the job (idle since the kill) after seeing Redis
        # healthy for a lease itself, and acks it without running it again.
        await wait_worker_ready(d, successor)
        pending = protocol.jobs_stream(protocol.jobs_shard(gen_id, DEFAULTS.job_shards))
        await asyncio.to_thread(
            wait_until,
            lambda: client.xpending(pending, protocol.WORKER_GROUP)["pending"] == 0,
            2 * LEASE + 2 * DEFAULTS.probe_interval, "the new worker to ack the reaped job",
        )
        assert requests_for(fake_llm, prompt) == 1, "the reaped generation ran again"
        assert_ended_once_with_worker_lost(client, gen_id)  # still just the one
        reaped_by_edges = sum([
            metric((await http.get(e.url + "/metrics")).text, "broker_leases_reaped_total")
            for e in d.edges
        ])
    assert successor.proc.poll() is None, successor.output()
    assert "Traceback" not in successor.output()
    assert elapsed <= WORKER_LOST_WITHIN, f"worker_lost {elapsed:.2f}s after the kill"
    # The worker's own metrics port counts its reaps; the log says who it was either way.
    reaped_by = client.hget(protocol.meta_key(gen_id), "owner").decode()
    print(f"\nreaped by {reaped_by} ({reaped_by_edges:.0f} by an edge)")
    report(record_property, f"reap race, worker started {successor_starts}", elapsed,
           "SIGKILL, edges and a new worker racing")


async def test_a_viewer_arriving_after_the_worker_died_gets_worker_lost(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    """Nobody watched while the worker died: the first viewer's edge finds the lease expired."""
    d = deploy(edges=1, workers=1)
    edge = d.edges[0]
    client = d.redis.client()
    prompt = fake_llm.script(unique("late-viewer"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, edge.url, prompt)
        await running_on(client, gen_id, None)
        kill(d.workers[0])
        await lease_expired(client, gen_id)
        assert client.hget(protocol.meta_key(gen_id), "status") == b"running"

        arrived_at = time.monotonic()
        viewer = Viewer(http, events_url(edge.url, gen_id))
        got = await viewer.result(within=2 * DEFAULTS.probe_interval + 1)
        assert viewer.terminal_at is not None
        elapsed = viewer.terminal_at - arrived_at
        assert_viewer_saw_worker_lost(got, log_events(client, gen_id))
        assert_ended_once_with_worker_lost(client, gen_id)
    assert elapsed <= 2 * DEFAULTS.probe_interval
    report(record_property, "viewer after the worker died", elapsed, "the viewer's request")


async def test_a_status_read_after_the_worker_died_says_failed(deploy, fake_llm: FakeLLM):
    """No viewer at all: reading the status of a generation whose lease ran out ends it,
    instead of answering `running` until a worker comes back."""
    d = deploy(edges=1, workers=1)
    edge = d.edges[0]
    client = d.redis.client()
    prompt = fake_llm.script(unique("status-after-death"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, edge.url, prompt)
        await running_on(client, gen_id, None)
        text_before = client.get(protocol.text_key(gen_id))
        kill(d.workers[0])
        await lease_expired(client, gen_id)

        # The edge reaps only once it has seen Redis healthy for a whole lease (after an
        # outage a live owner gets a lease to renew), counted from its first probe seen back,
        # which may come after the claim on an edge that has just started. So the reading
        # that ends it comes within a lease and a probe interval of the lease running out;
        # until then every reading says `running`, never anything else.
        async def failed() -> dict[str, Any] | None:
            status: dict[str, Any] = (
                await http.get(f"{edge.url}/v1/generations/{gen_id}")).json()
            if status["status"] == "running":
                return None
            return status

        status = await eventually(failed, LEASE + 2 * DEFAULTS.probe_interval,
                                  "a status read to end the generation")
        assert status["status"] == "failed" and status["finish_reason"] == "error"
        assert LONG.startswith(status["text"]) and status["text"].encode() == (
            client.get(protocol.text_key(gen_id))
        )
        assert status["text"].encode().startswith(text_before)
        assert_ended_once_with_worker_lost(client, gen_id)


async def test_redis_down_longer_than_a_lease_reaps_no_live_worker(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    """Redis (with AOF) is down for longer than a lease while the worker streams: when it
    returns, the lease in it has run out, but the worker is alive and renews within a third
    of a lease. The edge, which saw Redis fail, waits a whole lease of health before judging
    it, so the answer completes."""
    d = deploy(edges=1, workers=1, redis_args=("--appendonly", "yes", "--appendfsync", "always"))
    edge = d.edges[0]
    prompt = fake_llm.script(unique("outage"), LONG, delay=0.05)
    async with httpx.AsyncClient(timeout=30) as http:
        gen_id = await create(http, edge.url, prompt)
        viewer = Viewer(http, events_url(edge.url, gen_id))
        await viewer.wait_first_message()

        d.redis.kill()
        down_at = time.monotonic()
        # The outage must outlast the lease the worker last renewed (at most now).
        await asyncio.sleep(LEASE + DEFAULTS.probe_interval)
        d.redis.start()  # same port and directory: the AOF is replayed
        got = await viewer.result(within=60)
        elapsed = time.monotonic() - down_at
        assert_exact_once(got, LONG)
        metrics = (await http.get(edge.url + "/metrics")).text
        assert metric(metrics, "broker_leases_reaped_total") == 0
    report(record_property, "Redis down longer than a lease", elapsed, "the Redis kill")
