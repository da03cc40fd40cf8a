"""The README's terminal and curl examples, run as written (taken from README.md itself, with
only ``<id>``/``<token>`` and the port filled in) by bash, against a real ``broker dev``
process and against a ``broker edge`` with API keys and viewer tokens + ``broker worker`` +
redis-server + the fake LLM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio

from broker.tools.mockllm import WEATHER_CALL, Reply, default_script
from tests.conftest import StartBroker
from tests.support.devserver import DevServer
from tests.support.fakellm import FakeLLM
from tests.support.procs import RedisServer
from tests.support.sse import Received, read_events

pytestmark = pytest.mark.timeout(180)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
API_KEY = "readme-producer-key"
ASKED = "Why is the sky blue?"
HELLO = "Hello?"
THOUGHT = "Think about the weather in Paris."
# What the fake LLM answers behind the keyed edge (broker dev answers with its own mock).
SKY = ("Light from the sun meets the air. Short blue waves scatter most! So the sky looks "
       "blue? Yes.\n\nAt sunset the light crosses more air. Then red remains.")


def readme_commands(heading: str) -> list[str]:
    """The commands of the ``sh`` block under ``heading``: continuation lines kept, comment
    lines and blank lines dropped (a comment after a command stays: bash ignores it)."""
    section = README.split(f"\n{heading}", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if not line.rstrip().endswith("\\"):
            commands.append(current.rstrip("\n"))
            current = ""
    return commands


TERMINAL = readme_commands("## From a terminal")
API = readme_commands("## The API in brief")


def the_command(commands: list[str], starts: str) -> str:
    found = [c for c in commands if c.startswith(starts)]
    assert len(found) == 1, f"README: expected one command starting {starts!r}: {commands}"
    return found[0]


EXPORT = the_command(TERMINAL, "export BROKER_URL=")
ASK = the_command(TERMINAL, f'broker ask "{ASKED}"')
ASK_JSON = the_command(TERMINAL, "broker ask --json ")
TAIL = the_command(TERMINAL, "broker tail <id>")
TAIL_FROM = the_command(TERMINAL, "broker tail --from 0000000003 <id>")
THINKING = the_command(TERMINAL, 'broker ask "Think about the weather')
CREATE = the_command(API, "curl -s localhost:8000/v1/generations -H")
STREAM = the_command(API, "curl -N 'localhost:8000/v1/generations/<id>/events?token=<token>'")
RESUME = the_command(API, "curl -N -H 'Last-Event-ID: 0000000003' ")
STATUS = the_command(API, "curl -s localhost:8000/v1/generations/<id> ")
CANCEL = the_command(API, "curl -s -XPOST localhost:8000/v1/generations/<id>/cancel")


def test_every_readme_example_is_run_here() -> None:
    assert sorted(TERMINAL) == sorted([EXPORT, ASK, ASK_JSON, TAIL, TAIL_FROM, THINKING])
    assert sorted(API) == sorted([CREATE, STREAM, RESUME, STATUS, CANCEL])


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


@dataclass
class Target:
    """Where the examples run, and what a user there has in the environment."""

    url: str
    env: dict[str, str] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None  # lets held answers go on (keyed stack)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def headers(self) -> dict[str, str]:
        key = self.env.get("BROKER_API_KEY")
        return {"authorization": f"Bearer {key}"} if key else {}


async def sh(target: Target, command: str, **placeholders: str) -> Done:
    """``command`` as a user pastes it into bash: the README's port becomes the target's, each
    ``<name>`` becomes its value, ``broker`` is this checkout's."""
    command = command.replace(":8000", f":{target.port}")
    for name, value in placeholders.items():
        command = command.replace(f"<{name}>", value)
    assert not re.search(r"<\w+>", command), f"a placeholder left in {command!r}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "PYTHONIOENCODING": "utf-8", **target.env}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def sse_events(body: str) -> list[dict[str, str]]:
    """The events of a curl'ed stream (the edge writes one ``data:`` line per event)."""
    events = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if line and not line.startswith((":", "retry:")))
        if "data" in fields:
            events.append(fields)
    return events


def texts(events: list[dict[str, str]]) -> str:
    return "".join(json.loads(e["data"])["text"] for e in events if "event" not in e)


@pytest.fixture(scope="module")
def dev() -> Iterator[Target]:
    server = DevServer().start()
    yield Target(server.url)
    server.stop()


@pytest.fixture(scope="module")
def keyed(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[Target]:
    """An edge with keys, a worker, a redis-server; "Hello?" waits (after its first token)
    until the test releases it, so the example's cancel finds it running."""
    fake_llm.script(ASKED, SKY)
    # The typed-events example: what the dev mode's mock streams for it, reasoning first.
    mock = default_script({"messages": [{"role": "user", "content": THOUGHT}]})
    fake_llm.script(THOUGHT, deltas=mock.chunk_deltas(), finish_reason=mock.finish_reason,
                    delay=0)
    fake_llm.script(HELLO, "Hello there. Nice to meet you! How can I help? Ask me anything. "
                    "I answer in sentences.", hold_at=1)
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_api_keys=API_KEY,
                        broker_viewer_token_keys="readme-viewer-key", broker_insecure="0")
    start_broker("worker", redis.url, fake_llm)
    yield Target(edge.url, {"BROKER_API_KEY": API_KEY},
                 release=fake_llm.reply_for(HELLO).release.set)
    fake_llm.reply_for(HELLO).release.set()
    redis.stop()


@pytest_asyncio.fixture
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    yield request.getfixturevalue(request.param)


async def status_of(http: httpx.AsyncClient, target: Target, gen_id: str) -> dict[str, Any]:
    response = await http.get(f"{target.url}/v1/generations/{gen_id}", headers=target.headers())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("target", ["dev", "keyed"], indirect=True)
async def test_the_curl_examples_work_as_written(target: Target) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        # Cancel while it runs: 202.
        created = json.loads((await sh(target, CREATE)).stdout)
        cancelled = await sh(target, CANCEL, id=created["id"])
        assert json.loads(cancelled.stdout) == {"id": created["id"], "status": "cancelling"}
        target.release()
        got = await read_events(http, target.url + created["events_url"])
        assert got.terminal_data()["finish_reason"] == "cancelled"

        # Create, then the stream with the token of the create answer.
        made = await sh(target, CREATE)
        assert made.code == 0, made.stderr
        body = json.loads(made.stdout)
        gen_id, events_url = body["id"], body["events_url"]
        assert body["status"] == "queued"
        token = parse_qs(urlsplit(events_url).query)["token"][0]
        assert events_url == f"/v1/generations/{gen_id}/events?token={token}"  # as shown

        streamed = await sh(target, STREAM, id=gen_id, token=token)
        assert streamed.code == 0, streamed.stderr
        events = sse_events(streamed.stdout)
        assert events[-1]["event"] == "end", streamed.stdout
        assert json.loads(events[-1]["data"])["finish_reason"] == "stop"
        status = await status_of(http, target, gen_id)
        assert texts(events) == status["text"] and status["status"] == "completed"
        assert len(events) > 4, "the resume example needs events after 0000000003"

        resumed = sse_events((await sh(target, RESUME, id=gen_id, token=token)).stdout)
        assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]
        assert texts(resumed) == texts(events[3:])

        read = json.loads((await sh(target, STATUS, id=gen_id)).stdout)
        assert (read["status"], read["text"]) == ("completed", status["text"])
        assert read["events_url"].startswith(f"/v1/generations/{gen_id}/events?token=")
        again = await read_events(http, target.url + read["events_url"])  # a fresh token
        assert again.text == status["text"]

        late = json.loads((await sh(target, CANCEL, id=gen_id)).stdout)
        assert late["error"]["code"] == "already_finished"


@pytest.mark.parametrize("target", ["dev", "keyed"], indirect=True)
async def test_the_terminal_examples_work_as_written(target: Target) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        asked = await sh(target, f"{EXPORT}\n{ASK}")
        assert asked.code == 0, asked.stderr
        gen_id, events_url = asked.stderr.splitlines()
        status = await status_of(http, target, gen_id)
        assert asked.stdout == status["text"] + "\n" and status["status"] == "completed"
        assert events_url.startswith(f"{target.url}/v1/generations/{gen_id}/events?token=")
        full: Received = await read_events(http, events_url)  # the URL opens as printed
        assert full.text == status["text"] and len(full.messages) > 3

        as_json = await sh(target, f"{EXPORT}\n{ASK_JSON}")
        assert as_json.code == 0, as_json.stderr
        *messages, end = [json.loads(line) for line in as_json.stdout.splitlines()]
        json_id = as_json.stderr.splitlines()[0]
        assert "".join(m["text"] for m in messages) == (await status_of(
            http, target, json_id))["text"]
        assert end["finish_reason"] == "stop"

        tailed = await sh(target, f"{EXPORT}\n{TAIL}", id=gen_id)
        assert (tailed.code, tailed.stdout, tailed.stderr) == (0, status["text"] + "\n", "")

        rest = "".join(json.loads(e.data)["text"] for e in full.messages[3:])
        tailed_from = await sh(target, f"{EXPORT}\n{TAIL_FROM}", id=gen_id)
        assert (tailed_from.code, tailed_from.stdout) == (0, rest + "\n"), tailed_from.stderr
        assert rest and rest != status["text"]

        # The reasoning and the tool call beside the answer: on stderr, the answer alone on
        # stdout.
        thought = await sh(target, f"{EXPORT}\n{THINKING}")
        assert thought.code == 0, thought.stderr
        thought_id, _, side = thought.stderr.split("\n", 2)
        record = await status_of(http, target, thought_id)
        assert thought.stdout == record["text"] + "\n" != "\n"
        arguments = "".join(WEATHER_CALL.pieces)
        assert side == (f"[reasoning] {record['reasoning']}\n"
                        f"[tool_call {WEATHER_CALL.id}] get_weather({arguments})\n")


async def test_tail_on_a_keyed_edge_needs_a_key_or_a_token(keyed: Target) -> None:
    asked = await sh(keyed, f"{EXPORT}\n{ASK}")
    gen_id, events_url = asked.stderr.splitlines()
    token = parse_qs(urlsplit(events_url).query)["token"][0]
    viewer = Target(keyed.url)  # no API key in its environment
    refused = await sh(viewer, f"{EXPORT}\n{TAIL}", id=gen_id)
    assert refused.code == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "error: unauthorized: this stream needs a viewer token (?token=) (pass --api-key or "
        "set BROKER_API_KEY, or the viewer token with --token or BROKER_VIEWER_TOKEN)"]
    with_token = await sh(viewer, f"{EXPORT}\nbroker tail --token {token} <id>", id=gen_id)
    assert (with_token.code, with_token.stdout) == (0, asked.stdout)


# -- "Bring your own loop": the agent-loop example, run as written -------------------------

AGENT_LOOP = README.split("\n## Bring your own loop", 1)[1].split("\n## ", 1)[0] \
    .split("```python\n", 1)[1].split("```", 1)[0]


class MockLLM(FakeLLM):
    """The fake LLM answering as ``broker mock-llm`` does (its default script): a tool call
    when the question says "weather", then an answer once the tool's result comes back."""

    def _script(self, body: dict[str, Any]) -> Reply:
        return default_script(body)


@pytest.fixture(scope="module")
def mock_llm() -> Iterator[MockLLM]:
    llm = MockLLM().start()
    yield llm
    llm.stop()


@pytest.fixture
def producer_target(request: pytest.FixtureRequest, start_broker: StartBroker
                    ) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Where the example publishes: two edges with keys and viewer tokens (no worker: the
    example is the producer), or ``broker dev`` (no keys)."""
    if request.param == "dev":
        server = DevServer().start()
        yield [server.url, server.url], {}
        server.stop()
        return
    redis = RedisServer().start()
    edges = [start_broker("edge", redis.url, broker_api_keys=API_KEY,
                          broker_viewer_token_keys="readme-viewer-key", broker_insecure="0")
             for _ in range(2)]
    yield [edge.url for edge in edges], {"BROKER_API_KEY": API_KEY}
    redis.stop()


@pytest.mark.parametrize("producer_target", ["keyed", "dev"], indirect=True)
async def test_the_agent_loop_example_streams_one_generation_to_many_viewers(
    producer_target: tuple[list[str], dict[str, str]], mock_llm: MockLLM, tmp_path: Path
) -> None:
    (edge_a, edge_b), key_env = producer_target
    script = tmp_path / "agent.py"
    script.write_text(AGENT_LOOP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    env |= {"BROKER_URL": edge_a, **key_env, "OPENAI_BASE_URL": mock_llm.base_url,
            "OPENAI_API_KEY": "test-key", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first, (await proc.stderr.read()).decode()
    gen_id, events_url = first.decode().split()
    assert events_url.startswith(f"/v1/generations/{gen_id}/events?token=")
    async with httpx.AsyncClient(timeout=30) as http:
        # Viewers on both edges while it runs; one drops after 2 events and resumes elsewhere.
        watchers = [asyncio.ensure_future(read_events(http, base + events_url))
                    for base in (edge_a, edge_b, edge_b)]
        dropped = await read_events(http, edge_a + events_url, stop_after=2)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        full = await watchers[0]
        resumed = await read_events(http, edge_b + events_url,
                                    last_event_id=dropped.events[-1].id)
        late = await read_events(http, edge_a + events_url)
        for other in (*[await w for w in watchers[1:]], late):
            assert [(e.id, e.event, e.data) for e in other.events] == [
                (e.id, e.event, e.data) for e in full.events]
        assert [(e.id, e.data) for e in dropped.events + resumed.events] == [
            (e.id, e.data) for e in full.events]
    kinds = [e.event for e in full.events]
    first_call = kinds.index("tool_call")
    assert set(kinds[:first_call]) == {"message"} and kinds[-1] == "end"
    assert kinds[first_call:first_call + 2] == ["tool_call", "tool_result"]
    call = json.loads(full.events[first_call].data)
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] == "Paris"
    result = json.loads(full.events[first_call + 1].data)
    assert result == {"id": call["id"], "result": {"city": "Paris", "sky": "sunny",
                                                   "celsius": 21}}
    after = "".join(json.loads(e.data)["text"] for e in full.events[first_call + 2:-1])
    assert "sunny" in after and after.endswith("That settles it.")
    assert json.loads(full.events[-1].data)["finish_reason"] == "stop"
