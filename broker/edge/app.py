"""The edge application: Starlette routes, error shapes and the hub's lifetime."""

from __future__ import annotations

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
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from broker.core.metrics import Metrics
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.edge import headers
from broker.edge.auth import ApiKeys, ViewerTokens, parse_keys
from broker.edge.errors import ApiError, error_response
from broker.edge.hub import Hub
from broker.edge.routes import Edge, routes
from broker.edge.stream import HANDOFF, EventStream, ViewerSlots

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
    edge = Edge(settings, store, hub, metrics, api_keys, viewer_tokens,
                ViewerSlots(settings.max_viewers))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            if extra_lifespan is None:
                yield
            else:
                async with extra_lifespan(app):
                    yield
        finally:
            await hub.stop()
            if redis is None:
                await client.aclose()

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    middleware = [Middleware(
        JsonCORSMiddleware, allow_origins=origins,
        # Credentials (cookies) only for named origins: never for "*".
        allow_credentials="*" not in origins,
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type", "last-event-id"],
        expose_headers=["location", "retry-after"], max_age=600,
    )] if origins else []
    app = EdgeApp(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            RedisError: _redis_error,
            Exception: _internal_error,
        },
    )
    # Starlette would redirect ``/healthz/`` to ``/healthz`` with an absolute URL built from
    # the request's Host header, which the client chooses: an unknown path is a 404 instead.
    app.router.redirect_slashes = False
    app.state.edge = edge
    return app


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, its refused preflights answered in the edge's JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        kept = {name: value for name, value in response.headers.items()
                if name not in ("content-type", "content-length")}
        reason = bytes(response.body).decode(errors="replace")  # "Disallowed CORS origin, ..."
        return error_response(response.status_code, "cors_refused",
                              f"CORS preflight refused: {reason}", kept)


class EdgeApp(Starlette):
    """The edge's app: Starlette, except that an SSE stream, once routed, is served after the
    routing and middleware it came through have returned, so each of the thousands of open
    streams holds none of their frames, send wrappers and ``Request`` objects. Not with user
    middleware (CORS): that one wraps the stream's ``send`` and must stay in its way."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        send = _with_headers(send, headers.for_path(scope["path"]))
        if self.user_middleware:
            await super().__call__(scope, receive, send)
            return
        handoff: list[EventStream] = []
        scope[HANDOFF] = handoff
        await super().__call__(scope, receive, send)
        del scope[HANDOFF]
        if handoff:
            stream = handoff.pop()
            try:
                await stream.serve(scope, receive, send)
            except Exception as exc:
                if stream.started:
                    raise  # as through Starlette: uvicorn logs it and closes the connection
                await self._answer_error(scope, receive, send, exc)

    async def _answer_error(self, scope: Scope, receive: Receive, send: Send,
                            exc: Exception) -> None:
        """What Starlette's exception middleware would answer: the handler of the nearest
        class in the error's MRO; the catch-all one (500) answers and re-raises."""
        handler = next((h for cls in type(exc).__mro__
                        if (h := self.exception_handlers.get(cls)) is not None), None)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        if response is not None:
            await response(scope, receive, send)
        if handler is self.exception_handlers.get(Exception):
            raise exc


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, adding ``extra`` to the response's headers as it starts (once per response;
    a stream's events are written past ``send`` altogether, see
    ``broker.edge.uvicorn_extensions``)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return send_with_headers


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


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _redis_error(request: Request, exc: Exception) -> Response:
    request.app.state.edge.metrics.redis_errors.labels("request").inc()
    log.warning("Redis failed during %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "redis_unavailable", "the store is unavailable; retry shortly")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error")
