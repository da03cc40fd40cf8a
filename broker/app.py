"""The edge application: Starlette routes, error shapes and the hub's lifetime."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from broker.api import Edge, routes
from broker.errors import ApiError, error_response
from broker.hub import Hub
from broker.metrics import Metrics
from broker.settings import Settings
from broker.store import Store, connect

log = logging.getLogger(__name__)

Lifespan = Callable[[Starlette], contextlib.AbstractAsyncContextManager[Any]]


def create_app(
    settings: Settings,
    redis: aioredis.Redis | None = None,
    metrics: Metrics | None = None,
    extra_lifespan: Lifespan | None = None,
) -> Starlette:
    """The edge. ``redis`` defaults to ``settings.redis_url``; ``extra_lifespan`` runs inside the
    edge's own (``broker dev`` starts its worker there)."""
    metrics = metrics or Metrics()
    client = redis if redis is not None else connect(settings, f"broker-edge-{os.getpid()}")
    store = Store(client, settings)
    hub = Hub(
        store, metrics, window=settings.replay_window, audit_interval=settings.keepalive_interval,
        probe_interval=settings.probe_interval,
    )
    edge = Edge(settings, store, hub, metrics)

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

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            RedisError: _redis_error,
            Exception: _internal_error,
        },
    )
    app.state.edge = edge
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message)


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
