"""The SSE response of one conversation viewer: every turn, in order, over one response that
stays open between turns (``GET /v1/conversations/{cid}/events``).

It follows the conversation's turns index (re-read after each notice of its
``ConversationTopic``) and relays each turn's events from the turn's generation topic, the
same topic (and subscription) its generation viewers on this edge share. Each frame is framed
again for the conversation: its id names the turn and the event (``conversation_event_id``),
its data gains ``generation_id``. A turn opens with ``event: turn`` (id: the turn and seq 0).

Unlike a generation stream, a conversation viewer's task wakes for every event (no direct
writes from the fan-out: the frames differ from the generation's) and waits with a timer of
its own: a conversation has a few devices, a generation may have thousands of viewers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from redis.exceptions import RedisError
from starlette.types import Message, Receive, Scope, Send

from broker.core import protocol, sse
from broker.core.protocol import Turn
from broker.core.store import oldest_unended
from broker.edge.connection import connection_of
from broker.edge.conversations import ConversationTopic
from broker.edge.hub import Hub
from broker.edge.stream import SSE_HEADERS, ViewerSlot, next_frames
from broker.edge.topic import MAX_WRITE_BYTES, Frame, HistoryLost

log = logging.getLogger(__name__)

FROM_ACTIVE = "active"


class _StreamOver(Exception):
    """The response ends here (deadline, shutdown, or the history is lost)."""


class ConversationStream:
    """ASGI app streaming conversation ``cid`` to one viewer after (``turn``, ``seq``): the
    last event it has (``seq`` 0: the turn's ``turn`` event, -1: nothing of that turn yet)."""

    __slots__ = (
        "_client_gone", "_last_write", "_sending_since", "_task", "_too_slow", "cid",
        "deadline", "hub", "keepalive", "retry_ms", "send_timeout", "seq", "slot", "start",
        "started", "turn",
    )

    def __init__(
        self, hub: Hub, cid: str, after: tuple[int, int] | None, start: str | None, *,
        retry_ms: int, keepalive: float, send_timeout: float,
        max_seconds: float = float("inf"), slot: ViewerSlot | None = None,
    ) -> None:
        self.hub = hub
        self.cid = cid
        self.turn, self.seq = after if after is not None else (1, -1)
        self.start = None if after is not None else start  # a resume goes on where it was
        self.retry_ms = retry_ms
        self.keepalive = keepalive
        self.send_timeout = send_timeout
        self.deadline = time.monotonic() + max_seconds
        self.slot = slot
        self.started = False
        self._client_gone = False
        self._too_slow = False
        self._sending_since: float | None = None
        self._last_write = time.monotonic()
        self._task: asyncio.Task[object] | None = None

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        metrics = self.hub.metrics
        metrics.viewers.inc()
        if self.slot is not None:
            self.slot.watch(self)  # the send watch looks at it (close_if_blocked)
        try:
            # Subscribed first, the index read after: a turn added in between is in the index.
            async with self.hub.watch_conversation(self.cid) as conversation:
                if self.start == FROM_ACTIVE:
                    self.turn = await self._active_turn()
                self.started = True
                await self._send_message(send, {"type": "http.response.start", "status": 200,
                                                "headers": SSE_HEADERS})
                if scope["method"] == "HEAD":
                    await self._send(send, b"", more_body=False)
                    return
                await self._send(send, sse.retry(self.retry_ms))
                try:
                    await self._follow(conversation, send)
                except _StreamOver:
                    pass
                except (RedisError, OSError) as e:
                    # Mid-stream: the response ends without a terminal event, and the device
                    # resumes (on any edge) after the last id it has.
                    metrics.redis_errors.labels("request").inc()
                    log.warning("conversation %s: Redis failed mid-stream (%s); ending the "
                                "response for the viewer to resume", self.cid, e)
            await self._send(send, b"", more_body=False)
        except asyncio.CancelledError:
            task = self._task
            if not (self._client_gone or self._too_slow) or task is None:
                raise
            task.uncancel()  # the client left or was too slow: not a shutdown
            if self._too_slow:
                metrics.slow_viewers_closed.inc()
                # Its response cannot end (the socket takes no more): the connection goes.
                connection = connection_of(scope)
                if connection is not None:
                    await connection.hang_up()
        finally:
            metrics.viewers.dec()
            if self.slot is not None:
                self.slot.release()
            watcher.cancel()

    async def _send_message(self, send: Send, message: Message) -> None:
        self._sending_since = time.monotonic()
        await send(message)
        self._sending_since = None
        self._last_write = time.monotonic()

    async def _active_turn(self) -> int:
        """``?from=active``: the oldest turn that has not ended; none: the next turn."""
        store = self.hub.store
        turns = await store.conversation_turns(self.cid)
        active = oldest_unended(turns, await store.turn_statuses(turns))
        if active is not None:
            return active.number
        return turns[-1].number + 1 if turns else 1

    async def _follow(self, conversation: ConversationTopic, send: Send) -> None:
        """Each turn from the cursor on, in order; between turns, wait for the next."""
        while True:
            changed = conversation.next_change()  # taken before looking
            for turn in await self.hub.store.conversation_turns(self.cid, after=self.turn - 1):
                if turn.number > self.turn:
                    self.turn, self.seq = turn.number, -1
                await self._relay_turn(turn, send)
                self.turn, self.seq = turn.number + 1, -1
            await self._wait(changed, send)

    async def _relay_turn(self, turn: Turn, send: Send) -> None:
        """The turn's events after ``self.seq`` up to its terminal one (nothing if it expired
        or this viewer has it all)."""
        store = self.hub.store
        meta = await store.meta(turn.gen_id)
        if meta is None or meta.conversation != self.cid:
            return  # expired (or never queued): nothing to show of it
        if meta.finished and self.seq >= meta.seq:
            return
        if self.seq < 0:
            data = json.dumps({"generation_id": turn.gen_id, "status": meta.status,
                               "turn": turn.number}, separators=(",", ":"))
            await self._send(send, sse.frame(
                data, id=protocol.conversation_event_id(turn.number, 0), event="turn"))
            self.seq = 0
        async with self.hub.watch(turn.gen_id) as topic:
            check_log = topic.needs_log(self.seq)
            resyncs = topic.resyncs
            while True:
                changed = topic.next_change()  # taken before looking
                try:
                    frames, check_log = await next_frames(self.hub, topic, self.seq, check_log)
                except HistoryLost as e:
                    data = _with_generation(
                        protocol.error_data("history_lost", str(e)), turn.gen_id)
                    ended = await store.meta(turn.gen_id)
                    if ended is None or not ended.finished:
                        await self._send(send, sse.frame(data, event="error"))
                        raise _StreamOver from e
                    # An ended turn: the error is its terminal event, with the id of the
                    # turn's own, so the device goes on past it (a resume at the same hole
                    # would find it again, for ever) to the next turns.
                    await self._send(send, sse.frame(
                        data, id=protocol.conversation_event_id(turn.number, ended.seq),
                        event="error"))
                    self.seq = ended.seq
                    return
                if frames:
                    await self._send_frames(send, turn, frames)
                    if frames[-1].terminal:
                        return
                    continue
                await self._wait(changed, send)
                check_log = check_log or topic.resyncs != resyncs  # a resync may have missed some
                resyncs = topic.resyncs

    async def _send_frames(self, send: Send, turn: Turn, frames: list[Frame]) -> None:
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            data = conversation_frame(frame, turn)
            chunk.append(data)
            size += len(data)
            if size >= MAX_WRITE_BYTES or frame is frames[-1]:
                await self._send(send, b"".join(chunk))
                self.hub.metrics.events_delivered.inc(len(chunk))
                self.seq = frame.seq
                chunk, size = [], 0

    async def _wait(self, changed: asyncio.Event, send: Send) -> None:
        """Until ``changed`` is set or a keepalive is due (then sent); ``_StreamOver`` past
        the deadline or when the edge closes."""
        now = time.monotonic()
        due = min(self._last_write + self.keepalive, self.deadline) - now
        if due > 0 and not changed.is_set():
            try:
                async with asyncio.timeout(due):
                    await changed.wait()
            except TimeoutError:
                pass
        now = time.monotonic()
        if self.hub.closing or now >= self.deadline:
            raise _StreamOver
        if now - self._last_write >= self.keepalive:
            await self._send(send, sse.comment("keepalive"))

    async def _send(self, send: Send, body: bytes, *, more_body: bool = True) -> None:
        await self._send_message(send, {"type": "http.response.body", "body": body,
                                   "more_body": more_body})

    def close_if_blocked(self, now: float) -> None:
        """Called by the send watch (``OpenStreams``): a write blocked past the send timeout
        ends this stream (the viewer resumes with its Last-Event-ID once it reads again)."""
        since = self._sending_since
        if since is not None and now - since > self.send_timeout and not self._too_slow:
            self._too_slow = True
            if self._task is not None:
                self._task.cancel()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._client_gone = True
                if self._task is not None:
                    self._task.cancel()
                return


def conversation_frame(frame: Frame, turn: Turn) -> bytes:
    """A generation's frame as its conversation's stream sends it: the id names the turn, the
    data names the generation. (Read back from the frame's bytes, which the edge encoded from
    one event: an ``event:`` line unless a message, one ``data:`` line of compact JSON.)"""
    name = None
    data = ""
    for line in frame.data.decode().split("\n"):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data = line[len("data: "):]
    return sse.frame(_with_generation(data, turn.gen_id),
                     id=protocol.conversation_event_id(turn.number, frame.seq), event=name)


def _with_generation(data: str, gen_id: str) -> str:
    """A JSON object's text with ``generation_id`` first (ids need no escaping)."""
    head = '{"generation_id":"' + gen_id + '"'
    return head + "}" if data.strip() == "{}" else head + "," + data[1:]
