"""HTTP routes of the edge (the contract in API.md)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from importlib import resources

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from broker import protocol
from broker.errors import ApiError, error_response
from broker.hub import Hub
from broker.metrics import Metrics
from broker.settings import Settings
from broker.store import Store
from broker.stream import EventStream
from broker.validation import parse_create_body, parse_last_event_id


@dataclass
class Edge:
    """What the routes share; lives on ``app.state.edge``."""

    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics


def _edge(request: Request) -> Edge:
    edge: Edge = request.app.state.edge
    return edge


def events_url(gen_id: str) -> str:
    return f"/v1/generations/{gen_id}/events"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes ``limit`` rather than after reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
    return bytes(body)


def _gen_id(request: Request) -> str:
    gen_id: str = request.path_params["gen_id"]
    if not protocol.is_generation_id(gen_id):
        raise ApiError(404, "not_found", "no such generation")
    return gen_id


async def create_generation(request: Request) -> Response:
    edge = _edge(request)
    body = await read_body(request, edge.settings.max_body_bytes)
    chat_request = parse_create_body(body, edge.settings.model)
    gen_id = protocol.new_generation_id()
    await edge.store.create(gen_id, chat_request, chat_request["model"])
    edge.metrics.generations_created.inc()
    url = events_url(gen_id)
    return JSONResponse(
        {"id": gen_id, "events_url": url, "status": "queued"},
        status_code=201,
        headers={"location": f"/v1/generations/{gen_id}"},
    )


async def get_generation(request: Request) -> Response:
    edge = _edge(request)
    gen_id = _gen_id(request)
    meta, text = await asyncio.gather(edge.store.meta(gen_id), edge.store.text(gen_id))
    if meta is None:
        raise ApiError(404, "not_found", "no such generation")
    return JSONResponse({
        "id": gen_id,
        "status": meta.status,
        "text": text,
        "finish_reason": meta.finish_reason,
        "model": meta.model,
        "created_ms": meta.created_ms,
    })


async def cancel_generation(request: Request) -> Response:
    edge = _edge(request)
    gen_id = _gen_id(request)
    before = await edge.store.cancel(gen_id)
    if not before:
        raise ApiError(404, "not_found", "no such generation")
    if before in protocol.TERMINAL_STATUSES:
        raise ApiError(409, "already_finished", f"the generation already ended ({before})")
    edge.metrics.cancels.inc()
    if before == "queued":
        edge.metrics.generations_finished.labels("cancelled").inc()
    return JSONResponse({"id": gen_id, "status": "cancelling"}, status_code=202)


async def generation_events(request: Request) -> Response:
    edge = _edge(request)
    gen_id = _gen_id(request)
    cursor = parse_last_event_id(
        request.headers.get("last-event-id"), request.query_params.get("last_event_id")
    )
    meta = await edge.store.meta(gen_id)
    if meta is None:
        raise ApiError(404, "not_found", "no such generation")
    if cursor > meta.seq:
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is beyond this stream")
    if meta.finished and cursor == meta.seq:
        return Response(status_code=204)  # tells EventSource to stop reconnecting
    if cursor:
        edge.metrics.resumes.inc()
    s = edge.settings
    return EventStream(  # type: ignore[return-value]
        edge.hub, gen_id, cursor,
        retry_ms=s.retry_ms, keepalive=s.keepalive_interval, send_timeout=s.send_timeout,
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    edge = _edge(request)
    try:
        async with asyncio.timeout(2.0):
            await edge.store.redis.ping()
    except (RedisError, OSError, TimeoutError) as e:
        edge.metrics.redis_errors.labels("readyz").inc()
        return error_response(503, "redis_unavailable", f"Redis is unreachable: {e}")
    if not edge.hub.ready():
        return error_response(
            503, "not_delivering", "the pub/sub subscription is not delivering (probe lost)"
        )
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(_edge(request).metrics.render(), media_type="text/plain; version=0.0.4")


@functools.cache
def _demo_html() -> str:
    return resources.files("broker").joinpath("static/index.html").read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_demo_html())


routes = [
    Route("/", demo_page, methods=["GET"]),
    Mount("/static", app=StaticFiles(packages=[("broker", "static")]), name="static"),
    Route("/v1/generations", create_generation, methods=["POST"]),
    Route("/v1/generations/{gen_id}", get_generation, methods=["GET"]),
    Route("/v1/generations/{gen_id}/cancel", cancel_generation, methods=["POST"]),
    Route("/v1/generations/{gen_id}/events", generation_events, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
