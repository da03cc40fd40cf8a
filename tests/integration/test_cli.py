"""``broker ask`` and ``broker tail``, run as real processes against real edges and a worker
on a real redis-server, with the scripted fake LLM: what they print and how they exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import httpx
import pytest

from broker.core import protocol
from broker.tools import cli
from broker.tools.mockllm import tokenize
from tests.conftest import Stack
from tests.support.api import HARD_TEXTS, create, events_url, unique
from tests.support.dropping_proxy import DroppingProxy
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import eventually, free_port
from tests.support.sse import Received, read_events

STORY = (
    "The broker streams answers. It buffers tokens into sentences! Does it lose text? "
    "Never: the log in Redis is the truth.\n\nA second paragraph follows here. It ends now. "
    f"{TRICKY_TEXT}"
)
# Before the held token: a whole first message. After it: the rest, once the test lets go.
HEAD = "The first part arrives. "
REST = "Then the rest follows, once released. The end."


@dataclass
class Done:
    code: int
    stdout: str  # decoded from the exact bytes: no newline translation
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def cli_env(url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    env["PYTHONIOENCODING"] = "utf-8"
    if url is not None:
        env["BROKER_URL"] = url
    return env


async def start(*args: str, url: str | None = None) -> asyncio.subprocess.Process:
    """``python -m broker <args>``; ``url`` goes in ``BROKER_URL`` (else pass ``--url``)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", *args, env=cli_env(url),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, within: float = 30.0,
                 head: bytes = b"") -> Done:
    """Waits for the process to exit (killing it past ``within``); ``head``: stdout already
    read by the test."""
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"still running after {within}s; stdout {out!r}, stderr {err!r}"
        ) from None
    assert proc.returncode is not None
    return Done(proc.returncode, (head + out).decode(), err.decode())


async def broker(*args: str, url: str | None = None, within: float = 30.0) -> Done:
    return await finish(await start(*args, url=url), within)


async def read_exactly(stream: asyncio.StreamReader | None, n: int, within: float = 10.0) -> bytes:
    assert stream is not None
    async with asyncio.timeout(within):
        return await stream.readexactly(n)


async def read_line(stream: asyncio.StreamReader | None, within: float = 10.0) -> bytes:
    assert stream is not None
    async with asyncio.timeout(within):
        return await stream.readline()


async def finished(
    http: httpx.AsyncClient, stack: Stack, fake_llm: FakeLLM, text: str
) -> tuple[str, Received]:
    """A generation of ``text``, followed to its end: (id, the events received)."""
    prompt = fake_llm.script(unique("finished"), text)
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.a, gen_id))
    assert got.text == text and got.terminal is not None and got.terminal.event == "end"
    return gen_id, got


def held(fake_llm: FakeLLM, label: str) -> str:
    """A prompt whose answer stops after ``HEAD`` until the test sets its ``release``."""
    return fake_llm.script(unique(label), tokens=[HEAD, *tokenize(REST)], hold_at=1, delay=0)


# -- ask ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [STORY, *HARD_TEXTS],
)
async def test_ask_prints_exactly_the_answer_and_the_id_on_stderr(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, text: str
):
    prompt = fake_llm.script(unique("ask"), tokens=list(text))  # one character per token
    done = await broker("ask", prompt, url=stack.a)  # the URL from BROKER_URL
    assert done.code == 0, done.stderr
    assert done.stdout == text + "\n"
    gen_id, events = done.stderr_lines
    assert protocol.is_generation_id(gen_id)
    assert events == f"{stack.a}/v1/generations/{gen_id}/events"  # an open edge: no token
    status = (await http.get(f"{stack.b}/v1/generations/{gen_id}")).json()
    assert status["text"] == text and status["status"] == "completed"


async def test_ask_json_prints_one_object_per_event(stack: Stack, fake_llm: FakeLLM):
    prompt = fake_llm.script(unique("json"), STORY)
    done = await broker("ask", "--json", "--url", stack.b, prompt)
    assert done.code == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    *messages, end = lines
    assert len(messages) >= 5 and all(set(m) == {"id", "event", "text"} for m in messages)
    assert {m["event"] for m in messages} == {"message"} and end["event"] == "end"
    assert "".join(m["text"] for m in messages) == STORY
    ids = [protocol.parse_event_id(m["id"]) for m in [*messages, end]]
    assert ids == sorted(set(ids))
    assert end["finish_reason"] == "stop" and end["usage"]["completion_tokens"] > 0
    assert protocol.is_generation_id(done.stderr_lines[0])


async def test_ask_sends_model_and_system(stack: Stack, fake_llm: FakeLLM):
    prompt = fake_llm.script(unique("model"), "Fine.")
    done = await broker("ask", "--model", "cli-model", "--system", "Be brief.", prompt,
                        url=stack.a)
    assert done.code == 0, done.stderr
    assert done.stdout == "Fine.\n"
    body = fake_llm.record_for(prompt).body
    assert body["model"] == "cli-model"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": prompt}]


async def test_ask_exits_1_on_an_error_event_after_the_partial_text(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("broken"), STORY, break_after=12)
    done = await broker("ask", prompt, url=stack.a)
    assert done.code == 1, done.stderr
    gen_id, error = done.stderr_lines[0], done.stderr_lines[-1]
    assert error.startswith("error: llm_stream_broken: ")
    assert done.stdout.endswith("\n")
    partial = done.stdout[:-1]
    assert partial and STORY.startswith(partial) and partial != STORY
    assert (await http.get(f"{stack.a}/v1/generations/{gen_id}")).json()["text"] == partial

    # tail of the failed generation: the same text and exit status; with --json, the error last.
    tailed = await broker("tail", "--json", gen_id, url=stack.b)
    assert tailed.code == 1
    *messages, last = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert "".join(m["text"] for m in messages) == partial
    assert last["error"]["code"] == "llm_stream_broken" and last["error"]["message"]
    assert tailed.stderr_lines == [error]


async def test_ask_rejected_by_the_edge_exits_2(stack: Stack):
    done = await broker("ask", "--model", "", "a question", url=stack.a)
    assert done.code == 2
    assert done.stdout == ""
    assert done.stderr_lines == ["error: invalid_request: 'model' must be a non-empty string"]


async def test_ask_at_a_url_that_is_not_the_edges_base_says_so(stack: Stack):
    """``--url http://edge/v1`` (a path the API is not under): not a bare "Not Found"."""
    done = await broker("ask", "a question", url=stack.a + "/v1")
    assert done.code == 2
    assert done.stderr_lines == [
        f"error: not_found: Not Found (no broker API at {stack.a}/v1: --url / BROKER_URL is "
        "the edge's base URL, e.g. http://127.0.0.1:8000)"]


async def test_usage_errors_exit_2():
    for args in (["ask"], ["tail"], ["ask", "--url", "not a url", "q"], ["ask", "--bogus", "q"]):
        done = await broker(*args)
        assert done.code == 2, args
        assert done.stdout == "" and "error" in done.stderr and "Traceback" not in done.stderr


async def test_ask_exits_3_when_no_edge_answers():
    dead = f"http://127.0.0.1:{free_port()}"
    done = await broker("ask", "question", url=dead)
    assert done.code == 3
    assert done.stderr_lines[-1].startswith(f"error: unavailable: {dead}")


async def test_a_cancelled_generation_exits_0(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = held(fake_llm, "cancel")
    try:
        proc = await start("ask", "--json", prompt, url=stack.a)
        gen_id = (await read_line(proc.stderr)).decode().strip()
        first = json.loads(await read_line(proc.stdout))
        assert first["text"] == HEAD
        cancel = await http.post(f"{stack.b}/v1/generations/{gen_id}/cancel")
        assert cancel.status_code == 202
        done = await finish(proc)
    finally:
        fake_llm.reply_for(prompt).release.set()
    assert done.code == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["finish_reason"] == "cancelled"


async def test_ctrl_c_exits_130_quietly(stack: Stack, fake_llm: FakeLLM):
    prompt = held(fake_llm, "interrupt")
    try:
        proc = await start("ask", prompt, url=stack.a)
        head = await read_exactly(proc.stdout, len(HEAD.encode()))
        assert head.decode() == HEAD
        proc.send_signal(signal.SIGINT)
        done = await finish(proc, head=head)
    finally:
        fake_llm.reply_for(prompt).release.set()
    assert done.code == 130
    assert done.stdout == HEAD + "\n"  # the partial line ends, so the prompt starts afresh
    assert len(done.stderr_lines) == 2 and protocol.is_generation_id(done.stderr_lines[0])


def test_a_reader_that_goes_away_ends_ask_quietly(stack: Stack, fake_llm: FakeLLM):
    """`broker ask ... | head -c N`: stdout closes mid-answer; exit 141, no traceback."""
    prompt = held(fake_llm, "pipe")
    proc = subprocess.Popen([sys.executable, "-m", "broker", "ask", prompt],
                            env=cli_env(stack.a), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        head = b""
        while len(head) < len(HEAD.encode()):
            head += os.read(proc.stdout.fileno(), len(HEAD.encode()) - len(head))
        assert head.decode() == HEAD
        proc.stdout.close()  # the reader is gone; the rest of the answer meets a closed pipe
        fake_llm.reply_for(prompt).release.set()
        _, err = proc.communicate(timeout=30)
    finally:
        fake_llm.reply_for(prompt).release.set()
        if proc.poll() is None:
            proc.kill()
    stderr = err.decode()
    assert proc.returncode == 141, stderr
    assert len(stderr.splitlines()) == 2 and "Traceback" not in stderr, stderr


# -- tail -----------------------------------------------------------------------------------


async def test_tail_of_a_finished_generation_prints_it_all(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    gen_id, _ = await finished(http, stack, fake_llm, STORY)
    done = await broker("tail", gen_id, url=stack.b)
    assert done.code == 0, done.stderr
    assert done.stdout == STORY + "\n"
    assert done.stderr == ""


async def test_tail_from_an_event_id_prints_exactly_the_rest(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    gen_id, full = await finished(http, stack, fake_llm, STORY)
    cursor = full.messages[2].id
    rest = "".join(json.loads(e.data)["text"] for e in full.messages[3:])
    done = await broker("tail", "--from", cursor, "--url", stack.a, gen_id)
    assert done.code == 0, done.stderr
    assert done.stdout == rest + "\n" and rest and STORY.endswith(rest)

    as_json = await broker("tail", "--json", "--from", cursor, gen_id, url=stack.b)
    *messages, end = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [m["id"] for m in messages] == [e.id for e in full.messages[3:]]
    assert end["finish_reason"] == "stop"

    # From the terminal event's id there is nothing left (204): an empty answer, exit 0.
    after_end = await broker("tail", "--from", full.ids[-1], gen_id, url=stack.a)
    assert (after_end.code, after_end.stdout) == (0, "\n")


async def test_tail_follows_a_live_generation(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = held(fake_llm, "live")
    try:
        gen_id = await create(http, stack.a, prompt)
        proc = await start("tail", gen_id, url=stack.b)
        head = await read_exactly(proc.stdout, len(HEAD.encode()))
        fake_llm.reply_for(prompt).release.set()
        done = await finish(proc, head=head)
    finally:
        fake_llm.reply_for(prompt).release.set()
    assert done.code == 0, done.stderr
    assert done.stdout == HEAD + REST + "\n"


async def test_tail_of_an_unknown_generation_exits_3(stack: Stack):
    for gen_id in (protocol.new_generation_id(), "no-such-thing"):
        done = await broker("tail", gen_id, url=stack.a)
        assert done.code == 3, gen_id
        assert done.stdout == ""
        assert done.stderr_lines == ["error: not_found: no such generation (unknown or expired)"]


async def test_tail_with_a_malformed_event_id_exits_2(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    gen_id, _ = await finished(http, stack, fake_llm, "Short.")
    done = await broker("tail", "--from", "abc", gen_id, url=stack.a)
    assert done.code == 2
    assert done.stderr_lines[-1].startswith("error: invalid_last_event_id: ")


# -- a dropped connection ---------------------------------------------------------------------


async def test_ask_resumes_after_a_dropped_connection(stack: Stack, fake_llm: FakeLLM):
    proxy = await DroppingProxy(stack.a).start()
    prompt = held(fake_llm, "dropped")
    try:
        proc = await start("ask", "--json", "--url", proxy.url, prompt)
        async with asyncio.timeout(10):
            await proxy.cut.wait()
        first = json.loads(await read_line(proc.stdout))
        assert first["text"] == HEAD

        async def resumed() -> bool:
            return first["id"].encode() in proxy.resumed_with()

        await eventually(resumed, 10, "a request resuming with Last-Event-ID")
        fake_llm.reply_for(prompt).release.set()  # the rest arrives on the new connection
        done = await finish(proc)
    finally:
        fake_llm.reply_for(prompt).release.set()
        await proxy.close()
    assert done.code == 0, done.stderr
    *messages, end = [first] + [json.loads(line) for line in done.stdout.splitlines()]
    assert "".join(m["text"] for m in messages) == HEAD + REST
    ids = [m["id"] for m in messages]
    assert len(ids) == len(set(ids))
    assert end["finish_reason"] == "stop"


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ask", "tail"])
def test_client_help_names_broker_url_and_no_server_settings(command: str):
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    help_text = action.choices[command].format_help()  # type: ignore[attr-defined]
    assert "--url" in help_text and "BROKER_URL" in help_text and "exit status" in help_text
    for server_flag in ("--redis-url", "--port", "--keepalive-interval", "--log-level"):
        assert server_flag not in help_text
