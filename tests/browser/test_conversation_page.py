"""The demo page's conversation view in Chromium against a real `broker dev`: two devices
follow every turn of one conversation (the helper's `followConversation`), each over one
stream that stays open between turns; one device drops its connection in the middle of a turn
and resumes, across turns, with nothing lost or repeated."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from broker.tools.mockllm import WEATHER_CALL
from tests.browser.helpers import assert_ids_strictly_increasing

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000

EVERY_DEVICE = "(n) => window.demo.conversation.devices.length === 2 && " \
    "window.demo.conversation.devices.every((d) => "


async def conversation(page: Page) -> dict[str, Any]:
    data: dict[str, Any] = await page.evaluate("() => window.demo.conversation")
    return data


@pytest.mark.browser
async def test_two_devices_follow_every_turn_and_one_resumes_mid_turn(
    page: Page, api: httpx.AsyncClient
) -> None:
    await page.goto("/")
    await page.fill("#turn-question", "Think about the weather in Paris.")
    await page.click("#send-turn")
    await page.wait_for_function(
        EVERY_DEVICE + "d.turns.length === 1 && d.turns[0].finishReason !== null)",
        timeout=WAIT_MS)
    await page.fill("#turn-question", "And now, how does resuming work?")
    await page.click("#send-turn")
    # Device B drops its connection while the second turn streams, and resumes.
    await page.wait_for_function(
        "() => { const d = window.demo.conversation.devices[1];"
        " return d.turns.length === 2 && d.turns[1].text.length > 0; }", timeout=WAIT_MS)
    await page.locator(".device").nth(1).locator(".drop").click()
    await page.wait_for_function(
        EVERY_DEVICE + "d.turns.length === 2 && d.turns[1].finishReason !== null)",
        timeout=WAIT_MS)
    conv = await conversation(page)
    first, second = conv["created"]
    records = [(await api.get(f"/v1/generations/{gen_id}")).json() for gen_id in (first, second)]
    assert records[1]["status"] == "completed"

    a, b = conv["devices"]
    assert a["reconnects"] == 0 and b["reconnects"] == 1
    assert a["ids"] == b["ids"]  # the same events, once each, in the same order
    assert_ids_strictly_increasing(a["ids"])
    for device in (a, b):
        assert [t["generationId"] for t in device["turns"]] == [first, second]
        assert [t["turn"] for t in device["turns"]] == [1, 2]
        for turn, record in zip(device["turns"], records, strict=True):
            assert turn["text"] == record["text"] != ""
            assert turn["reasoning"] == record["reasoning"]
            assert turn["toolCalls"] == record["tool_calls"]
            assert turn["finishReason"] == record["finish_reason"]
    assert a["turns"][0]["toolCalls"][0]["id"] == WEATHER_CALL.id
    assert a["turns"][0]["reasoning"] != ""

    # Rendered side by side: each device shows both turns, the first with its reasoning
    # pane and its tool chip, every answer as received.
    for index in (0, 1):
        device = page.locator(".device").nth(index)
        turns = device.locator(".turn")
        assert await turns.count() == 2
        assert await turns.nth(0).locator("details.reasoning .reasoning-text").text_content() \
            == records[0]["reasoning"]
        chip = turns.nth(0).locator(".chip.tool-call")
        assert await chip.count() == 1 and await chip.is_visible()
        assert await chip.get_attribute("data-call-id") == WEATHER_CALL.id
        for n in (0, 1):
            assert await turns.nth(n).locator(".answer").text_content() == records[n]["text"]
        assert not await turns.nth(1).locator("details.reasoning").is_visible()
    boxes = [await page.locator(".device").nth(i).bounding_box() for i in (0, 1)]
    assert boxes[0] and boxes[1] and boxes[0]["x"] < boxes[1]["x"]
    assert boxes[0]["y"] == boxes[1]["y"]  # side by side, not stacked


@pytest.mark.browser
async def test_follow_conversation_explains_a_refused_stream_and_stops(page: Page) -> None:
    """A token that is not this conversation's: the helper asks why (403 `forbidden`),
    reports it once and does not reconnect."""
    await page.goto("/healthz")
    outcome = await page.evaluate("""async () => {
        const { followConversation } = await import('/static/broker-stream.js');
        return await new Promise((resolve) => {
            const states = [];
            const follow = followConversation('/v1/conversations/chat-1/events?token=bogus', {
                onState: (state) => states.push(state),
                onError: (e) => resolve({ code: e.code, status: e.status, states,
                                          state: follow.state,
                                          readyState: follow.source.readyState }),
            });
        });
    }""")
    assert outcome["code"] in ("forbidden", "unauthorized") and outcome["status"] in (401, 403)
    assert outcome["state"] == "error" and outcome["readyState"] == 2
    assert "live" not in outcome["states"]
