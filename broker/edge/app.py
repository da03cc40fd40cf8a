"""The edge application: the event stream's pre-router, Starlette for every other route, the
error shapes and the hub's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.core.metrics import Metrics
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.core.tasks import cancel_and_wait
from broker.edge import aisdk_routes, headers, producers
from broker.edge.auth import ApiKeys, ViewerTokens, parse_keys
from broker.edge.cors import CorsPolicy
from broker.edge.errors import ApiError, error_response
from broker.edge.hub import Hub
from broker.edge.routes import Edge, open_stream, routes, stream_route
from broker.edge.stream import EventStream, OpenStreams

log = logging.getLogger(__name__)

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[Any]]


def create_app(
    settings: Settings,
    redis: aioredis.Redis | None = None,
    metrics: Metrics | None = None,
    extra_lifespan: Lifespan | None = None,
    dev: bool = False,
) -> Starlette:
    """The edge. ``redis`` defaults to ``settings.redis_url``; ``extra_lifespan`` runs inside the
    edge's own (``broker dev`` starts its worker there). Refuses (``InsecureConfig``) to run
    without API keys and viewer-token keys unless ``settings.insecure`` or ``dev``."""
    api_keys, viewer_tokens = _credentials(settings, dev)
    metrics = metrics or Metrics()
    client = redis if redis is not None else connect(settings, f"broker-edge-{os.getpid()}")
    store = Store(client, settings)
    hub = Hub(
        store, metrics, window=settings.replay_window, audit_interval=settings.keepalive_interval,
        probe_interval=settings.probe_interval,
        name=f"edge-{socket.gethostname()}-{os.getpid()}",
    )
    open_streams = OpenStreams(settings.max_viewers)
    edge = Edge(settings, store, hub, metrics, api_keys, viewer_tokens, open_streams)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        send_watch = asyncio.create_task(open_streams.watch_sends_forever(), name="send-watch")
        sweep = asyncio.create_task(producers.sweep_forever(edge), name="producer-sweep")
        try:
            if extra_lifespan is None:
                yield
            else:
                async with extra_lifespan(app):
                    yield
        finally:
            await cancel_and_wait(send_watch, sweep)
            await hub.stop()
            if redis is None:
                await client.aclose()

    cors = CorsPolicy(settings.cors_origins)
    app = EdgeApp(
        routes=[*routes, *aisdk_routes.routes, *producers.routes],
        lifespan=lifespan,
        middleware=cors.middleware(),
        exception_handlers={
            ApiError: _error_handler,
            HTTPException: _error_handler,
            RedisError: _error_handler,
            Exception: _error_handler,
        },
    )
    # Starlette would redirect ``/healthz/`` to ``/healthz`` with an absolute URL built from
    # the request's Host header, which the client chooses: an unknown path is a 404 instead.
    app.router.redirect_slashes = False
    app.state.edge = edge
    app.cors = cors
    return app


class EdgeApp(Starlette):
    """The edge's app. The event stream is routed here, before Starlette: authorized,
    validated and served by ``__call__`` itself (its errors mapped to the JSON error answers by
    ``error_answer``, its CORS and security headers added as its answer starts), so each of the
    thousands of open streams holds no routing or middleware frames, send wrappers or
    ``Request`` objects, with or without CORS. Every other request goes through Starlette
    (routes, the CORS middleware, the exception handlers, which map errors the same way)."""

    cors = CorsPolicy("")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        page_headers = headers.for_path(scope["path"])
        gen_id = stream_route(scope)
        if gen_id is None:
            await super().__call__(scope, receive, _with_headers(send, page_headers))
            return
        cors = await self.cors.simple_headers(scope)
        extra = [*page_headers, *cors] if cors else page_headers
        # Served from here, in this frame: an open stream holds no frame more than it must,
        # nor a send wrapper (the stream adds ``extra`` to its own start).
        edge: Edge = self.state.edge
        try:
            answer = await open_stream(edge, Request(scope, receive), gen_id)
        except Exception as exc:
            await _answer_error(edge, exc, scope, receive, _with_headers(send, extra))
            return
        if not isinstance(answer, EventStream):
            await answer(scope, receive, _with_headers(send, extra))  # 204: ended at the cursor
            return
        # Every request header the stream needs was read (token, Last-Event-ID, Origin): an
        # open stream keeps none of them (a browser's are a kilobyte or more, held for hours).
        request_headers = scope.get("headers")
        if isinstance(request_headers, list):
            request_headers.clear()
        try:
            await answer.serve(scope, receive, send, extra)
        except Exception as exc:
            if answer.started:
                raise  # uvicorn logs it and closes the connection
            await _answer_error(edge, exc, scope, receive, _with_headers(send, extra))


async def _answer_error(edge: Edge, exc: Exception, scope: Scope, receive: Receive,
                        send: Send) -> None:
    response, unexpected = error_answer(edge, exc, scope["method"], scope["path"])
    await response(scope, receive, send)
    if unexpected:
        raise exc  # as Starlette's ServerErrorMiddleware does: the server logs it too


def error_answer(edge: Edge, exc: Exception, method: str, path: str) -> tuple[Response, bool]:
    """The JSON error answer to ``exc``, and whether it was unexpected (a 500: the error goes
    on up once answered). One mapping for the stream and, through the exception handlers,
    for every other route."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers), False
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail)), False
    if isinstance(exc, RedisError):
        edge.metrics.redis_errors.labels("request").inc()
        log.warning("Redis failed during %s %s: %s", method, path, exc)
        return error_response(503, "redis_unavailable",
                              "the store is unavailable; retry shortly"), False
    log.error("unhandled error in %s %s", method, path, exc_info=exc)
    return error_response(500, "internal_error", "internal error"), True


_with_headers = headers.with_headers


class InsecureConfig(SystemExit):
    """The edge would serve without auth, and nobody said that is intended."""


def _credentials(settings: Settings, dev: bool) -> tuple[ApiKeys, ViewerTokens]:
    api_keys = ApiKeys(parse_keys(settings.api_keys, settings.api_keys_file))
    token_keys = parse_keys(settings.viewer_token_keys)
    if dev and not token_keys:
        # An ephemeral key: dev mode exercises viewer tokens with no set-up (they die with it).
        token_keys = [secrets.token_urlsafe(32)]
    viewer_tokens = ViewerTokens(token_keys, settings.viewer_token_ttl)
    missing = [name for name, ok in (("BROKER_API_KEYS", api_keys.enabled),
                                     ("BROKER_VIEWER_TOKEN_KEYS", viewer_tokens.enabled)) if not ok]
    if missing and not (settings.insecure or dev):
        raise InsecureConfig(
            f"refusing to start: {' and '.join(missing)} not set, so anyone could create, read "
            "and watch generations. Set them (see docs/security.md), or pass --insecure "
            "(BROKER_INSECURE=1) to run open on a trusted network."
        )
    if viewer_tokens.enabled and settings.viewer_token_ttl <= settings.max_stream_seconds:
        log.warning("BROKER_VIEWER_TOKEN_TTL (%gs) is not longer than BROKER_MAX_STREAM_SECONDS "
                    "(%gs): a stream cut at its maximum duration cannot resume with its token",
                    settings.viewer_token_ttl, settings.max_stream_seconds)
    if dev:
        return api_keys, viewer_tokens  # broker.tools.dev says in its own words what is open
    if not api_keys.enabled:
        log.warning("INSECURE: no API keys: anyone who reaches this edge may create, read and "
                    "cancel generations")
    if not viewer_tokens.enabled:
        log.warning("INSECURE: no viewer-token keys: anyone who knows a generation id may "
                    "watch its stream")
    return api_keys, viewer_tokens


async def _error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's exception handlers (and its ServerErrorMiddleware, for ``Exception``, which
    re-raises once answered): ``error_answer``."""
    return error_answer(request.app.state.edge, exc, request.method, request.url.path)[0]
