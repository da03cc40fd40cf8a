"""A viewer reading 100x slower than the stream costs the edge no backlog, is closed by the edge
once a write stays blocked past the send timeout, and resumes without loss; the other viewers
get the whole answer meanwhile. What it costs in figures (the edge's memory, the other
viewers' latency) is bench B8's to measure.

Two edges serve the same generation: on a *patient* one (a send timeout longer than the test)
the slow viewer lags by the whole answer, whatever the machine's speed, so its memory can be
judged; on a *strict* one it is closed and resumes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from broker.client import Follower
from broker.core import protocol, sse
from broker.core.protocol import Event, meta_key, text_key
from broker.core.settings import Settings
from broker.edge.topic import KEPT_CHUNKS, LOG_READ_CHUNK, MAX_WRITE_BYTES
from tests.faults.helpers import assert_exact_once
from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import FakeLLM
from tests.support.procs import eventually
from tests.support.sse import read_events

BLOCK = ("slow " * 800).rstrip() + ". "  # ~4 kB, one message each
TOKENS = [*([BLOCK] * 6000), "Done."]  # ~24 MB
EXPECTED = "".join(TOKENS)
SETTINGS = Settings(max_message_chars=4096)  # the rest are the defaults
STRICT_SEND_TIMEOUT = 6.0
PATIENT_SEND_TIMEOUT = 600.0  # longer than the test: its slow viewer is never closed
VIEWERS_PER_EDGE = 2  # a fast one and a slow one
SLOW_RCVBUF = 65536  # the slow viewers' receive buffer: fixed, so the lag backs up to the edge


def edge_may_hold() -> int:
    """Bytes the edge keeps for one generation whatever its viewers' lag: its replay window
    and the log chunks it keeps, each frame at most one message of ``max_message_chars``
    (ASCII here), and one write batch per viewer."""
    largest = Event(10**9, "message", protocol.message_data("x" * SETTINGS.max_message_chars),
                    protocol.now_ms())
    frames = SETTINGS.replay_window + KEPT_CHUNKS * LOG_READ_CHUNK
    return frames * len(sse.encode_event(largest)) + VIEWERS_PER_EDGE * MAX_WRITE_BYTES


def in_kernel_buffers() -> int:
    """Bytes of a lagging stream the kernel may hold between the edge and the slow viewer:
    the edge's send buffer (autotuned up to ``tcp_wmem``'s maximum) and the viewer's receive
    buffer (Linux doubles ``SO_RCVBUF`` for its own bookkeeping)."""
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return wmem_max + 2 * SLOW_RCVBUF


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class SlowViewer:
    """A ``Follower`` on a small fixed receive buffer that takes ~5 messages a second (the
    stream brings hundreds) until ``hurry`` is set, then reads at full speed."""

    def __init__(self, url: str) -> None:
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)])
        self.http = httpx.AsyncClient(timeout=60, transport=transport)
        self.follower = Follower(self.http, url)
        self.hurry = asyncio.Event()
        self.read_bytes = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> str:
        text = []
        async with self.http:
            async for message in self.follower:
                text.append(message.text)
                self.read_bytes += len(message.text)
                if not self.hurry.is_set():
                    await asyncio.sleep(0.2)
        return "".join(text)


async def test_slow_viewer_costs_no_backlog_is_closed_and_resumes(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=0, workers=1, broker_max_message_chars=SETTINGS.max_message_chars)
    patient = d.add_edge(broker_send_timeout=PATIENT_SEND_TIMEOUT)
    strict = d.add_edge(broker_send_timeout=STRICT_SEND_TIMEOUT)
    prompt = fake_llm.script(unique("slow"), tokens=TOKENS, delay=0.001)
    store = aioredis.Redis(port=d.redis.port)
    async with store, httpx.AsyncClient(timeout=60) as http:
        baseline = rss_bytes(patient.proc.pid)
        gen_id = await create(http, patient.url, prompt)
        fast = [asyncio.create_task(read_events(http, events_url(edge.url, gen_id)))
                for edge in (patient, strict)]
        lagging = SlowViewer(events_url(patient.url, gen_id))
        closed = SlowViewer(events_url(strict.url, gen_id))
        growth = 0  # the patient edge's largest RSS growth while its slow viewer lagged
        lag = 0  # how far behind that viewer was when the answer was complete

        async def until_complete() -> None:
            nonlocal growth, lag
            while True:
                growth = max(growth, rss_bytes(patient.proc.pid) - baseline)
                # Straight from Redis: the status endpoint would pull the whole (megabytes of)
                # text through the edge on every poll and inflate the RSS under measurement.
                if await store.hget(meta_key(gen_id), "status") == b"completed":
                    lag = await store.strlen(text_key(gen_id)) - lagging.read_bytes
                    lagging.hurry.set()
                    return
                await asyncio.sleep(0.05)

        async def until_closed() -> None:
            async def counted() -> bool:
                metrics = (await http.get(strict.url + "/metrics")).text
                return metric(metrics, "broker_slow_viewers_closed_total") >= 1

            await eventually(counted, 120, "the strict edge to close its slow viewer")
            closed.hurry.set()

        await asyncio.wait_for(asyncio.gather(until_complete(), until_closed()), 120)
        fast_results = await asyncio.wait_for(asyncio.gather(*fast), 60)
        slow_texts = await asyncio.wait_for(asyncio.gather(lagging.task, closed.task), 60)

    for got in fast_results:
        assert_exact_once(got, EXPECTED)
    assert slow_texts == [EXPECTED, EXPECTED]
    # The patient edge never closed its slow viewer. While that viewer lagged by the whole
    # answer, more than the kernel's buffers and all the edge may keep for a generation
    # together (so an edge queueing the backlog per viewer would have grown past that bound),
    # the edge grew by less: its bound per viewer is one write batch.
    assert lagging.follower.reconnects == 0
    bound = edge_may_hold()
    assert lag > in_kernel_buffers() + bound, f"the viewer lagged by {lag / 1e6:.1f} MB only"
    assert growth < bound, (f"edge RSS grew {growth / 1e6:.1f} MB while the viewer lagged "
                            f"(the edge may hold {bound / 1e6:.1f} MB)")
    # The strict edge closed its slow viewer for a write blocked past the send timeout; it
    # resumed with Last-Event-ID and lost nothing (its text above).
    assert closed.follower.reconnects >= 1
    record_property("edge_rss_growth_while_lagging_mb", round(growth / 1e6, 1))
    print(f"slow viewer: the patient edge's RSS +{growth / 1e6:.1f} MB while its slow viewer "
          f"lagged by up to {lag / 1e6:.1f} MB (it may hold {bound / 1e6:.1f} MB); the strict "
          f"edge closed its slow viewer, which reconnected {closed.follower.reconnects}x; "
          f"every viewer got the exact text")
