"""Typed events in a conversation's Python clients: ``broker tail --conversation`` (``--json``
and plain) and ``ConversationFollower`` show each turn's reasoning, tool calls and refusal
beside its answer, live and resumed, against real edges and a worker on a real redis-server
with the fake LLM (``TRICKY_TEXT`` in the turns). tests/integration/test_conversations.py
has the conversation stream itself and the plain-text terminals."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.client import ConversationEvent, ConversationFollower
from broker.client.terminal import EXIT_INTERRUPTED
from tests.conftest import Stack, StartBroker
from tests.integration.test_cli import broker, finish, read_line, start
from tests.integration.test_typed_clients import (
    ANSWER_1,
    ANSWER_2,
    REASONING_1,
    REASONING_2,
    REFUSAL_LINE,
    TOOL_LINES,
    mixed_reply,
    reasoning_block,
)
from tests.support.api import unique
from tests.support.dropping_proxy import DroppingProxy
from tests.support.fakellm import TRICKY_TEXT, FakeLLM

pytestmark = pytest.mark.parametrize("stack", ["redis"], indirect=True)

FIRST_ANSWER = f"Hello there. {TRICKY_TEXT} How can I help?"


def new_cid() -> str:
    return f"chat:{uuid.uuid4().hex[:12]}"


async def ask_turn(stack: Stack, cid: str, prompt: str) -> str:
    """``broker ask --conversation``: the turn's generation id."""
    done = await broker("ask", "--conversation", cid, prompt, url=stack.a)
    assert done.code == 0, done.stderr
    return done.stderr_lines[0]


async def conversation(http: httpx.AsyncClient, base: str, cid: str,
                       turns: int) -> list[ServerSentEvent]:
    """The conversation's stream read by a spec-following parser until ``turns`` turns
    ended: the reference."""
    url = f"{base}/v1/conversations/{cid}/events"
    events: list[ServerSentEvent] = []
    async with aconnect_sse(http, "GET", url) as source:
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            if event.data:
                events.append(event)
            if sum(e.event in ("end", "error") for e in events) == turns:
                return events
    raise AssertionError(f"the stream closed after {events}")


def without_turn_status(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A device sees a turn's status as it reaches it (queued, running or completed)."""
    return [{k: v for k, v in line.items() if not (line["event"] == "turn" and k == "status")}
            for line in lines]


def json_lines_of(events: list[ServerSentEvent]) -> list[dict[str, Any]]:
    """What ``--json`` must print for a conversation's events."""
    lines = []
    for e in events:
        data = json.loads(e.data)
        line = {"id": e.id, "event": e.event, "generation_id": data.pop("generation_id")}
        if e.event == "message":
            line["text"] = data["text"]
        elif e.event in ("end", "turn"):
            line |= data
        elif e.event == "error":
            line["error"] = data
        else:
            line["data"] = data
        lines.append(line)
    return lines


async def test_tail_conversation_json_follows_each_turn_live_until_ctrl_c(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    cid = new_cid()
    first = await ask_turn(stack, cid, fake_llm.script(unique("turn-1"), FIRST_ANSWER))
    proc = await start("tail", "--json", "--conversation", cid, url=stack.b)
    lines: list[dict[str, Any]] = []

    async def until_turns_ended(n: int) -> None:
        while sum(line["event"] in ("end", "error") for line in lines) < n:
            lines.append(json.loads(await read_line(proc.stdout, within=20)))

    await until_turns_ended(1)  # the first turn, from the history
    second = await ask_turn(stack, cid, fake_llm.script(unique("turn-2"), **mixed_reply()))
    await until_turns_ended(2)  # the second, live over the same stream
    proc.send_signal(signal.SIGINT)
    done = await finish(proc)
    assert done.code == EXIT_INTERRUPTED and done.stdout == "", done.stderr

    reference = await conversation(http, stack.a, cid, turns=2)
    assert without_turn_status(lines) == without_turn_status(json_lines_of(reference))
    assert [line["generation_id"] for line in lines if line["event"] == "turn"] == [first, second]
    assert [line["turn"] for line in lines if line["event"] == "turn"] == [1, 2]
    of_second = [line for line in lines if line["generation_id"] == second]
    assert "".join(x["text"] for x in lines if x["event"] == "message"
                   and x["generation_id"] == first) == FIRST_ANSWER
    assert "".join(x["data"]["text"] for x in of_second if x["event"] == "reasoning") == (
        REASONING_1 + REASONING_2)
    assert "".join(x["text"] for x in of_second if x["event"] == "message") == (
        ANSWER_1 + ANSWER_2)
    assert [x["finish_reason"] for x in lines if x["event"] == "end"] == ["stop", "tool_calls"]


async def test_tail_conversation_plain_keeps_the_side_events_off_stdout(
    stack: Stack, fake_llm: FakeLLM
) -> None:
    cid = new_cid()
    first = await ask_turn(stack, cid, fake_llm.script(unique("turn-1"), FIRST_ANSWER))
    second = await ask_turn(stack, cid, fake_llm.script(unique("turn-2"), **mixed_reply()))
    done = await broker("tail", "--conversation", cid, "--turns", "2", url=stack.b)
    assert done.code == 0, done.stderr
    # Each turn's header and answer on stdout; its reasoning and tool calls on stderr.
    assert done.stdout == (f"── turn 1 ({first}) ──\n{FIRST_ANSWER}\n"
                           f"── turn 2 ({second}) ──\n{ANSWER_1}{ANSWER_2}\n")
    assert done.stderr == (reasoning_block(REASONING_1) + reasoning_block(REASONING_2)
                           + "".join(line + "\n" for line in [*TOOL_LINES, REFUSAL_LINE]))


@pytest.fixture(scope="module")
def quick_retry_edge(stack: Stack, start_broker: StartBroker) -> str:
    return start_broker("edge", stack.redis.url, broker_retry_ms="20").url


async def test_conversation_follower_resumes_exactly_once_across_dropped_connections(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, quick_retry_edge: str
) -> None:
    """Each event of two turns on a connection of its own (the proxy cuts each one after its
    first event), the second turn created while the follower waits: every event once, in
    order, across turns."""
    cid = new_cid()
    first = await ask_turn(stack, cid, fake_llm.script(unique("turn-1"), FIRST_ANSWER))
    proxy = await DroppingProxy(quick_retry_edge, every_connection=True).start()
    got: list[ConversationEvent] = []
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20.0) as client:
            follower = ConversationFollower(client, f"/v1/conversations/{cid}/events")
            async with asyncio.timeout(30):
                async for event in follower:
                    got.append(event)
                    ended = sum(e.terminal for e in got)
                    if ended == 1 and event.event == "end":  # the next turn, while it waits
                        second = await ask_turn(
                            stack, cid, fake_llm.script(unique("turn-2"), **mixed_reply()))
                    if ended == 2:
                        break
    finally:
        await proxy.close()
    reference = await conversation(http, stack.a, cid, turns=2)

    def comparable(kind: str, event_id: str, data: dict[str, Any]) -> tuple[Any, ...]:
        return (kind, event_id, {k: v for k, v in data.items()
                                 if not (kind == "turn" and k == "status")})

    assert [comparable(e.event, e.id, {"generation_id": e.generation_id, **e.data})
            for e in got] == [comparable(e.event, e.id, json.loads(e.data)) for e in reference]
    assert [e.generation_id for e in got if e.event == "turn"] == [first, second]
    of_second = [e for e in got if e.generation_id == second]
    assert "".join(e.data["text"] for e in of_second if e.event == "message") == (
        ANSWER_1 + ANSWER_2)
    assert "".join(e.data["text"] for e in of_second if e.event == "reasoning") == (
        REASONING_1 + REASONING_2)
    assert [e.data["name"] for e in of_second if e.event == "tool_call"] == [
        "get_weather", "get_time"]
    assert proxy.resumed_with() == [e.id.encode() for e in reference[:-1]]
    assert follower.reconnects == len(reference) - 1
