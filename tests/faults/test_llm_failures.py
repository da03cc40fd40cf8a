"""The LLM fails in every way an upstream can: each generation ends with ``event: error``
carrying the upstream's cause, the text sent before the failure stays intact, and the request
is retried only before its first token (never once text has flowed)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from broker.tools.mockllm import create_mock_llm_app, tokenize
from tests.faults.helpers import report, requests_for, wait_worker_ready
from tests.support.api import create, events_url, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import TIMER_RESOLUTION, free_port, wait_until
from tests.support.sse import Received, read_events

STORY = TRICKY_TEXT + (
    " The broker streams answers. It buffers tokens into sentences! Does it lose text? "
    "Never: the log in Redis is the truth.\n\nA second paragraph follows here. It ends now."
)

# -- helpers -----------------------------------------------------------------------------------

FROM_FAULT = "the fault to every viewer's terminal event"


async def timed_view(http: httpx.AsyncClient, url: str) -> tuple[Received, float]:
    """A viewer's whole stream, and the monotonic time its terminal event arrived."""
    got = await read_events(http, url)
    return got, time.monotonic()


async def fault_moment(llm: FakeLLM, prompt: str, tokens: int) -> float:
    """When the fake LLM had sent ``tokens`` tokens: the moment it breaks or stalls (the mock
    counts a token after it was taken, right before it cuts or goes silent)."""

    def watch() -> float:
        record = llm.record_for(prompt)
        deadline = time.monotonic() + 20
        while record.sent_tokens < tokens:
            assert time.monotonic() < deadline, "the fake LLM never reached the fault"
            time.sleep(0.002)
        return time.monotonic()

    return await asyncio.to_thread(watch)


async def assert_failed_status(
    http: httpx.AsyncClient, base: str, gen_id: str, text: str
) -> None:
    status = (await http.get(f"{base}/v1/generations/{gen_id}")).json()
    assert status["status"] == "failed", status
    assert status["finish_reason"] == "error", status
    assert status["text"] == text


def error_of(got: Received) -> dict[str, Any]:
    assert got.status == 200
    assert got.terminal is not None and got.terminal.event == "error", got.events
    assert got.terminal.id  # terminal events carry an id too
    assert sum(1 for e in got.events if e.event in ("end", "error")) == 1
    data = got.terminal_data()
    assert isinstance(data["message"], str) and data["message"]
    return data


class CountingLLM:
    """The project's mock LLM behind a counter of EVERY chat-completions request: the mock
    answers a rejected key before it records the request, so its records cannot count those."""

    def __init__(self) -> None:
        self.app = create_mock_llm_app()
        self.authorizations: list[str] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(
            self._count, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
            interface="asgi3",
        ))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()),
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _count(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            headers = dict(scope["headers"])
            with self.lock:
                self.authorizations.append(headers.get(b"authorization", b"").decode())
        await self.app(scope, receive, send)

    def start(self) -> CountingLLM:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, "the counting LLM")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="module")
def counting_llm() -> Iterator[CountingLLM]:
    llm = CountingLLM().start()
    yield llm
    llm.stop()


# -- the scenarios -----------------------------------------------------------------------------


async def test_connection_refused_is_llm_unreachable(
    deploy: Any, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(workers=0)
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    worker = d.add_worker(openai_base_url=nowhere, broker_llm_max_retries=1)
    await wait_worker_ready(d, worker)
    base = d.edges[0].url

    started = time.monotonic()
    gen_id = await create(http, base, unique("refused"))
    got, done = await asyncio.wait_for(timed_view(http, events_url(base, gen_id)), 20)
    report(record_property, "connection refused", done - started, FROM_FAULT)

    error = error_of(got)
    assert error["code"] == "llm_unreachable"
    assert "refused" in error["message"].lower() or "connect" in error["message"].lower()
    assert got.messages == []
    await assert_failed_status(http, base, gen_id, "")


async def test_http_500_is_retried_before_the_first_token_then_fails(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(broker_llm_max_retries=2)
    await wait_worker_ready(d, d.workers[0])
    base = d.edges[0].url
    prompt = fake_llm.script(unique("http500"), "never sent", status=500)

    started = time.monotonic()
    gen_id = await create(http, base, prompt)
    got, done = await asyncio.wait_for(timed_view(http, events_url(base, gen_id)), 20)
    report(record_property, "HTTP 500", done - started, FROM_FAULT)

    error = error_of(got)
    assert error["code"] == "llm_server_error"
    assert "500" in error["message"]
    assert "mock upstream failure 500" in error["message"]  # the upstream's own words
    assert got.messages == []
    assert requests_for(fake_llm, prompt) == 1 + 2  # BROKER_LLM_MAX_RETRIES retries
    await assert_failed_status(http, base, gen_id, "")


async def test_stream_broken_midway_keeps_the_text_and_is_not_retried(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(edges=2)
    await wait_worker_ready(d, d.workers[0])
    a, b = d.edges[0].url, d.edges[1].url
    cut = 12
    prompt = fake_llm.script(unique("broken"), STORY, delay=0.01, break_after=cut)

    gen_id = await create(http, a, prompt)
    viewers = [asyncio.create_task(timed_view(http, events_url(base, gen_id))) for base in (a, b)]
    fault = await fault_moment(fake_llm, prompt, cut)
    results = await asyncio.wait_for(asyncio.gather(*viewers), 20)
    report(record_property, "stream broken midway", max(t for _, t in results) - fault,
           FROM_FAULT)

    expected = "".join(tokenize(STORY)[:cut])
    for got, _ in results:
        error = error_of(got)
        assert error["code"] == "llm_stream_broken"
        assert got.text == expected
    assert results[0][0].ids == results[1][0].ids
    assert requests_for(fake_llm, prompt) == 1  # no retry once tokens flowed
    await assert_failed_status(http, b, gen_id, expected)


async def test_llm_silent_too_long_is_llm_timeout(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    idle_timeout = 1.0
    d = deploy(broker_llm_idle_timeout=idle_timeout)
    await wait_worker_ready(d, d.workers[0])
    base = d.edges[0].url
    silent_after = 9
    # The last token is held until the test lets it go, so the test knows the earliest moment
    # the silence can start: the worker cannot have that token before the release.
    last = silent_after - 1
    prompt = fake_llm.script(unique("stall"), STORY, delay=0.01, hold_at=last,
                             stall_after=silent_after)

    gen_id = await create(http, base, prompt)
    viewer = asyncio.create_task(timed_view(http, events_url(base, gen_id)))
    await fault_moment(fake_llm, prompt, last)
    released_at = time.monotonic()
    fake_llm.reply_for(prompt).release.set()
    got, done = await asyncio.wait_for(viewer, 20)
    seconds = done - released_at
    report(record_property, "LLM silent (idle timeout 1 s)", seconds,
           "the last token's release to the viewer's terminal event")

    error = error_of(got)
    assert error["code"] == "llm_timeout"
    expected = "".join(tokenize(STORY)[:silent_after])
    assert got.text == expected
    # Not before one whole idle period after the last token (to the event loop's millisecond),
    # and before a second one: the silence is timed once, from the last token (not
    # restarted, not retried).
    assert idle_timeout - TIMER_RESOLUTION <= seconds < 2 * idle_timeout, (
        f"the timeout came {seconds:.3f}s after the last token's release")
    record = fake_llm.record_for(prompt)
    assert await asyncio.to_thread(record.closed_by_client.wait, 10)  # the worker hung up
    assert record.sent_tokens == silent_after
    assert requests_for(fake_llm, prompt) == 1
    await assert_failed_status(http, base, gen_id, expected)


async def test_rejected_api_key_is_llm_auth_failed_without_retries(
    deploy: Any, counting_llm: CountingLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(workers=0)
    worker = d.add_worker(openai_base_url=counting_llm.base_url, openai_api_key="bad-key",
                          broker_llm_max_retries=2)
    await wait_worker_ready(d, worker)
    base = d.edges[0].url
    before = len(counting_llm.authorizations)

    started = time.monotonic()
    gen_id = await create(http, base, unique("bad key"))
    got, done = await asyncio.wait_for(timed_view(http, events_url(base, gen_id)), 20)
    report(record_property, "rejected API key", done - started, FROM_FAULT)

    error = error_of(got)
    assert error["code"] == "llm_auth_failed"
    assert "Incorrect API key provided" in error["message"]  # the upstream's words
    assert got.messages == []
    assert counting_llm.authorizations[before:] == ["Bearer bad-key"]  # one request, no retry
    assert counting_llm.app.state.records == []  # the mock refused it before recording
    await assert_failed_status(http, base, gen_id, "")
    # The stream replays the same single error to a late viewer.
    late = await read_events(http, events_url(base, gen_id))
    assert late.ids == got.ids and json.loads(late.events[-1].data) == error
