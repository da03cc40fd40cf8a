"""An edge is SIGKILLed in the middle of a conversation's turn: the devices that were on it
reconnect through HAProxy to the surviving edge and get the rest of that turn, then the next
turn, over the same kind of single stream; every device ends with the exact texts of both
turns, each event once, in order.

The devices are real clients that reconnect by themselves: Chromium's EventSource through the
edge's own `/static/broker-conversation.js`, and the project's `broker.client.
ConversationFollower`. HAProxy names the edge behind each answer (`X-Served-By`).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page, async_playwright

from broker.client import ConversationEvent, ConversationFollower
from tests.support.chromium import launch
from tests.support.haproxy import SERVED_BY, HAProxy
from tests.support.procs import eventually

pytestmark = pytest.mark.browser

PYTHON_DEVICES = 4
CHROMIUM_DEVICES = 2
FIRST = ("The first turn streams for a few seconds, one sentence at a time. " * 12).strip()
SECOND = "The second turn comes after the kill, over the streams that resumed. Done."

CHROMIUM_DEVICES_JS = """
async ([url, count]) => {
  const { followConversation } = await import('/static/broker-conversation.js');
  window.devices = [];
  for (let i = 0; i < count; i++) window.devices.push(followConversation(url));
}
"""
CHROMIUM_STATE_JS = "() => window.devices.map((d) => d.snapshot())"


class PythonDevice:
    def __init__(self, base_url: str, events_url: str) -> None:
        self.served_by: list[str] = []
        self.events: list[ConversationEvent] = []
        self.http = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(30.0, connect=5.0),
            event_hooks={"response": [self._note_server]})
        self.follower = ConversationFollower(self.http, events_url)
        self.task = asyncio.create_task(self._run())

    async def _note_server(self, response: httpx.Response) -> None:
        self.served_by.append(response.headers.get(SERVED_BY, "?"))

    async def _run(self) -> None:
        async for event in self.follower:
            self.events.append(event)

    def texts(self) -> dict[str, str]:
        texts: dict[str, str] = {}
        for e in self.events:
            if e.event == "message":
                texts[e.generation_id] = texts.get(e.generation_id, "") + e.data["text"]
        return texts

    def ended(self) -> int:
        return sum(1 for e in self.events if e.terminal)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.http.aclose()


@pytest.fixture
def haproxy_over() -> Iterator[Any]:
    started: list[HAProxy] = []

    def start(backends: list[str]) -> HAProxy:
        lb = HAProxy(backends)
        started.append(lb)
        return lb.start()

    yield start
    for lb in started:
        lb.stop()


@pytest_asyncio.fixture
async def chromium_page() -> Any:
    async with async_playwright() as pw:
        browser = await launch(pw)
        try:
            context = await browser.new_context()
            context.set_default_timeout(20_000)
            yield await context.new_page()
        finally:
            await browser.close()


async def test_edge_killed_mid_turn_devices_resume_and_follow_the_next_turn(
    deploy: Any, fake_llm: Any, haproxy_over: Any, chromium_page: Page
) -> None:
    d = deploy(edges=2, workers=1)
    lb = haproxy_over([edge.url for edge in d.edges])
    edge_by_name = {name: d.edges[i] for i, name in enumerate(lb.server_names())}
    first = fake_llm.script("conversation edge killed: first", FIRST, delay=0.03)
    second = fake_llm.script("conversation edge killed: second", SECOND)
    cid = "fault:edge-killed"

    async with httpx.AsyncClient(base_url=lb.url, timeout=10.0) as http:
        async def turn(prompt: str) -> str:
            created = await http.post("/v1/generations", json={
                "messages": [{"role": "user", "content": prompt}], "conversation_id": cid})
            assert created.status_code == 201, created.text
            return str(created.json()["id"])

        gens = [await turn(first)]
        events_url = f"/v1/conversations/{cid}/events"
        pythons = [PythonDevice(lb.url, events_url) for _ in range(PYTHON_DEVICES)]
        page = chromium_page
        chromium_served_by: list[str] = []
        page.on("response", lambda response: chromium_served_by.append(
            response.headers.get(SERVED_BY, "?")) if events_url in response.url else None)
        await page.goto(f"{lb.url}/healthz")
        await page.evaluate(CHROMIUM_DEVICES_JS, [lb.url + events_url, CHROMIUM_DEVICES])
        try:
            async def all_streaming() -> bool:
                chromium = await page.evaluate(CHROMIUM_STATE_JS)
                return (all(len(p.events) >= 3 for p in pythons)
                        and all(len(c["ids"]) >= 3 for c in chromium))
            await eventually(all_streaming, 20, "every device in the first turn")
            assert (await http.get(f"/v1/generations/{gens[0]}")).json()["status"] == "running"
            victim = pythons[0].served_by[0]
            edge_by_name[victim].signal(signal.SIGKILL)
            edge_by_name[victim].proc.wait(5)
            gens.append(await turn(second))

            async def all_done() -> bool:
                chromium = await page.evaluate(CHROMIUM_STATE_JS)
                return (all(p.ended() == 2 for p in pythons)
                        and all(sum(t["ended"] for t in c["turns"]) == 2 for c in chromium))
            await eventually(all_done, 30, "every device to see both turns end")
            chromium = await page.evaluate(CHROMIUM_STATE_JS)
        finally:
            for device in pythons:
                await device.stop()

    expected = dict(zip(gens, [FIRST, SECOND], strict=True))
    reference = [e.id for e in pythons[0].events]
    assert reference == sorted(set(reference))
    for device in pythons:
        assert device.texts() == expected
        assert [e.id for e in device.events] == reference  # each event once, in order
        assert [e.generation_id for e in device.events if e.event == "turn"] == gens
        on_victim = device.served_by[0] == victim
        assert (device.follower.reconnects >= 1) == on_victim, device.served_by
        assert victim not in device.served_by[1:]
    for snapshot in chromium:
        assert {t["generationId"]: t["text"] for t in snapshot["turns"]} == expected
        assert snapshot["ids"] == [i for i in reference if i]
    moved = [p for p in pythons if p.served_by[0] == victim]
    assert moved, "no device was on the killed edge"
    chromium_moved = sum(s == victim for s in chromium_served_by[:CHROMIUM_DEVICES])
    assert sum(s["reconnects"] for s in chromium) >= chromium_moved
    assert victim not in chromium_served_by[CHROMIUM_DEVICES:]
    print(f"\nkilled {victim}: {len(moved)} of {PYTHON_DEVICES} Python devices and "
          f"{chromium_moved} of "
          f"{CHROMIUM_DEVICES} Chromium devices moved; Chromium answers: {chromium_served_by}; "
          f"texts: {json.dumps({g[:6]: len(t) for g, t in expected.items()})}")
