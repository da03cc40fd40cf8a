"""A Python viewer of a generation: iterate its messages, resuming across dropped connections.

    async with httpx.AsyncClient(base_url="http://127.0.0.1:8000") as http:
        created = await create(http, [{"role": "user", "content": "Hello?"}])
        follower = Follower(http, created.events_url)
        async for message in follower:
            print(message.text, end="")
        print(follower.result.finish_reason)

Iterating the follower gives the answer's messages alone (v1). ``follower.events()`` gives
every event of the stream instead, typed (``Event``: ``kind``, ``id``, ``data``): the answer's
messages and the reasoning, tool calls, tool results and application data between them, in
the stream's one id order, with the same resume (see docs/api.md, "Typed events"):

    async for event in follower.events():
        if event.kind == "reasoning":
            print(event.text, end="", file=sys.stderr)
        elif event.kind == "message":
            print(event.text, end="")
        elif event.kind == "tool_call":
            print(event.data["name"], event.data["arguments"])

Read with ``broker.core.sse.SSEEventDecoder``, the spec's rules (lines end at CR, LF or CRLF
only: a U+2028 in a message is text). Like a browser's ``EventSource`` it
reconnects after a dropped connection with ``Last-Event-ID``, after ``retry:`` (doubling, with
jitter, while reconnects bring nothing, up to 10 s), and stops on
the terminal event or a 204; unlike it, it gives up after ``give_up_after`` seconds without
progress and raises typed errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from broker.core.sse import ServerSentEvent, SSEEventDecoder


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the stream before its terminal one. ``kind`` is the SSE event name:
    ``message`` (the answer), ``reasoning``, ``tool_call``, ``tool_result``, ``data``, or a
    kind newer than this client (passed on as it came). ``data`` is the event's JSON object,
    as the edge sent it (docs/api.md lists each kind's fields)."""

    kind: str
    id: str
    data: dict[str, Any]

    @property
    def text(self) -> str:
        """The text of a ``message`` or ``reasoning`` event; ``""`` for the other kinds."""
        text = self.data.get("text") if self.kind in TEXT_KINDS else None
        return text if isinstance(text, str) else ""


TEXT_KINDS = ("message", "reasoning")


@dataclass(frozen=True, slots=True)
class Result:
    finish_reason: str
    usage: dict[str, Any] | None


class StreamError(Exception):
    """The stream could not be followed to its end."""


class GenerationFailed(StreamError):
    """The generation ended with ``event: error``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class GenerationNotFound(StreamError):
    """404: the generation is unknown or expired."""


MAX_RECONNECT_DELAY = 10.0


class _Unavailable(Exception):
    """A 5xx answer, or a 200 that is not an event stream (a proxy's page): the edge is
    unhealthy for now; retry like a dropped connection."""


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    events_url: str
    # With ``conversation_id``: the conversation, and its stream's URL (its devices follow it
    # with a ``ConversationFollower``; viewer token included where tokens are on).
    conversation_id: str | None = None
    conversation_url: str | None = None


class RequestRejected(StreamError):
    """The edge refused a request (4xx/5xx with the JSON error body): creating the generation,
    or following it (``410 history_lost``, ``400 invalid_last_event_id``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


async def create(
    http: httpx.AsyncClient, messages: list[dict[str, str]], **fields: Any
) -> Created:
    """``POST /v1/generations``; ``fields`` are other chat-completions fields (model, ...)."""
    response = await http.post("/v1/generations", json={"messages": messages, **fields})
    if response.status_code != 201:
        raise _rejected(response.status_code, response.text)
    body = response.json()
    return Created(body["id"], body["events_url"], body.get("conversation_id"),
                   body.get("conversation_url"))


def _rejected(status: int, body: str) -> RequestRejected:
    """The typed error for an answer carrying the JSON error body (or anything else)."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", body[:200]
    return RequestRejected(status, code, message)


T = TypeVar("T")


class _Resuming:
    """What both followers share: EventSource's reconnection. A dropped connection, a 5xx or
    an answer that is no event stream is retried after ``retry:`` (the server's, doubling with
    each failure in a row, jittered) with ``Last-Event-ID``; ``StreamError`` when there has
    been no progress (what counts as progress: the subclass says, by ``_progressed``) for
    ``give_up_after`` seconds."""

    def __init__(
        self, http: httpx.AsyncClient, events_url: str, *, last_event_id: str | None = None,
        give_up_after: float = 30.0,
    ) -> None:
        self.http = http
        self.events_url = events_url
        self.last_event_id = last_event_id
        self.give_up_after = give_up_after
        self.retry_ms = 1000
        self.reconnects = 0
        self._progress_at = time.monotonic()
        self._failures = 0  # reconnects in a row without progress: the delay doubles with each

    def _progressed(self) -> None:
        self._progress_at = time.monotonic()
        self._failures = 1

    async def _reconnecting(
        self, connect_once: Callable[[], AsyncIterator[T]], ended: Callable[[], bool],
    ) -> AsyncGenerator[T, None]:
        self._progress_at = time.monotonic()
        self._failures = 0
        while True:
            if self._failures:
                self.reconnects += 1
                if time.monotonic() - self._progress_at > self.give_up_after:
                    raise StreamError(f"no progress for {self.give_up_after}s; giving up")
                delay = min(self.retry_ms / 1000 * 2 ** (self._failures - 1),
                            MAX_RECONNECT_DELAY)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter: no herds
            self._failures += 1
            try:
                async for item in connect_once():
                    yield item
            except (httpx.TransportError, _Unavailable):
                continue  # dropped: reconnect with Last-Event-ID, as EventSource does
            if ended():
                return

    def _stream(self) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        headers = {"accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = self.last_event_id
        return self.http.stream("GET", self.events_url, headers=headers)

    async def _sse_events(
        self, response: httpx.Response
    ) -> AsyncIterator[tuple[ServerSentEvent, Any]]:
        """The stream's events with their data parsed; ``retry:`` and ids taken as they come."""
        decoder = SSEEventDecoder()
        async for piece in response.aiter_bytes():
            events = decoder.feed(piece)
            if decoder.retry is not None:
                self.retry_ms = decoder.retry
            for event in events:
                if event.id:
                    self.last_event_id = event.id
                yield event, json.loads(event.data)


class Follower(_Resuming):
    """Follows one generation's events to its terminal event, across reconnects."""

    def __init__(
        self, http: httpx.AsyncClient, events_url: str, *, last_event_id: str | None = None,
        give_up_after: float = 30.0,
    ) -> None:
        super().__init__(http, events_url, last_event_id=last_event_id,
                         give_up_after=give_up_after)
        self.result: Result | None = None

    def __aiter__(self) -> AsyncGenerator[Message, None]:
        """The answer's messages alone (the other kinds are skipped, their ids still count
        for the resume point)."""
        return self._messages()

    def events(self) -> AsyncGenerator[Event, None]:
        """Every event before the terminal one, typed, in the stream's order. The terminal
        event ends the iteration as for messages: ``end`` sets ``result``, ``error`` raises
        ``GenerationFailed``. Iterate a follower once, either way."""
        return self._reconnecting(self._connect_once, lambda: self.result is not None)

    async def _messages(self) -> AsyncGenerator[Message, None]:
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if event.kind == "message":
                    yield Message(event.id, event.text)

    async def _connect_once(self) -> AsyncIterator[Event]:
        async with self._stream() as response:
            if response.status_code == 204:
                self.result = self.result or Result("unknown", None)
                return
            if response.status_code == 404:
                raise GenerationNotFound(self.events_url)
            await _check_stream(response)
            async for event, data in self._sse_events(response):
                self._progressed()  # (an event: the delay starts over)
                if event.event == "end":
                    self.result = Result(data.get("finish_reason", "unknown"),
                                         data.get("usage"))
                    return
                elif event.event == "error":
                    raise GenerationFailed(data.get("code", "unknown"),
                                           data.get("message", ""))
                else:
                    yield Event(event.event, event.id, data)


@dataclass(frozen=True, slots=True)
class ConversationEvent:
    """One event of a conversation stream: ``event`` as the stream names it (``turn``,
    ``message``, ``reasoning``, ..., ``end``, ``error``), its data without ``generation_id``,
    which is here."""

    id: str
    event: str
    generation_id: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in ("end", "error")


class ConversationFollower(_Resuming):
    """Follows a conversation's stream (``GET /v1/conversations/{cid}/events``): every turn,
    for as long as it is iterated (a conversation has no end). Reconnects after a dropped
    connection with ``Last-Event-ID``, as ``Follower`` does, and raises ``StreamError`` only
    when no connection could be made for ``give_up_after`` seconds (a quiet conversation is
    not a failure: the edge sends keepalives)."""

    def __aiter__(self) -> AsyncGenerator[ConversationEvent, None]:
        return self._reconnecting(self._connect_once, lambda: False)

    async def _connect_once(self) -> AsyncIterator[ConversationEvent]:
        async with self._stream() as response:
            await _check_stream(response)
            self._progressed()  # (a connection: the delay starts over)
            async for event, data in self._sse_events(response):
                yield ConversationEvent(event.id, event.event,
                                        str(data.pop("generation_id", "")), data)


async def _check_stream(response: httpx.Response) -> None:
    """Raise unless ``response`` is an event stream: ``_Unavailable`` (retry) for a 5xx or a
    200 that is something else, ``RequestRejected`` for another refusal."""
    status = response.status_code
    if status != 200:
        body = (await response.aread()).decode(errors="replace")
        if status >= 500:
            raise _Unavailable(f"HTTP {status}: {body[:200]}")
        raise _rejected(status, body)
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise _Unavailable(f"HTTP 200 with {content_type or 'no content type'}, not an event "
                           "stream")
