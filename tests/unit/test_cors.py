"""The stream's CORS headers (``CorsPolicy.simple_headers``, added by the edge's pre-router)
are exactly those Starlette's CORS middleware adds to every other route's answers: with and
without an allowed origin, a cookie, ``*``."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from broker.edge.cors import CorsPolicy

SETTINGS = ["", "https://a.example,https://b.example", "*"]
ORIGINS = [None, "https://a.example", "https://evil.example"]


async def plain_answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def headers_through_the_middleware(policy: CorsPolicy, scope: Scope) -> set[Any]:
    app: Any = plain_answer
    for middleware in reversed(policy.middleware()):
        app = middleware.cls(app, *middleware.args, **middleware.kwargs)
    started: list[Message] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await app(scope, receive, send)
    return {(k.lower(), v) for k, v in started[0]["headers"]}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("cookie", [False, True])
async def test_the_stream_gets_the_cors_headers_of_every_other_answer(
    setting: str, origin: str | None, cookie: bool
):
    headers = [(b"origin", origin.encode())] if origin else []
    if cookie:
        headers.append((b"cookie", b"broker_token_x=1"))
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers}
    policy = CorsPolicy(setting)
    expected = await headers_through_the_middleware(policy, scope)
    assert {(k, v) for k, v in await policy.simple_headers(scope)} == expected
