"""Typed events in the browser: the demo page's reasoning pane and tool chips against a real
`broker dev` (its mock LLM reasons when asked to "think" and calls a tool about the
"weather"), and the helper `/static/broker-stream.js` handing every kind to its callback,
across a reconnect, against a real edge on a real redis-server into which the test publishes
each kind (tool results and data come from producers, not from an LLM). A v1 page and the Node
`eventsource` package with `onmessage` alone see exactly the answer on that same stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from playwright.async_api import Page

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.tools.mockllm import WEATHER_CALL, default_script
from tests.browser.helpers import assert_ids_strictly_increasing
from tests.browser.test_v1_compat import ONMESSAGE_ONLY
from tests.conftest import StartBroker
from tests.support.fakellm import TRICKY_TEXT
from tests.support.node_viewer import NodeViewers
from tests.support.procs import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000
QUESTION = "Please think about the weather in Paris."


def mock_reasoning() -> str:
    """The reasoning the dev mode's mock LLM streams for ``QUESTION``."""
    deltas = default_script({"messages": [{"role": "user", "content": QUESTION}]}).chunk_deltas()
    return "".join(d.get("reasoning_content", "") for d in deltas)


# -- the demo page ------------------------------------------------------------------------------


@pytest.mark.browser
async def test_demo_page_shows_the_reasoning_pane_and_a_tool_chip(
    page: Page, api: httpx.AsyncClient
) -> None:
    await page.goto("/")
    await page.fill("#question", QUESTION)
    await page.click("#ask")
    await page.wait_for_function(
        "() => window.demo.viewers.length === 1 && window.demo.viewers[0].terminal !== null",
        timeout=WAIT_MS)
    v: dict[str, Any] = await page.evaluate("() => window.demo.viewers[0]")
    gen_id = await page.evaluate("() => window.demo.generation.id")
    record = (await api.get(f"/v1/generations/{gen_id}")).json()

    assert v["state"] == "ended" and v["finishReason"] == "tool_calls" == record["finish_reason"]
    assert v["reasoning"] == record["reasoning"] == mock_reasoning() != ""
    assert v["text"] == record["text"] != ""
    expected_call = {"index": 0, "id": WEATHER_CALL.id, "name": WEATHER_CALL.name,
                     "arguments": "".join(WEATHER_CALL.pieces)}
    assert v["toolCalls"] == record["tool_calls"] == [expected_call]
    assert_ids_strictly_increasing(v["ids"])
    assert len(v["ids"]) == record["events"]["message"] + record["events"]["reasoning"] + 2

    panel = page.locator(".viewer").nth(0)
    # The reasoning pane: shown, holding the reasoning as sent, and it folds away.
    pane = panel.locator("details.reasoning")
    assert await pane.is_visible()
    assert await pane.locator(".reasoning-text").text_content() == record["reasoning"]
    assert await pane.locator(".reasoning-text").is_visible()
    await pane.locator("summary").click()
    assert await pane.get_attribute("open") is None
    assert not await pane.locator(".reasoning-text").is_visible()
    await pane.locator("summary").click()
    assert await pane.locator(".reasoning-text").is_visible()
    # One chip for the call, named after the tool; the answer holds the answer alone.
    chips = panel.locator(".tools .chip.tool-call")
    assert await chips.count() == 1
    chip = chips.nth(0)
    assert await chip.is_visible()
    assert (await chip.text_content() or "").startswith("⚙ get_weather({")
    assert await chip.get_attribute("data-call-id") == WEATHER_CALL.id
    assert expected_call["arguments"] in (await chip.get_attribute("title") or "")
    assert await panel.locator(".answer").text_content() == record["text"]


@pytest.mark.browser
async def test_demo_page_without_typed_events_shows_no_pane_and_no_chips(page: Page) -> None:
    await page.goto("/")
    await page.fill("#question", "Hello there.")
    await page.click("#ask")
    await page.wait_for_function(
        "() => window.demo.viewers.length === 1 && window.demo.viewers[0].terminal !== null",
        timeout=WAIT_MS)
    panel = page.locator(".viewer").nth(0)
    assert not await panel.locator("details.reasoning").is_visible()
    assert not await panel.locator(".tools").is_visible()
    assert await panel.locator(".answer").text_content() != ""


# -- the helper, every kind -----------------------------------------------------------------------


REASONING = [f"Thinking {TRICKY_TEXT} ", "Done thinking."]
ANSWER = [f"Hello {TRICKY_TEXT} ", "Bye."]
TOOL_CALL = (0, "call_1", "search", '{"q": "caf\\u00e9 \u2028 😀"}')
TOOL_RESULT = {"hits": [1, 2], "note": f"é\n{TRICKY_TEXT}"}
SOURCES = [{"url": "https://example.com/?a=1&b=2", "title": "a\u2028b"}]
FIRST_HALF = [
    protocol.new_reasoning(REASONING[0]),
    protocol.new_message(ANSWER[0]),
    protocol.new_tool_call(*TOOL_CALL),
]
SECOND_HALF = [
    protocol.new_tool_result("call_1", TOOL_RESULT),
    protocol.new_data("sources", SOURCES),
    protocol.new_reasoning(REASONING[1]),
    protocol.new_message(ANSWER[1]),
    protocol.new_end("stop", None),
]
EVERY_EVENT = [*FIRST_HALF, *SECOND_HALF]


@pytest.fixture(scope="module")
def typed_edge(start_broker: StartBroker) -> Iterator[tuple[str, RedisServer]]:
    """An edge (open, no worker) on a redis-server of its own; the test is the producer."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_retry_ms="100")
    yield edge.url, redis
    redis.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def producer(typed_edge: tuple[str, RedisServer]) -> AsyncIterator[Store]:
    settings = Settings(redis_url=typed_edge[1].url)
    client = connect(settings, "browser-typed-test")
    yield Store(client, settings)
    await client.aclose()
    if isinstance(client, aioredis.Redis):
        await client.connection_pool.disconnect()


async def running_generation(store: Store) -> str:
    gen_id = protocol.new_generation_id()
    await store.redis.hset(protocol.meta_key(gen_id), mapping=protocol.new_meta("m"))
    assert await store.claim(gen_id, "test-producer", 60.0) == "ok"
    return gen_id


FOLLOW_EVERY_KIND = """
async url => {
    const { followGeneration } = await import('/static/broker-stream.js');
    const rec = { messages: [], reasoning: [], toolCalls: [], toolResults: [], data: [],
                  outcome: null };
    const keep = (list) => (e) => list.push({ id: e.id, text: e.text, data: e.data });
    const follow = followGeneration(url, {
        onMessage: keep(rec.messages), onReasoning: keep(rec.reasoning),
        onToolCall: keep(rec.toolCalls), onToolResult: keep(rec.toolResults),
        onData: keep(rec.data),
    });
    follow.done.then((r) => { rec.outcome = { ok: true, ...r }; },
                     (e) => { rec.outcome = { ok: false, code: e.code }; });
    window.typed = { follow, rec };
}
"""


def received(events: list[protocol.NewEvent], kind: str, ids: dict[int, str]) -> list[Any]:
    """What the helper's callback for ``kind`` must have received: id, text (none but for
    messages and reasoning: undefined in the page, None here), data."""
    out = []
    for n, event in enumerate(events):
        if event.kind == kind:
            data = json.loads(event.data)
            text = data["text"] if kind in ("message", "reasoning") else None
            out.append({"id": ids[n], "text": text, "data": data})
    return out


@pytest.mark.browser
async def test_helper_hands_every_kind_to_its_callback_across_a_reconnect(
    page: Page, typed_edge: tuple[str, RedisServer], producer: Store
) -> None:
    edge_url, _ = typed_edge
    gen_id = await running_generation(producer)
    await page.goto(edge_url + "/healthz")  # same origin as the edge: its module, its stream
    assert await producer.publish(gen_id, "test-producer", 1, FIRST_HALF) == 1
    await page.evaluate(FOLLOW_EVERY_KIND, f"/v1/generations/{gen_id}/events")
    await page.wait_for_function("() => window.typed.rec.toolCalls.length === 1",
                                 timeout=WAIT_MS)
    assert await page.evaluate("() => window.typed.follow.reconnect()")  # resume after id 3
    assert await producer.publish(gen_id, "test-producer", len(FIRST_HALF) + 1,
                                  SECOND_HALF) == 1
    await page.wait_for_function("() => window.typed.rec.outcome !== null", timeout=WAIT_MS)
    rec: dict[str, Any] = await page.evaluate("() => window.typed.rec")
    handle: dict[str, Any] = await page.evaluate("() => window.typed.follow.snapshot()")

    ids = {n: protocol.event_id(n + 1) for n in range(len(EVERY_EVENT))}
    for key, kind in [("messages", "message"), ("reasoning", "reasoning"),
                      ("toolCalls", "tool_call"), ("toolResults", "tool_result"),
                      ("data", "data")]:
        assert rec[key] == received(EVERY_EVENT, kind, ids), key
    outcome = rec["outcome"]
    assert outcome["ok"] and outcome["finishReason"] == "stop"
    assert outcome["text"] == handle["text"] == "".join(ANSWER)
    assert outcome["reasoning"] == handle["reasoning"] == "".join(REASONING)
    assert outcome["toolCalls"] == handle["toolCalls"] == [json.loads(FIRST_HALF[2].data)]
    assert handle["ids"] == list(ids.values())
    assert handle["reconnects"] == 1


@pytest.mark.browser
async def test_onmessage_only_viewers_see_the_answer_alone_beside_every_kind(
    page: Page, typed_edge: tuple[str, RedisServer], producer: Store
) -> None:
    """A v1 page (Chromium's `EventSource`, `onmessage` only) and the Node `eventsource`
    package, watching live while every kind is published: the answer's messages, exactly."""
    edge_url, _ = typed_edge
    gen_id = await running_generation(producer)
    path = f"/v1/generations/{gen_id}/events"
    node = NodeViewers(edge_url + path).start()
    try:
        await page.goto(edge_url + "/healthz")
        await page.evaluate(ONMESSAGE_ONLY, path)
        seq = 1
        for event in EVERY_EVENT:  # one at a time, live
            assert await producer.publish(gen_id, "test-producer", seq, [event]) == 1
            seq += 1
            await asyncio.sleep(0)
        node_report: list[dict[str, Any]] = await asyncio.to_thread(node.result, 30)
    finally:
        node.stop()
    await page.wait_for_function("window.v1.closed", timeout=WAIT_MS)
    in_chromium: dict[str, Any] = await page.evaluate("window.v1")

    message_ids = [protocol.event_id(n + 1) for n, e in enumerate(EVERY_EVENT)
                   if e.kind == "message"]
    assert [(m["id"], m["type"], json.loads(m["data"])) for m in in_chromium["messages"]] == [
        (i, "message", {"text": t}) for i, t in zip(message_ids, ANSWER, strict=True)]
    (viewer,) = node_report
    assert viewer["text"] == "".join(ANSWER)
    assert viewer["ids"] == [*message_ids, protocol.event_id(len(EVERY_EVENT))]
    assert viewer["terminal"] == "end" and viewer["finish_reason"] == "stop"


# -- the conversation view ---------------------------------------------------------------------


@pytest.mark.browser
async def test_conversation_view_shows_each_turns_reasoning_and_tool_chip(
    page: Page, api: httpx.AsyncClient
) -> None:
    """Both devices of the demo's conversation view show the turn's reasoning in its pane
    and its tool call as a chip, beside the answer."""
    await page.goto("/static/conversation.html")
    await page.fill("#question", QUESTION)
    await page.click("#ask")
    await page.wait_for_function(
        "() => window.conversationDemo.devices.length === 2 && window.conversationDemo"
        ".devices.every((d) => d && d.turns.length === 1 && d.turns[0].ended)",
        timeout=WAIT_MS)
    (gen_id,) = await page.evaluate("() => window.conversationDemo.generations")
    record = (await api.get(f"/v1/generations/{gen_id}")).json()
    assert record["reasoning"] == mock_reasoning() != "" and record["finish_reason"] == "tool_calls"
    for index in (0, 1):
        turn = page.locator(".device").nth(index).locator(".turn")
        assert await turn.count() == 1
        pane = turn.locator("details.reasoning")
        assert await pane.is_visible()
        assert await pane.locator(".reasoning-text").text_content() == record["reasoning"]
        chip = turn.locator(".tools .chip.tool-call")
        assert await chip.count() == 1 and await chip.is_visible()
        assert await chip.get_attribute("data-call-id") == WEATHER_CALL.id
        assert (await chip.text_content() or "").startswith("⚙ get_weather({")
        assert await turn.locator(".answer").text_content() == record["text"] != ""
