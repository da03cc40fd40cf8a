"""The producer API: an application's own loop publishes into a generation (docs/api.md,
"Producers"). ``POST /v1/generations`` with ``{"producer": "external"}`` creates one
(``routes.create_generation`` hands it to ``create_external``); append, finish and heartbeat
are here, and so is the edge's sweep of the producers' leases.

Who may write: the API key that created the generation, and only it (the meta's
``producer``; when keys are off, anyone who knows the id). A viewer token never lets anyone
write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.core import logs, protocol
from broker.core.external import ProducerReply
from broker.edge.errors import ApiError
from broker.edge.routes import Edge, _edge, _gen_id, read_body
from broker.edge.validation import parse_append_body, parse_finish_body

log = logging.getLogger(__name__)


def _urls(gen_id: str) -> dict[str, str]:
    base = f"/v1/generations/{gen_id}"
    return {"append_url": base + "/append", "finish_url": base + "/finish",
            "heartbeat_url": base + "/heartbeat"}


async def create_external(
    edge: Edge, producer: str | None, model: str, metadata: dict[str, Any],
    conversation: str | None,
) -> Response:
    """A running generation for an external producer (the next turn of ``conversation``, if
    given); its lease starts now."""
    gen_id = protocol.new_generation_id()
    logs.generation.set(gen_id)
    lease = edge.settings.producer_lease
    await edge.external.create(gen_id, model=model, lease=lease, producer=producer,
                               metadata=metadata, conversation=conversation)
    edge.metrics.generations_created.inc()
    log.info("created generation %s for an external producer", gen_id)
    answer: dict[str, Any] = {"id": gen_id, "events_url": edge.events_url(gen_id),
                              "status": "running", **_urls(gen_id), "lease_seconds": lease}
    if conversation:
        answer |= {"conversation_id": conversation,
                   "conversation_url": edge.conversation_url(conversation)}
    return JSONResponse(answer, status_code=201,
                        headers={"location": f"/v1/generations/{gen_id}"})


def _refusal(reply: ProducerReply) -> Response:
    """The answer to an outcome that applied nothing new (other than a retry)."""
    outcome, count = reply.outcome, reply.count
    if outcome == "gone":
        raise ApiError(404, "not_found", "no such generation")
    if outcome == "forbidden":
        raise ApiError(403, "forbidden", "only the API key that created this generation may "
                       "write to it")
    if outcome == "not_external":
        raise ApiError(409, "not_external", "this generation is run by the broker's worker, "
                       "not by an external producer")
    if outcome == "offset_mismatch":
        code, message = outcome, (f"'after' must be the number of events you appended: "
                                  f"{count} (see 'count')")
    elif outcome == "cancelled":
        code, message = "cancelled", "the generation was cancelled: stop producing"
    elif outcome == "failed":
        code, message = "already_finished", "the generation ended with an error (a lapsed " \
            "lease ends it with producer_lost)"
    else:
        code, message = "already_finished", f"the generation already ended ({outcome})"
    return JSONResponse({"error": {"code": code, "message": message}, "count": count},
                        status_code=409)


async def _writer(request: Request) -> tuple[Edge, str, str | None, bytes]:
    edge = _edge(request)
    producer = edge.authorize_producer(request)
    gen_id = _gen_id(request)
    logs.generation.set(gen_id)
    body = await read_body(request, edge.settings.max_body_bytes, edge.settings.request_timeout)
    return edge, gen_id, producer, body


async def append_events(request: Request) -> Response:
    edge, gen_id, producer, body = await _writer(request)
    after, events = parse_append_body(body)
    reply = await edge.external.append(gen_id, producer, after, events)
    if reply.outcome not in ("ok", "duplicate"):
        return _refusal(reply)
    return JSONResponse({"count": reply.count})


async def finish_generation(request: Request) -> Response:
    edge, gen_id, producer, body = await _writer(request)
    terminal = parse_finish_body(body)
    reply = await edge.external.finish(gen_id, producer, terminal)
    if reply.outcome not in ("ok", "same"):
        return _refusal(reply)
    if reply.outcome == "ok":
        edge.metrics.generations_finished.labels(terminal.final_status).inc()
    return JSONResponse({"id": gen_id, "status": terminal.final_status,
                         "finish_reason": terminal.finish_reason, "count": reply.count})


async def heartbeat(request: Request) -> Response:
    edge, gen_id, producer, _ = await _writer(request)
    reply = await edge.external.heartbeat(gen_id, producer)
    if reply.outcome != "running":
        return _refusal(reply)
    return JSONResponse({"status": "running", "count": reply.count})


async def sweep_forever(edge: Edge) -> None:
    """Every ``BROKER_PROBE_INTERVAL``, check the producer leases that are due (every edge and
    worker does; Redis arbitrates, so a lapsed one ends once). The check is the lease watch's,
    with this edge's view of Redis's health."""
    interval = edge.settings.probe_interval
    while True:
        await asyncio.sleep(interval)
        try:
            await edge.external.sweep(edge.hub.leases.check, hold=4 * interval)
        except (RedisError, OSError, protocol.ProtocolError) as e:
            log.warning("sweeping the producers' leases failed (%r); retrying", e)


routes = [
    Route("/v1/generations/{gen_id}/append", append_events, methods=["POST"]),
    Route("/v1/generations/{gen_id}/finish", finish_generation, methods=["POST"]),
    Route("/v1/generations/{gen_id}/heartbeat", heartbeat, methods=["POST"]),
]
