"""EdgeApp routes the event stream itself, before Starlette, with or without CORS: the stream
runs outside Starlette's routing and middleware, its errors before it started get the JSON
error answers every other route gets, and its answer carries the CORS and security headers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core import protocol
from broker.core.settings import Settings
from broker.edge.app import EdgeApp, create_app
from broker.edge.topic import Frame, Topic, to_frame


class Boom(Exception):
    pass


GEN_ID = protocol.new_generation_id()
PATH = f"/v1/generations/{GEN_ID}/events"


def edge_app(watch: Any, **settings: Any) -> EdgeApp:
    """The edge app, generation ``GEN_ID`` queued in its store, its hub's topics ``watch``."""
    app = create_app(Settings(insecure=True, **settings), redis=fakeredis.FakeAsyncRedis())
    assert isinstance(app, EdgeApp)
    app.state.edge.hub.watch = watch
    return app


async def call(app: EdgeApp, headers: list[tuple[bytes, bytes]] | None = None,
               sent: list[dict[str, Any]] | None = None, method: str = "GET",
               started: asyncio.Event | None = None,
               ) -> tuple[list[dict[str, Any]], BaseException | None]:
    """GET the stream of ``GEN_ID``: the ASGI messages sent, and what the app raised (None if
    nothing)."""
    await app.state.edge.store.redis.hset(protocol.meta_key(GEN_ID),
                                          mapping=protocol.new_meta("model"))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
        "root_path": "", "headers": headers or [], "client": ("127.0.0.1", 1),
        "server": ("edge", 80),
    }
    sent = [] if sent is None else sent

    async def receive() -> dict[str, Any]:
        await asyncio.get_running_loop().create_future()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if started is not None:
            started.set()

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


def watching(*, fail: Exception | None = None, chain: list[str] | None = None,
             events: tuple[protocol.Event, ...] = ()) -> Any:
    """A hub.watch that records who runs it, then fails or yields a topic holding ``events``
    (nothing by default)."""

    @contextlib.asynccontextmanager
    async def watch(gen_id: str, lease_check: object = None) -> AsyncIterator[Topic]:
        if chain is not None:
            chain.extend(callers())
        if fail is not None:
            raise fail
        topic = Topic(gen_id, 8)
        topic.read_to = 0  # an empty, read log: nothing to send until something is offered
        for event in events:
            topic.offer(to_frame(event))
        yield topic

    return watch


def body_of(sent: list[dict[str, Any]]) -> dict[str, Any]:
    assert sent[0]["type"] == "http.response.start"
    parsed: dict[str, Any] = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return parsed


@pytest.mark.parametrize("cors_origins", ["", "https://a.example", "*"])
async def test_the_stream_runs_outside_the_routing_and_middleware(cors_origins: str) -> None:
    chain: list[str] = []
    app = edge_app(watching(fail=Boom(), chain=chain), cors_origins=cors_origins)
    _, raised = await call(app)
    assert isinstance(raised, Boom)
    assert "EdgeApp.__call__" in chain and "EventStream.serve" in chain
    assert not [name for name in chain
                if "Middleware" in name or "Router" in name or "Route." in name], chain


async def test_with_cors_the_stream_answers_with_the_cors_and_security_headers() -> None:
    app = edge_app(watching(), cors_origins="https://a.example")
    origin = [(b"origin", b"https://a.example")]
    sent = await call_until_started(app, origin)
    assert sent[0]["status"] == 200
    answer = dict(sent[0]["headers"])
    assert answer[b"access-control-allow-origin"] == b"https://a.example"
    assert answer[b"access-control-allow-credentials"] == b"true"
    assert answer[b"x-content-type-options"] == b"nosniff"


async def test_the_terminal_event_goes_out_with_the_end_of_the_response_in_one_send() -> None:
    events = (protocol.Event(1, "message", '{"text":"Hi."}', 0),
              protocol.Event(2, "end", '{"finish_reason":"stop"}', 0))
    sent, raised = await call(edge_app(watching(events=events)))
    assert raised is None
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    opening, last = sent[1:]  # the retry field; then the events and the end, in one
    assert opening["more_body"] is True and opening["body"].startswith(b"retry:")
    assert last == {"type": "http.response.body", "more_body": False,
                    "body": b"".join(to_frame(e).data for e in events)}


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
    async def watch(gen_id: str, lease_check: object = None) -> AsyncIterator[Topic]:
        topic = Topic(gen_id, 8)
        topic.offer(Frame(1, b"event: end\ndata: {}\n\n", True, 0))
        yield topic
        raise Boom("after the start")  # leaving the topic fails

    sent, raised = await call(edge_app(watch))
    assert isinstance(raised, Boom)
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[0]["status"] == 200 and sent[-1]["body"].startswith(b"event: end")



async def call_until_started(app: EdgeApp, headers: list[tuple[bytes, bytes]],
                             ) -> list[dict[str, Any]]:
    """GET the stream until its answer has started (a live stream does not end by itself)."""
    sent: list[dict[str, Any]] = []
    started = asyncio.Event()
    task = asyncio.create_task(call(app, headers, sent, started=started))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    return sent


async def test_other_methods_on_the_stream_path_are_answered_405_as_before() -> None:
    sent, raised = await call(edge_app(watching()), method="POST")
    assert raised is None
    assert sent[0]["status"] == 405
    assert body_of(sent)["error"]["code"] == "method_not_allowed"
