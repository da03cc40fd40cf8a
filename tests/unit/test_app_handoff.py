"""EdgeApp serves an SSE stream after Starlette's routing and middleware have returned, and
answers the stream's errors before it started as Starlette's middleware would."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request
from starlette.routing import Route

from broker.core.settings import Settings
from broker.edge.app import EdgeApp, create_app
from broker.edge.stream import EventStream
from broker.edge.topic import Frame, Topic


class Boom(Exception):
    pass


def edge_app(watch: Any, **settings: Any) -> EdgeApp:
    """The edge app with a route /stream answering an EventStream whose topic is ``watch``."""
    app = create_app(Settings(insecure=True, **settings), redis=fakeredis.FakeAsyncRedis())
    assert isinstance(app, EdgeApp)
    hub = app.state.edge.hub
    hub.watch = watch

    async def stream(request: Request) -> EventStream:
        return EventStream(hub, "gen", 0, retry_ms=1000, keepalive=10, send_timeout=5)

    app.router.routes.insert(0, Route("/stream", stream))  # type: ignore[arg-type]
    return app


async def call(app: EdgeApp) -> tuple[list[dict[str, Any]], BaseException | None]:
    """GET /stream: the ASGI messages sent, and what the app raised (None if nothing)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/stream", "raw_path": b"/stream", "query_string": b"",
        "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("edge", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.get_running_loop().create_future()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as e:
        return sent, e
    return sent, None


def callers() -> list[str]:
    """The qualified names of the functions and coroutines the caller runs in."""
    names, frame = [], inspect.currentframe()
    while frame is not None:
        names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    return names


def watching(*, fail: Exception | None = None, chain: list[str] | None = None) -> Any:
    """A hub.watch that records who runs it, then fails or yields a topic with nothing."""

    @contextlib.asynccontextmanager
    async def watch(gen_id: str) -> AsyncIterator[Topic]:
        if chain is not None:
            chain.extend(callers())
        if fail is not None:
            raise fail
        topic = Topic(gen_id, 8)
        topic.read_to = 0  # an empty, read log: nothing to send until something is offered
        yield topic

    return watch


def body_of(sent: list[dict[str, Any]]) -> dict[str, Any]:
    assert sent[0]["type"] == "http.response.start"
    parsed: dict[str, Any] = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return parsed


async def test_the_stream_runs_outside_the_routing_and_middleware() -> None:
    chain: list[str] = []
    _, raised = await call(edge_app(watching(fail=Boom(), chain=chain)))
    assert isinstance(raised, Boom)
    assert "EdgeApp.__call__" in chain and "EventStream.serve" in chain
    assert not [name for name in chain if "Middleware" in name or "Router" in name], chain


async def test_with_cors_the_stream_stays_inside_the_middleware() -> None:
    # CORS wraps the stream's send to add its headers: it must stay in the way.
    chain: list[str] = []
    app = edge_app(watching(fail=Boom(), chain=chain), cors_origins="https://a.example")
    _, raised = await call(app)
    assert isinstance(raised, Boom)
    assert "CORSMiddleware.__call__" in chain


async def test_a_redis_error_before_the_stream_started_answers_503_json() -> None:
    app = edge_app(watching(fail=RedisConnectionError("the subscription was not confirmed")))
    sent, raised = await call(app)
    assert raised is None
    assert sent[0]["status"] == 503
    assert body_of(sent)["error"]["code"] == "redis_unavailable"
    metrics = app.state.edge.metrics.registry
    assert metrics.get_sample_value("broker_redis_errors_total", {"where": "request"}) == 1
    assert metrics.get_sample_value("broker_viewers") == 0


async def test_an_unexpected_error_before_the_stream_started_answers_500_and_goes_on_up() -> None:
    # As Starlette's ServerErrorMiddleware does: a JSON 500, and the error reaches the server.
    sent, raised = await call(edge_app(watching(fail=Boom("bug"))))
    assert isinstance(raised, Boom)
    assert sent[0]["status"] == 500
    assert body_of(sent)["error"]["code"] == "internal_error"


async def test_an_error_after_the_stream_started_goes_on_up_without_a_second_answer() -> None:
    @contextlib.asynccontextmanager
    async def watch(gen_id: str) -> AsyncIterator[Topic]:
        topic = Topic(gen_id, 8)
        topic.offer(Frame(1, b"event: end\ndata: {}\n\n", True, 0))
        yield topic
        raise Boom("after the start")  # leaving the topic fails

    sent, raised = await call(edge_app(watch))
    assert isinstance(raised, Boom)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[0]["status"] == 200 and sent[-1]["body"].startswith(b"event: end")
