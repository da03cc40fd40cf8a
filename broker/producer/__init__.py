"""Publish your own loop into a generation: the Python producer (asyncio).

An application with its own agent loop (several LLM calls, tools, retrieval) streams it into
ONE generation that any number of viewers watch and resume, exactly as they watch the
built-in worker's (docs/api.md, "Producers")::

    from broker import producer

    async with producer.over_http("http://127.0.0.1:8000", api_key=KEY) as gen:
        print(gen.events_url)                      # hand it to the viewers
        turn = await gen.pipe(await llm.chat.completions.create(..., stream=True))
        for call in turn.tool_calls:
            await gen.tool_result(call.id, run_tool(call))
        await gen.text("Done. ")
    # leaving the block finishes the generation ("stop"); an exception fails it

* ``text()`` and ``reasoning()`` go through the worker's sentence buffer
  (``broker.core.sentences``): sentence-sized events, none waiting longer than the flush
  interval; ``tool_call()``, ``tool_result()`` and ``data()`` go out at once, after the text
  before them.
* ``pipe(stream)`` forwards an ``openai`` SDK chat-completion stream (content, reasoning,
  tool calls; ``broker.core.deltas``, as the worker reads one) and answers its ``Turn``.
* Appends are cut to what an edge accepts (``protocol.MAX_APPEND_EVENTS`` events, about
  ``APPEND_BATCH_BYTES`` each): one long ``text()`` may be many sentence-sized events.
* The lease is kept alive for you: a heartbeat goes out whenever nothing was appended for a
  third of it.
* A cancel (``POST .../cancel``) is surfaced: ``cancelled`` (an ``asyncio.Event``) is set
  and the next call that reaches the edge raises ``Cancelled`` (a buffered ``text()`` may
  not; leaving the block does); the ``async with`` form swallows it (the
  generation already ended, ``finish_reason: "cancelled"``) and closes the LLM stream being
  piped.
* Two transports: ``over_http`` (an edge's producer API; retried with the idempotent
  ``after``) and ``direct`` (the same Redis scripts the edge runs, no extra hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from redis.exceptions import RedisError

from broker.core import protocol
from broker.core.deltas import (
    DeltaReader,
    Refusal,
    Text,
    TextChannels,
    TextKind,
    ToolCall,
    chunk_dict,
)
from broker.core.protocol import NewEvent
from broker.core.sentences import SentenceBuffer
from broker.core.settings import Settings
from broker.core.sse import aiter_sse_data
from broker.core.tasks import cancel_and_wait
from broker.producer.transports import (
    Cancelled,
    Created,
    GenerationEnded,
    HttpTransport,
    ProducerError,
    RedisTransport,
    Transport,
)

__all__ = [
    "Cancelled",
    "GenerationEnded",
    "HttpTransport",
    "Producer",
    "ProducerError",
    "RedisTransport",
    "StreamFailed",
    "ToolCall",
    "Turn",
    "direct",
    "over_http",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Turn:
    """What one piped LLM call streamed: its text, its reasoning, its complete tool calls,
    how it finished, its usage."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    refusal: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def assistant_message(self) -> dict[str, Any]:
        """The assistant message to send back to the LLM on the next call of the loop."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in self.tool_calls
            ]
        return message


class Producer:
    """One generation that this code produces. ``start()`` (or ``async with``) creates it."""

    def __init__(
        self, transport: Transport, *, model: str | None = None,
        metadata: dict[str, Any] | None = None, conversation_id: str | None = None,
        settings: Settings | None = None, own_transport: bool = True,
    ) -> None:
        self.transport = transport
        self.model = model
        self.metadata = metadata
        self.conversation_id = conversation_id  # a turn of this conversation, if given
        self.settings = settings or Settings()
        self._own_transport = own_transport
        self._created: Created | None = None
        self.count = 0  # events appended so far (what the next append's ``after`` is)
        self.cancelled = asyncio.Event()  # set once the generation is known to be cancelled
        self.finished = False  # the terminal event went out (or the generation ended)
        self._error: ProducerError | None = None  # why it can no longer be written
        self._channels = TextChannels(self._sentence_buffer)
        self._lock = asyncio.Lock()  # one append at a time: ``after`` counts them in order
        self._last_renewal = 0.0
        self._pending = asyncio.Event()  # text waits in a sentence buffer
        # Batches whose append failed (no answer, or Redis refused), in order: each is sent
        # again as it was, with the same ``after``, before anything else (a retry of one that
        # had landed is a no-op; a batch with more in it would be an overlap).
        self._unsent: list[list[NewEvent]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._tool_calls = 0  # default ``index`` of the next tool_call()

    def _sentence_buffer(self) -> SentenceBuffer:
        s = self.settings
        return SentenceBuffer(s.max_message_chars, first_wait=s.first_text_wait,
                              max_wait=s.flush_interval)

    # -- the generation ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._info().id

    @property
    def events_url(self) -> str:
        """The viewers' stream, relative to an edge (with a viewer token over HTTP when
        tokens are on)."""
        return self._info().events_url

    @property
    def conversation_url(self) -> str | None:
        """Its conversation's stream (every turn over one connection), if it is a turn of one
        (``conversation_id``)."""
        return self._info().conversation_url

    def _info(self) -> Created:
        if self._created is None:
            raise RuntimeError("the generation is not created yet: await start() first")
        return self._created

    async def start(self) -> Producer:
        """Create the generation (running at once) and start the heartbeat and flusher."""
        if self._created is None:
            self._created = await self.transport.create(self.model, self.metadata,
                                                        self.conversation_id)
            self._last_renewal = time.monotonic()
            self._tasks = [asyncio.create_task(self._flush_on_time()),
                           asyncio.create_task(self._heartbeat())]
        return self

    async def wait_cancelled(self) -> None:
        """Returns once the generation is known to be cancelled (an append, a heartbeat or
        a finish was answered ``cancelled``: within a third of the lease while idle)."""
        await self.cancelled.wait()

    # -- events --------------------------------------------------------------------------

    async def text(self, text: str) -> None:
        """Answer text (``onmessage`` for viewers), sentence-buffered."""
        await self._text("message", text)

    async def reasoning(self, text: str) -> None:
        """Reasoning text (``event: reasoning``), sentence-buffered like the answer."""
        await self._text("reasoning", text)

    async def tool_call(self, id: str, name: str, arguments: str,
                        index: int | None = None) -> None:
        """A complete tool call (``arguments``: a string, usually JSON). ``index`` defaults
        to how many tool calls this producer sent before."""
        if index is None:
            index = self._tool_calls
        _check_types(id=(id, str), name=(name, str), arguments=(arguments, str),
                     index=(index, int))
        if not name or not 0 <= index <= protocol.MAX_TOOL_CALL_INDEX:
            raise ValueError("a tool call needs a name and an index from 0 to "
                             f"{protocol.MAX_TOOL_CALL_INDEX}")
        self._tool_calls = max(self._tool_calls, index + 1)
        await self._event(protocol.new_tool_call(index, id, name, arguments))

    async def tool_result(self, id: str, result: Any) -> None:
        """A tool's result (any JSON value) for the call ``id``."""
        _check_types(id=(id, str))
        await self._event(protocol.new_tool_result(id, result))

    async def data(self, name: str, value: Any) -> None:
        """Application data for the viewers (sources, progress, UI state): any JSON value."""
        _check_types(name=(name, str))
        if not name:
            raise ValueError("data needs a name")
        await self._event(protocol.new_data(name, value))

    async def flush(self) -> None:
        """Send the text waiting in the sentence buffers now."""
        self._check_open()
        await self._send(self._channels.flush())

    async def finish(self, finish_reason: str = "stop",
                     usage: dict[str, Any] | None = None) -> None:
        """End the generation (``event: end``), after the text still buffered."""
        await self._end(protocol.new_end(finish_reason, usage))

    async def fail(self, code: str = "producer_error", message: str = "") -> None:
        """End the generation with ``event: error`` (``code``: ``[a-z][a-z0-9_]{0,63}``)."""
        await self._end(protocol.new_error(code, message))

    async def pipe(self, stream: AsyncIterable[Any]) -> Turn:
        """Forward an ``openai`` SDK chat-completion stream (``stream=True``; its chunks, or
        their dicts) into the generation: content as text, ``reasoning_content`` /
        ``reasoning`` as reasoning, each complete tool call as a ``tool_call`` event, a
        refusal as ``data`` named ``refusal`` (as the worker does). Answers the ``Turn`` (the
        generation goes on: call ``finish()``, or leave the ``async with``). A cancel stops
        the stream (closing the upstream request) and raises ``Cancelled``."""
        self._check_open()
        reader = DeltaReader()
        turn = Turn()
        try:
            async for data in _chunks(stream):
                self._check_open()
                usage = data.get("usage")
                if isinstance(usage, dict):
                    turn.usage = {k: v for k, v in usage.items() if v is not None}
                for piece in reader.feed(data):
                    await self._piece(piece, turn)
            for piece in reader.finish():
                await self._piece(piece, turn)
        except BaseException:
            close = getattr(stream, "close", None) or getattr(stream, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            raise
        turn.finish_reason = reader.finish_reason
        return turn

    async def _piece(self, piece: Text | ToolCall | Refusal, turn: Turn) -> None:
        if isinstance(piece, Text):
            if piece.kind == "message":
                turn.text += piece.text
            else:
                turn.reasoning += piece.text
            await self._text(piece.kind, piece.text)
        elif isinstance(piece, ToolCall):
            turn.tool_calls.append(piece)
            self._tool_calls = max(self._tool_calls, piece.index + 1)
            await self._event(piece.event())
        else:
            turn.refusal = piece.text
            await self._event(piece.event())

    # -- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the heartbeat and the flusher; close the transport if it is this producer's.
        An unfinished generation is left to its lease (it ends with ``producer_lost``)."""
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._own_transport:
            await self.transport.aclose()

    async def __aenter__(self) -> Producer:
        try:
            return await self.start()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> bool:
        try:
            if isinstance(error, Cancelled):
                return True  # it ended already (finish_reason "cancelled"): nothing to do
            if isinstance(error, Exception) and not self.finished:
                with contextlib.suppress(ProducerError, httpx.HTTPError, RedisError, OSError):
                    await self.fail("producer_error",
                                    f"the producer's loop failed ({type(error).__name__})")
            elif error is None and not self.finished:
                # A cancel the loop never heard of (its last text was still buffered): the
                # generation ended cancelled; the block ends quietly, as for one it heard of.
                with contextlib.suppress(Cancelled):
                    await self.finish()
            return False
        finally:
            await self.aclose()

    # -- sending -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self.finished:
            raise GenerationEnded("already_finished", "this producer finished the generation")

    async def _text(self, kind: TextKind, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        self._check_open()
        if not text:
            return
        events = self._channels.feed(kind, text, time.monotonic())
        await self._send(events)
        if self._channels.pending_since is not None:
            self._pending.set()

    async def _event(self, event: NewEvent) -> None:
        """A non-text event: after the text pending before it, in the same append."""
        self._check_open()
        await self._send([*self._channels.flush(), event])

    async def _end(self, terminal: NewEvent) -> None:
        self._check_open()
        await self._send(self._channels.flush())
        async with self._lock:
            self._check_open()
            try:
                await self.transport.finish(self.id, terminal)
            except ProducerError as e:
                self._refused(e)
                raise
            self.finished = True
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def _send(self, events: list[NewEvent]) -> None:
        if not events and not self._unsent:
            return
        async with self._lock:
            self._check_open()
            # Cut to what an edge accepts (one long text() is many events).
            self._unsent.extend(_append_batches(events))
            while self._unsent:
                batch = self._unsent[0]
                try:
                    self.count = await self.transport.append(self.id, self.count, batch)
                except ProducerError as e:
                    self._unsent.clear()
                    self._refused(e)
                    raise
                # (any other failure leaves the batch, and those after it, to the next send)
                self._unsent.pop(0)
                self._last_renewal = time.monotonic()

    def _refused(self, error: ProducerError) -> None:
        if isinstance(error, Cancelled):
            self.cancelled.set()
        if isinstance(error, Cancelled | GenerationEnded):
            self._error = error
            self.finished = True

    async def _flush_on_time(self) -> None:
        """Text waiting for a sentence end goes out when the buffer says it is due (as the
        worker's flusher: the first text soon, none later than the flush interval)."""
        while True:
            deadline = self._channels.deadline()
            if deadline is None and not self._unsent:
                self._pending.clear()
                await self._pending.wait()
                continue
            delay = 0.0 if deadline is None else deadline - time.monotonic()
            if delay > 0 and not self._unsent:
                await asyncio.sleep(delay)
                continue
            try:  # (a batch that failed before goes first: it was due already)
                await self._send(self._channels.flush_due(time.monotonic()))
            except ProducerError:
                return  # recorded: the producer's next call raises it
            except (httpx.HTTPError, RedisError, OSError) as e:
                log.warning("generation %s: a timed flush failed (%r)", self.id, e)
                await asyncio.sleep(self.settings.flush_interval)

    async def _heartbeat(self) -> None:
        """Renew the lease when nothing was appended for a third of it; notice a cancel."""
        period = self._info().lease / 3
        while True:
            idle = time.monotonic() - self._last_renewal
            if idle < period:
                await asyncio.sleep(period - idle)
                continue
            self._last_renewal = time.monotonic()
            try:
                await self.transport.heartbeat(self.id)
            except ProducerError as e:
                self._refused(e)
                return
            except (httpx.HTTPError, RedisError, OSError) as e:
                log.warning("generation %s: a heartbeat failed (%r)", self.id, e)


def _check_types(**values: tuple[Any, type]) -> None:
    """What the edge would refuse (422), refused here the same way whichever the transport
    (the direct one has no edge to check)."""
    for name, (value, kind) in values.items():
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")


class StreamFailed(Exception):
    """The LLM sent an error inside the stream being piped (``{"error": ...}``)."""


async def _chunks(stream: AsyncIterable[Any]) -> AsyncIterator[dict[str, Any]]:
    """The stream's chunks as dicts. An ``openai`` SDK stream nobody read yet is read raw, as
    the worker reads one: its HTTP response's bytes, SSE-decoded (``broker.core.sse``), each
    event ``json.loads``'ed. That skips the SDK's pydantic model of every chunk, which was
    most of ``pipe()``'s CPU (2.6x the worker's per token; ``bench.producers``). Anything
    else (a stream the SDK began reading, a wrapper, an iterable of dicts) is iterated, each
    chunk through ``chunk_dict``."""
    response = getattr(stream, "response", None)
    aiter_bytes = getattr(response, "aiter_bytes", None)
    headers = getattr(response, "headers", None) or {}
    if callable(aiter_bytes) and "event-stream" in str(headers.get("content-type", "")):
        try:
            async for data in aiter_sse_data(aiter_bytes()):
                if data.startswith("[DONE]"):
                    return
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    error = chunk["error"]
                    message = error.get("message") if isinstance(error, dict) else None
                    raise StreamFailed(f"the LLM failed mid-stream: {message or error}")
                yield chunk
            return
        except Exception as e:
            # (the SDK's own httpx's StreamConsumed: its iterator began reading; go on there)
            if type(e).__name__ != "StreamConsumed":
                raise
    async for chunk in stream:
        yield chunk_dict(chunk)


# Bytes of event data one append carries at most (but one event, whatever its size): well
# under an edge's default BROKER_MAX_BODY_BYTES (1 MiB) once escaped and wrapped.
APPEND_BATCH_BYTES = 256 * 1024


def _append_batches(events: list[NewEvent]) -> Iterator[list[NewEvent]]:
    """``events`` in order, cut into appends an edge accepts: at most
    ``protocol.MAX_APPEND_EVENTS`` events and about ``APPEND_BATCH_BYTES`` each (one long
    ``text()`` is many sentence-sized events)."""
    batch: list[NewEvent] = []
    size = 0
    for event in events:
        event_size = len(event.data.encode())
        if batch and (len(batch) == protocol.MAX_APPEND_EVENTS
                      or size + event_size > APPEND_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += event_size
    if batch:
        yield batch


def over_http(base_url: str, api_key: str | None = None, *, model: str | None = None,
              metadata: dict[str, Any] | None = None, conversation_id: str | None = None,
              client: httpx.AsyncClient | None = None,
              settings: Settings | None = None) -> Producer:
    """A producer through an edge's HTTP API (``base_url``: the edge or its load balancer).
    ``await`` its ``start()``, or use it with ``async with``. ``conversation_id``: the
    generation is the next turn of that conversation."""
    return Producer(HttpTransport(base_url, api_key, client=client), model=model,
                    metadata=metadata, conversation_id=conversation_id, settings=settings)


def direct(redis_url: str | None = None, *, lease: float = 30.0, model: str | None = None,
           metadata: dict[str, Any] | None = None, conversation_id: str | None = None,
           settings: Settings | None = None) -> Producer:
    """A producer writing straight to Redis (``REDIS_URL`` when ``redis_url`` is None) with
    the edge's own scripts: no extra hop. ``lease``: seconds without an append or a heartbeat
    before the generation ends with ``producer_lost``."""
    if settings is None:
        settings = (Settings.from_env() if redis_url is None
                    else Settings.from_env(redis_url=redis_url))
    return Producer(RedisTransport(settings=settings, lease=lease), model=model,
                    metadata=metadata, conversation_id=conversation_id, settings=settings)
