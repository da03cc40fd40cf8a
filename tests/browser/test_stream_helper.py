"""The browser helper module `/static/broker-stream.js` in Chromium against a real `broker dev`.

Each test opens a same-origin document (`/healthz`), imports the module the way any page
would, follows a generation created through the API and checks what the helper assembled
against the server's own record (`GET /v1/generations/{id}`). Every wait is a condition
with a timeout; the only fixed wait is the observation window of the "no reconnect storm"
test, since the absence of requests can only be watched for a while.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Page

from tests.browser.helpers import (
    assert_ids_strictly_increasing,
    assert_resumed_while_running,
    record_events_requests,
    signed_events_url,
)
from tests.support.fakellm import TRICKY_TEXT

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 20_000  # one mock answer takes ~4 s; generous for a loaded machine
MODULE_PATH = "/static/broker-stream.js"
UNKNOWN_ID = "A" * 22  # well-formed (22 URL-safe characters), never created
# Longer than Chromium's own default reconnection delay (3 s) and the server's advised
# `retry:` (1 s by default): a source that were going to come back would have done so.
QUIET_WINDOW_MS = 3_500

# Import the module and follow `url` under `name`; what the callbacks and `done` report is
# recorded in `window.follows[name].rec` as plain data.
START = """
async ([name, url, options]) => {
    const { followGeneration } = await import('/static/broker-stream.js');
    const rec = { messages: [], states: [], ends: [], errors: [], outcome: null };
    const follow = followGeneration(url, {
        ...options,
        onMessage: (m) => rec.messages.push({ id: m.id, text: m.text }),
        onEnd: (r) => rec.ends.push(r),
        onError: (e) => rec.errors.push(
            { code: e.code, message: e.message, status: e.status, terminal: e.terminal }),
        onState: (state, info) => rec.states.push([state, info.reason]),
    });
    follow.done.then(
        (r) => { rec.outcome = { ok: true, ...r }; },
        (e) => { rec.outcome = { ok: false, isError: e instanceof Error, name: e.name,
                                 code: e.code, message: e.message, status: e.status,
                                 terminal: e.terminal }; },
    );
    window.follows = window.follows || {};
    window.follows[name] = { follow, rec };
}
"""

SNAPSHOT = """
name => {
    const { follow, rec } = window.follows[name];
    return { ...JSON.parse(JSON.stringify(rec)), handle: follow.snapshot(),
             readyState: follow.source.readyState };
}
"""


# -- helpers ---------------------------------------------------------------------------------




async def create(api: httpx.AsyncClient, question: str) -> dict[str, Any]:
    response = await api.post(
        "/v1/generations", json={"messages": [{"role": "user", "content": question}]}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def generation_status(api: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def start(page: Page, name: str, url: str, **options: Any) -> None:
    await page.evaluate(START, [name, url, options])


async def snapshot(page: Page, name: str) -> dict[str, Any]:
    data: dict[str, Any] = await page.evaluate(SNAPSHOT, name)
    return data


async def wait_outcome(page: Page, name: str) -> dict[str, Any]:
    """Wait until `done` settled, then return the whole record."""
    await page.wait_for_function(
        "n => window.follows[n].rec.outcome !== null", arg=name, timeout=WAIT_MS
    )
    return await snapshot(page, name)


async def wait_live_messages(page: Page, name: str, count: int) -> dict[str, Any]:
    await page.wait_for_function(
        """([n, c]) => {
            const { follow, rec } = window.follows[n];
            return follow.state === 'live' && rec.messages.length >= c;
        }""",
        arg=[name, count], timeout=WAIT_MS,
    )
    return await snapshot(page, name)



def assert_ended(rec: dict[str, Any], finish_reason: str) -> None:
    outcome, handle = rec["outcome"], rec["handle"]
    assert outcome["ok"], f"done rejected: {outcome}"
    assert outcome["finishReason"] == finish_reason, outcome
    assert handle["state"] == "ended", handle
    assert handle["finishReason"] == finish_reason
    assert handle["error"] is None
    assert rec["readyState"] == 2, "the EventSource is not closed after `end`"
    assert rec["errors"] == []
    assert len(rec["ends"]) == 1
    assert outcome["text"] == handle["text"] == rec["ends"][0]["text"]
    assert outcome["lastEventId"] == handle["ids"][-1] == handle["lastEventId"]
    # one id per message plus the terminal event
    assert [m["id"] for m in rec["messages"]] == handle["ids"][:-1]
    assert "".join(m["text"] for m in rec["messages"]) == handle["text"]


# -- 1. follow to the end --------------------------------------------------------------------


@pytest.mark.browser
async def test_follows_a_generation_to_end_with_the_exact_text(
    page: Page, api: httpx.AsyncClient
) -> None:
    created = await create(api, "Follow me to the end, helper.")
    requests = record_events_requests(page)
    await page.goto("/healthz")  # any same-origin document: the import resolves on the edge
    await start(page, "a", created["events_url"])

    rec = await wait_outcome(page, "a")
    assert_ended(rec, "stop")
    handle = rec["handle"]
    assert len(rec["messages"]) >= 5, "expected sentence-sized messages"
    assert_ids_strictly_increasing(handle["ids"])
    assert handle["reconnects"] == 0
    usage = rec["outcome"]["usage"]
    assert isinstance(usage, dict) and usage.get("completion_tokens", 0) > 0, usage
    assert handle["usage"] == usage
    assert rec["states"][0] == ["live", "open"]
    assert rec["states"][-1] == ["ended", "end"]

    status = await generation_status(api, created["id"])
    assert status["status"] == "completed"
    assert status["finish_reason"] == "stop"
    assert rec["outcome"]["text"] == status["text"]
    assert len(requests) == 1, [r.url for r in requests]

    # A second follower resuming after the third message gets exactly the rest.
    after = handle["ids"][2]
    await start(page, "b", created["events_url"], lastEventId=after)
    rest = await wait_outcome(page, "b")
    assert_ended(rest, "stop")
    assert rest["handle"]["ids"] == handle["ids"][3:]
    assert rest["outcome"]["text"] == "".join(m["text"] for m in rec["messages"][3:])
    assert parse_qs(urlsplit(requests[1].url).query) == {
        **parse_qs(urlsplit(created["events_url"]).query), "last_event_id": [after]}

    # reconnect() after the end asks again: the server answers 204, the state stays ended.
    assert await page.evaluate("() => window.follows.a.follow.reconnect()") is True
    await page.wait_for_function(
        """() => {
            const { follow, rec } = window.follows.a;
            const last = rec.states[rec.states.length - 1];
            return last[1] === 'already_over' && follow.source.readyState === 2;
        }""",
        timeout=WAIT_MS,
    )
    again = await snapshot(page, "a")
    assert again["handle"]["state"] == "ended"
    assert again["handle"]["text"] == status["text"]
    assert again["handle"]["ids"] == handle["ids"]
    assert again["errors"] == [] and len(again["ends"]) == 1
    assert len(requests) == 3, [r.url for r in requests]
    last_response = await requests[2].response()
    assert last_response is not None and last_response.status == 204


@pytest.mark.browser
async def test_every_character_an_llm_may_send_reaches_the_page_exactly(
    page: Page, api: httpx.AsyncClient
) -> None:
    """U+2028, U+0085, CR, astral... in the answer (the mock quotes the question): through the
    dev worker's reading of the mock LLM, the edge's framing and Chromium's EventSource."""
    created = await create(api, TRICKY_TEXT)
    await page.goto("/healthz")
    await start(page, "tricky", created["events_url"])
    rec = await wait_outcome(page, "tricky")
    assert_ended(rec, "stop")
    status = await generation_status(api, created["id"])
    assert rec["handle"]["text"] == status["text"]
    assert TRICKY_TEXT in status["text"]


# -- 2. drop and resume ----------------------------------------------------------------------


@pytest.mark.browser
async def test_drop_mid_stream_resumes_without_loss_or_duplicates(
    page: Page, api: httpx.AsyncClient
) -> None:
    created = await create(api, "Drop me halfway, helper.")
    # The events URL carries a query (its token) and one more parameter: the resume keeps both.
    url = created["events_url"] + "&viewer=drop-test"
    requests = record_events_requests(page)
    await page.goto("/healthz")
    await start(page, "a", url)
    await wait_live_messages(page, "a", 3)

    await page.evaluate("() => window.follows.a.follow.drop()")
    await assert_resumed_while_running(requests, api, created["id"])

    rec = await wait_outcome(page, "a")
    assert_ended(rec, "stop")
    handle = rec["handle"]
    assert handle["reconnects"] >= 1
    assert ["reconnecting", "reconnect"] in rec["states"]
    assert_ids_strictly_increasing(handle["ids"])
    status = await generation_status(api, created["id"])
    assert status["status"] == "completed"
    assert rec["outcome"]["text"] == status["text"]

    # The resume asked for the events after an id the viewer had, mid-stream, and kept the
    # URL's own query.
    assert len(requests) == 2, [r.url for r in requests]
    assert urlsplit(requests[0].url).query == urlsplit(url).query
    query = parse_qs(urlsplit(requests[1].url).query)
    assert query["viewer"] == ["drop-test"]
    assert query["token"] == parse_qs(urlsplit(url).query)["token"]
    assert len(query["last_event_id"]) == 1, requests[1].url
    resumed_after = query["last_event_id"][0]
    assert resumed_after in handle["ids"][:-1], (resumed_after, handle["ids"])
    assert handle["ids"].index(resumed_after) < len(handle["ids"]) - 2, "nothing after the drop"


@pytest.mark.browser
async def test_resume_url_appends_or_replaces_last_event_id(page: Page) -> None:
    await page.goto("/healthz")
    cases = [
        ["/v1/generations/x/events", "0000000003"],
        ["/v1/generations/x/events?token=a%2Bb.c", "0000000003"],
        ["/v1/generations/x/events?last_event_id=0000000001&token=t", "0000000007"],
        ["https://edge.example/v1/generations/x/events?token=t#frag", "a b"],
    ]
    got = await page.evaluate(
        """async cases => {
            const { resumeUrl } = await import('/static/broker-stream.js');
            return cases.map(([url, id]) => resumeUrl(url, id));
        }""",
        cases,
    )
    assert got == [
        "/v1/generations/x/events?last_event_id=0000000003",
        "/v1/generations/x/events?token=a%2Bb.c&last_event_id=0000000003",
        "/v1/generations/x/events?token=t&last_event_id=0000000007",
        "https://edge.example/v1/generations/x/events?token=t&last_event_id=a%20b#frag",
    ]


# -- 3. cancel -------------------------------------------------------------------------------


@pytest.mark.browser
async def test_cancelled_generation_resolves_with_finish_reason_cancelled(
    page: Page, api: httpx.AsyncClient
) -> None:
    created = await create(api, "Cancel me, helper.")
    await page.goto("/healthz")
    await start(page, "a", created["events_url"])
    await wait_live_messages(page, "a", 1)

    response = await api.post(f"/v1/generations/{created['id']}/cancel")
    assert response.status_code == 202, response.text

    rec = await wait_outcome(page, "a")
    assert_ended(rec, "cancelled")
    assert_ids_strictly_increasing(rec["handle"]["ids"])
    status = await generation_status(api, created["id"])
    assert status["status"] == "cancelled"
    assert status["finish_reason"] == "cancelled"
    assert rec["outcome"]["text"] == status["text"]


@pytest.mark.browser
async def test_close_before_the_end_rejects_closed_and_stops(
    page: Page, api: httpx.AsyncClient
) -> None:
    """close() rejects `done` with code 'closed'; a follower used without awaiting `done`
    must not leave an unhandled rejection (the `page` fixture fails on page errors)."""
    created = await create(api, "Close me early, helper.")
    await page.goto("/healthz")
    await start(page, "a", created["events_url"])
    await page.evaluate(
        """async url => {
            const { followGeneration } = await import('/static/broker-stream.js');
            window.bare = followGeneration(url);  // nobody ever looks at bare.done
        }""",
        created["events_url"],
    )
    await wait_live_messages(page, "a", 1)
    await page.wait_for_function("() => window.bare.state === 'live'", timeout=WAIT_MS)

    await page.evaluate("() => { window.follows.a.follow.close(); window.bare.close(); }")

    rec = await wait_outcome(page, "a")
    assert not rec["outcome"]["ok"]
    assert rec["outcome"]["code"] == "closed"
    assert rec["readyState"] == 2
    assert rec["handle"]["state"] == "closed"
    assert rec["states"][-1] == ["closed", "closed"]
    assert rec["errors"] == [] and rec["ends"] == []
    assert await page.evaluate("() => window.follows.a.follow.reconnect()") is False
    bare = await page.evaluate("() => [window.bare.state, window.bare.source.readyState]")
    assert bare == ["closed", 2]
    # Let the rejection's microtasks run and be reported if they were going to be.
    await page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")


# -- 4. refused streams ----------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize(("events_url", "code", "status"), [
    (signed_events_url(UNKNOWN_ID), "not_found", 404),  # a valid token; the id is unknown
    (f"/v1/generations/{UNKNOWN_ID}/events", "unauthorized", 401),  # no token at all
])
async def test_refused_stream_rejects_without_reconnecting(
    page: Page, api: httpx.AsyncClient, events_url: str, code: str, status: int
) -> None:
    assert (await api.get(events_url)).status_code == status
    requests = record_events_requests(page)
    await page.goto("/healthz")
    await start(page, "a", events_url)

    rec = await wait_outcome(page, "a")
    outcome = rec["outcome"]
    assert not outcome["ok"], outcome
    assert outcome["isError"] and outcome["name"] == "GenerationError", outcome
    assert outcome["code"] == code
    assert outcome["status"] == status
    assert outcome["terminal"] is False
    assert rec["readyState"] == 2, "the EventSource is not closed"
    handle = rec["handle"]
    assert handle["state"] == "error"
    assert handle["error"]["code"] == code
    assert handle["text"] == "" and handle["ids"] == []
    assert rec["errors"] == [{**handle["error"], "status": status, "terminal": False}]

    # No reconnect storm: the browser's one attempt, the helper's one question, then quiet.
    def kinds() -> list[str]:
        return [r.resource_type for r in requests]

    assert sorted(kinds()) == ["eventsource", "fetch"], [(r.resource_type, r.url) for r in requests]
    await page.wait_for_timeout(QUIET_WINDOW_MS)
    assert sorted(kinds()) == ["eventsource", "fetch"], [(r.resource_type, r.url) for r in requests]
    assert (await snapshot(page, "a"))["handle"]["reconnects"] == 0


@pytest.mark.browser
async def test_resume_beyond_the_stream_rejects_with_the_servers_code(
    page: Page, api: httpx.AsyncClient
) -> None:
    """The error code comes from the refused answer's JSON body (400 here), not a guess."""
    created = await create(api, "Resume me from the future, helper.")
    await page.goto("/healthz")
    await start(page, "a", created["events_url"], lastEventId="9999999999")

    rec = await wait_outcome(page, "a")
    outcome = rec["outcome"]
    assert not outcome["ok"], outcome
    assert outcome["code"] == "invalid_last_event_id", outcome
    assert outcome["status"] == 400
    assert rec["readyState"] == 2
    assert rec["handle"]["state"] == "error"


# -- 5. served as JavaScript -----------------------------------------------------------------


@pytest.mark.browser
async def test_module_is_served_with_a_javascript_mime_type(
    page: Page, api: httpx.AsyncClient
) -> None:
    await page.goto("/healthz")
    async with page.expect_response(lambda r: urlsplit(r.url).path == MODULE_PATH) as info:
        exported = await page.evaluate(
            "async () => Object.keys(await import('/static/broker-stream.js')).sort()"
        )
    response = await info.value
    assert response.status == 200
    mime = response.headers["content-type"].split(";")[0].strip().lower()
    assert mime in {"text/javascript", "application/javascript"}, mime
    assert exported == ["GenerationError", "followGeneration", "resumeUrl"]

    # The same through plain HTTP, and the demo page imports it as a module.
    direct = await api.get(MODULE_PATH)
    assert direct.status_code == 200
    assert direct.headers["content-type"].split(";")[0].strip() == mime
    demo = await api.get("/")
    assert '<script type="module" src="/static/demo.js">' in demo.text
    demo_script = await api.get("/static/demo.js")
    assert demo_script.headers["content-type"].split(";")[0].strip() == mime
    assert "from '/static/broker-stream.js'" in demo_script.text
