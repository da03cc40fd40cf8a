"""An edge stopped with SIGTERM ends its streams at once, so viewers move to another edge."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from broker.client import Follower
from broker.core.settings import Settings
from broker.edge import uvicorn_extensions
from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.haproxy import HAProxy
from tests.support.procs import eventually

ANSWER = "".join(
    f"Sentence {i} keeps the answer going for a while. " for i in range(80)
) + TRICKY_TEXT
SETTINGS = Settings()  # the edges and the worker run the defaults


# A viewer of the stopped edge gets its stream ended at once; like EventSource it reconnects
# after the advised `retry:` (the Follower adds up to 20 % jitter); the surviving edge replays
# what it missed from the log at once, or its next message comes within the worker's flush
# interval. One more retry period is left for a loaded machine.
MOVED_WITHIN = SETTINGS.retry_ms / 1000 * (1.2 + 1) + SETTINGS.flush_interval


async def test_sigterm_on_an_edge_moves_its_viewers_without_loss(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    grace = uvicorn_extensions.GRACEFUL_SHUTDOWN_SECONDS
    d = deploy(edges=2, workers=1)
    lb = HAProxy([e.url for e in d.edges]).start()
    try:
        prompt = fake_llm.script(unique("edge-term"), ANSWER, delay=0.01)
        async with httpx.AsyncClient(base_url=lb.url, timeout=30) as http:
            gen_id = await create(http, lb.url, prompt)
            followers = [Follower(http, events_url(lb.url, gen_id)) for _ in range(4)]
            texts: list[list[str]] = [[] for _ in followers]
            moved_at: list[float | None] = [None for _ in followers]
            exit_times: list[float] = []

            async def follow(i: int) -> str:
                async for message in followers[i]:
                    if followers[i].reconnects and moved_at[i] is None:
                        moved_at[i] = time.monotonic()  # its first message after reconnecting
                    texts[i].append(message.text)
                return "".join(texts[i])

            tasks = [asyncio.create_task(follow(i)) for i in range(len(followers))]
            await eventually(lambda: asyncio.sleep(0, all(len(t) >= 2 for t in texts)), 15,
                             "every viewer to have two messages")
            counts = [metric((await http.get(e.url + "/metrics")).text, "broker_viewers ")
                      for e in d.edges]
            victim = d.edges[counts.index(max(counts))]
            before = (await http.get(f"/v1/generations/{gen_id}")).json()
            assert before["status"] == "running"  # the viewers move in the middle of it

            victim.signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            exited = asyncio.create_task(asyncio.to_thread(victim.proc.wait, 10))
            exited.add_done_callback(lambda _: exit_times.append(time.monotonic() - stopped_at))
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            elapsed = time.monotonic() - stopped_at
            code = await exited
            exited_after = exit_times[0]
            status = (await http.get(f"/v1/generations/{gen_id}")).json()
        log = victim.output()
        # uvicorn re-raises the signal once shut down. It did not wait out its grace period
        # for the streams (it says so when it does): the edge had ended them itself.
        assert code in (0, -signal.SIGTERM)
        assert "Shutting down" in log, log  # uvicorn's own shutdown lines reach this log
        assert "graceful shutdown exceeded" not in log, log
        assert exited_after < grace, f"exited {exited_after:.2f}s after SIGTERM"
        assert all(r == ANSWER for r in results)
        assert sum(f.reconnects for f in followers) >= max(counts)
        assert all(f.result is not None and f.result.finish_reason == "stop" for f in followers)
        moved = [t - stopped_at for t in moved_at if t is not None]
        assert len(moved) >= max(counts)
        assert max(moved) < MOVED_WITHIN, f"moved after {moved} s"
        assert status["status"] == "completed"
    finally:
        lb.stop()
    record_property("seconds_to_terminal", round(elapsed, 2))
    record_property("edge_exit_seconds", round(exited_after, 2))
    record_property("seconds_to_moved", [round(t, 2) for t in moved])
    print(f"edge SIGTERM: exited after {exited_after:.2f}s; {int(max(counts))} viewers moved "
          f"(first message on the new edge {max(moved):.2f}s after the signal, bound "
          f"{MOVED_WITHIN:.2f}s); all had the exact text {elapsed:.2f}s after the signal")
