"""Typed events end to end: the fake LLM streams reasoning, text, tool-call fragments and
refusals over HTTP, the real worker (the real ``openai`` SDK) turns them into events, real
edges on a real Redis (and a Redis Cluster) serve, replay and resume them."""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import ServerSentEvent
from openai import AsyncOpenAI

from broker.core import protocol
from broker.core.deltas import DeltaReader, Piece, chunk_dict
from broker.core.settings import Settings
from broker.core.sse import aiter_sse_data
from broker.core.store import Store, connect
from broker.tools.mockllm import ScriptedCall, text_deltas, tool_call_deltas
from tests.conftest import Stack
from tests.support.api import create, events_url, status, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import eventually
from tests.support.sse import Received, read_events

# The upstream's stream: reasoning, answer, reasoning again, answer again (interleaved
# thinking), then two tool calls whose fragments interleave. Every character that breaks
# careless readers, in the reasoning too.
REASONING_1 = f"The user asks two things. I need the weather and the time. {TRICKY_TEXT} "
ANSWER_1 = "Let me check both. "
REASONING_2 = "Two calls, in parallel: 3.14 is not an end. Go."
ANSWER_2 = "One moment…\n\n"
# Arguments as models write them: JSON escapes (quote, backslash, \u), characters of 2, 3 and
# 4 UTF-8 bytes (and so a surrogate pair when escaped), a combining mark, line separators.
ARGUMENTS = [
    '{"city": "Z\\u00fcrich", "q": "say \\"hi\\"\\n", "emoji": "😀🎉", "cjk": "東京", '
    '"mark": "e\u0301", "seps": "\u2028\u2029\u0085"}',
    '{"tz": "Europe/Z\u00fcrich", "path": "C:\\\\tmp"}',
]
CALLS = [("call_weather", "get_weather"), ("call_time", "get_time")]


def awkward_pieces(arguments: str, split_surrogates: bool) -> list[str]:
    """``arguments`` cut where a careless reader breaks: after every backslash (inside every
    escape), inside every ``\\u`` escape, before every combining mark, every few characters;
    and, when the stream escapes non-ASCII characters (``split_surrogates``), between the
    two halves of every surrogate pair (a fragment then ends in a lone high surrogate)."""
    if split_surrogates:  # UTF-16 code units: an astral character is two
        raw = arguments.encode("utf-16-le", "surrogatepass")
        chars = [raw[i:i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(raw), 2)]
    else:
        chars = list(arguments)
    pieces, current = [], ""
    for char in chars:
        if current and (unicodedata.category(char) == "Mn" or len(current) >= 5):
            pieces.append(current)
            current = ""
        current += char
        inside_escape = char == "\\" or current.endswith("\\u00")
        if inside_escape or (split_surrogates and "\ud800" <= char <= "\udbff"):
            pieces.append(current)
            current = ""
    return [*pieces, current] if current else pieces


def mixed_reply(reasoning_field: str, ascii_json: bool) -> dict[str, Any]:
    calls = [ScriptedCall(i, call_id, name, awkward_pieces(ARGUMENTS[i], ascii_json))
             for i, (call_id, name) in enumerate(CALLS)]
    deltas = [
        *text_deltas(REASONING_1, reasoning_field), *text_deltas(ANSWER_1),
        *text_deltas(REASONING_2, reasoning_field), *text_deltas(ANSWER_2),
        *tool_call_deltas(calls, interleave=True),
    ]
    # ``split_writes`` cuts the UTF-8 bytes of every multi-byte character across two network
    # writes; with ``ascii_json`` there are none (everything is escaped).
    return {"deltas": deltas, "finish_reason": "tool_calls", "delay": 0.001,
            "ascii_json": ascii_json, "split_writes": not ascii_json}


def expected_calls() -> list[dict[str, Any]]:
    return [{"index": i, "id": call_id, "name": name, "arguments": ARGUMENTS[i]}
            for i, (call_id, name) in enumerate(CALLS)]


def kind(event: ServerSentEvent) -> str:
    return event.event


def texts(events: list[ServerSentEvent], of: str) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == of)


def runs(kinds: list[str]) -> list[str]:
    """``kinds`` with repeats in a row merged: the order of the types."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


async def assert_resumes_from_every_id(
    http: httpx.AsyncClient, base: str, gen_id: str, full: Received
) -> None:
    """From every id of ``full`` (and from the start), on ``base``: exactly the events after
    it, same ids, same types, same data; after the terminal id, 204."""
    for i, event_id in enumerate(["0", *full.ids[:-1]]):
        rest = await read_events(http, events_url(base, gen_id), last_event_id=event_id)
        assert rest.status == 200
        assert [(e.id, e.event, e.data) for e in rest.events] == [
            (e.id, e.event, e.data) for e in full.events[i:]], f"resumed after {event_id}"
    after_end = await http.get(events_url(base, gen_id), headers={"last-event-id": full.ids[-1]})
    assert after_end.status_code == 204


@pytest.mark.parametrize(("reasoning_field", "ascii_json"), [
    ("reasoning_content", False),  # DeepSeek's name, UTF-8 JSON cut inside characters
    ("reasoning", True),  # OpenRouter's/Ollama's name, escaped JSON cut inside pairs
])
async def test_a_mixed_stream_end_to_end_then_resumed_from_every_id_on_the_other_edge(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, reasoning_field: str,
    ascii_json: bool,
) -> None:
    prompt = fake_llm.script(unique("mixed"), **mixed_reply(reasoning_field, ascii_json))
    gen_id = await create(http, stack.a, prompt)
    full = await read_events(http, events_url(stack.a, gen_id))
    events = full.events

    # Exact text of each kind; the order of the types is the upstream's.
    assert texts(events, "reasoning") == REASONING_1 + REASONING_2
    assert full.text == ANSWER_1 + ANSWER_2
    assert runs([kind(e) for e in events]) == [
        "reasoning", "message", "reasoning", "message", "tool_call", "end"]
    calls = [json.loads(e.data) for e in events if e.event == "tool_call"]
    assert calls == expected_calls()
    assert full.terminal_data()["finish_reason"] == "tool_calls"
    # A message never carries reasoning, nor a reasoning event answer text: each event's
    # text lies within one upstream segment of its own kind.
    for e in events:
        if e.event in ("message", "reasoning"):
            segments = ([ANSWER_1, ANSWER_2] if e.event == "message"
                        else [REASONING_1, REASONING_2])
            assert any(json.loads(e.data)["text"] in s for s in segments), e.data
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))

    got = await status(http, stack.b, gen_id)
    assert got["text"] == full.text and got["reasoning"] == REASONING_1 + REASONING_2
    assert got["tool_calls"] == expected_calls()
    assert got["status"] == "completed" and got["finish_reason"] == "tool_calls"
    assert got["events"] == {k: sum(e.event == k for e in events)
                             for k in ("message", "reasoning", "tool_call", "tool_result", "data")}

    await assert_resumes_from_every_id(http, stack.b, gen_id, full)


async def test_a_refusal_is_one_data_event_and_never_answer_text(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    refusal = "I can't help with that. It could hurt someone 😟."
    prompt = fake_llm.script(unique("refuse"), deltas=text_deltas(refusal, "refusal"),
                             finish_reason="content_filter")
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.b, gen_id))
    assert [(e.event, json.loads(e.data)) for e in got.events] == [
        ("data", {"name": "refusal", "value": refusal}),
        ("end", {"finish_reason": "content_filter", "usage": got.terminal_data()["usage"]}),
    ]
    record = await status(http, stack.a, gen_id)
    assert record["text"] == "" and record["events"]["data"] == 1
    assert record["finish_reason"] == "content_filter" and record["status"] == "completed"


async def test_tool_and_reasoning_request_fields_reach_the_llm_unchanged(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    fields = {
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Wetter für eine Stadt 🌦",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": False},
            "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": {"type": "object"}, "strict": True}},
        "reasoning_effort": "high",
    }
    prompt = fake_llm.script(unique("fields"), "Fine.")
    gen_id = await create(http, stack.a, prompt, **fields)
    await read_events(http, events_url(stack.a, gen_id))
    body = fake_llm.record_for(prompt).body
    assert {name: body.get(name) for name in fields} == fields


@pytest.fixture
async def store(stack: Stack) -> AsyncIterator[Store]:
    """A store on the stack's Redis, to publish into a generation as its producer would."""
    settings = Settings(redis_url=stack.redis.url)
    client = connect(settings, "typed-events-test")
    yield Store(client, settings)
    await client.aclose()
    if isinstance(client, aioredis.Redis):  # its pool was given to it: not closed with it
        await client.connection_pool.disconnect()


EVERY_KIND = [
    protocol.new_reasoning("Thinking 🤔\u2028. "),
    protocol.new_message("Hello. "),
    protocol.new_tool_call(0, "call_1", "search", '{"q":"\\u00e9"}'),
    protocol.new_tool_result("call_1", {"hits": [1, 2], "note": "é\n"}),
    protocol.new_data("sources", [{"url": "https://example.com/?a=1&b=2"}]),
    protocol.new_reasoning("Done."),
    protocol.new_message("Bye."),
]


async def test_every_kind_published_live_is_replayed_and_resumed_on_the_other_edge(
    stack: Stack, store: Store, http: httpx.AsyncClient
) -> None:
    """Every kind, published while viewers watch (live frames) and resumed mid-stream from
    every id on the other edge (the log, then live): exactly once each, in order."""
    gen_id = protocol.new_generation_id()
    await store.redis.hset(protocol.meta_key(gen_id), mapping=protocol.new_meta("m"))
    assert await store.claim(gen_id, "test-producer", 60.0) == "ok"
    live: list[Received] = []
    watching = asyncio.create_task(
        read_events(http, events_url(stack.a, gen_id), progress=live))
    seq = 1
    for batch in (EVERY_KIND[:3], EVERY_KIND[3:4], EVERY_KIND[4:]):  # batches of 3, 1 and 3
        assert await store.publish(gen_id, "test-producer", seq, batch) == 1
        seq += len(batch)
        await asyncio.sleep(0)
    # Resume from every id so far on the other edge while the generation still runs: every
    # resumed stream has started (its 200 came) before the terminal event is published.
    started: list[Received] = []
    resumes = [asyncio.create_task(read_events(http, events_url(stack.b, gen_id),
                                               last_event_id=protocol.event_id(n),
                                               progress=started))
               for n in range(seq)]
    await eventually(lambda: asyncio.sleep(0, len(started) == seq), 20, "the resumed streams")
    assert all(r.status == 200 for r in started)
    assert await store.publish(gen_id, "test-producer", seq,
                               [protocol.new_end("stop", None)]) == 1
    full = await asyncio.wait_for(watching, 20)
    expected = [*((e.kind, e.data) for e in EVERY_KIND), ("end", protocol.end_data("stop", None))]
    assert [(e.event, e.data) for e in full.events] == expected
    assert full.ids == [protocol.event_id(n) for n in range(1, len(expected) + 1)]
    for n, resumed in enumerate(await asyncio.wait_for(asyncio.gather(*resumes), 20)):
        assert [(e.id, e.event, e.data) for e in resumed.events] == [
            (e.id, e.event, e.data) for e in full.events[n:]], f"resumed after {n}"
    record = await status(http, stack.b, gen_id)
    assert record["events"] == {"message": 2, "reasoning": 2, "tool_call": 1, "tool_result": 1,
                                "data": 1}
    assert record["reasoning"] == "Thinking 🤔\u2028. Done." and record["text"] == "Hello. Bye."


async def test_the_sdk_chunks_read_like_the_raw_stream(fake_llm: FakeLLM) -> None:
    """The producer library's ``pipe()`` reads the ``openai`` SDK's chunk objects: through
    ``chunk_dict`` they give the same pieces as the raw JSON the worker reads."""
    prompt = fake_llm.script(unique("sdk"), **mixed_reply("reasoning_content", False))
    request = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    async with AsyncOpenAI(base_url=fake_llm.base_url, api_key="test-key") as client:
        from_sdk: list[Piece] = []
        sdk_reader = DeltaReader()
        async for sdk_chunk in await client.chat.completions.create(**request, stream=True):
            from_sdk += sdk_reader.feed(chunk_dict(sdk_chunk))
        from_sdk += sdk_reader.finish()
        raw_reader, from_raw = DeltaReader(), []
        async with client.chat.completions.with_streaming_response.create(
                **request, stream=True) as response:
            async for data in aiter_sse_data(response.http_response.aiter_bytes()):
                if data.startswith("{"):
                    from_raw += raw_reader.feed(json.loads(data))
        from_raw += raw_reader.finish()
    assert from_sdk == from_raw
    assert sdk_reader.finish_reason == raw_reader.finish_reason == "tool_calls"
    assert "".join(p.text for p in from_sdk if getattr(p, "kind", "") == "reasoning") == (
        REASONING_1 + REASONING_2)
