"""HTTP/2 where browsers connect: Chromium through the shipped load balancer's HTTPS listener.

A deployment of its own (a redis-server, two ``broker edge``, a ``broker worker`` reading the
fake LLM) behind HAProxy with the product's configuration and both listeners: plain HTTP/1.1
and HTTPS with ALPN ``h2,http/1.1`` on a self-signed certificate (what ``broker cluster
--tls`` serves; the browser context accepts it with ``ignore_https_errors``).

Each generation's answer is held by the fake LLM after its first sentence until the test
releases it, so "while every stream is still open" is a state the test waits for, not a
race against the answer's length:

- over HTTP/2, one page opens 12 EventSources to one origin and all 12 receive their first
  event while every answer is held (none can have ended), on one origin, all h2;
- the control, over HTTP/1.1: exactly 6 receive while the answers are held; a witness
  stream opened later over HTTP/2 receives, yet none of the other 6 has even opened; their
  requests go out (the network stack's Resource Timing) only after the answers are
  released, when the first six can end and leave their connections;
- a stream read with ``fetch`` over HTTP/2 gets its first event and then the edge's
  keep-alive comments while the answer is held: nothing waits in a buffer;
- the browser helper closes its EventSource on ``pagehide`` and, restored from the
  back/forward cache, resumes after the last id: the exact text, no id twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from broker.tools.mockllm import tokenize
from tests.browser.helpers import assert_ids_strictly_increasing
from tests.support.chromium import launch
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.haproxy import HAProxy
from tests.support.procs import BrokerProcess, RedisServer, free_port

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.timeout(120)]

STREAMS = 12  # twice what a browser allows HTTP/1.1 connections per host
HTTP1_CONNECTIONS_PER_HOST = 6  # Chromium's limit for one scheme://host:port over HTTP/1.1
WAIT_MS = 30_000  # a failure deadline for conditions the test waits on (a loaded machine)
KEEPALIVE_INTERVAL = 0.5  # the edges' BROKER_KEEPALIVE_INTERVAL here: comments come quickly

FIRST_SENTENCE = "The first sentence arrives while the rest of the answer is held. "
REST = (
    "Then the test lets the answer go on. "
    f"Every character must arrive exactly: {TRICKY_TEXT} "
    "Over HTTP/2 twelve streams share one connection. The end."
)


# -- the deployment -------------------------------------------------------------------------


@dataclass
class Stack:
    lb: HAProxy
    edges: list[BrokerProcess]
    llm: FakeLLM

    @property
    def h1(self) -> str:
        return self.lb.url

    @property
    def h2(self) -> str:
        return self.lb.tls_url


@pytest.fixture(scope="module")
def stack(fake_llm: FakeLLM) -> Iterator[Stack]:
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "OPENAI_BASE_URL": fake_llm.base_url,
           "OPENAI_API_KEY": "test-key", "BROKER_LOG_LEVEL": "warning"}
    procs: list[BrokerProcess] = []
    lb: HAProxy | None = None
    try:
        edges = [BrokerProcess("edge", {**env, "BROKER_KEEPALIVE_INTERVAL":
                                        str(KEEPALIVE_INTERVAL)}, free_port()) for _ in range(2)]
        procs.extend(edges)
        procs.append(BrokerProcess("worker", env))
        for edge in edges:
            edge.wait_ready()
        lb = HAProxy([edge.url for edge in edges], tls=True).start()
        yield Stack(lb, edges, fake_llm)
    finally:
        if lb is not None:
            lb.stop()
        for proc in procs:
            proc.stop()
        redis.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Chromium with its back/forward cache on, as a user's browser has it."""
    async with async_playwright() as pw:
        chromium = await launch(pw, bfcache=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh context per test (its own connections), trusting the self-signed certificate
    the way a user who accepted it would."""
    ctx = await browser.new_context(ignore_https_errors=True)
    ctx.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    ctx.on("weberror", lambda error: errors.append(str(error.error)))
    try:
        yield ctx
    finally:
        await ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest_asyncio.fixture(loop_scope="module")
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.h1, timeout=10.0) as client:
        yield client


# -- generations held after their first sentence ------------------------------------------


@dataclass
class Held:
    """A generation whose answer the fake LLM holds after its first sentence."""

    id: str
    events_url: str
    prompt: str
    llm: FakeLLM

    def release(self) -> None:
        self.llm.reply_for(self.prompt).release.set()


async def create_held(api: httpx.AsyncClient, llm: FakeLLM, name: str) -> Held:
    first = tokenize(FIRST_SENTENCE)
    prompt = llm.script(f"http2 test: {name}", FIRST_SENTENCE + REST, delay=0.005,
                        hold_at=len(first))
    created = await api.post("/v1/generations",
                             json={"messages": [{"role": "user", "content": prompt}]})
    assert created.status_code == 201, created.text
    body = created.json()
    return Held(body["id"], body["events_url"], prompt, llm)


async def final_status(api: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def viewers_on_edges(stack: Stack) -> int:
    """Streams the edges serve right now (their ``broker_viewers`` gauges)."""
    total = 0
    for edge in stack.edges:
        metrics = httpx.get(f"{edge.url}/metrics", timeout=2).text
        line = next(x for x in metrics.splitlines() if x.startswith("broker_viewers "))
        total += int(float(line.split()[1]))
    return total


# -- 12 EventSources in one page ------------------------------------------------------------

# Opens one EventSource per URL at once and records, per stream, in ms since the first was
# created: when it opened, its first message, its end; and what it received.
OPEN_STREAMS = """
urls => {
    const t0 = performance.now();
    const at = () => performance.now() - t0;
    window.streamsT0 = t0;
    window.streams = urls.map((url, i) => {
        const s = { i, url, opened: null, first: null, end: null, text: '', ids: [],
                    finish: null, drops: 0 };
        const es = new EventSource(url);
        es.onopen = () => { if (s.opened === null) s.opened = at(); };
        es.onmessage = (e) => {
            if (s.first === null) s.first = at();
            s.text += JSON.parse(e.data).text;
            s.ids.push(e.lastEventId);
        };
        es.addEventListener('end', (e) => {
            s.end = at();
            es.close();
            s.ids.push(e.lastEventId);
            s.finish = JSON.parse(e.data).finish_reason;
        });
        es.addEventListener('error', (e) => {
            if (typeof e.data === 'string') { es.close(); s.finish = 'error'; s.end = at(); }
            else s.drops += 1;
        });
        return s;
    });
    window.streamsAt = at;
}
"""
STREAMS_STATE = "() => JSON.parse(JSON.stringify(window.streams))"
NOW = "() => window.streamsAt()"
# The protocol each finished stream's request went over, from Resource Timing.
PROTOCOLS = """
urls => urls.map((url) => {
    const href = new URL(url, location.href).href;
    const entry = performance.getEntriesByType('resource').find((e) => e.name === href);
    return entry ? entry.nextHopProtocol : null;
})
"""
# When each finished stream's request went out on a connection, as the network stack saw it
# (Resource Timing: ms on the page's clock, like `window.streamsAt` plus its offset).
REQUEST_STARTS = """
urls => urls.map((url) => {
    const href = new URL(url, location.href).href;
    const e = performance.getEntriesByType('resource').find((entry) => entry.name === href);
    return e ? e.requestStart - window.streamsT0 : null;
})
"""


async def open_page(context: BrowserContext, origin: str) -> Page:
    page = await context.new_page()
    await page.goto(f"{origin}/healthz")  # a document of the load balancer's origin
    return page


async def streams_state(page: Page) -> list[dict[str, Any]]:
    state: list[dict[str, Any]] = await page.evaluate(STREAMS_STATE)
    return state


async def wait_receiving(page: Page, count: int) -> None:
    try:
        await page.wait_for_function(
            "n => window.streams.filter((s) => s.first !== null).length >= n", arg=count,
            timeout=WAIT_MS)
    except PlaywrightTimeoutError:
        firsts = [s["first"] for s in await streams_state(page)]
        raise AssertionError(f"{count} streams should receive, but only "
                             f"{sum(f is not None for f in firsts)} did: {firsts}") from None


async def release_and_finish(page: Page, held: list[Held]) -> tuple[float, list[dict[str, Any]]]:
    """Release every answer (the page's clock at that moment) and wait until every stream
    ended; returns the clock and the streams' records."""
    released_at: float = await page.evaluate(NOW)
    for gen in held:
        gen.release()
    await page.wait_for_function("() => window.streams.every((s) => s.end !== null)",
                                 timeout=WAIT_MS)
    return released_at, await streams_state(page)


async def assert_exact(api: httpx.AsyncClient, held: list[Held],
                       streams: list[dict[str, Any]]) -> None:
    for gen, s in zip(held, streams, strict=True):
        status = await final_status(api, gen.id)
        assert status["status"] == "completed", status
        assert s["finish"] == "stop", s
        assert s["text"] == status["text"] == FIRST_SENTENCE + REST, s["i"]
        assert_ids_strictly_increasing(s["ids"])
        assert s["drops"] == 0, f"stream {s['i']} lost its connection"


def waits(streams: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['first']:.0f}" for s in streams)


async def test_twelve_streams_to_one_origin_all_receive_at_once_over_http2(
    stack: Stack, context: BrowserContext, api: httpx.AsyncClient,
    request: pytest.FixtureRequest,
) -> None:
    held = [await create_held(api, stack.llm, f"h2 stream {i}") for i in range(STREAMS)]
    urls = [gen.events_url for gen in held]
    page = await open_page(context, stack.h2)
    await page.evaluate(OPEN_STREAMS, urls)

    # Every answer is held after its first sentence, so no stream can end before this.
    await wait_receiving(page, STREAMS)
    receiving = await streams_state(page)
    assert all(s["end"] is None for s in receiving)
    assert viewers_on_edges(stack) == STREAMS

    released_at, streams = await release_and_finish(page, held)
    assert max(s["first"] for s in streams) < released_at < min(s["end"] for s in streams)
    await assert_exact(api, held, streams)
    assert await page.evaluate(PROTOCOLS, urls) == ["h2"] * STREAMS

    all_first = max(s["first"] for s in streams)
    print(f"\nHTTP/2: all {STREAMS} streams had their first event {all_first:.0f} ms after "
          f"the first was opened (each: {waits(streams)} ms)")
    request.node.user_properties.append(("h2_all_first_event_ms", round(all_first)))


async def test_over_http1_the_seventh_stream_waits_for_one_of_the_first_six(
    stack: Stack, context: BrowserContext, api: httpx.AsyncClient,
    request: pytest.FixtureRequest,
) -> None:
    """The control: the same page over the plain HTTP/1.1 listener."""
    held = [await create_held(api, stack.llm, f"h1 stream {i}") for i in range(STREAMS)]
    urls = [gen.events_url for gen in held]
    page = await open_page(context, stack.h1)
    await page.evaluate(OPEN_STREAMS, urls)
    await wait_receiving(page, HTTP1_CONNECTIONS_PER_HOST)

    # A witness, opened after them in another page of the HTTPS origin (its own connection),
    # follows one of the streams that received nothing: by the time its first event comes,
    # those streams would have theirs, had they a connection.
    waiting = [s["i"] for s in await streams_state(page) if s["first"] is None]
    assert waiting, "all streams receive over HTTP/1.1: no six-connection limit?"
    witness = await open_page(context, stack.h2)
    await witness.evaluate(OPEN_STREAMS, [urls[waiting[0]]])
    await witness.wait_for_function("() => window.streams[0].first !== null", timeout=WAIT_MS)
    state = await streams_state(page)
    early = [s for s in state if s["first"] is not None]
    assert len(early) == HTTP1_CONNECTIONS_PER_HOST, [s["first"] for s in state]
    late = [s for s in state if s["first"] is None]
    assert all(s["opened"] is None for s in late), "a stream past the sixth got a connection"
    assert viewers_on_edges(stack) == HTTP1_CONNECTIONS_PER_HOST + 1  # + the witness

    released_at, streams = await release_and_finish(page, held)
    await assert_exact(api, held, streams)
    assert await page.evaluate(PROTOCOLS, urls) == ["http/1.1"] * STREAMS
    # The network stack's own times: the first six requests went out at once, the other six
    # only after the answers were released, when the first six could end and leave their
    # connections (while held, none can end: no connection was free for them).
    starts = await page.evaluate(REQUEST_STARTS, urls)
    assert all(starts[s["i"]] < released_at for s in early), (starts, released_at)
    assert all(starts[s["i"]] > released_at for s in late), (starts, released_at)
    late_firsts = sorted(streams[s["i"]]["first"] for s in late)

    all_first = max(s["first"] for s in streams)
    print(f"\nHTTP/1.1: {len(early)} streams had their first event by "
          f"{max(s['first'] for s in early):.0f} ms; the other {len(late)} waited for the "
          f"first six to end (released at {released_at:.0f} ms) and had theirs at "
          f"{', '.join(f'{t:.0f}' for t in late_firsts)} ms; all {STREAMS}: {all_first:.0f} ms")
    request.node.user_properties.append(("h1_all_first_event_ms", round(all_first)))


# -- events one by one, keep-alive comments ------------------------------------------------

# Reads the stream with fetch() and records each chunk the browser hands over, as text.
READ_RAW = """
async url => {
    window.raw = { chunks: [], done: false, protocol: null };
    const response = await fetch(url, { cache: 'no-store' });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        window.raw.chunks.push(value);
    }
    window.raw.done = true;
}
"""


async def test_events_and_keepalive_comments_pass_through_http2_unbuffered(
    stack: Stack, context: BrowserContext, api: httpx.AsyncClient,
) -> None:
    gen = await create_held(api, stack.llm, "raw reader")
    page = await open_page(context, stack.h2)
    reading = asyncio.ensure_future(page.evaluate(READ_RAW, gen.events_url))
    try:
        # While the answer is held: its first message, then the edge's keep-alive comments
        # (one every KEEPALIVE_INTERVAL on the idle stream), each as it is written.
        await page.wait_for_function(
            """() => {
                const text = window.raw && window.raw.chunks.join('');
                return text && text.includes('data: ') && text.includes(': keepalive\\n');
            }""", timeout=WAIT_MS)
        status = await final_status(api, gen.id)
        assert status["status"] == "running", status
        held_text: str = await page.evaluate("() => window.raw.chunks.join('')")
        assert held_text.index("data: ") < held_text.index(": keepalive\n")
        assert "event: end" not in held_text
    finally:
        gen.release()
    await reading
    text: str = await page.evaluate("() => window.raw.chunks.join('')")
    assert "\nevent: end\n" in text, text[-300:]
    assert await page.evaluate(PROTOCOLS, [gen.events_url]) == ["h2"]


# -- the browser helper across the back/forward cache ---------------------------------------

FOLLOW = """
async url => {
    const { followGeneration } = await import('/static/broker-stream.js');
    window.shown = [];  // pageshow's `persisted` from now on (the page has loaded)
    window.addEventListener('pageshow', (e) => window.shown.push(e.persisted));
    const rec = { messages: [], states: [], outcome: null };
    window.rec = rec;
    window.follow = followGeneration(url, {
        onMessage: (m) => rec.messages.push({ id: m.id, text: m.text }),
        onState: (state, info) => rec.states.push([state, info.reason]),
    });
    window.follow.done.then(
        (r) => { rec.outcome = { ok: true, ...r }; },
        (e) => { rec.outcome = { ok: false, code: e.code, message: e.message }; },
    );
}
"""
FOLLOWED = """() => ({ ...JSON.parse(JSON.stringify(window.rec)), handle: window.follow.snapshot(),
                      readyState: window.follow.source.readyState })"""


async def eventually_viewers(stack: Stack, count: int) -> None:
    """Until the edges serve ``count`` streams (what a closed EventSource changes)."""
    deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
    while (now := viewers_on_edges(stack)) != count:
        assert asyncio.get_running_loop().time() < deadline, f"{now} viewers, not {count}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("ends_while_away", [True, False], ids=["ended-while-away",
                                                                  "still-held-on-return"])
async def test_helper_pauses_on_pagehide_and_resumes_exactly_from_the_back_forward_cache(
    stack: Stack, context: BrowserContext, api: httpx.AsyncClient, ends_while_away: bool,
) -> None:
    gen = await create_held(api, stack.llm, f"back-forward cache {ends_while_away}")
    try:
        page = await open_page(context, stack.h2)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/events" in r.url else None)
        await page.evaluate(FOLLOW, gen.events_url)
        await page.wait_for_function(
            "() => window.follow.state === 'live' && window.rec.messages.length >= 1")
        await eventually_viewers(stack, 1)
        before = await page.evaluate(FOLLOWED)

        # Away: the helper closes its stream (the edges see it go; Chromium alone would keep
        # it open for the cached page), and the answer may go on meanwhile.
        await page.goto(f"{stack.h2}/readyz")
        await eventually_viewers(stack, 0)
        if ends_while_away:
            gen.release()
            await wait_status(api, gen.id, "completed")

        # Back: the same document, from the back/forward cache, resumes after its last id.
        await page.go_back(wait_until="commit")  # a restored page fires no load event
        # A restored document has the listener's record; a reloaded one has none.
        await page.wait_for_function("() => document.readyState === 'complete' && "
                                     "(window.shown === undefined || window.shown.length > 0)")
        shown = await page.evaluate("() => window.shown === undefined ? null : window.shown")
        reasons = await page.evaluate(
            "() => JSON.stringify(performance.getEntriesByType('navigation')[0]"
            ".notRestoredReasons)")
        assert shown == [True], f"not restored from the back/forward cache: {reasons}"
        if not ends_while_away:
            await page.wait_for_function("() => window.follow.state === 'live'")
            gen.release()
        await page.wait_for_function("() => window.rec.outcome !== null")
    finally:
        gen.release()

    rec = await page.evaluate(FOLLOWED)
    status = await final_status(api, gen.id)
    assert rec["outcome"]["ok"], rec["outcome"]
    assert status["status"] == "completed"
    assert rec["outcome"]["text"] == rec["handle"]["text"] == status["text"]
    assert status["text"] == FIRST_SENTENCE + REST
    ids = rec["handle"]["ids"]
    assert_ids_strictly_increasing(ids)  # no id twice
    assert [m["id"] for m in rec["messages"]] == ids[:-1]
    assert rec["readyState"] == 2
    assert rec["handle"]["reconnects"] == 1
    assert ["paused", "pagehide"] in rec["states"]
    assert rec["states"][-3:] == [["reconnecting", "pageshow"], ["live", "open"],
                                  ["ended", "end"]], rec["states"]
    # One resume, after the last id the page had when it was hidden.
    assert len(requests) == 2, requests
    resumed = httpx.URL(requests[1]).params.get("last_event_id")
    assert resumed == before["handle"]["lastEventId"] != "", (requests, before)


async def wait_status(api: httpx.AsyncClient, gen_id: str, wanted: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_MS / 1000
    while (status := (await final_status(api, gen_id))["status"]) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"{status}, not {wanted}"
        await asyncio.sleep(0.05)
