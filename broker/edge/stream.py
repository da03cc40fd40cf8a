"""The SSE response of one viewer: a cursor over a hub topic, ended by the disconnect."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import ClassVar, Protocol

from starlette.types import Message, Receive, Scope, Send

from broker.core import sse
from broker.core.metrics import Metrics
from broker.core.protocol import error_data, now_ms
from broker.edge.connection import DirectWriter, connection_of
from broker.edge.errors import error_response
from broker.edge.headers import with_headers
from broker.edge.hub import Hub
from broker.edge.leases import FirstCheck
from broker.edge.topic import MAX_WRITE_BYTES, Frame, HistoryLost, Topic

log = logging.getLogger(__name__)

SEND_WATCH_INTERVAL = 0.5

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SendWatched(Protocol):
    def close_if_blocked(self, now: float) -> None:
        """End the response if a write has been blocked past the send timeout."""


class OpenStreams:
    """The SSE responses of this edge.

    At most ``BROKER_MAX_VIEWERS`` of them: a stream request takes a slot as it is accepted, in
    the same step as the check (no await between: a burst cannot all pass a check before any
    counts), and gives it back exactly once when it ends, whichever way. And a send watch: a
    write returns at once unless the socket's buffer is full, so rather than a timer around
    every write (once half the edge's CPU), each started response is looked at now and then
    and closed when a write stays blocked past the send timeout (a slow reader)."""

    __slots__ = ("limit", "running", "taken")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.running: set[SendWatched] = set()

    def take(self) -> ViewerSlot | None:
        if self.taken >= self.limit:
            return None
        self.taken += 1
        return ViewerSlot(self)

    async def watch_sends_forever(self) -> None:
        while True:
            await asyncio.sleep(SEND_WATCH_INTERVAL)
            self._close_blocked(time.monotonic())

    def _close_blocked(self, now: float) -> None:
        # (Not in the loop's body: there, the last stream looked at stayed alive while the
        # loop slept, and for good once no stream was left; see ``LeaseWatch._check_due``.)
        for stream in list(self.running):
            stream.close_if_blocked(now)


class ViewerSlot:
    """One stream's place among the ``OpenStreams``."""

    __slots__ = ("_slots", "_stream")

    def __init__(self, slots: OpenStreams) -> None:
        self._slots: OpenStreams | None = slots
        self._stream: SendWatched | None = None

    def watch(self, stream: SendWatched) -> None:
        """The response runs: the send watch looks at it until the slot is released."""
        if self._slots is not None:
            self._stream = stream
            self._slots.running.add(stream)

    def release(self) -> None:
        """Give the slot back; once (later calls do nothing)."""
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.taken -= 1
            if self._stream is not None:
                slots.running.discard(self._stream)
                self._stream = None


class EventStream:
    """ASGI app streaming generation ``gen_id`` to one viewer from after ``cursor``.

    Live, it costs no running task: once caught up it parks at its topic's head, and the
    topic's fan-out writes each next event straight to its socket (``push``). Its task runs
    only to catch up (from the window or the log), for a write that has to wait, for a
    keepalive, and to end the response."""

    # What a subclass speaking another protocol over the same machinery changes (see
    # ``broker.edge.aisdk_routes``): the headers, the bytes before the first event, the bytes
    # of a run of events, of a history lost mid-stream; whether the topic's fan-out may write
    # its SSE frames to this stream directly.
    headers: ClassVar[list[tuple[bytes, bytes]]] = SSE_HEADERS
    direct_writes: ClassVar[bool] = True

    # Thousands of these live at once: no per-instance dict.
    __slots__ = (
        "_client_gone", "_last_write", "_relay_task", "_sending_since", "_too_slow", "_writer",
        "cursor", "deadline", "end_observed", "gen_id", "hub", "keepalive", "lease_check",
        "metrics", "position", "retry_ms", "send_timeout", "slot", "started",
    )

    def __init__(
        self, hub: Hub, gen_id: str, cursor: int, *, retry_ms: int, keepalive: float,
        send_timeout: float, max_seconds: float = float("inf"), slot: ViewerSlot | None = None,
        lease_check: FirstCheck | None = None,
    ) -> None:
        self.hub = hub
        self.slot = slot  # given back when the response ends
        # The lease check the request's meta read made: the topic's lease watch starts from it.
        self.lease_check = lease_check
        self.metrics: Metrics = hub.metrics
        self.gen_id = gen_id
        self.cursor = cursor
        self.position = cursor  # the last seq sent to this viewer
        self.end_observed = False  # (``LiveViewer``)
        self.retry_ms = retry_ms
        self.keepalive = keepalive
        self.send_timeout = send_timeout
        # Past this, the stream ends without a terminal event and EventSource resumes it: no
        # connection lives forever (tokens are checked again, load rebalances).
        self.deadline = time.monotonic() + max_seconds
        self._client_gone = False
        # Set while a write is in flight: the send watch (``OpenStreams``) looks at it.
        self._sending_since: float | None = None
        self._last_write = time.monotonic()
        self._too_slow = False
        self._relay_task: asyncio.Task[object] | None = None
        self._writer: DirectWriter | None = None  # for the fan-out's writes, once started
        self.started = False  # the response began (or its error answer did)

    async def serve(self, scope: Scope, receive: Receive, send: Send,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The response, with ``headers`` beside its own; exceptions before it started
        (``started``) still need an answer."""
        extra = headers or []
        relay = asyncio.current_task()
        assert relay is not None
        self._relay_task = relay
        # The edge's server tells us at once when the client leaves; elsewhere (or when the
        # connection is going already) a task waits for ``http.disconnect``.
        connection = connection_of(scope)
        watcher = None
        if connection is None or not connection.on_lost(self._client_left):
            watcher = asyncio.create_task(self._watch_disconnect(receive))
        self.metrics.viewers.inc()
        if self.slot is not None:
            self.slot.watch(self)
        try:
            lease_check, self.lease_check = self.lease_check, None
            async with self.hub.watch(self.gen_id, lease_check) as topic:
                changed = topic.next_change()
                try:
                    frames, check_log = await self._next_frames(
                        topic, self.cursor, topic.needs_log(self.cursor)
                    )
                except HistoryLost as e:
                    # Before any byte is sent: a non-200 answer, so EventSource stops here
                    # instead of reconnecting into the same hole forever.
                    self.started = True
                    await error_response(410, "history_lost", str(e))(
                        scope, receive, with_headers(send, extra))
                    return
                self.started = True
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*self.headers, *extra]})
                if connection is not None and self.direct_writes:
                    self._writer = connection.direct_writer(scope)
                await self._send(send, self.opening())
                ended = await self._relay(topic, send, frames, check_log, changed)
            if not ended:
                # Watched like any write: after a direct write filled the socket's buffer, this
                # one may wait for a client that no longer reads.
                await self._send(send, b"", more_body=False)
        except asyncio.CancelledError:
            if not (self._client_gone or self._too_slow):
                raise
            relay.uncancel()  # the client left or was too slow: not a shutdown
            if self._too_slow:
                self.metrics.slow_viewers_closed.inc()
                log.info("closing a slow viewer of %s at event %d", self.gen_id, self.position)
                # Its response cannot end (the socket takes no more): the connection goes.
                if connection is not None:
                    await connection.hang_up()
        finally:
            self.metrics.viewers.dec()
            if self.slot is not None:
                self.slot.release()
            self._writer = None
            if watcher is not None:
                watcher.cancel()
            elif connection is not None:
                connection.on_lost(None)

    async def _relay(
        self, topic: Topic, send: Send, frames: list[Frame], check_log: bool,
        changed: asyncio.Event,
    ) -> bool:
        """Send what is after the cursor, wait for more, repeat until the terminal event.
        True if the response ended with it (the terminal event and the end of the body go
        in one write); False when the stream stops otherwise and the response must still end.

        ``check_log``: the log may hold events after the ones in hand that will not come live
        (a full chunk was read, or live messages may have been missed): look there once the
        window has nothing more after the cursor."""
        resyncs = topic.resyncs
        caught_up = False  # the last look found nothing new: what comes next is live
        while True:
            if frames:
                for batch in _batches(frames):
                    # Only the last batch can end with the terminal event (the last frame).
                    ends = batch[-1].terminal
                    await self._send(send, self.encode(batch), more_body=not ends)
                    self.metrics.events_delivered.inc(len(batch))
                    self.position = batch[-1].seq
                if caught_up and not (self.end_observed and frames[0].terminal):
                    self.metrics.delivery_latency.observe(
                        max(0.0, now_ms() - frames[-1].published_ms) / 1000
                    )
                if frames[-1].terminal:
                    return True
                caught_up = False
            else:
                caught_up = True
                # No timer per wait: the hub wakes quiet topics a few times per keepalive
                # interval, and whoever has written nothing for that long sends a comment.
                if self.hub.closing:
                    return False  # (a stream that started after close_streams woke the others)
                if self._writer is not None and not changed.is_set():
                    # The fan-out writes to us meanwhile, all but the terminal event (it
                    # wakes us for that one).
                    woken = topic.parked(self)
                    try:
                        await woken
                    finally:
                        topic.unpark(self, woken)
                else:
                    await changed.wait()
                now = time.monotonic()
                if now < self.deadline and now - self._last_write >= self.keepalive:
                    await self._send(send, sse.comment("keepalive"))
            if self.hub.closing or time.monotonic() >= self.deadline:
                return False
            changed = topic.next_change()  # taken before looking, so no change slips between
            check_log = check_log or topic.resyncs != resyncs  # a resync may have missed some
            resyncs = topic.resyncs
            try:
                frames, check_log = await self._next_frames(topic, self.position, check_log)
            except HistoryLost as e:
                await self._send(send, self.lost(str(e)))
                return False

    def opening(self) -> bytes:
        """What the response starts with: the reconnection time EventSource should use."""
        return sse.retry(self.retry_ms)

    def encode(self, frames: list[Frame]) -> bytes:
        """The bytes of consecutive frames: as the topic encoded them."""
        return b"".join(f.data for f in frames)

    def lost(self, message: str) -> bytes:
        """The last bytes of a stream whose history is lost mid-way."""
        return sse.frame(error_data("history_lost", message), event="error")

    def push(self, after: int, last: int, chunk: bytes, now: float) -> bool:
        """The topic's fan-out, while this viewer is parked: write frames ``after + 1`` to
        ``last`` now if they are the next ones and the socket takes them without waiting (see
        ``LiveViewer``)."""
        writer = self._writer
        if self.position != after or writer is None or not writer.ready():
            return False
        if now >= self.deadline or self.hub.closing:
            return False  # woken, it ends the stream
        try:
            writer.write(chunk)
        except (OSError, RuntimeError):
            return False  # the fan-out goes on; this viewer's own send meets the failure
        self.position = last
        self._last_write = now
        return True

    async def _next_frames(
        self, topic: Topic, cursor: int, check_log: bool
    ) -> tuple[list[Frame], bool]:
        return await next_frames(self.hub, topic, cursor, check_log)

    async def _send(self, send: Send, body: bytes, *, more_body: bool = True) -> None:
        self._sending_since = time.monotonic()
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
        self._sending_since = None
        self._last_write = time.monotonic()

    def close_if_blocked(self, now: float) -> None:
        """Called by the send watch (``OpenStreams``): a write blocked past the send timeout
        ends this stream (the viewer resumes from the log when it catches up)."""
        since = self._sending_since
        if since is not None and now - since > self.send_timeout and not self._too_slow:
            self._too_slow = True
            if self._relay_task is not None:
                self._relay_task.cancel()

    def _client_left(self) -> None:
        self._client_gone = True
        if self._relay_task is not None:
            self._relay_task.cancel()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                return


async def next_frames(
    hub: Hub, topic: Topic, cursor: int, check_log: bool
) -> tuple[list[Frame], bool]:
    """The frames after ``cursor`` and whether the log must still be checked after them (the
    generation stream's, and each turn's of a conversation stream).

    The window comes first even while the log must be checked: during a resume storm
    the viewers' reads fill it, so most viewers follow from memory instead of each
    reading every chunk themselves."""
    if topic.lost:
        raise HistoryLost("the generation's history no longer exists")
    frames = topic.frames_after(cursor)
    if frames:
        return frames, check_log
    if check_log and topic.read_to is not None and cursor >= topic.read_to:
        check_log = False  # another viewer's read reached the log's end: the rest is live
    if not check_log and (frames is not None or not topic.window):
        # Caught up with the window, or nothing live yet and the log was read already:
        # what follows arrives live.
        return [], False
    frames, more = await topic.read_log(hub.store, cursor, hub.metrics, hub.caller())
    if frames and frames[0].seq != cursor + 1:
        raise HistoryLost(f"events after {cursor} were trimmed from the log")
    hub.metrics.replayed_events.inc(len(frames))
    return frames, more


def _batches(frames: list[Frame]) -> Iterator[list[Frame]]:
    """Consecutive frames in writes of about ``MAX_WRITE_BYTES``: few sends when behind, but
    never a copy of a whole backlog at once (it would sit in the socket's buffer)."""
    batch: list[Frame] = []
    size = 0
    for frame in frames:
        batch.append(frame)
        size += len(frame.data)
        if size >= MAX_WRITE_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
