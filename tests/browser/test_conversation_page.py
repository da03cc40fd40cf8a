"""The demo's conversation view in Chromium against a real `broker dev`: two devices side by
side, each on ONE EventSource (`/static/broker-conversation.js`) that stays open between
turns; one device dropped mid-turn resumes with nothing lost or repeated. What the devices
show is checked against the server's own record of each turn."""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, Request

from tests.browser.helpers import assert_ids_strictly_increasing

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000
CONVERSATION_EVENTS = re.compile(r"/v1/conversations/[^/?#]+/events$")


def record_conversation_requests(page: Page) -> list[Request]:
    seen: list[Request] = []
    page.on("request", lambda request: seen.append(request)
            if CONVERSATION_EVENTS.search(urlsplit(request.url).path) else None)
    return seen


async def ask(page: Page, question: str, turns: int) -> str:
    await page.fill("#question", question)
    await page.click("#ask")
    await page.wait_for_function("n => window.conversationDemo.generations.length === n",
                                 arg=turns, timeout=WAIT_MS)
    gen_id: str = await page.evaluate(f"() => window.conversationDemo.generations[{turns - 1}]")
    return gen_id


async def wait_turns_ended(page: Page, device: int, turns: int) -> dict[str, Any]:
    await page.wait_for_function(
        """([i, n]) => {
            const d = window.conversationDemo.devices[i];
            return Boolean(d) && d.turns.filter((t) => t.ended).length === n;
        }""", arg=[device, turns], timeout=WAIT_MS)
    snapshot: dict[str, Any] = await page.evaluate(
        "i => window.conversationDemo.devices[i]", device)
    return snapshot


@pytest.mark.browser
async def test_two_devices_follow_two_turns_and_a_dropped_one_resumes(
    page: Page, api: httpx.AsyncClient
) -> None:
    requests = record_conversation_requests(page)
    await page.goto("/")
    await page.click("#conversation-view")  # the demo page switches to this view
    await page.wait_for_url("**/static/conversation.html")
    first = await ask(page, "What is a Server-Sent Events stream?", 1)
    for device in (0, 1):
        await wait_turns_ended(page, device, 1)

    second = await ask(page, "And how does it resume?", 2)
    # Device B drops its connection in the middle of the second turn.
    await page.wait_for_function(
        """g => {
            const d = window.conversationDemo.devices[1];
            const t = d && d.turns.find((x) => x.generationId === g);
            return Boolean(t) && t.events >= 2 && !t.ended;
        }""", arg=second, timeout=WAIT_MS)
    await page.locator(".device").nth(1).locator(".drop").click()
    a, b = (await wait_turns_ended(page, 0, 2)), (await wait_turns_ended(page, 1, 2))

    for gen_id in (first, second):
        status = (await api.get(f"/v1/generations/{gen_id}")).json()
        assert status["status"] == "completed"
        for device in (a, b):
            [turn] = [t for t in device["turns"] if t["generationId"] == gen_id]
            assert turn["text"] == status["text"]  # nothing lost, nothing twice
            assert turn["finishReason"] == "stop"
    assert [t["generationId"] for t in a["turns"]] == [first, second]
    assert [t["turn"] for t in b["turns"]] == [1, 2]
    assert a["ids"] == b["ids"]  # the same events under the same ids
    assert_ids_strictly_increasing(a["ids"])
    assert (a["reconnects"], b["reconnects"]) == (0, 1)
    # One stream per device for both turns, and the drop's resume: three requests in all.
    assert len(requests) == 3, [r.url for r in requests]
    assert "last_event_id=" in requests[2].url
    # What is rendered is what was received.
    rendered = page.locator(".device").nth(1).locator(f'.turn[data-generation-id="{second}"]')
    assert await rendered.locator(".answer").text_content() == b["turns"][1]["text"]
    assert await rendered.get_attribute("data-state") == "ended"


@pytest.mark.browser
async def test_a_device_resumed_mid_turn_from_a_stored_id_gets_the_rest_of_that_turn(
    page: Page, api: httpx.AsyncClient
) -> None:
    """``followConversation(url, {lastEventId})`` resumes after an id a page kept (a reload);
    when that id is inside a turn, the turn's ``turn`` event came before it, and the helper
    dropped the rest of the turn's events (its end too) for want of it."""
    created = (await api.post("/v1/generations", json={
        "producer": "external", "conversation_id": f"resume-{uuid.uuid4().hex}"})).json()
    texts = ["One. ", "Two. ", "Three. "]
    for i, text in enumerate(texts):
        response = await api.post(created["append_url"],
                                  json={"after": i, "events": [{"type": "text", "text": text}]})
        assert response.status_code == 200, response.text
    assert (await api.post(created["finish_url"], json={})).status_code == 200
    await page.goto("/")
    # The turn's end, or what the helper has after a bound (the events are all in Redis).
    device: dict[str, Any] = await page.evaluate(
        """async ([url, after, bound]) => {
            const { followConversation } = await import('/static/broker-conversation.js');
            return await new Promise((resolve) => {
                const done = () => { follow.close(); resolve(follow.snapshot()); };
                const follow = followConversation(url, { lastEventId: after, onTurnEnd: done });
                setTimeout(done, bound);
            });
        }""", [created["conversation_url"], "000000010000000001", 5000])
    assert [(t["generationId"], t["turn"], t["text"], t["finishReason"], t["ended"])
            for t in device["turns"]] == [(created["id"], 1, "Two. Three. ", "stop", True)]
    assert device["ids"] == ["000000010000000002", "000000010000000003", "000000010000000004"]
