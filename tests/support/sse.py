"""Reading SSE streams in tests, with ``httpx-sse`` (a spec-following parser, not our own)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

TERMINAL = ("end", "error")


@dataclass
class Received:
    status: int
    headers: httpx.Headers
    events: list[ServerSentEvent] = field(default_factory=list)

    @property
    def messages(self) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event == "message"]

    @property
    def text(self) -> str:
        return "".join(json.loads(e.data)["text"] for e in self.messages)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.events]

    @property
    def terminal(self) -> ServerSentEvent | None:
        last = self.events[-1] if self.events else None
        return last if last is not None and last.event in TERMINAL else None

    def terminal_data(self) -> dict[str, Any]:
        assert self.terminal is not None, f"no terminal event in {self.events}"
        data: dict[str, Any] = json.loads(self.terminal.data)
        return data


async def read_events(
    client: httpx.AsyncClient, url: str, *, last_event_id: str | None = None,
    query_last_event_id: str | None = None, stop_after: int | None = None,
    progress: list[Received] | None = None,
) -> Received:
    """Read a stream until its terminal event (or ``stop_after`` events, then hang up).
    ``progress``, if given, gets the ``Received`` at once, to watch it fill while it runs."""
    headers = {"last-event-id": last_event_id} if last_event_id is not None else {}
    if query_last_event_id is not None:  # added to the URL's own query (a viewer token)
        url = str(httpx.URL(url).copy_merge_params({"last_event_id": query_last_event_id}))
    async with aconnect_sse(client, "GET", url, headers=headers) as source:
        received = Received(source.response.status_code, source.response.headers)
        if progress is not None:
            progress.append(received)
        if source.response.status_code != 200:
            await source.response.aread()
            return received
        async for event in source.aiter_sse():
            if event.data == "":
                continue  # the spec dispatches no event for an empty data buffer (`retry:`)
            received.events.append(event)
            if event.event in TERMINAL:
                break
            if stop_after is not None and len(received.events) >= stop_after:
                break
    return received
