"""The demo page and the browser's own EventSource against a real `broker dev`.

These tests drive Chromium through the page's test hooks (`#ask`, `#add-viewer`, `#cancel`,
`.viewer .drop`, `window.demo`) and check what the viewers received against the server's
own record of the generation (`GET /v1/generations/{id}`). Every wait is a condition with a
timeout; the only fixed wait is the observation window of the "no reconnect after end" test.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page

from tests.browser.helpers import (
    assert_ids_strictly_increasing,
    assert_resumed_while_running,
    record_events_requests,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000  # one mock answer takes ~4 s; generous for a loaded machine


# -- helpers ---------------------------------------------------------------------------------




async def ask(page: Page) -> dict[str, Any]:
    """Click Ask and wait until the page has a *new* generation (the click returns before the
    POST answers). Returns `window.demo.generation`."""
    previous = await page.evaluate("() => window.demo.generation && window.demo.generation.id")
    await page.click("#ask")
    await page.wait_for_function(
        "prev => window.demo.generation !== null && window.demo.generation.id !== prev",
        arg=previous, timeout=WAIT_MS,
    )
    generation: dict[str, Any] = await page.evaluate("() => window.demo.generation")
    return generation


async def viewer(page: Page, index: int) -> dict[str, Any]:
    data: dict[str, Any] = await page.evaluate("i => window.demo.viewers[i]", index)
    return data


async def wait_live_messages(page: Page, index: int, count: int) -> dict[str, Any]:
    """Wait until viewer `index` is live (not ended) and has received `count` messages."""
    await page.wait_for_function(
        """([i, n]) => {
            const v = window.demo.viewers[i];
            return Boolean(v) && v.state === 'live' && v.messages >= n;
        }""",
        arg=[index, count], timeout=WAIT_MS,
    )
    return await viewer(page, index)


async def wait_terminal(page: Page, index: int) -> dict[str, Any]:
    """Wait until viewer `index` saw its terminal event (`ended` or `error`) and return it.

    Waiting for either state makes a server `event: error` fail fast with its code rather
    than as a timeout."""
    await page.wait_for_function(
        """i => {
            const v = window.demo.viewers[i];
            return Boolean(v) && v.terminal !== null
                && (v.state === 'ended' || v.state === 'error');
        }""",
        arg=index, timeout=WAIT_MS,
    )
    return await viewer(page, index)


async def generation_status(api: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def advised_retry_ms(api: httpx.AsyncClient, events_url: str) -> int:
    """The `retry:` the server advises at the start of a stream (read from a replay)."""
    async with api.stream("GET", events_url) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("retry:"):
                return int(line.removeprefix("retry:").strip())
    raise AssertionError(f"no `retry:` line in {events_url}")



def assert_ended(v: dict[str, Any], finish_reason: str) -> None:
    assert v["state"] == "ended", f"viewer did not end cleanly: {v}"
    assert v["terminal"] == "end"
    assert v["finishReason"] == finish_reason, v


# -- 1. streaming ----------------------------------------------------------------------------


@pytest.mark.browser
async def test_demo_page_streams_an_answer_sentence_by_sentence(
    page: Page, api: httpx.AsyncClient
) -> None:
    await page.goto("/")
    generation = await ask(page)

    v = await wait_terminal(page, 0)
    assert_ended(v, "stop")
    assert v["messages"] >= 5, f"expected sentence-sized messages, got {v['messages']}"
    assert len(v["ids"]) == v["messages"] + 1, "one id per message plus the terminal event"
    assert_ids_strictly_increasing(v["ids"])
    assert v["reconnects"] == 0

    status = await generation_status(api, generation["id"])
    assert status["status"] == "completed"
    assert status["finish_reason"] == "stop"
    assert v["text"] == status["text"]

    # What is rendered is what was received: one span per message, text byte for byte.
    panel = page.locator(".viewer").nth(0)
    assert await panel.get_attribute("data-state") == "ended"
    assert await panel.get_attribute("data-finish-reason") == "stop"
    assert await panel.locator(".answer").text_content() == status["text"]
    assert await panel.locator(".answer .msg").count() == v["messages"]


@pytest.mark.browser
async def test_demo_page_runs_under_a_content_security_policy_that_refuses_inline_scripts(
    browser: Browser, broker_url: str
) -> None:
    context = await browser.new_context(base_url=broker_url)
    try:
        page = await context.new_page()
        response = await page.goto("/")
        assert response is not None
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        await page.wait_for_function("() => window.demo !== undefined")  # its script ran
        # What an injected inline script meets: the policy is in force, not just sent.
        refused = await page.evaluate("""() => new Promise((resolve) => {
            document.addEventListener('securitypolicyviolation',
                                      (e) => resolve(e.effectiveDirective));
            const script = document.createElement('script');
            script.textContent = 'window.injected = true';
            document.head.append(script);
        })""")
        assert refused == "script-src-elem"
        assert await page.evaluate("() => window.injected") is None
    finally:
        await context.close()


# -- 2. no reconnect after the end -----------------------------------------------------------


@pytest.mark.browser
async def test_demo_viewer_does_not_reconnect_after_end(
    page: Page, api: httpx.AsyncClient
) -> None:
    requests = record_events_requests(page)
    await page.goto("/")
    generation = await ask(page)

    v = await wait_terminal(page, 0)
    assert_ended(v, "stop")
    made_before_end = [r.url for r in requests]
    assert len(made_before_end) == 1, made_before_end

    # An EventSource that were going to reconnect would do so `retry` ms after the server
    # closed the response; watch for twice that long.
    retry_ms = await advised_retry_ms(api, generation["events_url"])
    assert 0 < retry_ms <= 10_000
    await page.wait_for_timeout(2 * retry_ms)
    assert [r.url for r in requests] == made_before_end, "the viewer reconnected after `end`"
    assert (await viewer(page, 0))["state"] == "ended"


NATIVE_EVENTSOURCE = """
url => {
    const probe = { text: '', ids: [], messages: 0, endId: null, endData: null,
                    errorReadyStates: [] };
    const source = new EventSource(url);
    window.probe = probe;
    window.probeSource = source;
    source.onmessage = (e) => {
        probe.text += JSON.parse(e.data).text;
        probe.ids.push(e.lastEventId);
        probe.messages += 1;
    };
    // Deliberately no close() here: the server must make the browser stop by itself.
    source.addEventListener('end', (e) => {
        probe.endId = e.lastEventId;
        probe.endData = JSON.parse(e.data);
    });
    source.onerror = () => { probe.errorReadyStates.push(source.readyState); };
}
"""


@pytest.mark.browser
async def test_native_eventsource_stops_on_204_after_end(
    page: Page, api: httpx.AsyncClient
) -> None:
    """Plain `EventSource`, no demo code: after `end` the server closes the response, the
    browser reconnects once with Last-Event-ID = the terminal id, gets 204, and gives up."""
    created = await api.post(
        "/v1/generations",
        json={"messages": [{"role": "user", "content": "How does a native EventSource end?"}]},
    )
    assert created.status_code == 201, created.text
    gen_id, events_url = created.json()["id"], created.json()["events_url"]

    requests = record_events_requests(page)
    await page.goto("/healthz")  # any same-origin document without the demo's script
    await page.evaluate(NATIVE_EVENTSOURCE, events_url)
    await page.wait_for_function(
        "() => window.probeSource.readyState === EventSource.CLOSED", timeout=WAIT_MS
    )
    probe: dict[str, Any] = await page.evaluate("() => window.probe")

    assert probe["endData"] is not None, f"closed without an end event: {probe}"
    assert probe["endData"]["finish_reason"] == "stop"
    # error #1: the server closed the stream (CONNECTING, reconnect); error #2: 204 (CLOSED).
    assert probe["errorReadyStates"] == [0, 2], probe["errorReadyStates"]
    assert probe["messages"] >= 5
    assert_ids_strictly_increasing([*probe["ids"], probe["endId"]])

    status = await generation_status(api, gen_id)
    assert status["status"] == "completed"
    assert probe["text"] == status["text"]

    assert len(requests) == 2, [r.url for r in requests]
    first, second = requests
    assert urlsplit(first.url).path == urlsplit(second.url).path == urlsplit(events_url).path
    assert urlsplit(second.url).query == urlsplit(events_url).query  # the token, kept
    # `Request.headers` holds only Chromium's provisional headers, which lack Last-Event-ID;
    # `all_headers()` has what went on the wire.
    assert "last-event-id" not in await first.all_headers()
    assert (await second.all_headers()).get("last-event-id") == probe["endId"]
    first_response, second_response = await first.response(), await second.response()
    assert first_response is not None and first_response.status == 200
    assert second_response is not None and second_response.status == 204


# -- 3. late join ----------------------------------------------------------------------------


@pytest.mark.browser
async def test_second_viewer_joining_late_gets_the_same_stream(
    page: Page, api: httpx.AsyncClient
) -> None:
    await page.goto("/")
    generation = await ask(page)
    await wait_live_messages(page, 0, 3)

    await page.click("#add-viewer")
    await page.wait_for_function("() => window.demo.viewers.length === 2", timeout=WAIT_MS)
    # The second viewer really joined mid-stream, not after the answer was complete.
    assert (await viewer(page, 0))["state"] != "ended"

    first, second = await wait_terminal(page, 0), await wait_terminal(page, 1)
    assert_ended(first, "stop")
    assert_ended(second, "stop")
    assert second["text"] == first["text"]
    assert second["ids"] == first["ids"]
    assert_ids_strictly_increasing(second["ids"])

    status = await generation_status(api, generation["id"])
    assert status["status"] == "completed"
    assert first["text"] == status["text"]
    answers = page.locator(".viewer .answer")
    assert await answers.nth(1).text_content() == status["text"]


# -- 4. drop and resume ----------------------------------------------------------------------


@pytest.mark.browser
async def test_dropped_viewer_resumes_without_loss_or_duplicates(
    page: Page, api: httpx.AsyncClient
) -> None:
    requests = record_events_requests(page)
    await page.goto("/")
    generation = await ask(page)
    await wait_live_messages(page, 0, 3)

    await page.locator(".viewer").nth(0).locator(".drop").click()
    await assert_resumed_while_running(requests, api, generation["id"])

    v = await wait_terminal(page, 0)
    assert_ended(v, "stop")
    assert v["reconnects"] >= 1
    assert_ids_strictly_increasing(v["ids"])
    status = await generation_status(api, generation["id"])
    assert status["status"] == "completed"
    assert v["text"] == status["text"]

    # The resume asked for the events after an id the viewer had, mid-stream.
    assert len(requests) >= 2, [r.url for r in requests]
    resumed_after = parse_qs(urlsplit(requests[1].url).query).get("last_event_id")
    assert resumed_after is not None and len(resumed_after) == 1, requests[1].url
    assert resumed_after[0] in v["ids"][:-1], (resumed_after, v["ids"])
    assert v["ids"].index(resumed_after[0]) < len(v["ids"]) - 2, "no message after the resume"


# -- 5. cancel -------------------------------------------------------------------------------


@pytest.mark.browser
async def test_cancel_ends_the_stream_as_cancelled(page: Page, api: httpx.AsyncClient) -> None:
    await page.goto("/")
    generation = await ask(page)
    await wait_live_messages(page, 0, 1)

    await page.click("#cancel")

    v = await wait_terminal(page, 0)
    assert_ended(v, "cancelled")
    assert_ids_strictly_increasing(v["ids"])
    assert await page.locator(".viewer").nth(0).get_attribute("data-finish-reason") == "cancelled"

    status = await generation_status(api, generation["id"])
    assert status["status"] == "cancelled"
    assert status["finish_reason"] == "cancelled"
    assert v["text"] == status["text"]
