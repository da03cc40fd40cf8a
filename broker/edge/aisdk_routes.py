"""The AI SDK's chat endpoints (``useChat`` / ``Chat`` with ``DefaultChatTransport``; the
contract: docs/api.md, "AI SDK"): ``POST /v1/ai-sdk/chat`` runs a turn of the chat and answers
its UI message stream; ``GET /v1/ai-sdk/chat/{id}/stream`` answers the chat's active turn's
from its start (what ``resume: true`` calls after a reload), on any edge.

Both stream through the edge's own machinery (``EventStream``: the hub's one subscription per
generation, the topic's window and log reads, keepalives, slow-viewer and disconnect
handling), only framed in the SDK's chunks (``broker.edge.aisdk``)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from broker.core import protocol, sse
from broker.edge import aisdk
from broker.edge.auth import CONVERSATION_COOKIE_PREFIX, TOKEN_PARAM, conversation_scope
from broker.edge.errors import ApiError
from broker.edge.hub import Hub
from broker.edge.routes import Edge, queue_generation, read_body
from broker.edge.stream import EventStream, ViewerSlot
from broker.edge.topic import Frame


class UIMessageEventStream(EventStream):
    """A generation's events from its first, as the AI SDK's UI message stream.

    The fan-out never writes to it directly (its frames are the topic's SSE bytes, not these
    chunks): it follows the topic from its own task. It has no maximum duration either: the
    SDK's client does not reconnect by itself, so a stream cut short would leave the message
    unfinished."""

    headers = aisdk.UI_MESSAGE_STREAM_HEADERS
    direct_writes = False
    __slots__ = ("_ui",)

    def __init__(self, hub: Hub, gen_id: str, ui: aisdk.UIMessageStream, *, keepalive: float,
                 send_timeout: float, slot: ViewerSlot) -> None:
        super().__init__(hub, gen_id, 0, retry_ms=0, keepalive=keepalive,
                         send_timeout=send_timeout, slot=slot)
        self._ui = ui

    def opening(self) -> bytes:
        return aisdk.encode(self._ui.start())

    def encode(self, frames: list[Frame]) -> bytes:
        chunks: list[aisdk.Chunk] = []
        for frame in frames:
            # The topic holds each event as the SSE bytes of the generation stream; read back
            # by the SSE decoder (one event a frame), its type is the event's kind.
            for event in sse.SSEEventDecoder().feed(frame.data):
                if event.event in protocol.EVENT_KINDS:
                    chunks += self._ui.event(frame.seq, event.event, json.loads(event.data))
        return aisdk.encode(chunks) + (aisdk.DONE if self._ui.done else b"")

    def lost(self, message: str) -> bytes:
        error = {"type": "error", "errorText": f"history_lost: {message}"}
        return aisdk.encode([error]) + aisdk.DONE


class _Served(Response):
    """A stream as the response of a Starlette route (which calls it as an ASGI app)."""

    def __init__(self, stream: UIMessageEventStream) -> None:  # (no body, no headers yet)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream.serve(scope, receive, send)


def _slot(edge: Edge) -> ViewerSlot:
    slot = edge.open_streams.take()
    if slot is None:
        raise ApiError(
            503, "too_many_viewers", "this edge serves as many streams as it may; retry shortly",
            headers={"retry-after": "5"},
        )
    return slot


def _stream(edge: Edge, slot: ViewerSlot, gen_id: str, message_id: str,
            tool_calls: frozenset[str] = frozenset()) -> Response:
    s = edge.settings
    return _Served(UIMessageEventStream(
        edge.hub, gen_id, aisdk.UIMessageStream(message_id, tool_calls),
        keepalive=s.keepalive_interval, send_timeout=s.send_timeout, slot=slot,
    ))


async def chat(request: Request) -> Response:
    edge: Edge = request.app.state.edge
    s = edge.settings
    producer = edge.authorize_producer(request)
    body = await read_body(request, s.max_body_bytes, s.request_timeout)
    turn = aisdk.parse_chat_body(
        body, s.model, max_messages=s.max_messages, max_content_chars=s.max_content_chars
    )
    # The stream's place first: a turn is created only if its answer can be streamed (else
    # the 503's retry would make it twice, and an answer nobody reads would run).
    slot = _slot(edge)
    try:
        gen_id = await queue_generation(edge, producer, turn.request, turn.chat_id)
    except BaseException:
        slot.release()
        raise
    # The answer's message: the generation's id, or the assistant message it continues (as
    # the SDK's own servers answer, ``getResponseUIMessageId``: the client then extends that
    # message instead of adding a copy of it). A resume says the generation's id either way:
    # a reloaded page's client rebuilds the turn as a message of its own.
    if turn.continues is None:
        return _stream(edge, slot, gen_id, gen_id)
    return _stream(edge, slot, gen_id, turn.continues, turn.continued_calls)


async def resume(request: Request) -> Response:
    """Auth: the producer's API key (``Authorization``: the transport sends its ``headers``
    on this request too) or, without that header, the chat's conversation viewer token
    (``?token=``, e.g. set by ``prepareReconnectToStreamRequest``, or the conversation's
    cookie, as ``GET /v1/conversations/{cid}/events`` takes it) as a page may hold one.
    Open when API keys are off, as the chat's ``POST`` is."""
    edge: Edge = request.app.state.edge
    chat_id: str = request.path_params["chat_id"]
    by_token = edge.api_keys.enabled and edge.viewer_tokens.enabled
    if not by_token or "authorization" in request.headers:
        edge.authorize_producer(request)
    else:
        edge.viewer_tokens.check(
            request.query_params.get(TOKEN_PARAM)
            or request.cookies.get(CONVERSATION_COOKIE_PREFIX + chat_id),
            conversation_scope(chat_id),
        )
    if not protocol.is_conversation_id(chat_id):
        raise ApiError(404, "not_found", "no such chat")
    gen_id = await edge.store.active_turn(chat_id)
    if gen_id is None:
        return Response(status_code=204)  # the transport: no active stream, nothing to resume
    if request.method == "HEAD":  # the headers alone: a stream would run on with no reader
        return Response(headers={k.decode(): v.decode()
                                 for k, v in aisdk.UI_MESSAGE_STREAM_HEADERS})
    return _stream(edge, _slot(edge), gen_id, gen_id)


routes: list[BaseRoute] = [
    Route("/v1/ai-sdk/chat", chat, methods=["POST"]),
    Route("/v1/ai-sdk/chat/{chat_id}/stream", resume, methods=["GET"]),
]
