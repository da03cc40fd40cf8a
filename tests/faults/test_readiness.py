"""Readiness that proves delivery: a subscription that silently stops delivering turns
/readyz 503 and is replaced, and viewers catch up from the log."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import eventually
from tests.support.sse import Received, read_events
from tests.support.tcpproxy import TcpProxy

ANSWER = "".join(
    f"Sentence {i} arrives while the subscription is stalled. " for i in range(60)
) + TRICKY_TEXT
PROBE_INTERVAL = 0.2
# BROKER_PROBE_INTERVAL: "/readyz fails after 3 lost" probes, i.e. none seen back for three
# intervals. The last one seen came before the freeze: /readyz is 503 within a probe timeout
# of it; the hub then starts over on a new connection and is ready again once a probe makes
# the round trip, within a second timeout. One more timeout is left as slack for each.
PROBE_TIMEOUT = 3 * PROBE_INTERVAL
UNREADY_WITHIN = 2 * PROBE_TIMEOUT
READY_AGAIN_WITHIN = 3 * PROBE_TIMEOUT


async def test_stalled_subscription_turns_readyz_503_then_recovers(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=0, workers=1)
    proxy = TcpProxy(d.redis.port).start()
    try:
        edge = d.add_edge(redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                          broker_probe_interval=PROBE_INTERVAL)
        prompt = fake_llm.script(unique("stall"), ANSWER, delay=0.01)
        async with httpx.AsyncClient(timeout=30) as http:

            async def readyz(code: int) -> bool:
                return (await http.get(edge.url + "/readyz")).status_code == code

            await eventually(lambda: readyz(200), 5, "/readyz 200")
            gen_id = await create(http, edge.url, prompt)
            progress: list[Received] = []
            viewer = asyncio.create_task(
                read_events(http, events_url(edge.url, gen_id), progress=progress)
            )
            await eventually(lambda: asyncio.sleep(0, progress and len(progress[0].messages) >= 2),
                             10, "two messages")

            assert proxy.freeze_subscribers() == 1
            frozen_at = time.monotonic()
            await eventually(lambda: readyz(503), UNREADY_WITHIN, "/readyz 503")
            to_503 = time.monotonic() - frozen_at
            body = (await http.get(edge.url + "/readyz")).json()
            await eventually(lambda: readyz(200), frozen_at + READY_AGAIN_WITHIN
                             - time.monotonic(), "/readyz 200 again")
            back = time.monotonic() - frozen_at

            got = await asyncio.wait_for(viewer, 30)
            metrics = (await http.get(edge.url + "/metrics")).text
    finally:
        proxy.stop()
    assert got.text == ANSWER and got.terminal_data()["finish_reason"] == "stop"
    assert body["error"]["code"] == "not_delivering"
    assert metric(metrics, "broker_pubsub_stalls_total") >= 1
    record_property("seconds_to_503", round(to_503, 2))
    record_property("seconds_back_to_200", round(back, 2))
    print(f"stalled subscription: /readyz 503 after {to_503:.2f}s, 200 again after "
          f"{back:.2f}s (probe every 0.2s); the viewer got the exact text")
