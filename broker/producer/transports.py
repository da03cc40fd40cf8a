"""How a producer's events reach the broker: over an edge's HTTP API, or straight to Redis.

Both speak the same four operations with the same outcomes (``broker.core.external``'s
scripts answer them in both cases: over HTTP the edge runs them for you), so ``Producer``
does not care which it has.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core import protocol
from broker.core.backoff import Backoff
from broker.core.external import ExternalStore, ProducerReply
from broker.core.protocol import NewEvent
from broker.core.settings import Settings
from broker.core.store import RedisClient, Store, connect

# How long an operation is retried through connection failures and 5xx answers before it
# gives up (a retry is harmless: appends are idempotent by ``after``, finish by its event).
RETRY_DEADLINE = 30.0


class ProducerError(Exception):
    """The broker refused an operation (``code``: its error code)."""

    def __init__(self, code: str, message: str, count: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.count = count


class Cancelled(ProducerError):
    """The generation was cancelled (a viewer's app called cancel): stop producing. It has
    already ended, with ``finish_reason: "cancelled"``."""


class GenerationEnded(ProducerError):
    """The generation ended otherwise: finished already, or its lease lapsed
    (``producer_lost``)."""


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    events_url: str  # relative to the edge (with a viewer token when tokens are on)
    lease: float  # seconds the lease lasts without an append or a heartbeat
    conversation_url: str | None = None  # its conversation's stream, if it is a turn of one


class Transport(Protocol):
    async def create(self, model: str | None, metadata: dict[str, Any] | None,
                     conversation: str | None = None) -> Created: ...

    async def append(self, gen_id: str, after: int, events: Sequence[NewEvent]) -> int:
        """The producer's count after the batch; raises ``ProducerError``s."""
        ...

    async def heartbeat(self, gen_id: str) -> None: ...

    async def finish(self, gen_id: str, terminal: NewEvent) -> None: ...

    async def aclose(self) -> None: ...


def _raise_for(code: str, message: str, count: int | None) -> None:
    if code == "cancelled":
        raise Cancelled(code, message, count)
    if code == "already_finished":
        raise GenerationEnded(code, message, count)
    raise ProducerError(code, message, count)


# -- over HTTP ------------------------------------------------------------------------------

def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object; None when it has none (an empty 204, or what something
    between us and the edge answered itself: a load balancer's HTML error page)."""
    if not response.content:
        return {} if response.is_success else None
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class HttpTransport:
    """An edge's producer API (docs/api.md, "Producers"), with ``httpx``. Connection failures,
    timeouts and 5xx answers are retried with backoff for ``RETRY_DEADLINE`` seconds, with the
    same ``after`` (a retried append that had landed is a no-op). A create is retried only
    through connection failures: it is not idempotent."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 client: httpx.AsyncClient | None = None, timeout: float = 10.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_client = client is None
        self.http = client or httpx.AsyncClient(timeout=timeout)
        self.base_url = base_url.rstrip("/")
        self.headers = headers

    async def _post(self, path: str, body: Any, *, idempotent: bool = True) -> dict[str, Any]:
        """``idempotent=False`` (a create): retried only when the request never went out (a
        retry after it did may make a second generation, a second turn of a conversation that
        nobody produces)."""
        deadline = time.monotonic() + RETRY_DEADLINE
        backoff = Backoff(first=0.05, cap=1.0)
        content = None if body is None else json.dumps(body, ensure_ascii=False,
                                                         allow_nan=False).encode()
        headers = {**self.headers, "content-type": "application/json"}
        while True:
            try:
                response = await self.http.post(self.base_url + path, content=content,
                                                headers=headers)
            except httpx.TransportError as e:
                unsent = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout
                                    | httpx.PoolTimeout)
                if (not idempotent and not unsent) or time.monotonic() + backoff.delay > deadline:
                    raise
                await backoff.sleep()
                continue
            answer = _json_object(response)
            # A 503 that is not the edge's JSON answer is a load balancer's own (no edge ready
            # to take it): the request reached no edge, so even a create may go again.
            unsent = response.status_code == 503 and answer is None
            if (response.status_code >= 500 and (idempotent or unsent)
                    and time.monotonic() + backoff.delay < deadline):
                await backoff.sleep()
                continue
            if response.is_success and answer is not None:
                return answer
            error = (answer or {}).get("error") or {}
            if not isinstance(error, dict):
                error = {}
            _raise_for(str(error.get("code", f"http_{response.status_code}")),
                       str(error.get("message", response.text[:200])),
                       (answer or {}).get("count"))

    async def create(self, model: str | None, metadata: dict[str, Any] | None,
                     conversation: str | None = None) -> Created:
        body: dict[str, Any] = {"producer": "external"}
        if model is not None:
            body["model"] = model
        if metadata:
            body["metadata"] = metadata
        if conversation:
            body["conversation_id"] = conversation
        answer = await self._post("/v1/generations", body, idempotent=False)
        return Created(answer["id"], answer["events_url"], float(answer["lease_seconds"]),
                       answer.get("conversation_url"))

    async def append(self, gen_id: str, after: int, events: Sequence[NewEvent]) -> int:
        body = {"after": after, "events": [_wire_event(event) for event in events]}
        answer = await self._post(f"/v1/generations/{gen_id}/append", body)
        return int(answer["count"])

    async def heartbeat(self, gen_id: str) -> None:
        await self._post(f"/v1/generations/{gen_id}/heartbeat", None)

    async def finish(self, gen_id: str, terminal: NewEvent) -> None:
        data = json.loads(terminal.data)
        body = {"error": data} if terminal.kind == "error" else data
        await self._post(f"/v1/generations/{gen_id}/finish", body)

    async def aclose(self) -> None:
        if self._own_client:
            await self.http.aclose()


# What the producer API calls each event kind (``protocol.EventKind`` but ``message``).
_WIRE_TYPE = {"message": "text"}


def _wire_event(event: NewEvent) -> dict[str, Any]:
    """An event as an append's body carries it: its data's fields, and its ``type``."""
    return {"type": _WIRE_TYPE.get(event.kind, event.kind), **json.loads(event.data)}


# -- straight to Redis ----------------------------------------------------------------------

_OUTCOME_MESSAGES = {
    "cancelled": "the generation was cancelled",
    "completed": "the generation already ended",
    "failed": "the generation already ended with an error (producer_lost, if its lease lapsed)",
    "gone": "no such generation",
    "offset_mismatch": "the events appended so far are not the ones this producer counted",
    "not_external": "the built-in worker runs this generation",
    "forbidden": "another producer owns this generation",
}


def _check(reply: ProducerReply, ok: tuple[str, ...]) -> int:
    if reply.outcome in ok:
        return reply.count
    code = {"completed": "already_finished", "failed": "already_finished",
            "gone": "not_found"}.get(reply.outcome, reply.outcome)
    _raise_for(code, _OUTCOME_MESSAGES.get(reply.outcome, reply.outcome), reply.count)
    return reply.count  # (not reached)


class RedisTransport:
    """The same scripts the edge runs, called from here: no extra hop. Edges serve the
    generation to viewers as any other (they find it in Redis). Connection failures are
    retried as over HTTP. With viewer tokens on, a viewer's ``events_url`` (with its token)
    comes from an edge: ``GET /v1/generations/{id}``."""

    def __init__(self, redis_url: str | None = None, *, redis: RedisClient | None = None,
                 settings: Settings | None = None, lease: float = 30.0,
                 producer: str | None = None) -> None:
        if settings is None:
            settings = (Settings.from_env() if redis_url is None
                        else Settings.from_env(redis_url=redis_url))
        self.settings = settings
        self._own_client = redis is None
        self.redis = redis if redis is not None else connect(self.settings, "broker-producer")
        self.external = ExternalStore(Store(self.redis, self.settings))
        self.lease = lease
        self.producer = producer  # an API key id, to share generations with one over HTTP

    async def _retrying(self, call: Any) -> ProducerReply:
        deadline = time.monotonic() + RETRY_DEADLINE
        backoff = Backoff(first=0.05, cap=1.0)
        while True:
            try:
                result: ProducerReply = await call()
                return result
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if time.monotonic() + backoff.delay > deadline:
                    raise
                await backoff.sleep()

    async def create(self, model: str | None, metadata: dict[str, Any] | None,
                     conversation: str | None = None) -> Created:
        if conversation is not None and not protocol.is_conversation_id(conversation):
            raise ValueError("a conversation id is 1-128 characters of A-Z a-z 0-9 _ . : -")
        gen_id = protocol.new_generation_id()
        await self.external.create(gen_id, model=model or self.settings.model,
                                   lease=self.lease, producer=self.producer, metadata=metadata,
                                   conversation=conversation)
        conversation_url = (None if conversation is None
                            else f"/v1/conversations/{conversation}/events")
        return Created(gen_id, f"/v1/generations/{gen_id}/events", self.lease, conversation_url)

    async def append(self, gen_id: str, after: int, events: Sequence[NewEvent]) -> int:
        published_ms = protocol.now_ms()
        reply = await self._retrying(
            lambda: self.external.append(gen_id, self.producer, after, events, published_ms))
        return _check(reply, ("ok", "duplicate"))

    async def heartbeat(self, gen_id: str) -> None:
        _check(await self._retrying(lambda: self.external.heartbeat(gen_id, self.producer)),
               ("running",))

    async def finish(self, gen_id: str, terminal: NewEvent) -> None:
        _check(await self._retrying(
            lambda: self.external.finish(gen_id, self.producer, terminal)), ("ok", "same"))

    async def aclose(self) -> None:
        if not self._own_client:
            return
        if isinstance(self.redis, aioredis.Redis):
            # (a client made on a pool of its own leaves the pool open unless told)
            await self.redis.aclose(close_connection_pool=True)
        else:
            await self.redis.aclose()


