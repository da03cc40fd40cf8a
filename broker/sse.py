"""Server-Sent Events framing: pure functions from fields to bytes, tested without a server."""

from __future__ import annotations

import re

from broker.protocol import Event, event_id

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
    framed once per event, written to every viewer as is (``broker.server.DirectWriter``)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_event(event: Event) -> bytes:
    """The bytes every viewer of ``event`` receives; message events carry no ``event:`` field."""
    name = None if event.kind == "message" else event.kind
    return frame(event.data, id=event_id(event.seq), event=name)


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise FieldError(f"SSE {name} must not contain a line break or NUL: {value[:40]!r}")
