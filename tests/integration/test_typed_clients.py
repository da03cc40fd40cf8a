"""The Python clients understand typed events: ``Follower.events()`` and ``broker ask`` /
``broker tail`` (``--json``, plain output to pipes, plain output to a terminal), against real
edges and a worker on a real redis-server, the worker reading the fake LLM's reasoning, tool
calls and refusal through the real ``openai`` SDK over HTTP. Every text carries the
characters careless readers break (``TRICKY_TEXT``)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker.client import Event, Follower, Message, Result
from broker.client.terminal import DIM, UNDIM
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.tools.mockllm import ScriptedCall, text_deltas, tool_call_deltas
from tests.conftest import Stack, StartBroker
from tests.integration.test_cli import broker, cli_env
from tests.support.api import create, events_url, unique
from tests.support.dropping_proxy import DroppingProxy
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.sse import Received, read_events

# The client side does not depend on the store: one Redis is enough here.
pytestmark = pytest.mark.parametrize("stack", ["redis"], indirect=True)

# The upstream's stream: reasoning, answer, reasoning again, answer again, a refusal, then two
# tool calls whose fragments interleave and cut escapes, characters and JSON strings.
REASONING_1 = f"I should look this up. {TRICKY_TEXT} "
ANSWER_1 = f"Checking now: {TRICKY_TEXT} "
REASONING_2 = "Two calls, then I answer."
ANSWER_2 = "One moment…\n"
REFUSAL = "I won't guess the weather 😟."
ARGUMENTS = ['{"city": "Z\\u00fcrich", "note": "a\\nb \u2028 \\"q\\" 😀"}',
             '{"tz": "Europe/Paris"}']
CALLS = [("call_weather", "get_weather"), ("call_time", "get_time")]
# Plain mode: one line per tool call; the arguments as the model wrote them, but for the
# U+2028 (a line end to many readers), escaped.
TOOL_LINES = [
    '[tool_call call_weather] get_weather({"city": "Z\\u00fcrich", "note": "a\\nb \\u2028 '
    '\\"q\\" 😀"})',
    '[tool_call call_time] get_time({"tz": "Europe/Paris"})',
]
REFUSAL_LINE = f"[data refusal] {json.dumps(REFUSAL, ensure_ascii=False)}"


def mixed_reply() -> dict[str, Any]:
    calls = [ScriptedCall(i, call_id, name, [ARGUMENTS[i][j:j + 3]
                                             for j in range(0, len(ARGUMENTS[i]), 3)])
             for i, (call_id, name) in enumerate(CALLS)]
    deltas = [
        *text_deltas(REASONING_1, "reasoning_content"), *text_deltas(ANSWER_1),
        *text_deltas(REASONING_2, "reasoning_content"), *text_deltas(ANSWER_2),
        *text_deltas(REFUSAL, "refusal"), *tool_call_deltas(calls, interleave=True),
    ]
    return {"deltas": deltas, "finish_reason": "tool_calls", "delay": 0.002,
            "split_writes": True}


def as_json_lines(received: Received) -> list[dict[str, Any]]:
    """What ``--json`` must print for the events ``received``: each with its id and kind,
    a message's text, the other kinds' data, the terminal event's fields."""
    lines: list[dict[str, Any]] = []
    for e in received.events:
        data = json.loads(e.data)
        if e.event == "message":
            body = {"text": data["text"]}
        elif e.event == "end":
            body = data
        elif e.event == "error":
            body = {"error": data}
        else:
            body = {"data": data}
        lines.append({"id": e.id, "event": e.event, **body})
    return lines


def reasoning_block(text: str) -> str:
    """A run of reasoning in plain output: labelled once, ended with a line end."""
    return "[reasoning] " + text + ("" if text.endswith("\n") else "\n")


# -- broker ask, from the real worker -----------------------------------------------------------


async def test_ask_json_prints_every_typed_event_exactly(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    prompt = fake_llm.script(unique("ask-json"), **mixed_reply())
    done = await broker("ask", "--json", prompt, url=stack.a)
    assert done.code == 0, done.stderr
    gen_id = done.stderr_lines[0]
    lines = [json.loads(line) for line in done.stdout.split("\n")[:-1]]
    reference = await read_events(http, events_url(stack.b, gen_id))
    assert lines == as_json_lines(reference)

    kinds = [line["event"] for line in lines]
    assert kinds.count("tool_call") == 2 and kinds.count("data") == 1 and kinds[-1] == "end"
    assert "".join(x["data"]["text"] for x in lines if x["event"] == "reasoning") == (
        REASONING_1 + REASONING_2)
    assert "".join(x["text"] for x in lines if x["event"] == "message") == ANSWER_1 + ANSWER_2
    assert [x["data"] for x in lines if x["event"] == "tool_call"] == [
        {"index": i, "id": call_id, "name": name, "arguments": ARGUMENTS[i]}
        for i, (call_id, name) in enumerate(CALLS)]
    assert [x["data"] for x in lines if x["event"] == "data"] == [
        {"name": "refusal", "value": REFUSAL}]
    assert lines[-1]["finish_reason"] == "tool_calls"


async def test_ask_plain_keeps_stdout_the_answer_and_shows_the_rest_on_stderr(
    stack: Stack, fake_llm: FakeLLM
) -> None:
    prompt = fake_llm.script(unique("ask-plain"), **mixed_reply())
    done = await broker("ask", prompt, url=stack.a)
    assert done.code == 0, done.stderr
    assert done.stdout == ANSWER_1 + ANSWER_2 + "\n"
    gen_id, url, rest = done.stderr.split("\n", 2)
    assert protocol.is_generation_id(gen_id) and url.endswith(f"/{gen_id}/events")
    # In the stream's order: the worker sends the complete calls, then the refusal, after
    # the text.
    assert rest == (reasoning_block(REASONING_1) + reasoning_block(REASONING_2)
                    + "".join(line + "\n" for line in [*TOOL_LINES, REFUSAL_LINE]))


# -- broker tail, of a generation with every kind -------------------------------------------------


@pytest.fixture
async def store(stack: Stack) -> AsyncIterator[Store]:
    """A store on the stack's Redis, to publish into a generation as a producer would."""
    settings = Settings(redis_url=stack.redis.url)
    client = connect(settings, "typed-clients-test")
    yield Store(client, settings)
    await client.aclose()
    if isinstance(client, aioredis.Redis):  # its pool was given to it: not closed with it
        await client.connection_pool.disconnect()


TOOL_RESULT = {"hits": [1, 2], "note": f"é\n{TRICKY_TEXT}"}
SOURCES = [{"url": "https://example.com/?a=1&b=2", "title": "a\u2028b\u0085c"}]
EVERY_KIND = [
    protocol.new_reasoning(f"Thinking {TRICKY_TEXT} "),
    protocol.new_message(f"Hello {TRICKY_TEXT} "),
    protocol.new_tool_call(0, "call_1", "search", '{"q": "caf\\u00e9"}'),
    protocol.new_tool_result("call_1", TOOL_RESULT),
    protocol.new_data("sources", SOURCES),
    protocol.new_reasoning("Done."),
    protocol.new_message("Bye."),
]
ANSWER = f"Hello {TRICKY_TEXT} Bye."


def escaped_json(value: Any) -> str:
    """JSON as plain mode shows it: its characters as themselves, but for those that end a
    line which JSON leaves unescaped (U+0085, U+2028, U+2029)."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace(
        "\u2029", "\\u2029")


SIDE_LINES = [
    '[tool_call call_1] search({"q": "caf\\u00e9"})',
    f"[tool_result call_1] {escaped_json(TOOL_RESULT)}",
    f"[data sources] {escaped_json(SOURCES)}",
]


async def every_kind(store: Store) -> str:
    """A finished generation holding each kind of event (as an external producer publishes
    them: tool results and data come from no LLM); its id."""
    gen_id = protocol.new_generation_id()
    await store.redis.hset(protocol.meta_key(gen_id), mapping=protocol.new_meta("m"))
    assert await store.claim(gen_id, "test-producer", 60.0) == "ok"
    events = [*EVERY_KIND, protocol.new_end("stop", {"completion_tokens": 7})]
    assert await store.publish(gen_id, "test-producer", 1, events) == 1
    return gen_id


async def test_tail_json_and_plain_show_every_kind(
    stack: Stack, store: Store, http: httpx.AsyncClient
) -> None:
    gen_id = await every_kind(store)
    as_json = await broker("tail", "--json", gen_id, url=stack.a)
    assert as_json.code == 0 and as_json.stderr == ""
    reference = await read_events(http, events_url(stack.b, gen_id))
    assert [json.loads(line) for line in as_json.stdout.split("\n")[:-1]] == (
        as_json_lines(reference))

    plain = await broker("tail", gen_id, url=stack.a)
    assert plain.code == 0
    assert plain.stdout == ANSWER + "\n"
    assert plain.stderr == (reasoning_block(f"Thinking {TRICKY_TEXT} ")
                            + "".join(line + "\n" for line in SIDE_LINES)
                            + reasoning_block("Done."))
    for line in SIDE_LINES:  # one line each, whatever the value held
        assert len(line.splitlines()) == 1


def run_on_terminal(*args: str, url: str, within: float = 30.0) -> tuple[int, bytes, bytes]:
    """``python -m broker <args>`` with its stdout on a pseudo-terminal (raw: the bytes as
    written, no newline translation): (exit status, what the terminal got, stderr)."""
    controller, terminal = pty.openpty()
    tty.setraw(terminal)
    env = {k: v for k, v in cli_env(url).items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "broker", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([controller], [], [], left)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal (the process ended)
                break
            if not chunk:
                break
            shown += chunk
        _, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(controller)
    return proc.returncode, bytes(shown), stderr


async def test_tail_on_a_terminal_shows_everything_in_order_with_the_reasoning_dimmed(
    stack: Stack, store: Store
) -> None:
    gen_id = await every_kind(store)
    code, shown, stderr = await asyncio.to_thread(run_on_terminal, "tail", gen_id, url=stack.a)
    assert code == 0 and stderr == b""
    assert shown.decode() == (
        f"{DIM}[reasoning] Thinking {TRICKY_TEXT} {UNDIM}\n"
        f"Hello {TRICKY_TEXT} \n"  # a side line starts on a line of its own
        + "".join(line + "\n" for line in SIDE_LINES)
        + f"{DIM}[reasoning] Done.{UNDIM}\n"
        "Bye.\n"
    )


# -- Follower.events() ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_retry_edge(stack: Stack, start_broker: StartBroker) -> str:
    """An edge of the stack advising a 20 ms ``retry:``: a follower cut off after every
    event resumes at once."""
    return start_broker("edge", stack.redis.url, broker_retry_ms="20").url


async def test_follower_events_resume_exactly_once_across_dropped_connections(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, quick_retry_edge: str
) -> None:
    """Each event comes on a connection of its own (the proxy cuts each one after its first
    event), while the generation is live and then from the log: every typed event arrives
    once, in order, and the v1 iteration on the same stream gives the answer alone."""
    prompt = fake_llm.script(unique("follow"), **mixed_reply())
    gen_id = await create(http, stack.a, prompt)
    path = f"/v1/generations/{gen_id}/events"
    proxy = await DroppingProxy(quick_retry_edge, every_connection=True).start()
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20.0) as client:
            follower = Follower(client, path)
            typed = [event async for event in follower.events()]
            v1_follower = Follower(client, path)
            messages = [message async for message in v1_follower]
    finally:
        await proxy.close()
    full = await read_events(http, events_url(stack.b, gen_id))
    *content, end = full.events

    assert typed == [Event(e.event, e.id, json.loads(e.data)) for e in content]
    assert {e.kind for e in typed} == {"reasoning", "message", "tool_call", "data"}
    assert "".join(e.text for e in typed if e.kind == "reasoning") == REASONING_1 + REASONING_2
    assert follower.result == Result("tool_calls", json.loads(end.data)["usage"])
    assert follower.last_event_id == end.id
    # One connection per event, each resumed after the previous event's id (both followers).
    assert proxy.resumed_with() == [i.encode() for i in full.ids[:-1]] * 2
    assert follower.reconnects == v1_follower.reconnects == len(content)

    assert messages == [Message(e.id, json.loads(e.data)["text"]) for e in full.messages]
    assert "".join(m.text for m in messages) == ANSWER_1 + ANSWER_2
    assert v1_follower.result == follower.result
