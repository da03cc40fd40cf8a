"""The Vercel AI SDK's chat protocol end to end: the real `ai` package's ``Chat`` with
``DefaultChatTransport`` (in Node, ``tests/frontends/node``) against real edges (API keys on)
and a real worker streaming from the fake LLM over HTTP; and the wire itself, read raw."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.core import protocol
from broker.tools.mockllm import ScriptedCall, text_deltas, tokenize, tool_call_deltas
from tests.conftest import Stack, StartBroker
from tests.support.ai_sdk import NodeChats
from tests.support.api import assert_error_body
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import RedisServer

KEY = "ai-sdk-test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
ANSWER = f"First sentence. {TRICKY_TEXT} Second sentence, the last one."


@pytest.fixture(scope="module")
def chat_stack(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[Stack]:
    """Two edges with API keys and viewer tokens on (keepalives every 0.2 s: a held turn sends
    some), and a worker, on a Redis of their own (a worker on the session's Redis would take
    other tests' jobs)."""
    redis = RedisServer().start()
    keyed = {"broker_api_keys": KEY, "broker_viewer_token_keys": "ai-sdk-token-key-0123456789",
             "broker_insecure": "0", "broker_keepalive_interval": "0.2"}
    edges = [start_broker("edge", redis.url, **keyed) for _ in range(2)]
    worker = start_broker("worker", redis.url, fake_llm, broker_max_concurrency="20")
    yield Stack(redis, edges, worker)
    for process in (*edges, worker):
        process.stop()
    redis.stop()


def chat_id() -> str:
    return f"chat-{uuid.uuid4().hex}"


def api(base: str) -> str:
    return f"{base}/v1/ai-sdk/chat"


def prompt(label: str) -> str:
    return f"{label} {uuid.uuid4().hex}"


def assistant(state: dict[str, Any]) -> dict[str, Any]:
    last: dict[str, Any] = state["messages"][-1]
    assert last["role"] == "assistant", state
    return last


def text_of(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


async def new_chat(node: NodeChats, name: str, base: str, cid: str, **extra: Any) -> None:
    await node.call(op="chat", name=name, api=api(base), id=cid, apiKey=KEY, **extra)


async def test_a_turn_streams_to_completion_with_exact_text(
    chat_stack: Stack, fake_llm: FakeLLM
) -> None:
    question = fake_llm.script(prompt("ai-sdk turn"), ANSWER)
    cid = chat_id()
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, cid)
        await node.call(op="send", name="a", text=question)
        state = await node.call(op="wait", name="a", until="done")
    assert state["status"] == "ready" and state["error"] is None, state
    user, answer = state["messages"]
    assert user["role"] == "user" and user["parts"] == [{"type": "text", "text": question}]
    assert protocol.is_generation_id(answer["id"])  # the `start` chunk's messageId
    assert answer["parts"] == [{"type": "step-start"},
                               {"type": "text", "text": ANSWER, "state": "done"}]
    assert state["finishReason"] == "stop"
    # The UI messages went to the LLM as chat messages, as a turn of the chat's conversation.
    assert fake_llm.record_for(question).body["messages"] == [
        {"role": "user", "content": question}]
    async with httpx.AsyncClient(headers=AUTH) as http:
        meta = (await http.get(f"{chat_stack.b}/v1/generations/{answer['id']}")).json()
    assert meta["status"] == "completed" and meta["text"] == ANSWER


async def test_a_reload_mid_turn_resumes_on_another_edge_into_the_same_message(
    chat_stack: Stack, fake_llm: FakeLLM
) -> None:
    """``Chat`` A asks on edge a; while the LLM holds mid-answer, ``Chat`` B (a reloaded page:
    the same chat id, the user's message persisted) resumes on edge b, as ``useChat({resume:
    true})`` does, and ``readUIMessageStream`` reads the same stream once more. Keepalives
    flow while the turn is held; then both finish with equal messages."""
    tokens = tokenize(ANSWER)
    question = fake_llm.script(prompt("ai-sdk resume"), ANSWER, hold_at=len(tokens) // 2)
    reply = fake_llm.reply_for(question)
    cid = chat_id()
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, cid)
        await node.call(op="send", name="a", text=question)
        first = await node.call(op="wait", name="a", until="text")
        await new_chat(node, "b", chat_stack.b, cid, messages=first["messages"][:1])
        await node.call(op="resume", name="b")
        resumed = await node.call(op="wait", name="b", until="text")
        assert text_of(assistant(resumed)) and resumed["status"] == "streaming"
        read = asyncio.create_task(node.call(op="read", api=api(chat_stack.b), id=cid,
                                             apiKey=KEY))
        await keepalives_pass(chat_stack.a, cid, count=2)
        async with httpx.AsyncClient(headers=AUTH, timeout=5) as http:
            head = await http.head(f"{api(chat_stack.b)}/{cid}/stream")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert not reply.release.is_set() and not read.done()
        reply.release.set()
        a = await node.call(op="wait", name="a", until="done")
        b = await node.call(op="wait", name="b", until="done")
        rebuilt = (await read)["message"]
        # The turn is over: a resume now finds nothing to resume (204: the transport's null).
        after = await node.call(op="read", api=api(chat_stack.a), id=cid, apiKey=KEY)
    assert a["status"] == b["status"] == "ready", (a, b)
    assert text_of(assistant(a)) == ANSWER
    assert b["messages"] == a["messages"]
    assert rebuilt == assistant(a)
    assert after["message"] is None


async def keepalives_pass(base: str, cid: str, count: int) -> None:
    """Read the chat's active stream raw until ``count`` keepalive comments came (the held
    turn is quiet): the `ai` clients on the same turn meanwhile got theirs and went on."""
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as http, http.stream(
        "GET", f"{api(base)}/{cid}/stream") as response:
        assert response.status_code == 200
        seen = 0
        async with asyncio.timeout(10):
            async for line in response.aiter_lines():
                seen += line == ": keepalive"
                if seen >= count:
                    return


async def test_reasoning_and_tool_calls_arrive_as_parts_and_a_tool_output_continues(
    chat_stack: Stack, fake_llm: FakeLLM
) -> None:
    """Reasoning, text and a tool call in one answer: a reasoning part, a text part and a
    ``tool-get_weather`` part with the parsed input. The client runs the tool
    (``addToolOutput``) and, as ``lastAssistantMessageIsCompleteWithToolCalls`` says, sends
    the chat back: the LLM gets the call and its output as OpenAI tool messages, and the
    answer continues the same assistant message in a new step."""
    reasoning, text = "The user wants the weather. A tool call.", "Let me look that up. "
    arguments = '{"city": "Z\\u00fcrich", "unit": "C"}'
    call = ScriptedCall(0, "call_w1", "get_weather", [arguments[:9], arguments[9:]])
    question = fake_llm.script(prompt("ai-sdk tools"), deltas=[
        *text_deltas(reasoning, "reasoning_content"), *text_deltas(text),
        *tool_call_deltas([call])], finish_reason="tool_calls")
    cid = chat_id()
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, cid)
        await node.call(op="send", name="a", text=question)
        state = await node.call(op="wait", name="a", until="done")
        assert state["status"] == "ready" and state["finishReason"] == "tool-calls", state
        first = assistant(state)
        tool_part = {"type": "tool-get_weather", "toolCallId": "call_w1",
                     "state": "input-available", "input": {"city": "Zürich", "unit": "C"}}
        assert [{k: v for k, v in p.items() if k != "providerMetadata"}
                for p in first["parts"]] == [
            {"type": "step-start"},
            {"type": "reasoning", "id": "reasoning-1", "text": reasoning, "state": "done"},
            {"type": "text", "text": text, "state": "done"},
            tool_part,
        ]
        fake_llm.script(question, "It is 21 degrees in Zürich.")
        await node.call(op="tool-output", name="a", tool="get_weather", toolCallId="call_w1",
                        output={"temp": 21})
        state = await node.call(op="wait", name="a", until="done")
    assert state["status"] == "ready", state
    continued = assistant(state)
    assert len(state["messages"]) == 2 and continued["id"] == first["id"]
    assert [p["type"] for p in continued["parts"]] == [
        "step-start", "reasoning", "text", "tool-get_weather", "step-start", "text"]
    assert continued["parts"][3]["state"] == "output-available"
    assert continued["parts"][5]["text"] == "It is 21 degrees in Zürich."
    followup = [r.body for r in fake_llm.records
                if len(r.body["messages"]) > 1 and r.body["messages"][0]["content"] == question]
    assert followup[-1]["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": text, "tool_calls": [
            {"id": "call_w1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Zürich","unit":"C"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"temp":21}'},
    ]


async def test_a_cancelled_turn_ends_the_message_without_an_error(
    chat_stack: Stack, fake_llm: FakeLLM
) -> None:
    """Cancelled mid-answer (``POST /v1/generations/{id}/cancel`` with the message's id): the
    stream ends with ``abort``; the client keeps the text so far and reports no error."""
    question = fake_llm.script(prompt("ai-sdk cancel"), ANSWER, hold_at=4)
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, chat_id())
        await node.call(op="send", name="a", text=question)
        partial = await node.call(op="wait", name="a", until="text")
        gen_id = assistant(partial)["id"]
        async with httpx.AsyncClient(headers=AUTH, timeout=5) as http:
            cancelled = await http.post(f"{chat_stack.b}/v1/generations/{gen_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        state = await node.call(op="wait", name="a", until="done")
    assert state["status"] == "ready" and state["error"] is None, state
    assert state["finishReason"] is None  # `abort` carries none
    assert ANSWER.startswith(text_of(assistant(state))) and text_of(assistant(state))


async def test_a_refusal_arrives_as_a_data_part(chat_stack: Stack, fake_llm: FakeLLM) -> None:
    refusal = "I cannot help with that."
    question = fake_llm.script(prompt("ai-sdk refusal"),
                               deltas=text_deltas(refusal, "refusal"))
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, chat_id())
        await node.call(op="send", name="a", text=question)
        state = await node.call(op="wait", name="a", until="done")
    assert state["status"] == "ready", state
    assert assistant(state)["parts"] == [{"type": "step-start"},
                                         {"type": "data-refusal", "data": refusal}]


async def test_an_error_ends_the_message_with_the_error(
    chat_stack: Stack, fake_llm: FakeLLM
) -> None:
    """The LLM breaks after 5 tokens: the message keeps the text before it, the ``error``
    chunk fails the chat with the broker's code and message (``chat.error``)."""
    question = fake_llm.script(prompt("ai-sdk error"), ANSWER, break_after=5)
    async with NodeChats() as node:
        await new_chat(node, "a", chat_stack.a, chat_id())
        await node.call(op="send", name="a", text=question)
        state = await node.call(op="wait", name="a", until="done")
    assert state["status"] == "error", state
    assert state["error"].startswith("llm_stream_broken: the LLM stream broke")
    assert text_of(assistant(state)) == "".join(tokenize(ANSWER)[:5])


# -- the wire, read raw ----------------------------------------------------------------------


def ui_body(cid: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "trigger": "submit-message", "messageId": None, **extra,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}]}


async def read_chunks(response: httpx.Response) -> list[Any]:
    """The ``data:`` of each event, JSON-decoded but for ``[DONE]``."""
    chunks: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


async def test_the_stream_on_the_wire(chat_stack: Stack, fake_llm: FakeLLM) -> None:
    question = fake_llm.script(prompt("ai-sdk wire"), "Hello there. Bye.")
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as http, http.stream(
        "POST", api(chat_stack.a), json=ui_body(chat_id(), question, temperature=0.5)
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = await read_chunks(response)
    gen_id = chunks[0]["messageId"]
    deltas = [c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta"]
    assert "".join(deltas) == "Hello there. Bye."
    assert [c if c == "[DONE]" else c["type"] for c in chunks] == [
        "start", "start-step", "text-start", *["text-delta"] * len(deltas), "text-end",
        "finish-step", "finish", "[DONE]"]
    assert protocol.is_generation_id(gen_id)
    # Fields the transport's `body` option adds go to the LLM as in POST /v1/generations.
    assert fake_llm.record_for(question).body["temperature"] == 0.5


async def test_auth_validation_and_no_active_turn(chat_stack: Stack, fake_llm: FakeLLM) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as http:
        assert_error_body(await http.post(api(chat_stack.a), json=ui_body(cid, "hi")), 401,
                          "unauthorized")
        assert_error_body(await http.get(f"{api(chat_stack.a)}/{cid}/stream"), 401)
        http.headers.update(AUTH)
        assert_error_body(await http.post(api(chat_stack.a), content=b"{"), 400, "invalid_json")
        for bad, code in [
            (ui_body("bad id!", "hi"), "invalid_conversation_id"),
            (ui_body("..", "hi"), "invalid_conversation_id"),  # its resume URL would be lost
            (ui_body(cid, "hi", trigger="resume-stream"), "invalid_request"),
            ({"id": cid, "messages": [{"role": "robot", "parts": []}]}, "invalid_request"),
            ({"id": cid, "messages": []}, "invalid_request"),
        ]:
            assert_error_body(await http.post(api(chat_stack.a), json=bad), 422, code)
        assert (await http.get(f"{api(chat_stack.b)}/{cid}/stream")).status_code == 204
        assert_error_body(await http.get(f"{api(chat_stack.b)}/bad%20id/stream"), 404)
        # Without the API key, a page may resume with its conversation's viewer token (the
        # create answer's conversation_url holds one); another chat's token opens nothing.
        created = await http.post(f"{chat_stack.a}/v1/generations", json={
            "messages": [{"role": "user", "content": prompt("ai-sdk token")}],
            "conversation_id": cid})
        token = httpx.URL(created.json()["conversation_url"]).params["token"]
    async with httpx.AsyncClient(timeout=10) as page:
        resumed = await page.get(f"{api(chat_stack.b)}/{cid}/stream", params={"token": token})
        assert resumed.status_code in (200, 204)  # the turn may have ended already
        assert_error_body(await page.get(f"{api(chat_stack.b)}/{chat_id()}/stream",
                                         params={"token": token}), 403, "forbidden")
        by_cookie = await page.get(f"{api(chat_stack.b)}/{cid}/stream",
                                   headers={"cookie": f"broker_conversation_token_{cid}={token}"})
        assert by_cookie.status_code in (200, 204)


async def test_a_chat_refused_for_lack_of_streams_creates_no_turn(
    start_broker: StartBroker
) -> None:
    """An edge serving as many streams as it may answers the chat's POST 503: then no turn
    may have been created (it was, before the edge looked for a free stream: an answer nobody
    would read ran, and the client's retry made the same turn twice)."""
    redis = RedisServer().start()
    try:
        edge = start_broker("edge", redis.url, broker_max_viewers="1")
        cid = chat_id()
        user = {"role": "user", "parts": [{"type": "text", "text": "hi"}]}
        async with httpx.AsyncClient(timeout=10) as http:
            async with http.stream("GET", f"{edge.url}/v1/conversations/other/events") as held:
                assert held.status_code == 200  # the edge's one stream
                response = await http.post(api(edge.url), json={"id": cid, "messages": [user]})
                assert_error_body(response, 503, "too_many_viewers")
            listing = await http.get(f"{edge.url}/v1/conversations/{cid}")
            assert listing.status_code == 200 and listing.json()["turns"] == [], listing.text
    finally:
        redis.stop()
