"""HTTP routes of the edge (the contract: docs/api.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from broker.core import logs, protocol
from broker.core.external import ExternalStore
from broker.core.metrics import Metrics
from broker.core.protocol import Meta
from broker.core.settings import Settings
from broker.core.store import Store, oldest_unended
from broker.core.tasks import SharedCalls
from broker.edge import openapi
from broker.edge.auth import (
    CONVERSATION_COOKIE_PREFIX,
    TOKEN_COOKIE_PREFIX,
    TOKEN_PARAM,
    ApiKeys,
    ViewerTokens,
    conversation_scope,
)
from broker.edge.conversation_stream import ConversationStream
from broker.edge.errors import ApiError, error_response
from broker.edge.hub import Hub
from broker.edge.leases import FirstCheck
from broker.edge.stream import EventStream, OpenStreams
from broker.edge.validation import (
    parse_conversation_last_event_id,
    parse_create_body,
    parse_external_create,
    parse_last_event_id,
    parse_stream_start,
    take_conversation_id,
)

log = logging.getLogger(__name__)


@dataclass
class Edge:
    """What the routes share; lives on ``app.state.edge``."""

    settings: Settings
    store: Store
    hub: Hub
    metrics: Metrics
    api_keys: ApiKeys
    viewer_tokens: ViewerTokens
    open_streams: OpenStreams  # BROKER_MAX_VIEWERS, the send watch
    _meta_reads: SharedCalls[str, tuple[Meta | None, FirstCheck | None]] = field(
        default_factory=SharedCalls)

    async def stream_meta(
        self, gen_id: str, cursor: int
    ) -> tuple[Meta | None, FirstCheck | None]:
        """The generation's meta for a stream request, and the check of its lease made in the
        same call (``Store.stream_meta``: the topic's lease watch starts from it rather than
        checking again); no check (None) when this edge watches its lease already. Requests
        that arrive together (a resume storm, a crowd joining) share one read; an answer that
        would refuse the request (no such id, a cursor past its end) may predate this
        request's arrival, so it is read again for this request alone."""
        (meta, check), shared = await self._meta_reads.get(
            gen_id, lambda: self._read_stream_meta(gen_id))
        if shared and (meta is None or cursor > meta.seq):
            # No check with it: the shared one may be of before the generation existed (a
            # watch started from "gone" would drop the topic); the lease watch checks at once.
            return await self.store.meta(gen_id), None
        return meta, check

    async def _read_stream_meta(self, gen_id: str) -> tuple[Meta | None, FirstCheck | None]:
        via = self.hub.caller()
        if gen_id in self.hub.topics:
            # A viewer here watches it: its lease watch runs, the plain read costs Redis less.
            return await self.store.meta(gen_id, via), None
        leases = self.hub.leases
        meta, check = await self.store.stream_meta(gen_id, leases.name,
                                                   self.hub.healthy_for(gen_id), via)
        leases.checked(gen_id, check)
        return meta, FirstCheck(check, time.monotonic())

    def events_url(self, gen_id: str) -> str:
        """The stream's URL as a browser will open it: with a viewer token when tokens are on."""
        url = f"/v1/generations/{gen_id}/events"
        if self.viewer_tokens.enabled:
            url += f"?{TOKEN_PARAM}={self.viewer_tokens.issue(gen_id)}"
        return url

    def conversation_url(self, cid: str) -> str:
        """A conversation's stream URL, with a token for that conversation alone when tokens
        are on."""
        url = f"/v1/conversations/{cid}/events"
        if self.viewer_tokens.enabled:
            url += f"?{TOKEN_PARAM}={self.viewer_tokens.issue(conversation_scope(cid))}"
        return url

    @functools.cached_property
    def external(self) -> ExternalStore:
        """External producers' generations (``broker.edge.producers``)."""
        return ExternalStore(self.store)

    def authorize_producer(self, request: Request) -> str | None:
        """Refuse (401) a caller without a valid API key; the id of its key (None when keys
        are off)."""
        return self.api_keys.check(request.headers.get("authorization"))


def _edge(request: Request) -> Edge:
    edge: Edge = request.app.state.edge
    return edge


async def read_body(request: Request, limit: int, within: float) -> bytes:
    """The body, refusing (413) as soon as it passes ``limit`` rather than after reading it all,
    and (408) past ``within`` seconds: a trickling client holds nothing for long."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is larger than {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(within):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(
                        413, "body_too_large", f"request body is larger than {limit} bytes"
                    )
    except TimeoutError as e:
        raise ApiError(408, "request_timeout", f"the body took longer than {within:g}s") from e
    return bytes(body)


def _gen_id(request: Request) -> str:
    gen_id: str = request.path_params["gen_id"]
    if not protocol.is_generation_id(gen_id):
        raise ApiError(404, "not_found", "no such generation")
    return gen_id


async def create_generation(request: Request) -> Response:
    edge = _edge(request)
    s = edge.settings
    producer = edge.authorize_producer(request)
    body = await read_body(request, s.max_body_bytes, s.request_timeout)
    external = parse_external_create(body, s.model)
    if external is not None:
        from broker.edge.producers import create_external  # (it imports this module)

        return await create_external(edge, producer, *external)
    chat_request = parse_create_body(
        body, s.model, max_messages=s.max_messages, max_content_chars=s.max_content_chars
    )
    conversation = take_conversation_id(chat_request)
    gen_id = await queue_generation(edge, producer, chat_request, conversation)
    answer = {"id": gen_id, "events_url": edge.events_url(gen_id), "status": "queued"}
    if conversation:
        answer |= {"conversation_id": conversation,
                   "conversation_url": edge.conversation_url(conversation)}
    return JSONResponse(
        answer,
        status_code=201,
        headers={"location": f"/v1/generations/{gen_id}"},
    )


async def queue_generation(
    edge: Edge, producer: str | None, chat_request: dict[str, Any], conversation: str | None
) -> str:
    """Create a generation of the validated ``chat_request`` for the workers to run (a turn of
    ``conversation``, if given), within ``producer``'s queue quota (429 past it); its id. The
    one create path: ``POST /v1/generations`` and the AI SDK's ``POST /v1/ai-sdk/chat``."""
    s = edge.settings
    gen_id = protocol.new_generation_id()
    logs.generation.set(gen_id)
    if producer and not await edge.store.reserve_queue_slot(
        producer, gen_id, s.max_queued_per_key
    ):
        raise ApiError(
            429, "too_many_queued",
            f"this API key already has {s.max_queued_per_key} generations waiting for a worker",
            headers={"retry-after": "1"},
        )
    try:
        await edge.store.create(gen_id, chat_request, chat_request["model"], producer,
                                conversation)
    except BaseException:
        if producer:
            with contextlib.suppress(RedisError, OSError):
                await edge.store.release_queue_slot(producer, gen_id)
        raise
    edge.metrics.generations_created.inc()
    log.info("created generation %s (model %s)", gen_id, chat_request["model"])
    if s.log_prompts:  # asked for explicitly: prompts are private by default
        log.info("generation %s prompt: %s", gen_id,
                 json.dumps(chat_request["messages"], ensure_ascii=False))
    return gen_id


async def get_generation(request: Request) -> Response:
    edge = _edge(request)
    edge.authorize_producer(request)
    gen_id = _gen_id(request)
    snapshot = await edge.store.snapshot(gen_id)
    # A running generation's worker may be gone with no other left to notice: a lease that ran
    # out ends the generation now, and the answer says so instead of `running` until a worker
    # returns.
    if (snapshot is not None and snapshot.meta.status == "running"
            and await edge.hub.leases.reaped(gen_id)):
        snapshot = await edge.store.snapshot(gen_id)
    if snapshot is None:
        raise ApiError(404, "not_found", "no such generation")
    meta = snapshot.meta
    return JSONResponse({
        "id": gen_id,
        "status": meta.status,
        "text": snapshot.text,
        "reasoning": snapshot.reasoning,
        "tool_calls": snapshot.tool_calls,
        "events": meta.event_counts(),
        "finish_reason": meta.finish_reason,
        "model": meta.model,
        "created_ms": meta.created_ms,
        # A producer may hand a viewer the stream later, or again (a fresh token each time).
        "events_url": edge.events_url(gen_id),
        **_external_fields(meta),
    })


def _external_fields(meta: Meta) -> dict[str, object]:
    """What an external producer's generation shows besides: who produces it, its metadata."""
    if meta.source != protocol.SOURCE_EXTERNAL:
        return {}
    return {"producer": meta.source,
            "metadata": json.loads(meta.metadata) if meta.metadata else {}}


async def cancel_generation(request: Request) -> Response:
    edge = _edge(request)
    edge.authorize_producer(request)
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


# GET (and HEAD) of a generation's events: ``broker.edge.app.EdgeApp`` routes these itself,
# before Starlette, and serves the stream ``open_stream`` answers.
_STREAM_PATH = re.compile(r"/v1/generations/([^/]+)/events")


def stream_route(scope: Scope) -> str | None:
    """The generation id of a request for its event stream; None for any other request."""
    if scope["method"] not in ("GET", "HEAD"):
        return None
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    match = _STREAM_PATH.fullmatch(path)
    return None if match is None else match[1]


async def open_stream(edge: Edge, request: Request, gen_id: str) -> EventStream | Response:
    """Authorize and validate a stream request: the stream to serve (it holds a viewer slot),
    a 204 when there is nothing left to send, or an ``ApiError``."""
    # The token first: without one, no answer may tell whether the id exists.
    edge.viewer_tokens.check(
        request.query_params.get(TOKEN_PARAM) or request.cookies.get(TOKEN_COOKIE_PREFIX + gen_id),
        gen_id,
    )
    if not protocol.is_generation_id(gen_id):
        raise ApiError(404, "not_found", "no such generation")
    slot = edge.open_streams.take()
    if slot is None:
        raise ApiError(
            503, "too_many_viewers", "this edge serves as many streams as it may; retry shortly",
            headers={"retry-after": "5"},
        )
    stream: EventStream | None = None
    try:
        cursor = parse_last_event_id(
            request.headers.get("last-event-id"), request.query_params.get("last_event_id")
        )
        meta, lease_check = await edge.stream_meta(gen_id, cursor)
        if meta is None:
            raise ApiError(404, "not_found", "no such generation")
        if cursor > meta.seq:
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is beyond this stream")
        if meta.finished and cursor == meta.seq:
            return Response(status_code=204)  # tells EventSource to stop reconnecting
        if cursor:
            edge.metrics.resumes.inc()
        s = edge.settings
        stream = EventStream(
            edge.hub, gen_id, cursor,
            retry_ms=s.retry_ms, keepalive=s.keepalive_interval, send_timeout=s.send_timeout,
            max_seconds=s.max_stream_seconds, slot=slot, lease_check=lease_check,
        )
        return stream
    finally:
        if stream is None:  # no stream to hand the slot to: refused, ended, or failed
            slot.release()


async def generation_events(request: Request) -> Response:
    """Never called: ``EdgeApp`` serves GET and HEAD of this path before routing. The route is
    here so that other methods are answered 405 (and the path is listed with the others)."""
    raise RuntimeError("the event stream is served by EdgeApp before routing")


def _conversation_id(request: Request) -> str:
    cid: str = request.path_params["cid"]
    if not protocol.is_conversation_id(cid):
        raise ApiError(404, "not_found", "no such conversation")
    return cid


async def get_conversation(request: Request) -> Response:
    edge = _edge(request)
    edge.authorize_producer(request)
    cid = _conversation_id(request)
    # A conversation with no turn yet answers too: its devices may open the stream before
    # the first turn (`broker tail --conversation` does), and need its token to.
    turns = await edge.store.conversation_turns(cid)
    statuses = await edge.store.turn_statuses(turns)
    active = oldest_unended(turns, statuses)
    return JSONResponse({
        "id": cid,
        "turns": [{"generation_id": turn.gen_id, "turn": turn.number,
                   "status": status or "expired"}
                  for turn, status in zip(turns, statuses, strict=True)],
        "active": None if active is None else active.gen_id,
        "events_url": edge.conversation_url(cid),
    })


async def conversation_events(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/conversations/{cid}/events`` (an ASGI app: the stream is its own answer).
    Errors before the stream starts reach the exception handlers, as any route's."""
    request = Request(scope, receive)
    edge = _edge(request)
    cid: str = request.path_params["cid"]
    # The token first: without one, no answer may tell anything about the conversation.
    edge.viewer_tokens.check(
        request.query_params.get(TOKEN_PARAM)
        or request.cookies.get(CONVERSATION_COOKIE_PREFIX + cid),
        conversation_scope(cid),
    )
    cid = _conversation_id(request)
    after = parse_conversation_last_event_id(
        request.headers.get("last-event-id"), request.query_params.get("last_event_id")
    )
    start = parse_stream_start(request.query_params.get("from"))
    if after is not None:
        await _check_conversation_resume(edge.store, cid, after)
    slot = edge.open_streams.take()
    if slot is None:
        raise ApiError(
            503, "too_many_viewers", "this edge serves as many streams as it may; retry shortly",
            headers={"retry-after": "5"},
        )
    if after is not None:
        edge.metrics.resumes.inc()
    s = edge.settings
    stream = ConversationStream(
        edge.hub, cid, after, start, retry_ms=s.retry_ms, keepalive=s.keepalive_interval,
        send_timeout=s.send_timeout, max_seconds=s.max_stream_seconds, slot=slot,
    )
    await stream.serve(scope, receive, send)  # gives the slot back when it ends


async def _check_conversation_resume(store: Store, cid: str, after: tuple[int, int]) -> None:
    """400 for a resume point the conversation never had: a turn past its newest, or an event
    past its turn's last. Followed from there, the stream would skip every turn (or event) up
    to it without a word, as a generation stream refuses an id beyond its log."""
    number, seq = after
    turn = await store.conversation_turn(cid, number)  # (the index keeps every turn: 1, 2, ...)
    if turn is None:
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is beyond this conversation")
    meta = await store.meta(turn.gen_id)
    if meta is not None and seq > meta.seq:
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is beyond its turn")


class AsgiEndpoint:
    """A route's endpoint that answers itself (Starlette calls a plain function with a
    ``Request`` and expects a ``Response`` back; an instance is called as an ASGI app)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    edge = _edge(request)
    try:
        async with asyncio.timeout(2.0):
            await edge.store.redis.ping()
    except (RedisError, OSError, TimeoutError) as e:
        edge.metrics.redis_errors.labels("readyz").inc()
        # The error names Redis's address: for the operator's log, not for anyone who asks.
        log.warning("not ready: Redis is unreachable: %s", e)
        return error_response(503, "redis_unavailable", "Redis is unreachable")
    if not edge.hub.ready():
        return error_response(
            503, "not_delivering", "the pub/sub subscription is not delivering (probe lost)"
        )
    return JSONResponse({"status": "ready"})


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document(_edge(request).settings))


async def metrics(request: Request) -> Response:
    return Response(_edge(request).metrics.render(), media_type="text/plain; version=0.0.4")


@functools.cache
def _demo_html() -> str:
    return resources.files("broker.edge").joinpath("static/index.html").read_text(encoding="utf-8")


async def demo_page(request: Request) -> Response:
    return HTMLResponse(_demo_html())


routes = [
    Route("/", demo_page, methods=["GET"]),
    Mount("/static", app=StaticFiles(packages=[("broker.edge", "static")]), name="static"),
    Route("/v1/generations", create_generation, methods=["POST"]),
    Route("/v1/generations/{gen_id}", get_generation, methods=["GET"]),
    Route("/v1/generations/{gen_id}/cancel", cancel_generation, methods=["POST"]),
    Route("/v1/generations/{gen_id}/events", generation_events, methods=["GET"]),
    Route("/v1/conversations/{cid}", get_conversation, methods=["GET"]),
    Route("/v1/conversations/{cid}/events", AsgiEndpoint(conversation_events), methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]
