"""The Python producer (``broker.producer``) against real edges on a real Redis (and a Redis
Cluster), over HTTP and straight to Redis; ``pipe()`` of the real ``openai`` SDK's stream
from the fake LLM over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from broker import producer
from broker.core import protocol
from broker.core.settings import Settings
from broker.producer.transports import RETRY_DEADLINE
from tests.conftest import Stack, StartBroker
from tests.integration.test_typed_events import (
    ANSWER_1,
    ANSWER_2,
    REASONING_1,
    REASONING_2,
    assert_resumes_from_every_id,
    expected_calls,
    mixed_reply,
    texts,
)
from tests.support.api import events_url, status, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.haproxy import HAProxy
from tests.support.procs import BrokerProcess, RedisServer, eventually, free_port
from tests.support.sse import read_events

# A short flush interval: text without a sentence end goes out this soon (the bound tested).
FLUSH = 0.3


def make(stack: Stack, transport: str, **kwargs: Any) -> producer.Producer:
    settings = Settings(redis_url=stack.redis.url, flush_interval=FLUSH)
    if transport == "http":
        return producer.over_http(stack.a, settings=settings, **kwargs)
    return producer.direct(settings=settings, **kwargs)


@pytest.mark.parametrize("transport", ["http", "direct"])
async def test_every_event_type_through_the_library(
    stack: Stack, http: httpx.AsyncClient, transport: str
) -> None:
    answer = ["Hello", " there", ". ", "The weather", " is fine", ". ", TRICKY_TEXT, " Bye", "!"]
    thoughts = ["Let me", " think", ". ", "Zürich 🤔", " it is."]
    async with make(stack, transport, metadata={"app": "test"}) as gen:
        watching = asyncio.ensure_future(read_events(http, events_url(stack.b, gen.id)))
        for piece in thoughts:
            await gen.reasoning(piece)
        for piece in answer[:3]:
            await gen.text(piece)
        await gen.tool_call("call_1", "get_weather", '{"city": "Z\\u00fcrich"}')
        await gen.tool_result("call_1", {"temp": 21, "sky": None})
        await gen.data("sources", [{"url": "https://example.com"}])
        for piece in answer[3:]:
            await gen.text(piece)
    live = await asyncio.wait_for(watching, 20)
    events = live.events
    assert texts(events, "message") == "".join(answer)
    assert texts(events, "reasoning") == "".join(thoughts)
    # Sentence-sized: fewer events than pieces, never one mixing two kinds.
    assert len([e for e in events if e.event in ("message", "reasoning")]) < (
        len(answer) + len(thoughts))
    kinds = [e.event for e in events]
    first_tool = kinds.index("tool_call")
    assert set(kinds[:first_tool]) == {"reasoning", "message"}
    assert kinds[first_tool:first_tool + 3] == ["tool_call", "tool_result", "data"]
    assert json.loads(events[first_tool].data) == {
        "index": 0, "id": "call_1", "name": "get_weather", "arguments": '{"city": "Z\\u00fcrich"}'}
    assert json.loads(events[first_tool + 1].data) == {"id": "call_1",
                                                       "result": {"temp": 21, "sky": None}}
    assert events[-1].event == "end"
    assert json.loads(events[-1].data) == {"finish_reason": "stop", "usage": None}
    assert live.ids == [protocol.event_id(i) for i in range(1, len(events) + 1)]
    await assert_resumes_from_every_id(http, stack.a, gen.id, live)
    record = await status(http, stack.a, gen.id)
    assert record["metadata"] == {"app": "test"} and record["status"] == "completed"


async def test_text_without_a_sentence_end_goes_out_within_the_flush_interval(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    async with make(stack, "http") as gen:
        watching: list[Any] = []
        reading = asyncio.ensure_future(read_events(http, events_url(stack.b, gen.id),
                                                    progress=watching))
        await gen.text("no end yet")
        await gen.text(" still none")
        sent = time.monotonic()
        # All of it within the bound, in one message or two: the first text goes out
        # BROKER_FIRST_TEXT_WAIT after it came, up to its last word boundary if the rest came
        # a moment later (on uvloop, whose timers keep milliseconds, it may be "not due" yet).
        while not (watching and watching[0].text == "no end yet still none"):
            assert time.monotonic() - sent < FLUSH + 2.0, "buffered text never went out"
            await asyncio.sleep(0.02)
        assert len(watching[0].events) <= 2
    await asyncio.wait_for(reading, 10)


async def sdk_chunks(stream: Any) -> Any:
    """The SDK stream behind a wrapper: pipe() then reads its chunk objects, not its bytes."""
    async for chunk in stream:
        yield chunk


@pytest.mark.parametrize(("transport", "wrapped"), [
    ("http", False), ("direct", False),  # the SDK's stream as it comes: read raw
    ("direct", True),  # through a wrapper: the SDK's chunk objects
])
async def test_pipe_forwards_a_real_sdk_stream_exactly(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, transport: str, wrapped: bool
) -> None:
    """Reasoning, text and two interleaved tool calls cut awkwardly, read by the real openai
    SDK over HTTP, then a tool result and a second LLM call: one generation."""
    prompt = fake_llm.script(unique("pipe"), **mixed_reply("reasoning_content", False))
    second = fake_llm.script(unique("pipe again"), "It is sunny. Enjoy!")
    async with (AsyncOpenAI(base_url=fake_llm.base_url, api_key="test-key") as llm,
                make(stack, transport) as gen):
        stream = await llm.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], stream=True,
            stream_options={"include_usage": True})
        turn = await gen.pipe(sdk_chunks(stream) if wrapped else stream)
        assert turn.finish_reason == "tool_calls"
        assert turn.reasoning == REASONING_1 + REASONING_2
        assert turn.text == ANSWER_1 + ANSWER_2
        assert [{"index": c.index, "id": c.id, "name": c.name, "arguments": c.arguments}
                for c in turn.tool_calls] == expected_calls()
        assert turn.usage is not None
        for call in turn.tool_calls:
            await gen.tool_result(call.id, {"ok": call.name})
        messages = [{"role": "user", "content": second}, turn.assistant_message()]
        again = await gen.pipe(await llm.chat.completions.create(
            model="m", messages=messages, stream=True))
        assert again.text == "It is sunny. Enjoy!" and again.finish_reason == "stop"
    full = await read_events(http, events_url(stack.b, gen.id))
    events = full.events
    assert texts(events, "reasoning") == REASONING_1 + REASONING_2
    assert texts(events, "message") == ANSWER_1 + ANSWER_2 + "It is sunny. Enjoy!"
    assert [json.loads(e.data) for e in events if e.event == "tool_call"] == expected_calls()
    assert [json.loads(e.data) for e in events if e.event == "tool_result"] == [
        {"id": "call_weather", "result": {"ok": "get_weather"}},
        {"id": "call_time", "result": {"ok": "get_time"}}]
    kinds = [e.event for e in events]
    # The upstream's order: the calls come after all the first turn's text, the results
    # after the calls, the second turn's text after them.
    assert kinds.index("tool_call") > max(i for i, k in enumerate(kinds[:kinds.index(
        "tool_call")]) if k in ("message", "reasoning"))
    assert kinds[-1] == "end" and kinds[-2] == "message" and kinds[-4] == "tool_result"
    await assert_resumes_from_every_id(http, stack.a, gen.id, full)


async def test_an_exception_in_the_loop_fails_the_generation(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    gen = make(stack, "http")
    with pytest.raises(ZeroDivisionError):
        async with gen:
            await gen.text("Working on it. ")
            _ = 1 / 0
    received = await read_events(http, events_url(stack.b, gen.id))
    assert received.text == "Working on it. "
    assert received.terminal_data() == {
        "code": "producer_error", "message": "the producer's loop failed (ZeroDivisionError)"}


@pytest.mark.parametrize("transport", ["http", "direct"])
async def test_a_cancel_reaches_the_producer_mid_loop(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, transport: str
) -> None:
    """A producer piping a slow LLM stream learns of the cancel from its next append: pipe()
    raises Cancelled, the upstream request is closed, the async-with block ends quietly."""
    tokens = [f"word{i} " for i in range(400)]
    prompt = fake_llm.script(unique("slow"), tokens=tokens, delay=0.02)
    async with AsyncOpenAI(base_url=fake_llm.base_url, api_key="test-key") as llm:
        gen = make(stack, transport)
        raised: list[BaseException] = []
        async with gen:
            async def cancel_soon() -> float:
                # Once a viewer saw the producer's first event: it is mid-loop.
                await read_events(http, events_url(stack.b, gen.id), stop_after=1)
                response = await http.post(f"{stack.b}/v1/generations/{gen.id}/cancel")
                assert response.status_code == 202
                return time.monotonic()

            canceller = asyncio.ensure_future(cancel_soon())
            try:
                await gen.pipe(await llm.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": prompt}], stream=True))
            except producer.Cancelled as e:
                raised.append(e)
                raise
        cancelled_at = await canceller
        noticed = time.monotonic() - cancelled_at
    assert raised and gen.cancelled.is_set()
    # The next append after the cancel was refused: within a flush interval (one sentence-less
    # timed flush) and a token, plus slack.
    assert noticed < FLUSH + 2.0
    received = await read_events(http, events_url(stack.a, gen.id))
    assert received.terminal_data() == {"finish_reason": "cancelled", "usage": None}
    # The LLM was not read to its end: the stream was closed.
    assert len(received.text.split()) < len(tokens)


@pytest.mark.parametrize("transport", ["http", "direct"])
async def test_a_long_text_goes_out_in_appends_the_edge_accepts(
    stack: Stack, http: httpx.AsyncClient, transport: str
) -> None:
    """One ``text()`` of 600,000 characters, mostly emoji (1,500 messages of 400: more events
    than one append may carry, and 1,000 of them more bytes than a body may hold) is sent as
    several appends, each within the limits: the viewers get it all, once, in order."""
    clause = "🎉" * 120 + " a line\u2028separator, \"quotes\" and \\ too; "
    sentence = clause * 10 + "end. "  # ~1,000 characters: messages of 400 (fewer than the log)
    text = sentence * (600_000 // len(sentence))
    async with make(stack, transport) as gen:
        await gen.text(text)
    received = await read_events(http, events_url(stack.a, gen.id))
    assert received.status == 200
    assert received.text == text
    assert received.terminal_data() == {"finish_reason": "stop", "usage": None}
    assert len(received.messages) > protocol.MAX_APPEND_EVENTS


@pytest.mark.parametrize("transport", ["http", "direct"])
async def test_a_cancel_the_loop_never_heard_of_ends_the_block_quietly(
    stack: Stack, http: httpx.AsyncClient, transport: str
) -> None:
    """Cancelled while the loop's last text waits in the sentence buffer (nothing reached the
    edge since): leaving the block finishes, hears the cancel, and ends quietly (README:
    "the async with block then ends quietly"), with ``cancelled`` set."""
    gen = make(stack, transport)
    async with gen:
        await gen.text("A first sentence. ")
        await gen.flush()
        assert (await http.post(f"{stack.b}/v1/generations/{gen.id}/cancel")).status_code == 202
        await gen.text("Buffered, never sent")
    assert gen.cancelled.is_set()
    received = await read_events(http, events_url(stack.a, gen.id))
    assert received.text == "A first sentence. "
    assert received.terminal_data() == {"finish_reason": "cancelled", "usage": None}


async def test_an_idle_producer_hears_of_a_cancel_through_its_heartbeat(
    short_lease_edge: Any, http: httpx.AsyncClient
) -> None:
    edge = short_lease_edge
    async with producer.over_http(edge.url) as gen:
        await gen.text("Thinking. ")
        assert (await http.post(f"{edge.url}/v1/generations/{gen.id}/cancel")).status_code == 202
        started = time.monotonic()
        await asyncio.wait_for(gen.wait_cancelled(), timeout=LEASE / 3 + 2.0)
        assert time.monotonic() - started < LEASE / 3 + 2.0
        with pytest.raises(producer.Cancelled):
            await gen.text("More.")


LEASE = 1.5


@pytest.fixture(scope="module")
def short_lease_edge(start_broker: StartBroker) -> Any:
    server = RedisServer().start()
    yield start_broker("edge", server.url, broker_producer_lease=str(LEASE))
    server.stop()


async def test_heartbeats_keep_an_idle_producer_alive(
    short_lease_edge: Any, http: httpx.AsyncClient
) -> None:
    edge = short_lease_edge
    async with producer.over_http(edge.url) as gen:
        await gen.text("Calling a slow tool. ")
        await asyncio.sleep(3 * LEASE)  # a long tool call: no append, heartbeats only
        await gen.tool_result("call_1", "done")
    received = await read_events(http, edge.url + gen.events_url)
    assert received.terminal_data() == {"finish_reason": "stop", "usage": None}


async def test_a_worker_alone_ends_a_lapsed_direct_producer_once(
    start_broker: StartBroker, fake_llm: FakeLLM
) -> None:
    """No edge, no viewer: the worker's sweep still ends it, with one producer_lost."""
    server = RedisServer().start()
    try:
        worker = start_broker("worker", server.url, fake_llm)
        worker.wait_for_log("taking jobs")
        gen = producer.direct(server.url, lease=1.0)
        await gen.start()
        await gen.text("I will vanish. ")
        await gen.flush()
        await gen.aclose()  # the producer dies: no finish, no more heartbeats
        silent_since = time.monotonic()
        client = server.client()
        while client.hget(protocol.meta_key(gen.id), "status") != b"failed":
            assert time.monotonic() - silent_since < 1.0 + 1.0 + 3.0, "not reaped"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # more sweeps pass: nothing more is written
        kinds = [fields[b"k"] for _, fields in client.xrange(protocol.log_key(gen.id))]
        assert kinds == [b"message", b"error"]
        error = client.xrange(protocol.log_key(gen.id))[-1][1][b"d"]
        assert json.loads(error)["code"] == "producer_lost"
    finally:
        server.stop()


class LosingAnswers(httpx.AsyncBaseTransport):
    """Every ``every``-th request to a path ending with ``path`` (at most ``most`` of them)
    reaches the edge, which applies it, but its answer is lost on the way back (as when a
    connection drops after the request went out)."""

    def __init__(self, path: str = "/append", every: int = 3, most: int | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.path, self.every, self.most = path, every, most
        self.appends = 0  # requests to the path
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith(self.path):
            self.appends += 1
            if self.appends % self.every == 0 and (self.most is None or self.lost < self.most):
                await response.aread()
                await response.aclose()
                self.lost += 1
                raise httpx.ReadError("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_appends_whose_answers_are_lost_are_retried_without_duplicates(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    transport = LosingAnswers()
    sentences = [f"Sentence {i}. " for i in range(12)]
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        gen = producer.over_http(stack.a, client=client)
        async with gen:
            for i, sentence in enumerate(sentences):
                await gen.text(sentence)
                await gen.data("step", i)
    assert transport.lost >= 3
    received = await read_events(http, events_url(stack.b, gen.id))
    assert received.text == "".join(sentences)
    assert [json.loads(e.data)["value"] for e in received.events if e.event == "data"] == list(
        range(12))
    assert received.ids == [protocol.event_id(i) for i in range(1, len(received.events) + 1)]


async def test_producers_take_turns_in_a_conversation_with_the_worker(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    """An external producer's generation may be a turn of a conversation, like a worker's:
    a device following the conversation sees every turn, whoever produced it, in order."""
    from tests.integration.test_conversations import following, new_cid, turn

    cid = new_cid()
    async with make(stack, "http", conversation_id=cid) as first:
        assert first.conversation_url is not None
        conversation_url = stack.b + first.conversation_url
        await first.reasoning("Planning. ")
        await first.text("First turn, by my own loop. ")
    prompt = fake_llm.script(unique("second turn"), "Second turn, by the worker.")
    second = await turn(http, stack.a, cid, prompt)
    async with make(stack, "direct", conversation_id=cid) as third:
        await third.tool_result("call_1", {"ok": True})
        await third.text("Third turn, straight to Redis.")
    async with following(http, conversation_url) as device:
        await device.until(lambda d: d.turns_ended() == 3, "three turns")
    assert [device.text_of(g) for g in (first.id, second["id"], third.id)] == [
        "First turn, by my own loop. ", "Second turn, by the worker.",
        "Third turn, straight to Redis."]
    kinds = [e.event for e in device.of_turn(first.id)]
    assert "reasoning" in kinds and kinds[-1] == "end"
    assert "tool_result" in [e.event for e in device.of_turn(third.id)]
    listing = (await http.get(f"{stack.a}/v1/conversations/{cid}")).json()
    assert [t["generation_id"] for t in listing["turns"]] == [first.id, second["id"], third.id]


async def test_a_create_whose_answer_is_lost_is_not_made_twice(
    queue_only: Stack, http: httpx.AsyncClient
) -> None:
    """A create is not idempotent: retried after its request went out, it made a second
    generation, here a second turn of the conversation that nobody produced, which every
    device waited on (the turn before the real one) until its lease lapsed as producer_lost.
    The library raises instead; the caller decides."""
    from tests.integration.test_conversations import new_cid

    cid = new_cid()
    transport = LosingAnswers("/v1/generations", every=1, most=1)  # the first create's
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        gen = producer.over_http(queue_only.a, client=client, conversation_id=cid)
        with pytest.raises(httpx.ReadError):
            await gen.start()
        await gen.aclose()
    assert transport.lost == 1
    listing = (await http.get(f"{queue_only.a}/v1/conversations/{cid}")).json()
    assert len(listing["turns"]) == 1, listing


async def test_a_timed_flush_that_fails_loses_no_text(http: httpx.AsyncClient) -> None:
    """Text waiting for a sentence end goes out on the flusher's timer; when that append
    fails (here Redis refuses writes: out of memory), the text is sent again with the same
    ``after`` once Redis takes writes again. It used to be dropped: the answer had a hole and
    every later call succeeded, so nobody knew."""
    server = RedisServer().start()
    client = server.client()
    try:
        settings = Settings(redis_url=server.url, flush_interval=FLUSH)
        gen = producer.direct(settings=settings)
        async with gen:
            await gen.text("Held until a sentence ends. ")
            await gen.flush()
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", "1")  # every write is refused from now on
            await gen.text("no sentence end")  # the timer sends it, within FLUSH
            await asyncio.sleep(3 * FLUSH)  # the timed flush has failed (more than once)
            client.config_set("maxmemory", "0")

            async def resent() -> bool:  # by the flusher alone: no call of ours meanwhile
                return b"no sentence end" in (client.get(protocol.text_key(gen.id)) or b"")
            await eventually(resent, 10 * FLUSH, "the failed batch sent again")
            await gen.text(", then one. ")
        kinds_and_data = [(f[b"k"], json.loads(f[b"d"])) for _, f in
                          client.xrange(protocol.log_key(gen.id))]
        assert "".join(d["text"] for k, d in kinds_and_data if k == b"message") == (
            "Held until a sentence ends. no sentence end, then one. ")
        assert kinds_and_data[-1][0] == b"end"
    finally:
        server.stop()


async def test_a_create_meeting_the_load_balancers_own_503_goes_again_and_lands_once(
    own_redis: RedisServer,
) -> None:
    """HAProxy answers 503 with its own HTML page while no edge is ready (here: its one edge
    restarting): that request reached no edge, so even a create (not idempotent) goes again,
    and lands once the edge is back. The page is no JSON: the library reads it as the load
    balancer's, never as a JSONDecodeError."""
    port = free_port()
    edge = BrokerProcess("edge", {"REDIS_URL": own_redis.url}, port).wait_ready()
    lb = HAProxy([edge.url]).start()
    try:
        edge.stop()
        async with httpx.AsyncClient(timeout=10) as http:
            async def lb_says_503() -> httpx.Response | None:
                page = await http.post(lb.url + "/v1/generations", json={"producer": "external"})
                return page if page.status_code == 503 else None

            page = await eventually(lb_says_503, 10, "HAProxy to see its edge gone")
            assert not page.headers.get("content-type", "").startswith("application/json")
            gen = producer.over_http(lb.url, client=http)
            start = asyncio.create_task(gen.start())
            await asyncio.sleep(0.2)  # (its first tries meet the page)
            assert not start.done()
            edge = BrokerProcess("edge", {"REDIS_URL": own_redis.url}, port).wait_ready()
            await asyncio.wait_for(start, RETRY_DEADLINE)
            await gen.text("Landed once.")
            await gen.finish()
        redis = aioredis.Redis.from_url(own_redis.url)
        try:
            metas = [k async for k in redis.scan_iter(match="{gen:*}:meta")]
            assert len(metas) == 1, metas  # one generation, however many tries met the page
        finally:
            await redis.aclose()
    finally:
        edge.stop()
        lb.stop()
