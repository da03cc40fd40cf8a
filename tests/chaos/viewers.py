"""Viewers that follow a generation the way a browser's EventSource does (with the project's
helper's choices): reconnect with ``Last-Event-ID`` after any drop, network error or 5xx, stop
on 204, another 4xx, or a terminal event. Some leave mid-answer and come back, some join late
or from a point, one now and then stops reading for a while (a slow viewer).

Each keeps everything the checker needs: what it received (id, kind, data, and whether the
event carried an ``id:``), when it last heard anything from the server (events and keepalive
comments alike), and why it stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = ("end", "error")
_LINE = re.compile(rb"\r\n|\r|\n")
READ_TIMEOUT = 60.0  # a safety net only: keepalives come every BROKER_KEEPALIVE_INTERVAL


@dataclass
class Got:
    """One event as the viewer received it."""

    seq: int | None  # its own id (None: it had no ``id:`` line, e.g. history_lost)
    kind: str
    data: Any
    at: float


class SSEReader:
    """Bytes to events by the spec's rules, independent of the product's own decoder, keeping
    whether each event set its own id."""

    def __init__(self) -> None:
        self._rest = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, piece: bytes, now: float) -> list[Got]:
        buffer = self._rest + piece
        hold = b""
        if buffer.endswith(b"\r"):  # may be the first half of a CRLF: decide with the next piece
            buffer, hold = buffer[:-1], b"\r"
        lines = _LINE.split(buffer)
        self._rest = lines.pop() + hold
        got: list[Got] = []
        for raw in lines:
            line = raw.decode("utf-8", errors="strict")
            if not line:
                if self._data:
                    seq = int(self._id) if self._id else None
                    got.append(Got(seq, self._event or "message",
                                   json.loads("\n".join(self._data)), now))
                self._data, self._event, self._id = [], "", None
                continue
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                self._id = value
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)
        return got


@dataclass
class Plan:
    """How one viewer behaves (drawn from the run's seed)."""

    join_after: float = 0.0  # seconds after the generation was created
    start_after: int | None = None  # Last-Event-ID on the first request (None: from the start)
    leave_after: int | None = None  # hang up after this many events, then come back
    away_for: float = 0.0
    pause_after: int | None = None  # a slow viewer: stop reading after this many events...
    pause_for: float = 0.0  # ... for this long


@dataclass
class Viewer:
    gen_label: str
    name: str
    plan: Plan
    received: list[Got] = field(default_factory=list)
    heard_at: list[float] = field(default_factory=list)  # each read with any bytes, each 200
    away: list[tuple[float, float]] = field(default_factory=list)  # intervals it chose to leave
    connects: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # answer status/error -> count
    outcome: str = ""  # terminal | 204 | http_<code> | abandoned
    started_at: float = 0.0
    done_at: float = 0.0

    @property
    def start_point(self) -> int:
        return self.plan.start_after or 0

    @property
    def last_seq(self) -> int:
        for got in reversed(self.received):
            if got.seq is not None:
                return got.seq
        return self.start_point

    async def run(self, http: httpx.AsyncClient, url: str, retry_s: float,
                  deadline: float) -> None:
        await asyncio.sleep(self.plan.join_after)
        if self.plan.start_after is not None:
            # A page resumes from an id it saw: never one past what the generation has.
            self.plan.start_after = min(self.plan.start_after, await _published(http, url))
        self.started_at = time.monotonic()
        self.heard_at.append(self.started_at)
        left = False
        try:
            while time.monotonic() < deadline:
                if self.received:
                    headers = {"last-event-id": f"{self.last_seq:010d}"}
                elif self.plan.start_after is not None:
                    headers = {"last-event-id": f"{self.plan.start_after:010d}"}
                else:
                    headers = {}
                outcome, hung_up = await self._connect(http, url, headers, leave=not left)
                if outcome:
                    self.outcome = outcome
                    return
                if hung_up:  # it chose to leave: away for a while, then back with its id
                    left = True
                    gone = time.monotonic()
                    await asyncio.sleep(self.plan.away_for)
                    self.away.append((gone, time.monotonic()))
                    continue
                await asyncio.sleep(retry_s)
            self.outcome = "abandoned"
        finally:
            self.done_at = time.monotonic()

    async def _connect(self, http: httpx.AsyncClient, url: str, headers: dict[str, str],
                       leave: bool) -> tuple[str, bool]:
        """One request: (an outcome that ends the viewer, or ""; whether it chose to hang up)."""
        self.connects += 1
        reader = SSEReader()
        try:
            async with http.stream("GET", url, headers=headers) as response:
                code = response.status_code
                self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1
                if code == 204:
                    return "204", False
                if code >= 500:
                    return "", False
                if code != 200:
                    return f"http_{code}", False
                self.heard_at.append(time.monotonic())
                async for piece in response.aiter_raw():
                    now = time.monotonic()
                    self.heard_at.append(now)
                    for got in reader.feed(piece, now):
                        self.received.append(got)
                        if got.kind in TERMINAL:
                            return "terminal", False
                        if leave and self.plan.leave_after is not None and \
                                len(self.received) >= self.plan.leave_after:
                            return "", True
                        if self.plan.pause_after is not None and \
                                len(self.received) == self.plan.pause_after:
                            pause_from = time.monotonic()
                            await asyncio.sleep(self.plan.pause_for)
                            self.away.append((pause_from, time.monotonic()))
                return "", False
        except (httpx.HTTPError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            key = type(e).__name__
            self.statuses[key] = self.statuses.get(key, 0) + 1
            return "", False


async def _published(http: httpx.AsyncClient, events_url: str) -> int:
    """How many events the generation has now (its status: the counts of each kind)."""
    status_url = events_url.rsplit("/events", 1)[0]
    for _ in range(20):
        try:
            response = await http.get(status_url)
            if response.status_code == 200:
                return sum(response.json().get("events", {}).values())
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    return 0
