"""Helpers shared by the browser tests."""

from __future__ import annotations

import asyncio
import itertools
import re
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.async_api import Page, Request

from broker.edge.auth import ViewerTokens
from tests.support.procs import eventually

EVENTS_PATH = re.compile(r"/v1/generations/[^/?#]+/events$")
VIEWER_TOKEN_KEY = "browser-tests-viewer-key"  # the `broker dev` of these tests signs with it
DEMO_QUESTION = "Explain how Server-Sent Events resume after a dropped connection."  # the page's


def signed_events_url(gen_id: str) -> str:
    """The events URL with a valid viewer token, for any id (even one never created)."""
    token = ViewerTokens([VIEWER_TOKEN_KEY], ttl=3600).issue(gen_id)
    return f"/v1/generations/{gen_id}/events?token={token}"


def record_events_requests(page: Page) -> list[Request]:
    """Every request the page makes to a generation's event stream, in order, as it happens."""
    seen: list[Request] = []

    def on_request(request: Request) -> None:
        if EVENTS_PATH.search(urlsplit(request.url).path):
            seen.append(request)

    page.on("request", on_request)
    return seen


def assert_ids_strictly_increasing(ids: list[str]) -> None:
    """Ids are opaque strings; numeric ones are compared as numbers, others as strings."""
    assert ids, "no ids received"
    assert all(isinstance(i, str) and i for i in ids), f"empty or missing ids: {ids}"
    assert len(set(ids)) == len(ids), f"duplicate ids: {ids}"
    keys: list[Any] = [int(i) for i in ids] if all(i.isdigit() for i in ids) else list(ids)
    assert all(a < b for a, b in itertools.pairwise(keys)), f"ids not increasing: {ids}"


async def assert_resumed_while_running(
    requests: list[Request], api: httpx.AsyncClient, gen_id: str, within: float = 20.0
) -> None:
    """The page's resume (its second request to the event stream, from
    ``record_events_requests``) was answered while the generation still ran: the viewer came
    back to a live stream, not to a finished log."""
    await eventually(lambda: asyncio.sleep(0, len(requests) >= 2), within, "the resume")
    response = await asyncio.wait_for(requests[1].response(), within)  # served: its headers
    assert response is not None and response.status == 200, response
    status = (await api.get(f"/v1/generations/{gen_id}")).json()
    assert status["status"] == "running", f"the answer ended before the resume: {status}"
