"""A viewer reading 100x slower than the stream costs the edge no memory and the others no time."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from broker.client import Follower
from broker.protocol import meta_key, text_key
from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import FakeLLM
from tests.support.sse import read_events

BLOCK = ("slow " * 800).rstrip() + ". "  # ~4 kB, one message each
TOKENS = [*([BLOCK] * 6000), "Done."]  # ~24 MB in ~12 s
EXPECTED = "".join(TOKENS)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_slow_viewer_is_bounded_and_delays_nobody(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=1, workers=1, broker_send_timeout=6, broker_max_message_chars=4096)
    edge = d.edges[0]
    prompt = fake_llm.script(unique("slow"), tokens=TOKENS, delay=0.002)
    # A fixed receive buffer (no autotuning), so the lag backs up into the edge's socket.
    slow_transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    )
    store = aioredis.Redis(port=d.redis.port)
    async with (
        store,
        httpx.AsyncClient(timeout=60) as http,
        httpx.AsyncClient(timeout=60, transport=slow_transport) as slow_http,
    ):
        baseline = rss_bytes(edge.proc.pid)
        gen_id = await create(http, edge.url, prompt)
        url = events_url(edge.url, gen_id)
        fast = [asyncio.create_task(read_events(http, url)) for _ in range(2)]
        follower = Follower(slow_http, url)
        closed_slow = asyncio.Event()
        peak = baseline
        at_close: tuple[int, int] | None = None  # (edge RSS, bytes streamed) when it was closed
        completed_at: float | None = None
        fast_done_at: list[float] = []

        async def read_slowly() -> str:
            text = []
            async for message in follower:
                text.append(message.text)
                if not closed_slow.is_set():
                    await asyncio.sleep(0.2)  # ~5 messages/s against ~500/s streamed
            return "".join(text)

        async def watch_edge() -> None:
            nonlocal peak, completed_at, at_close
            while not (closed_slow.is_set() and completed_at):
                rss = rss_bytes(edge.proc.pid)
                peak = max(peak, rss)
                metrics = (await http.get(edge.url + "/metrics")).text
                # Straight from Redis: the status endpoint would pull the whole (megabytes of)
                # text through the edge on every poll and inflate the RSS under measurement.
                streamed = await store.strlen(text_key(gen_id))
                finished = await store.hget(meta_key(gen_id), "status")
                if not closed_slow.is_set() and metric(
                    metrics, "broker_slow_viewers_closed_total"
                ) >= 1:
                    at_close = (rss, streamed)
                    closed_slow.set()
                if completed_at is None and finished == b"completed":
                    completed_at = time.monotonic()
                await asyncio.sleep(0.05)

        async def time_fast(task: asyncio.Task) -> object:
            result = await task
            fast_done_at.append(time.monotonic())
            return result

        slow = asyncio.create_task(read_slowly())
        watcher = asyncio.create_task(watch_edge())
        fast_results = await asyncio.wait_for(asyncio.gather(*map(time_fast, fast)), 60)
        await asyncio.wait_for(watcher, 60)
        slow_text = await asyncio.wait_for(slow, 60)

    for got in fast_results:
        assert got.text == EXPECTED
    assert completed_at is not None
    lag = max(fast_done_at) - completed_at
    assert lag < 2.0, f"fast viewers finished {lag:.2f}s after the end was published"
    # While the viewer lagged by megabytes, the edge held no backlog for it: its memory stayed
    # flat (the bound per viewer is one write batch, not the lag).
    assert at_close is not None
    lagging_growth, streamed = at_close[0] - baseline, at_close[1]
    assert streamed > 4_000_000, "the viewer should have lagged by megabytes"
    assert lagging_growth < streamed / 2, (
        f"edge RSS grew {lagging_growth / 1e6:.1f} MB while {streamed / 1e6:.1f} MB streamed"
    )
    growth = peak - baseline  # includes the resume burst after the close
    assert growth < 64_000_000
    # Closed for its slowness, the viewer resumed with Last-Event-ID and lost nothing.
    assert follower.reconnects >= 1
    assert slow_text == EXPECTED
    record_property("edge_rss_growth_while_lagging_mb", round(lagging_growth / 1e6, 1))
    record_property("edge_rss_peak_growth_mb", round(growth / 1e6, 1))
    record_property("fast_viewer_lag_s", round(lag, 2))
    print(f"slow viewer: edge RSS +{lagging_growth / 1e6:.1f} MB while {streamed / 1e6:.1f} MB "
          f"streamed past it (peak +{growth / 1e6:.1f} MB with the resume); fast viewers done "
          f"{lag:.2f}s after the end; the slow viewer was closed, reconnected "
          f"{follower.reconnects}x and got the exact text")
