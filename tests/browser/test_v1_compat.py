"""v1 clients see no change from typed events: an `EventSource` with only `onmessage` (in
Chromium, and the Node `eventsource` package) receives the answer text and nothing else, while
the same stream carries reasoning and a tool call. Against a real `broker dev`, whose mock LLM
reasons when asked to "think" and calls a tool when asked about the "weather"."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from playwright.async_api import Page

from broker.tools.mockllm import WEATHER_CALL, default_script
from tests.support.node_viewer import NodeViewers
from tests.support.sse import read_events

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "Think first: what is the weather in Paris?"
WAIT_MS = 20_000

# The most a v1 page does: `onmessage`, nothing else. When the stream ends, the browser
# reconnects with the last id, gets a 204 and closes the source for good (readyState 2).
ONMESSAGE_ONLY = """
url => {
    window.v1 = { messages: [], closed: false };
    const source = new EventSource(url);
    source.onmessage = (event) => window.v1.messages.push(
        { id: event.lastEventId, type: event.type, data: event.data });
    const poll = setInterval(() => {
        if (source.readyState === EventSource.CLOSED) {
            window.v1.closed = true;
            clearInterval(poll);
        }
    }, 20);
}
"""


def mock_reasoning() -> str:
    deltas = default_script({"messages": [{"role": "user", "content": QUESTION}]}).chunk_deltas()
    return "".join(d.get("reasoning_content", "") for d in deltas)


@pytest.mark.browser
async def test_onmessage_only_clients_see_exactly_the_answer_text(
    page: Page, api: httpx.AsyncClient, broker_url: str
) -> None:
    created = await api.post("/v1/generations",
                             json={"messages": [{"role": "user", "content": QUESTION}]})
    assert created.status_code == 201, created.text
    gen_id, events_url = created.json()["id"], created.json()["events_url"]
    node = NodeViewers(broker_url + events_url).start()
    try:
        await page.goto("/healthz")  # a same-origin document
        await page.evaluate(ONMESSAGE_ONLY, events_url)
        # Everything the stream carries, typed events included, for reference.
        full = await read_events(api, events_url)
        node_report: list[dict[str, Any]] = await asyncio.to_thread(node.result, 30)
    finally:
        node.stop()
    await page.wait_for_function("window.v1.closed", timeout=WAIT_MS)
    in_chromium: dict[str, Any] = await page.evaluate("window.v1")

    record = (await api.get(f"/v1/generations/{gen_id}")).json()
    # The stream did carry the typed events (the dev mock's switches)...
    kinds = [e.event for e in full.events]
    assert {"reasoning", "message", "tool_call", "end"} <= set(kinds)
    assert record["reasoning"] == mock_reasoning() != ""
    assert record["tool_calls"] == [{"index": 0, "id": WEATHER_CALL.id, "name": WEATHER_CALL.name,
                                     "arguments": "".join(WEATHER_CALL.pieces)}]
    assert record["finish_reason"] == "tool_calls"
    # ...and the v1 clients saw the answer's messages, exactly, and nothing else.
    messages = [(e.id, e.data) for e in full.messages]
    assert messages and record["text"] == full.text != ""
    assert [(m["id"], m["data"]) for m in in_chromium["messages"]] == messages
    assert {m["type"] for m in in_chromium["messages"]} == {"message"}
    assert "".join(json.loads(m["data"])["text"] for m in in_chromium["messages"]) == (
        record["text"])
    (viewer,) = node_report
    assert viewer["text"] == record["text"]
    assert viewer["ids"] == [*(i for i, _ in messages), full.ids[-1]]  # + the `end` event's
    assert viewer["terminal"] == "end" and viewer["finish_reason"] == "tool_calls"
