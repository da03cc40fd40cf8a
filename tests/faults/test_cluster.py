"""Redis Cluster under a live stream: sharded pub/sub, spread job shards, a slot moved away
mid-stream, and a master killed so that its replica takes over."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from broker.core import protocol
from broker.core.settings import Settings
from tests.faults.helpers import (
    assert_exact_once,
    failover_outcome,
    until_messages,
    viewers_mid_stream,
    wait_ready_status,
    watch,
)
from tests.support.api import create, events_url, metric, status, unique
from tests.support.cluster import RedisClusterServers
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import RedisServer, eventually, wait_until
from tests.support.sse import Received
from worker.loop import REAP_INTERVAL

ANSWER = "".join(
    f"Sentence {i} of a clustered answer, with 2.5 and 你好。\n" for i in range(80)
) + TRICKY_TEXT
JOB_SHARDS = 6


async def test_generations_travel_sharded_and_jobs_spread_over_nodes(
    deploy, fake_llm: FakeLLM
):
    d = deploy(edges=2, workers=2, cluster=(3, 0), broker_job_shards=JOB_SHARDS)
    cluster: RedisClusterServers = d.redis
    held = fake_llm.script(unique("sharded"), ANSWER, delay=0.002, hold_at=3)
    prompts = [held] + [fake_llm.script(unique(f"spread{i}"), ANSWER, delay=0.002)
                        for i in range(11)]
    async with httpx.AsyncClient(timeout=60) as http:
        ids = [await create(http, d.edges[i % 2].url, p) for i, p in enumerate(prompts)]
        progress: list[Received] = []
        viewers = [watch(http, events_url(d.edges[(i + 1) % 2].url, gen_id), progress)
                   for i, gen_id in enumerate(ids)]

        # While the held generation's viewer waits: its channel has one sharded subscriber, on
        # the master of its slot, and no classic subscriber anywhere (a classic PUBLISH would
        # be copied to every node of the cluster).
        channel = protocol.live_channel(ids[0])
        owner = cluster.node_of(channel)

        def one_sharded_subscriber() -> bool:
            return owner.client().execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] >= 1

        await asyncio.to_thread(wait_until, one_sharded_subscriber, 10, "the SSUBSCRIBE")
        for node in cluster.live_nodes():
            assert node.client().pubsub_numsub(channel)[0][1] == 0
            if node is not owner:
                reply = node.client().execute_command("PUBSUB", "SHARDNUMSUB", channel)
                assert reply[1] == 0
        # The meta, the log and the text live with the channel, on one slot.
        for key in (protocol.meta_key(ids[0]), protocol.log_key(ids[0]),
                    protocol.text_key(ids[0])):
            assert cluster.node_of(key) is owner
        fake_llm.reply_for(held).release.set()

        try:
            results = await asyncio.wait_for(asyncio.gather(*viewers), 30)
        except TimeoutError:  # say where it stuck: which viewers, which generations, which logs
            for p, gen_id in zip(progress, ids, strict=False):
                state = (await status(http, d.edges[0].url, gen_id))["status"]
                print(f"viewer: {p.status} {len(p.events)} events, generation {state}")
            for proc in d.workers + d.edges:
                print(proc.output()[-3000:])
            raise
    for got in results:
        assert_exact_once(got, ANSWER)
    # The jobs queue is spread over streams on different masters, and every stream was drained.
    streams = [protocol.jobs_stream(i) for i in range(JOB_SHARDS)]
    assert len({cluster.node_of(s).port for s in streams}) >= 2
    used = {protocol.jobs_shard(gen_id, JOB_SHARDS) for gen_id in ids}
    assert len(used) >= 2
    for stream in streams:
        assert cluster.node_of(stream).client().xlen(stream) == 0  # acked and deleted
    for node in cluster.live_nodes():
        # Edges and workers publish generation events only with SPUBLISH.
        assert node.client().info("commandstats").get("cmdstat_publish", {}).get("calls", 0) == 0


async def test_slot_moved_mid_stream_loses_nothing(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=2, workers=1, cluster=(3, 0))
    cluster: RedisClusterServers = d.redis
    prompt = fake_llm.script(unique("moved"), ANSWER, delay=0.01)
    async with httpx.AsyncClient(timeout=60) as http:
        gen_id, viewers, progress = await viewers_mid_stream(http, d, prompt, 4, messages=3)

        source = cluster.node_of(protocol.meta_key(gen_id))
        target = next(n for n in cluster.live_nodes() if n is not source)
        moved_at = time.monotonic()
        await asyncio.to_thread(cluster.move_slot_of, protocol.meta_key(gen_id), target)
        assert cluster.node_of(protocol.meta_key(gen_id)) is target
        assert not any(got.terminal for got in progress), "the move came too late to matter"

        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
        elapsed = time.monotonic() - moved_at
        metrics = [(await http.get(edge.url + "/metrics")).text for edge in d.edges]
        assert (await status(http, d.edges[1].url, gen_id))["status"] == "completed"
    for got in results:
        assert_exact_once(got, ANSWER)
    # Each edge was told its subscription moved, subscribed on the new master and caught up.
    for text in metrics:
        assert metric(text, "broker_pubsub_resubscribes_total") >= 1
    assert cluster.node_of(protocol.live_channel(gen_id)) is target
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"slot moved mid-stream: 4 viewers had the exact text {elapsed:.2f}s after the move")


async def test_master_killed_its_replica_takes_over(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=2, workers=1, cluster=(3, 1))
    cluster: RedisClusterServers = d.redis
    prompt = fake_llm.script(unique("failover"), ANSWER, delay=0.01)
    async with httpx.AsyncClient(timeout=60) as http:
        gen_id, viewers, _ = await viewers_mid_stream(http, d, prompt, 4, messages=3)

        master = cluster.node_of(protocol.meta_key(gen_id))
        killed_at = time.monotonic()
        master.kill()
        # The edges cannot deliver from that master's slots until its replica is promoted.
        await wait_ready_status(http, d.edges[0], 503)
        unready_at = time.monotonic()
        await asyncio.to_thread(wait_until, lambda: promoted(cluster, gen_id, master), 30,
                                "the failover")
        failed_over_at = time.monotonic()
        await wait_ready_status(http, d.edges[0], 200)
        ready_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
        ended_at = time.monotonic()
        # Replication is asynchronous: a failover may lose the last acknowledged writes. Then
        # the viewers end with a clear error, never with a wrong or repeated text, never hang.
        outcomes, _ = await assert_failover_outcomes(http, d.edges[1].url, gen_id, results,
                                                     failed_over_at)

    timings = {
        "seconds_to_unready": round(unready_at - killed_at, 2),
        "seconds_to_failover": round(failed_over_at - killed_at, 2),
        "seconds_to_ready": round(ready_at - killed_at, 2),
        "seconds_to_terminal": round(ended_at - killed_at, 2),
    }
    for name, value in timings.items():
        record_property(name, value)
    print(f"master killed: {timings}; viewers: {sorted(outcomes)}")


async def test_failover_that_lost_writes_ends_the_viewers_with_history_lost(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    """The documented outcome of a lossy failover, forced: the replica is cut off from its
    master (so it misses what the worker writes next), then the master dies."""
    d = deploy(edges=2, workers=1, cluster=(3, 1))
    cluster: RedisClusterServers = d.redis
    prompt = fake_llm.script(unique("lossy"), ANSWER, delay=0.01)
    async with httpx.AsyncClient(timeout=60) as http:
        gen_id, viewers, progress = await viewers_mid_stream(http, d, prompt, 4, messages=3)
        meta = protocol.meta_key(gen_id)
        master = cluster.node_of(meta)
        replica = cluster.replica_of(master)

        kept = await asyncio.to_thread(cut_off, replica, meta)
        # Every viewer has had an event the replica will never have.
        await until_messages(progress, 4, kept + 1)
        assert not any(got.terminal for got in progress), "the answer ended too soon"
        master.kill()
        await asyncio.to_thread(wait_until, lambda: promoted(cluster, gen_id, master), 30,
                                "the failover")
        failed_over_at = time.monotonic()
        assert cluster.node_of(meta).port == replica.port
        assert int(cluster.client().hget(meta, "seq") or 0) == kept  # the writes are lost

        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
        ended_at = time.monotonic()
        outcomes, final_text = await assert_failover_outcomes(
            http, d.edges[1].url, gen_id, results, failed_over_at)
        reaped_at = time.monotonic()
    assert outcomes == {"history_lost"}, outcomes
    assert len(final_text) < min(len(got.text) for got in results)  # they had more: lost
    record_property("seconds_to_terminal", round(ended_at - failed_over_at, 2))
    record_property("seconds_to_reaped", round(reaped_at - failed_over_at, 2))
    print(f"lossy failover: the replica kept {kept} events; every viewer had history_lost "
          f"{ended_at - failed_over_at:.2f}s after it, the generation was reaped after "
          f"{reaped_at - failed_over_at:.2f}s")


# -- helpers ----------------------------------------------------------------------------------

# The lease the deployment runs with (the fixtures keep the default).
LEASE_TTL = Settings().lease_ttl
# When a failover lost writes, the worker's next publish is refused and it stops; the
# generation is then ended by a reaper (``worker_lost``) once the lease ran out after the
# worker's last renewal, and once the reaper itself saw Redis healthy for a whole lease after
# the failover's errors (the two overlap; counted one after the other), in its next round.
REAPED_WITHIN = 2 * LEASE_TTL + REAP_INTERVAL


def promoted(cluster: RedisClusterServers, gen_id: str, master: RedisServer) -> bool:
    """Every node sees all slots served, the generation's by another node than the dead
    ``master`` (``node_of`` raises while the slot map still names it)."""
    return cluster.healthy() and cluster.node_of(protocol.meta_key(gen_id)).port != master.port


def cut_off(replica: RedisServer, meta: str) -> int:
    """Keep ``replica`` from hearing from its master any more (it can no longer authenticate
    to it, so it does not reconnect), while it stays eligible to take over; the generation's
    last seq the replica holds."""
    client = replica.client()
    client.config_set("masterauth", "not-the-masters-password")
    client.execute_command("CLIENT", "KILL", "TYPE", "master")
    wait_until(lambda: client.info("replication")["master_link_status"] == "down", 10,
               "the replica to lose its master")
    client.execute_command("READONLY")  # a replica serves its slots' reads only when asked
    return int(client.hget(meta, "seq") or 0)


async def assert_failover_outcomes(
    http: httpx.AsyncClient, base: str, gen_id: str, results: list[Received],
    failed_over_at: float,
) -> tuple[set[str], str]:
    """Each viewer has the exact text or a clear error (``failover_outcome``), and the status
    agrees: ``completed`` with the whole answer when every viewer had it; else ``failed``
    (reaped) within ``REAPED_WITHIN`` of the failover, its text what the new master kept.
    Returns the outcomes and the text the status ends with."""
    outcomes = {failover_outcome(got, ANSWER) for got in results}
    if outcomes == {"exact text"}:
        final = await status(http, base, gen_id)
        assert final["status"] == "completed" and final["text"] == ANSWER, final
        return outcomes, ANSWER

    async def ended() -> dict[str, object] | None:
        final = await status(http, base, gen_id)
        return final if final["status"] != "running" else None

    final = await eventually(ended, failed_over_at + REAPED_WITHIN - time.monotonic(),
                             "the generation to be reaped")
    assert (final["status"], final["finish_reason"]) == ("failed", "error"), final
    kept = str(final["text"])
    assert ANSWER.startswith(kept)
    for got in results:  # one that read the reaper's event read what the new master kept
        if got.terminal is not None and got.terminal.event == "error" and (
                got.terminal_data()["code"] == "worker_lost"):
            assert got.text == kept
    return outcomes, kept
