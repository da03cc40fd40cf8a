"""Helpers the fault-suite modules share: waiting for a worker, reporting a timing, counting the
fake LLM's requests, and a viewer that reads a stream to its very end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from broker.core import protocol
from tests.support.api import create, events_url
from tests.support.fakellm import FakeLLM, prompt_of
from tests.support.procs import BrokerProcess, eventually, wait_until
from tests.support.sse import TERMINAL, Received, read_events


async def wait_worker_ready(d: Any, worker: BrokerProcess) -> None:
    """Until ``worker`` waits on the jobs group: one of its connections (named after its pid)
    last ran XREADGROUP."""
    client = d.redis.client()
    tag = f"-{worker.proc.pid}-"

    def ready() -> bool:
        if worker.proc.poll() is not None:
            raise AssertionError(f"the worker exited:\n{worker.output()}")
        return any(c["name"].startswith("broker-worker-") and tag in c["name"]
                   and c["cmd"] == "xreadgroup" for c in client.client_list())

    try:
        await asyncio.to_thread(wait_until, ready, 20, "the worker to take jobs")
    finally:
        client.close()


def report(record_property: Any, scenario: str, seconds: float, what: str) -> None:
    """Print a scenario's timing (``seconds`` from ``what``) and record it for the report."""
    print(f"\n[{scenario}] {seconds:.3f} s from {what}")
    record_property("seconds_to_terminal", round(seconds, 3))


def requests_for(llm: FakeLLM, prompt: str) -> int:
    """How many chat-completions requests the fake LLM has had for ``prompt``."""
    return sum(1 for r in llm.records if prompt_of(r.body) == prompt)


class Viewer:
    """One viewer read to the very END of the response, not just to its first terminal event
    (so a second terminal event would show); stamps when the terminal event arrived."""

    def __init__(self, http: httpx.AsyncClient, url: str, last_event_id: str | None = None):
        self.received = Received(0, httpx.Headers())
        self.first_message = asyncio.Event()
        self.terminal_at: float | None = None
        self.task = asyncio.create_task(self._read(http, url, last_event_id))

    async def _read(self, http: httpx.AsyncClient, url: str, last_event_id: str | None) -> None:
        headers = {"last-event-id": last_event_id} if last_event_id else {}
        async with aconnect_sse(http, "GET", url, headers=headers) as source:
            self.received.status = source.response.status_code
            self.received.headers = source.response.headers
            if source.response.status_code != 200:
                await source.response.aread()
                return
            async for event in source.aiter_sse():
                if event.data == "":
                    continue  # `retry:`
                self.received.events.append(event)
                if event.event == "message":
                    self.first_message.set()
                elif event.event in TERMINAL and self.terminal_at is None:
                    self.terminal_at = time.monotonic()

    async def wait_first_message(self, within: float = 20) -> None:
        """Until the first ``message`` event arrived (fails if the stream ended without one)."""
        waiter = asyncio.ensure_future(self.first_message.wait())
        try:
            async with asyncio.timeout(within):
                await asyncio.wait([self.task, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        assert self.first_message.is_set(), f"the stream ended without a message: {self.events}"

    async def result(self, within: float = 20, *, terminal_id: bool = True) -> Received:
        """The whole stream: a 200 with exactly one terminal event, and that one last (and,
        with ``terminal_id``, carrying an id)."""
        await asyncio.wait_for(self.task, within)
        got = self.received
        assert got.status == 200, got.status
        terminals = [e for e in got.events if e.event in TERMINAL]
        assert len(terminals) == 1, f"expected exactly one terminal event, got {terminals}"
        assert got.events[-1] is terminals[0], "events after the terminal event"
        if terminal_id:
            assert terminals[0].id
        return got

    @property
    def events(self) -> list[Any]:
        return self.received.events


async def until_messages(progress: list[Received], viewers: int, count: int) -> None:
    """Wait until ``viewers`` streams (watched through ``progress``) have ``count`` messages."""

    async def enough() -> bool:
        return len(progress) == viewers and all(len(v.messages) >= count for v in progress)

    await eventually(enough, 15, f"{viewers} viewers with {count} messages")


def watch(http: httpx.AsyncClient, url: str, progress: list[Received]) -> asyncio.Task[Received]:
    return asyncio.create_task(read_events(http, url, progress=progress))


async def readyz(http: httpx.AsyncClient, edge: BrokerProcess) -> int:
    return (await http.get(edge.url + "/readyz")).status_code


async def wait_ready_status(http: httpx.AsyncClient, edge: BrokerProcess, code: int) -> None:
    async def reached() -> bool:
        return await readyz(http, edge) == code

    await eventually(reached, 15, f"/readyz {code}")


# The clear ends a viewer may meet when a Redis failover lost acknowledged writes
# (docs/failure-model.md, "Known limits"): its edge sees the history go back behind what it
# delivered (``history_lost``, no ``id:``: not part of the log), or the reaper's error event
# reaches a viewer that was still behind (``worker_lost``, in the log).
FAILOVER_ERRORS = ("history_lost", "worker_lost")


def failover_outcome(got: Received, answer: str) -> str:
    """What one viewer of ``answer`` came to across a Redis failover: ``"exact text"``, or the
    code of the clear error it ended with; never a wrong, repeated or unended text."""
    assert got.status == 200, got.status
    assert got.terminal is not None, f"the stream did not end: {got.events[-3:]}"
    if got.terminal.event == "end":
        assert_exact_once(got, answer)
        return "exact text"
    code = got.terminal_data()["code"]
    assert code in FAILOVER_ERRORS, got.terminal_data()
    assert answer.startswith(got.text), "a text that is not the answer's beginning"
    logged = got.events if code == "worker_lost" else got.events[:-1]
    ids = [protocol.parse_event_id(e.id) for e in logged]
    assert ids == list(range(1, len(ids) + 1)), f"ids missing or repeated: {ids}"
    if code == "history_lost":  # no id of its own: the parser carries the last one over
        assert got.terminal.id == (logged[-1].id if logged else ""), got.terminal
    return str(code)


def assert_exact_once(got: Received, expected: str) -> None:
    """Ended with ``end`` after exactly the text, ids 1..n: none missing, none repeated."""
    assert got.terminal is not None and got.terminal.event == "end", got.terminal
    assert got.text == expected
    ids = [protocol.parse_event_id(i) for i in got.ids]
    assert ids == list(range(1, len(ids) + 1))


async def viewers_mid_stream(
    http: httpx.AsyncClient, d: Any, prompt: str, count: int, messages: int
) -> tuple[str, list[asyncio.Task[Received]], list[Received]]:
    """Create a generation and ``count`` viewers of it spread over ``d``'s edges; return once
    each has ``messages`` messages: (the id, the viewers' tasks, their progress)."""
    gen_id = await create(http, d.edges[0].url, prompt)
    progress: list[Received] = []
    viewers = [watch(http, events_url(d.edges[i % len(d.edges)].url, gen_id), progress)
               for i in range(count)]
    await until_messages(progress, count, messages)
    return gen_id, viewers, progress
