"""The compose stack, checked through its load balancer: what ``scripts/compose-smoke`` runs
once ``docker compose up --scale edge=3 --scale worker=2`` is healthy.

    python -m tests.compose.smoke --project sse-broker-smoke [--url http://127.0.0.1:8080]
    python -m tests.compose.smoke --project sse-broker-smoke --https https://127.0.0.1:8443 \
        --cafile cert.pem      # only the HTTPS listener of docker-compose.tls.yml

Functional checks (create, stream the exact text, resume on another edge with
``Last-Event-ID``, status, cancel; the static files byte for byte; v2: one conversation
stream held open over a worker's turn and an external producer's turn, its appends retried on
another edge, resumed on another edge), then faults with exact-text checks: an edge SIGKILLed
under nine viewers (``--edge-kills`` times, alternately a crash that Docker's restart policy
restarts and an edge left down), the worker running an answer SIGKILLed, and Redis SIGKILLed
(AOF; Docker restarts it). Every request goes through HAProxy; ``docker`` is used only to
find and kill containers and to read a generation's owner and the edges' viewer gauges.
The expected text is the mock LLM's own answer to the prompt
(``broker.tools.mockllm.default_script``), which is what the compose file's workers call. Prints one
line per check and a summary, writes the figures as JSON (``--report``), exits 1 on the first
failed check. With ``--https`` it checks only the load balancer's HTTPS listener (once the
script recreated it with ``docker-compose.tls.yml``): ALPN offers HTTP/2 first and HTTP/1.1
still, and an answer streams and resumes on another edge through it, exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from broker.client import Follower, GenerationFailed, StreamError, create
from broker.tools.mockllm import default_script

SERVED_BY = "x-served-by"  # deploy/haproxy.cfg names the edge slot that answered
VIEWERS = 9  # followers of the edge-kill fault: about three per edge
POLL = 0.02  # seconds between looks at the followers' state
# Bounds below are the mock's answer time (~5 s at 0.03 s a token) plus a generous margin: a
# bound that is hit is a failure, never a figure.
ANSWER_BOUND = 60.0


class CheckFailed(Exception):
    """One smoke check did not hold."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# -------------------------------------------------------------------------------- docker


@dataclass
class Stack:
    """The running compose project, through the ``docker`` CLI."""

    project: str
    compose_file: Path

    def compose(self, *args: str) -> str:
        argv = ["docker", "compose", "-p", self.project, "-f", str(self.compose_file), *args]
        return _run(argv)

    def containers(self, service: str) -> list[str]:
        """Full ids of the service's running containers."""
        return self.compose("ps", "-q", service).split()

    def kill(self, container: str) -> float:
        """SIGKILL the container's main process from the host, as a crash or the OOM killer
        would: Docker's restart policy starts it again. The monotonic time of the kill."""
        pid = int(_run(["docker", "inspect", "--format", "{{.State.Pid}}", container]))
        check(pid > 0, f"container {container[:12]} is not running")
        try:
            os.kill(pid, signal.SIGKILL)
        except PermissionError:  # not root (a member of the docker group, say)
            _run(["sudo", "kill", "-KILL", str(pid)])
        return time.monotonic()

    def kill_for_good(self, container: str) -> float:
        """``docker kill``: SIGKILL, and the container stays down (a manual stop, which the
        restart policy respects), like a lost host. The monotonic time the command started
        (the signal lands a few tens of ms later)."""
        started = time.monotonic()
        _run(["docker", "kill", "--signal", "KILL", container])
        return started

    def start(self, container: str) -> None:
        _run(["docker", "start", container])

    def exec(self, container: str, *argv: str) -> str:
        return _run(["docker", "exec", container, *argv])

    def redis_cli(self, *args: str) -> str:
        (redis,) = self.containers("redis")
        return self.exec(redis, "redis-cli", *args).strip()

    def edge_viewers(self) -> dict[str, int]:
        """Container id -> the ``broker_viewers`` gauge of that edge (asked inside it: the
        edges publish no port)."""
        script = ("import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics', timeout=5).read().decode())")
        counts = {}
        for container in self.containers("edge"):
            metrics = self.exec(container, "python", "-c", script)
            found = re.search(r"^broker_viewers (\S+)$", metrics, re.MULTILINE)
            check(found, f"no broker_viewers gauge on edge {container[:12]}")
            assert found is not None
            counts[container] = int(float(found.group(1)))
        return counts


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)} failed ({result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


# ------------------------------------------------------------------------------ streams


def prompt(name: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"compose smoke: {name}"}]


def expected_text(messages: list[dict[str, str]]) -> str:
    """What the compose file's mock LLM answers to ``messages``, token for token."""
    return "".join(default_script({"messages": messages}).tokens)


@dataclass
class Viewer:
    """A ``Follower`` on its own HTTP client (its own connections) through the LB."""

    base_url: str
    events_url: str
    name: str
    text: str = ""
    ids: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic, one per message
    served_by: list[str] = field(default_factory=list)
    terminal: str | None = None  # "end", "error:<code>" or "failed:<why>"
    finish_reason: str | None = None
    reconnects: int = 0
    dropped_at: float | None = None  # monotonic: the first dropped connection was noticed
    resumed_at: float | None = None  # monotonic: first message after the first reconnect
    done_at: float | None = None
    follower: Follower | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Viewer:
        self.tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._watch())]
        return self

    async def _watch(self) -> None:
        """Notes when the follower first saw its connection drop (it counts the reconnect
        before waiting the ``retry`` delay)."""
        while self.done_at is None:
            if self.follower is not None and self.follower.reconnects and not self.dropped_at:
                self.dropped_at = time.monotonic()
                return
            await asyncio.sleep(POLL)

    async def _note(self, response: httpx.Response) -> None:
        self.served_by.append(response.headers.get(SERVED_BY, "?"))

    async def _run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(30.0, connect=5.0),
            event_hooks={"response": [self._note]},
        ) as http:
            follower = self.follower = Follower(http, self.events_url,
                                                give_up_after=ANSWER_BOUND)
            try:
                async for message in follower:
                    self.text += message.text
                    self.ids.append(message.id)
                    self.times.append(time.monotonic())
                    if follower.reconnects and self.resumed_at is None:
                        self.resumed_at = time.monotonic()
                assert follower.result is not None
                self.terminal, self.finish_reason = "end", follower.result.finish_reason
            except GenerationFailed as e:
                self.terminal = f"error:{e.code}"
            except StreamError as e:
                self.terminal = f"failed:{e}"
            finally:
                self.reconnects = follower.reconnects
                self.done_at = time.monotonic()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(POLL)


async def read_stream(
    http: httpx.AsyncClient, url: str, last_event_id: str | None = None,
) -> tuple[str, list[tuple[str, str]], str]:
    """One GET of an event stream, read to its end: (served by, [(id, text)], terminal)."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    messages: list[tuple[str, str]] = []
    terminal = "closed"
    async with aconnect_sse(http, "GET", url, headers=headers) as source:
        check(source.response.status_code == 200,
              f"GET {url} answered {source.response.status_code}")
        served_by = source.response.headers.get(SERVED_BY, "?")
        async for event in source.aiter_sse():
            if event.data == "":
                continue  # `retry:` alone: no event is dispatched for an empty data buffer
            if event.event == "message":
                messages.append((event.id, json.loads(event.data)["text"]))
            elif event.event in ("end", "error"):
                terminal = f"{event.event}:{event.data}"
                break
    return served_by, messages, terminal


async def read_conversation(
    http: httpx.AsyncClient, url: str, terminals: int, *, last_event_id: str | None = None,
    connected: asyncio.Event | None = None,
) -> tuple[str, list[tuple[str, str, dict[str, Any]]]]:
    """A conversation's stream (it stays open between turns), read until ``terminals`` turn
    ends (``end``/``error``): (served by, [(id, event, data)]). ``connected`` is set once the
    edge answered 200."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    events: list[tuple[str, str, dict[str, Any]]] = []
    async with aconnect_sse(http, "GET", url, headers=headers) as source:
        check(source.response.status_code == 200,
              f"GET {url} answered {source.response.status_code}")
        served_by = source.response.headers.get(SERVED_BY, "?")
        if connected is not None:
            connected.set()
        async for event in source.aiter_sse():
            if event.data == "":
                continue  # `retry:` alone, or a keepalive
            events.append((event.id, event.event, json.loads(event.data)))
            if event.event in ("end", "error"):
                terminals -= 1
                if terminals == 0:
                    break
    return served_by, events


async def status(http: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/generations/{gen_id}")
    check(response.status_code == 200, f"status of {gen_id}: {response.status_code}")
    body: dict[str, Any] = response.json()
    return body


async def wait_status(http: httpx.AsyncClient, gen_id: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + ANSWER_BOUND
    while True:
        body = await status(http, gen_id)
        if body["status"] in wanted:
            return body
        check(time.monotonic() < deadline, f"{gen_id} still {body['status']}, not {wanted}")
        await asyncio.sleep(0.1)


def check_exact(viewer: Viewer, expected: str) -> None:
    check(viewer.terminal == "end" and viewer.finish_reason == "stop",
          f"{viewer.name} ended with {viewer.terminal} ({viewer.finish_reason})")
    check(viewer.text == expected, f"{viewer.name} assembled a different text:\n"
          f"  got      {viewer.text!r}\n  expected {expected!r}")
    check(len(set(viewer.ids)) == len(viewer.ids), f"{viewer.name} saw an id twice")
    check(viewer.ids == sorted(viewer.ids, key=int), f"{viewer.name} saw ids out of order")


# ------------------------------------------------------------------------------- checks


class Smoke:
    def __init__(self, url: str, stack: Stack, *, edges: int, workers: int) -> None:
        self.url = url.rstrip("/")
        self.stack = stack
        # Every container, running and healthy, before each step.
        self.expected = {"redis": 1, "mock-llm": 1, "edge": edges, "worker": workers, "lb": 1}
        self.figures: dict[str, Any] = {}
        self.killed_edges: set[str] = set()
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10.0)

    def say(self, line: str) -> None:
        print(f"compose-smoke: {line}", flush=True)

    async def functional(self) -> None:
        messages = prompt("functional")
        expected = expected_text(messages)
        response = await self.http.post("/v1/generations", json={"messages": messages})
        check(response.status_code == 201, f"create: {response.status_code} {response.text}")
        created = response.json()
        gen_id, events_url = created["id"], created["events_url"]
        self.say(f"created {gen_id} (through {response.headers.get(SERVED_BY)})")

        first_edge, events, terminal = await read_stream(self.http, events_url)
        text = "".join(t for _, t in events)
        check(terminal.startswith("end:") and '"stop"' in terminal, f"stream ended {terminal}")
        check(text == expected, f"streamed text differs:\n  {text!r}\n  {expected!r}")
        check(len(events) >= 4, f"only {len(events)} messages: too short to resume within")
        self.say(f"streamed the exact text ({len(events)} messages, {len(text)} characters) "
                 f"from {first_edge}")

        # Resume after the second message on another edge (round-robin: a few tries at most).
        cut = events[1][0]
        for _ in range(6):
            edge, resumed, terminal = await read_stream(self.http, events_url, cut)
            if edge != first_edge:
                break
        check(edge != first_edge, f"every resume was served by {first_edge}")
        check(resumed == events[2:], f"resume from {cut} on {edge}: {resumed} != {events[2:]}")
        check(terminal.startswith("end:"), f"resumed stream ended {terminal}")
        self.say(f"resumed after id {cut} on {edge}: exactly the {len(resumed)} later messages")

        body = await status(self.http, gen_id)
        check(body["status"] == "completed" and body["text"] == expected, f"status: {body}")
        self.say("status: completed, with the exact text")

        messages = prompt("cancel me")
        created2 = await create(self.http, messages)
        viewer = Viewer(self.url, created2.events_url, "cancel-viewer").start()
        await wait_for(lambda: len(viewer.ids) >= 1, ANSWER_BOUND, "a first message")
        response = await self.http.post(f"/v1/generations/{created2.id}/cancel")
        check(response.status_code == 202, f"cancel: {response.status_code} {response.text}")
        await wait_for(lambda: viewer.done_at is not None, ANSWER_BOUND, "the cancelled end")
        check(viewer.terminal == "end" and viewer.finish_reason == "cancelled",
              f"the cancelled stream ended {viewer.terminal} ({viewer.finish_reason})")
        full = expected_text(messages)
        check(full.startswith(viewer.text) and viewer.text != full,
              "the cancelled text is not a strict prefix of the answer")
        body = await wait_status(self.http, created2.id, {"cancelled"})
        check(body["text"] == viewer.text, "status text != what the viewer saw")
        self.say(f"cancelled after {len(viewer.ids)} messages: end cancelled, status cancelled")

    async def static_files(self) -> None:
        """The image ships the edge's static files (package data): each one, through the load
        balancer, byte for byte as in the source tree."""
        folder = resources.files("broker.edge").joinpath("static")
        names = sorted(f.name for f in folder.iterdir() if f.is_file())
        check("index.html" in names, f"no index.html among {names}")
        for path, name in [("/", "index.html"), *((f"/static/{n}", n) for n in names)]:
            response = await self.http.get(path)
            check(response.status_code == 200, f"GET {path}: {response.status_code}")
            check(response.content == folder.joinpath(name).read_bytes(),
                  f"GET {path} differs from broker/edge/static/{name}")
        self.say(f"static: / and {len(names)} files under /static/, each byte for byte")

    async def conversation_with_producer(self) -> None:
        """v2 through the load balancer: one conversation stream, held open, sees a worker's
        turn (the exact text) then an external producer's turn (its appends, one retried on
        another edge, exactly once); it resumes on another edge with ``Last-Event-ID``."""
        cid = f"compose-smoke-{uuid.uuid4().hex[:12]}"
        url = f"/v1/conversations/{cid}/events"
        connected = asyncio.Event()
        live = asyncio.create_task(read_conversation(self.http, url, 2, connected=connected))
        try:
            await asyncio.wait_for(connected.wait(), ANSWER_BOUND)
            messages = prompt("conversation")
            response = await self.http.post("/v1/generations",
                                            json={"messages": messages, "conversation_id": cid})
            check(response.status_code == 201, f"turn 1: {response.status_code} {response.text}")
            worker_turn = response.json()
            check(worker_turn.get("conversation_url") == url, f"turn 1: {worker_turn}")
            await wait_status(self.http, worker_turn["id"], {"completed"})

            response = await self.http.post("/v1/generations",
                                            json={"producer": "external", "conversation_id": cid})
            check(response.status_code == 201, f"turn 2: {response.status_code} {response.text}")
            produced = response.json()
            batch = [
                {"type": "reasoning", "text": "Looking it up. "},
                {"type": "text", "text": "Produced outside the broker. "},
                {"type": "tool_call", "index": 0, "id": "call_1", "name": "search",
                 "arguments": '{"q": "sse"}'},
                {"type": "tool_result", "id": "call_1", "result": {"hits": 2}},
                {"type": "data", "name": "sources", "value": ["a", "b"]},
            ]
            first_edge, retried_on = "", ""
            for _ in range(6):  # the same batch again until another edge takes it: a no-op
                response = await self.http.post(produced["append_url"],
                                                json={"after": 0, "events": batch})
                check(response.status_code == 200 and response.json() == {"count": len(batch)},
                      f"append: {response.status_code} {response.text}")
                edge = response.headers.get(SERVED_BY, "?")
                first_edge = first_edge or edge
                if edge != first_edge:
                    retried_on = edge
                    break
            check(retried_on, f"every append was served by {first_edge}")
            response = await self.http.post(produced["append_url"], json={
                "after": 1, "events": [{"type": "text", "text": "overlap"}]})
            check(response.status_code == 409
                  and response.json()["error"]["code"] == "offset_mismatch"
                  and response.json()["count"] == len(batch),
                  f"overlapping append: {response.status_code} {response.text}")
            tail = {"type": "text", "text": "Done."}
            response = await self.http.post(produced["append_url"],
                                            json={"after": len(batch), "events": [tail]})
            check(response.status_code == 200, f"append 2: {response.status_code}")
            response = await self.http.post(produced["heartbeat_url"])
            check(response.status_code in (200, 204), f"heartbeat: {response.status_code}")
            for _ in range(2):  # finishing again is idempotent
                response = await self.http.post(produced["finish_url"],
                                                json={"finish_reason": "stop"})
                check(response.status_code == 200, f"finish: {response.status_code} "
                      f"{response.text}")
            live_edge, events = await asyncio.wait_for(live, ANSWER_BOUND)
        finally:
            live.cancel()
            await asyncio.gather(live, return_exceptions=True)

        turn_ids = [data["generation_id"] for _, name, data in events if name == "turn"]
        check(turn_ids == [worker_turn["id"], produced["id"]], f"turns {turn_ids}")
        check(len({i for i, _, _ in events}) == len(events), "an id was seen twice")
        first = [(n, d) for _, n, d in events if d["generation_id"] == worker_turn["id"]]
        text = "".join(d["text"] for n, d in first if n == "message")
        check(text == expected_text(messages), f"turn 1 text differs: {text!r}")
        check(first[-1][0] == "end" and first[-1][1]["finish_reason"] == "stop",
              f"turn 1 ended {first[-1]}")
        second = [(n, {k: v for k, v in d.items() if k != "generation_id"})
                  for _, n, d in events if d["generation_id"] == produced["id"]]
        wire = {"text": "message"}
        appended = [(wire.get(e["type"], e["type"]), {k: v for k, v in e.items() if k != "type"})
                    for e in [*batch, tail]]
        check([e for e in second if e[0] != "turn"][:-1] == appended,
              f"turn 2 differs from the appends:\n  {second}\n  {appended}")
        check(second[-1] == ("end", {"finish_reason": "stop", "usage": None}),
              f"turn 2 ended {second[-1]}")
        self.say(f"conversation {cid} live on {live_edge}: worker turn exact, producer turn "
                 f"exactly its {len(appended)} appended events (the batch retried on "
                 f"{retried_on}, a no-op; an overlap 409 offset_mismatch)")

        cut = events[2][0]  # turn 1's second event
        for _ in range(6):
            edge, resumed = await read_conversation(self.http, url, 2, last_event_id=cut)
            if edge != live_edge:
                break
        check(edge != live_edge, f"every conversation resume was served by {live_edge}")
        # A `turn` event says the status when this device reached the turn (docs/api.md):
        # "running" live, "completed" on a replay; everything else is the same on the wire.
        def replayable(events: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
            return [(i, n, {k: v for k, v in d.items() if not (n == "turn" and k == "status")})
                    for i, n, d in events]

        check(replayable(resumed) == replayable(events[3:]),
              f"resume from {cut} on {edge}: {resumed} != {events[3:]}")
        body = (await self.http.get(f"/v1/conversations/{cid}")).json()
        check([t["status"] for t in body["turns"]] == ["completed", "completed"]
              and body["active"] is None, f"conversation: {body}")
        body = await status(self.http, produced["id"])
        check(body["status"] == "completed" and body["producer"] == "external"
              and body["text"] == batch[1]["text"] + tail["text"]
              and body["reasoning"] == batch[0]["text"], f"producer's generation: {body}")
        self.say(f"conversation resumed after id {cut} on {edge}: exactly the {len(resumed)} "
                 f"later events; both turns completed")

    async def https(self, https_url: str, cafile: Path) -> None:
        """The HTTPS listener of docker-compose.tls.yml (deploy/haproxy-tls.cfg), trusted
        through ``cafile`` alone: HTTP/2 for browsers by ALPN, and the API through it."""
        address = httpx.URL(https_url)
        host, port = address.host, address.port or 443

        def negotiated(offered: list[str]) -> str | None:
            context = ssl.create_default_context(cafile=str(cafile))
            context.set_alpn_protocols(offered)
            with socket.create_connection((host, port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.selected_alpn_protocol()

        deadline = time.monotonic() + ANSWER_BOUND
        while True:  # the recreated load balancer takes a moment to listen
            try:
                chosen = negotiated(["h2", "http/1.1"])
                break
            except OSError as e:
                check(time.monotonic() < deadline, f"no TLS handshake on {https_url}: {e}")
                await asyncio.sleep(0.5)
        check(chosen == "h2", f"ALPN chose {chosen!r} for a client offering h2, http/1.1")
        fallback = negotiated(["http/1.1"])
        check(fallback == "http/1.1", f"ALPN chose {fallback!r} for an HTTP/1.1-only client")
        self.say("HTTPS: ALPN h2 for a browser, http/1.1 for a client without HTTP/2")

        trust = ssl.create_default_context(cafile=str(cafile))
        async with httpx.AsyncClient(base_url=https_url, verify=trust, timeout=10.0) as http:
            await wait_for_ready(http)
            messages = prompt("https")
            expected = expected_text(messages)
            created = await create(http, messages)
            first_edge, events, terminal = await read_stream(http, created.events_url)
            text = "".join(t for _, t in events)
            check(terminal.startswith("end:"), f"stream over HTTPS ended {terminal}")
            check(text == expected, f"text over HTTPS differs:\n  {text!r}\n  {expected!r}")
            cut = events[1][0]
            for _ in range(6):
                edge, resumed, terminal = await read_stream(http, created.events_url, cut)
                if edge != first_edge:
                    break
            check(edge != first_edge, f"every resume over HTTPS was served by {first_edge}")
            check(resumed == events[2:], f"resume over HTTPS from {cut}: {resumed}")
        self.say(f"HTTPS: streamed the exact text from {first_edge}, resumed after id {cut} "
                 f"on {edge} with exactly the {len(resumed)} later messages")

    async def edge_killed(self, round_: int, *, for_good: bool) -> None:
        """Kill the edge holding the most of nine viewers: a crash Docker restarts, or, with
        ``for_good``, a container that stays down (the load balancer keeps its address until
        its checks say otherwise), started again afterwards."""
        messages = prompt(f"edge killed {round_}: " + "keep talking " * 12)
        expected = expected_text(messages)
        created = await create(self.http, messages)
        viewers = [Viewer(self.url, created.events_url, f"viewer-{i}").start()
                   for i in range(VIEWERS)]
        try:
            await wait_for(lambda: all(len(v.ids) >= 2 for v in viewers), ANSWER_BOUND,
                           "every viewer to receive 2 messages")
            victim, held = await self._busiest_edge()
            body = await status(self.http, created.id)
            check(body["status"] == "running", f"answer ended before the kill: {body['status']}")
            kill = self.stack.kill_for_good if for_good else self.stack.kill
            killed_at = await asyncio.to_thread(kill, victim)
            await wait_for(lambda: all(v.done_at is not None for v in viewers), ANSWER_BOUND,
                           "every viewer to finish")
        finally:
            for v in viewers:
                await v.stop()
        if for_good:
            self.stack.start(victim)

        for v in viewers:
            check_exact(v, expected)
        self._report_edge_kill(viewers, held, victim, killed_at,
                               "stays_down" if for_good else "restarted")

    async def _busiest_edge(self) -> tuple[str, int]:
        """The edge container holding the most viewers (among equals, one not killed
        before) and how many it holds, once the edges' gauges count every viewer."""
        deadline = time.monotonic() + 10
        while True:
            gauges = await asyncio.to_thread(self.stack.edge_viewers)
            if sum(gauges.values()) == VIEWERS:
                break
            check(time.monotonic() < deadline, f"edge gauges {gauges} != {VIEWERS}")
            await asyncio.sleep(0.2)
        victim = max(gauges, key=lambda c: (gauges[c], c not in self.killed_edges))
        self.killed_edges.add(victim)
        return victim, gauges[victim]

    def _report_edge_kill(self, viewers: list[Viewer], held: int, victim: str,
                          killed_at: float, kind: str) -> None:
        """Only the killed edge's viewers reconnected; what they lived through."""
        moved = [v for v in viewers if v.reconnects]
        check(len(moved) == held, f"{len(moved)} viewers reconnected, the killed edge held {held}")
        victim_slots = {v.served_by[0] for v in moved}
        check(len(victim_slots) == 1, f"the moved viewers came from {victim_slots}")
        (slot,) = victim_slots
        # A moved viewer may come back to the same slot: Docker restarts the killed edge (its
        # restart policy) at the same address, and HAProxy takes it back once it is ready.
        for v in viewers:
            if v not in moved:
                check(v.served_by == [v.served_by[0]], f"{v.name} reconnected: {v.served_by}")
        # What a moved viewer lived through: from noticing the dropped connection to its
        # next message (the reconnect delay `retry:` included), and from the kill command.
        check(all(v.resumed_at and v.dropped_at for v in moved),
              "a moved viewer got no message after reconnecting")
        gaps = sorted(round(v.resumed_at - v.dropped_at, 3) for v in moved
                      if v.resumed_at is not None and v.dropped_at is not None)
        from_kill = sorted(round(v.resumed_at - killed_at, 3) for v in moved
                           if v.resumed_at is not None)
        all_done = max(v.done_at for v in viewers if v.done_at is not None) - killed_at
        self.figures.setdefault("edge_kills", []).append({
            "kind": kind, "viewers": VIEWERS, "on_killed_edge": len(moved),
            "drop_to_next_message_s": gaps, "drop_to_next_message_max_s": max(gaps),
            "kill_to_next_message_s": from_kill,
            "kill_to_all_done_s": round(all_done, 3),
        })
        self.say(f"edge {slot} ({victim[:12]}, {kind}) SIGKILLed under {len(moved)} of {VIEWERS} "
                 f"viewers: every viewer exact; the moved ones had their next message "
                 f"{gaps} s after their connection dropped ({from_kill} s after the kill "
                 f"command)")

    async def worker_killed(self) -> None:
        messages = prompt("worker killed: " + "keep talking " * 12)
        expected = expected_text(messages)
        created = await create(self.http, messages)
        viewer = Viewer(self.url, created.events_url, "worker-kill-viewer").start()
        try:
            await wait_for(lambda: len(viewer.ids) >= 2, ANSWER_BOUND, "2 messages")
            owner = self.stack.redis_cli("HGET", f"{{gen:{created.id}}}:meta", "owner")
            workers = self.stack.containers("worker")
            # The worker's default name starts with its host name: the container's short id.
            owners = [c for c in workers if owner.startswith(c[:12] + "-")]
            check(len(owners) == 1, f"owner {owner!r} is not one of the workers {workers}")
            (victim,) = owners
            killed_at = await asyncio.to_thread(self.stack.kill, victim)
            seen_at_kill = len(viewer.ids)
            await wait_for(lambda: viewer.done_at is not None, ANSWER_BOUND, "the viewer to end")
        finally:
            await viewer.stop()
        assert viewer.done_at is not None
        body = await wait_status(self.http, created.id, {"completed", "failed"})
        check(len(set(viewer.ids)) == len(viewer.ids), "an id was seen twice")
        if viewer.terminal == "end":
            check_exact(viewer, expected)
            outcome = "completed by another worker, exact text"
        else:
            check(viewer.terminal == "error:worker_lost", f"viewer ended {viewer.terminal}")
            check(expected.startswith(viewer.text), "the text before worker_lost is not exact")
            check(body["status"] == "failed" and body["text"] == viewer.text, f"status {body}")
            outcome = "worker_lost, the text up to it exact"
        seconds = round(viewer.done_at - killed_at, 3)
        self.figures["worker_kill"] = {"outcome": viewer.terminal, "kill_to_end_s": seconds,
                                       "messages_before_kill": seen_at_kill,
                                       "messages": len(viewer.ids)}
        self.say(f"worker {victim[:12]} SIGKILLed mid-answer: {outcome}, {seconds} s after "
                 f"the kill ({len(viewer.ids)} messages, {seen_at_kill} before it)")

    async def redis_restarted(self) -> None:
        messages = prompt("redis restarted: " + "keep talking " * 12)
        expected = expected_text(messages)
        created = await create(self.http, messages)
        viewers = [Viewer(self.url, created.events_url, f"redis-viewer-{i}").start()
                   for i in range(3)]
        try:
            await wait_for(lambda: all(len(v.ids) >= 2 for v in viewers), ANSWER_BOUND,
                           "2 messages each")
            (redis,) = self.stack.containers("redis")
            killed_at = self.stack.kill(redis)  # Docker's restart policy starts it again
            await wait_for(lambda: all(v.done_at is not None for v in viewers), ANSWER_BOUND,
                           "every viewer to finish")
        finally:
            for v in viewers:
                await v.stop()
        for v in viewers:
            check_exact(v, expected)
        body = await wait_status(self.http, created.id, {"completed", "failed"})
        check(body["status"] == "completed" and body["text"] == expected, f"status: {body}")
        all_done = max(v.done_at for v in viewers if v.done_at is not None)
        # The pause each viewer saw: its longest wait between two messages around the kill
        # (Docker restarts Redis, the edges and the worker reconnect, the answer goes on);
        # without a fault, messages come every ~0.2 s.
        pauses = sorted(round(max(b - a for a, b in zip(v.times, v.times[1:], strict=False)
                                  if b > killed_at), 3) for v in viewers)
        self.figures["redis_restart"] = {
            "outcome": "exact", "longest_pause_s": pauses,
            "kill_to_all_done_s": round(all_done - killed_at, 3),
            "reconnects": [v.reconnects for v in viewers],
        }
        self.say(f"Redis SIGKILLed and started again (AOF): 3 viewers exact, their streams "
                 f"paused {pauses} s, done {all_done - killed_at:.2f} s after the kill")

    async def run(self, edge_kills: int) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("functional", self.functional), ("static files", self.static_files)]
        for i in range(edge_kills):
            for_good = bool(i % 2)  # alternately: a crash Docker restarts, an edge left down
            steps.append((f"edge killed ({i + 1} of {edge_kills}"
                          f"{', left down' if for_good else ''})",
                          functools.partial(self.edge_killed, i, for_good=for_good)))
        steps += [("worker killed", self.worker_killed), ("redis restarted", self.redis_restarted),
                  # Last: the edge kills count every viewer on the edges, and an edge holds a
                  # conversation stream its client closed until a keepalive write fails
                  # behind HAProxy (~2 keepalive intervals; ~4 through docker-proxy).
                  ("conversation with a producer (v2)", self.conversation_with_producer)]
        try:
            for name, step in steps:
                self.say(f"--- {name}")
                await self._wait_healthy()
                await step()
        finally:
            await self.http.aclose()

    def summary(self) -> list[str]:
        """The figures, one line each."""
        f = self.figures
        lines = []
        if f.get("build_s"):
            lines.append(f"image build: {f['build_s']:.1f} s")
        if f.get("start_s"):
            lines.append(f"'up' to every container healthy: {f['start_s']:.1f} s")
        for kind, how in (("restarted", "restarted by Docker"), ("stays_down", "stays down")):
            kills = [k for k in f.get("edge_kills", []) if k["kind"] == kind]
            if not kills:
                continue
            gaps = sorted(g for k in kills for g in k["drop_to_next_message_s"])
            lines.append(
                f"edge SIGKILLed, {how} ({len(kills)}x, {len(gaps)} viewers moved): dropped "
                f"connection to next message median {statistics.median(gaps):.2f} s, max "
                f"{max(gaps):.2f} s; every text exact")
        if worker := f.get("worker_kill"):
            lines.append(f"worker SIGKILLed mid-answer: {worker['outcome']} "
                         f"{worker['kill_to_end_s']:.2f} s after the kill")
        if redis := f.get("redis_restart"):
            lines.append(f"Redis SIGKILLed, restarted by Docker (AOF): every text exact, "
                         f"streams paused {max(redis['longest_pause_s']):.2f} s, "
                         f"viewers done {redis['kill_to_all_done_s']:.2f} s after the kill")
        return lines

    async def _wait_healthy(self) -> None:
        """Between faults: every container back (Docker restarts the killed ones) and the
        LB answering, so one fault's aftermath does not count in the next."""
        deadline = time.monotonic() + ANSWER_BOUND
        while True:
            states = self.stack.compose("ps", "-a", "--format",
                                        "{{.Service}} {{.State}} {{.Health}}").splitlines()
            unhealthy = [line for line in states
                         if "running" not in line or "starting" in line or "unhealthy" in line]
            counts = {s: sum(line.split()[0] == s for line in states) for s in self.expected}
            if counts != self.expected:
                unhealthy.append(f"containers {counts}, expected {self.expected}")
            ready = False
            if not unhealthy:
                with contextlib.suppress(httpx.HTTPError):
                    ready = (await self.http.get("/readyz")).status_code == 200
            if ready:
                return
            check(time.monotonic() < deadline, f"stack not healthy: {unhealthy}")
            await asyncio.sleep(0.5)


async def wait_for_ready(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + ANSWER_BOUND
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/readyz")).status_code == 200:
                return
        check(time.monotonic() < deadline, f"{http.base_url}readyz never answered 200")
        await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the load balancer")
    parser.add_argument("--project", required=True, help="the compose project name")
    parser.add_argument("--file", type=Path, default=Path("docker-compose.yml"))
    parser.add_argument("--edges", type=int, default=3, help="edges running (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="workers running (default 2)")
    parser.add_argument("--edge-kills", type=int, default=4,
                        help="edge kills, alternately restarted and left down (default 4)")
    parser.add_argument("--build-seconds", type=float, help="for the summary")
    parser.add_argument("--start-seconds", type=float, help="for the summary")
    parser.add_argument("--report", type=Path, help="write the figures here as JSON")
    parser.add_argument("--https", metavar="URL",
                        help="check only this HTTPS listener (docker-compose.tls.yml)")
    parser.add_argument("--cafile", type=Path, help="the certificate to trust for --https")
    args = parser.parse_args(argv)
    if args.edges < 2 or args.workers < 1:
        parser.error("the faults need at least 2 edges and 1 worker")
    if args.https and not args.cafile:
        parser.error("--https needs --cafile (the certificate the listener serves)")
    smoke = Smoke(args.url, Stack(args.project, args.file), edges=args.edges,
                  workers=args.workers)
    if args.https:
        async def https_only() -> None:
            try:
                await smoke.https(args.https, args.cafile)
            finally:
                await smoke.http.aclose()

        try:
            asyncio.run(https_only())
        except CheckFailed as e:
            print(f"compose-smoke: FAILED: {e}", file=sys.stderr, flush=True)
            return 1
        return 0
    smoke.figures.update(build_s=args.build_seconds, start_s=args.start_seconds)
    try:
        asyncio.run(smoke.run(args.edge_kills))
    except CheckFailed as e:
        print(f"compose-smoke: FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if args.report:
            args.report.write_text(json.dumps(smoke.figures, indent=2) + "\n")
    smoke.say("summary")
    for line in smoke.summary():
        smoke.say(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
