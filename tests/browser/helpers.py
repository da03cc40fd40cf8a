"""Helpers shared by the browser tests."""

from __future__ import annotations

import itertools
import re
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Page, Request

EVENTS_PATH = re.compile(r"/v1/generations/[^/?#]+/events$")


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
