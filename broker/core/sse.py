"""Server-Sent Events, both ways: framing (pure functions from fields to bytes, what the edge
writes) and decoding by the spec's rules (bytes back to events: ``SSEDecoder``, the data alone,
is what the worker reads its LLM with; ``SSEEventDecoder``, whole events, what
``broker.client`` follows a stream with); all tested without a server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker.core.protocol import Event, event_id

_Out = TypeVar("_Out")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class FieldError(ValueError):
    """A field value that would break SSE framing (a line break or NUL in ``id``/``event``)."""


def frame(data: str, *, id: str | None = None, event: str | None = None) -> bytes:
    """One event. Each line of ``data`` gets its own ``data:`` line (the spec rejoins them)."""
    parts: list[str] = []
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event is not None:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    for line in _LINE_BREAK.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def comment(text: str = "") -> bytes:
    """A comment line: ignored by clients, keeps proxies and idle timers from closing the stream."""
    return "".join(f": {line}\n" for line in _LINE_BREAK.split(text)).encode() + b"\n"


def retry(milliseconds: int) -> bytes:
    return f"retry: {int(milliseconds)}\n\n".encode()


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of an HTTP/1.1 chunked body, as the server frames a body part:
    framed once per event, written to every viewer as is (the edge's direct writes)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_event(event: Event) -> bytes:
    """The bytes every viewer of ``event`` receives; message events carry no ``event:`` field."""
    name = None if event.kind == "message" else event.kind
    data = event.data
    if "\n" in data or "\r" in data:
        return frame(data, id=event_id(event.seq), event=name)
    # One line of data (event data is compact JSON, whose strings escape line breaks): what
    # ``frame`` writes, without its split and checks (the id is digits, the kind one of
    # ours). Every live event is encoded here once per edge.
    if name is None:
        return f"id: {event_id(event.seq)}\ndata: {data}\n\n".encode()
    return f"id: {event_id(event.seq)}\nevent: {name}\ndata: {data}\n\n".encode()


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise FieldError(f"SSE {name} must not contain a line break or NUL: {value[:40]!r}")


# -- reading -------------------------------------------------------------------------------


class _LineReader(Generic[_Out]):
    """Lines of an SSE byte stream fed piece by piece, as the network delivers it (WHATWG HTML,
    "Interpreting an event stream"), handed to ``_lines`` (the subclass: what the lines mean).

    Lines end at CR, LF or CRLF and nowhere else: not at U+2028, U+2029, U+0085, VT, FF or
    U+001C-001E, where ``str.splitlines`` (and so httpx's ``aiter_lines``) would cut a JSON
    chunk in two. A CRLF whose CR ends one piece and whose LF opens the next is one line end.
    Lines are split as bytes and decoded as whole lines, so a character whose bytes arrive in
    two pieces is decoded once whole (LF and CR never occur inside a UTF-8 sequence). A BOM
    opening the stream is dropped.

    Cost: a few C-level bytes operations per piece (``in``, ``replace``, ``rfind``, one
    ``decode``, one ``split``), never a Python loop over bytes: this is the worker's hot path.
    """

    __slots__ = ("_after_cr", "_line_start", "_started")

    def __init__(self) -> None:
        self._line_start: list[bytes] = []  # bytes of the current line, its end not yet seen
        self._after_cr = False  # the last piece ended in CR: an LF opening the next is its pair
        self._started = False  # a first line was read (a BOM can only open the stream)

    def feed(self, piece: bytes) -> list[_Out]:
        """What the lines completed by ``piece`` dispatch (often nothing, often one event)."""
        if not piece:
            return []  # (and the decision on a pending CR waits for a piece with bytes)
        if self._after_cr:
            self._after_cr = False
            if piece.startswith(b"\n"):
                piece = piece[1:]
        if b"\r" in piece:
            # Whether CR + LF is one line end or two waits for the next piece; the CR ends a
            # line either way, so only a leading LF of the next piece is in question.
            self._after_cr = piece.endswith(b"\r")
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        last_end = piece.rfind(b"\n")
        if last_end < 0:
            if piece:
                self._line_start.append(piece)
            return []
        complete = piece[:last_end]
        if self._line_start:
            complete = b"".join(self._line_start) + complete
            self._line_start.clear()
        if last_end + 1 < len(piece):
            self._line_start.append(piece[last_end + 1 :])
        return self._read(complete.decode("utf-8", "replace").split("\n"))

    def _unterminated_line(self) -> list[str]:
        """At the end of the stream: the last line, if its end never came."""
        lines = [b"".join(self._line_start).decode("utf-8", "replace")] if self._line_start else []
        self._line_start.clear()
        return lines

    def _read(self, lines: list[str]) -> list[_Out]:
        if not self._started and lines:
            self._started = True
            lines[0] = lines[0].removeprefix("\ufeff")
        return self._lines(lines)

    def _lines(self, lines: list[str]) -> list[_Out]:
        raise NotImplementedError


class SSEDecoder(_LineReader[str]):
    """The ``data`` of each event of an SSE byte stream: what the worker reads its LLM with.
    Comment lines and fields other than ``data`` are ignored, ``data`` lines are joined by LF
    and an event is dispatched at a blank line (``_LineReader``: where lines end)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        super().__init__()
        self._data: list[str] = []  # the data lines of the event being read

    def end(self) -> list[str]:
        """At the end of the stream: an unterminated last line is read as a line and an event
        still open is dispatched. The spec drops both (a browser shows nothing of an event cut
        short); an LLM stream ending in ``data: [DONE]`` without the blank line is common, and
        a chunk cut mid-JSON then fails to parse (``llm_stream_broken``) instead of passing
        unnoticed."""
        done = self._read([*self._unterminated_line(), ""])
        self._data = []
        return done

    def _lines(self, lines: list[str]) -> list[str]:
        events: list[str] = []
        data = self._data
        for line in lines:
            if not line:  # a blank line dispatches the event, if it has data
                if data:
                    events.append("\n".join(data))
                    data = self._data = []
            elif line.startswith("data:"):  # nearly every line: the fast path
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
            elif line == "data":  # a field name alone: its value is empty
                data.append("")
            # Anything else is a comment (":...") or a field the reader does not use.
        return events


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event, as a browser's ``MessageEvent`` has it: ``event`` is its type
    (``message`` when the stream named none), ``id`` the last event id the stream set."""

    data: str
    event: str = "message"
    id: str = ""


class SSEEventDecoder(_LineReader[ServerSentEvent]):
    """Whole events of an SSE byte stream (``data``, ``event``, ``id``), as EventSource
    dispatches them: what ``broker.client`` follows an edge's stream with. ``retry`` is the
    last reconnection time the stream advised (ms; None until it sends one). An event cut
    short by the end of the stream is not dispatched (``_LineReader``: where lines end)."""

    __slots__ = ("_data", "_event", "last_event_id", "retry")

    def __init__(self) -> None:
        super().__init__()
        self._data: list[str] = []
        self._event = ""
        self.last_event_id = ""  # kept across events, as the spec's last event ID buffer
        self.retry: int | None = None

    def _lines(self, lines: list[str]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(ServerSentEvent("\n".join(self._data),
                                                  self._event or "message", self.last_event_id))
                self._data, self._event = [], ""
                continue
            if line.startswith(":"):
                continue  # a comment
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id" and "\0" not in value:
                self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)
        return events


async def aiter_sse_data(pieces: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The data of each event of the SSE byte stream ``pieces`` (``SSEDecoder``)."""
    decoder = SSEDecoder()
    async for piece in pieces:
        for data in decoder.feed(piece):
            yield data
    for data in decoder.end():
        yield data
