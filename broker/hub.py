"""One Redis subscription per generation per edge, fanned out to local viewers in memory.

A ``Topic`` keeps a window of the most recent events of one generation, each already encoded
to SSE bytes (encoded once per edge, not once per viewer). A viewer is only a cursor: it takes
what the window holds after its cursor, and whatever the window no longer (or not yet) holds
comes from the log, in one read shared by every viewer that needs the same range. So a slow
viewer costs no queue, a late or resuming viewer costs a log read, and a gap in the live ids
(missed pub/sub messages) is healed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker import protocol, sse
from broker.backoff import Backoff
from broker.metrics import Metrics
from broker.protocol import Event
from broker.store import Store

log = logging.getLogger(__name__)

LOG_READ_CHUNK = 200
SUBSCRIBE_TIMEOUT = 5.0


class HistoryLost(Exception):
    """Events a viewer needs are no longer in the log (trimmed, expired or lost)."""


@dataclass(slots=True)
class Frame:
    seq: int
    data: bytes
    terminal: bool
    published_ms: int


def to_frame(event: Event) -> Frame:
    return Frame(event.seq, sse.encode_event(event), event.terminal, event.published_ms)


@dataclass
class Topic:
    gen_id: str
    capacity: int
    window: deque[Frame] = field(default_factory=deque)
    viewers: int = 0
    terminal_seq: int | None = None
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    # Bumped when live messages may have been missed (a resubscription, an idle audit):
    # each viewer then looks in the log after its cursor once.
    resyncs: int = 0
    lost: bool = False  # the generation's keys vanished (expired, or Redis lost its data)
    # The log was read to this seq, complete, while subscribed: anything later comes live.
    read_to: int | None = None
    last_change: float = 0.0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reads: dict[int, asyncio.Future[list[Frame]]] = field(default_factory=dict)

    @property
    def head(self) -> int:
        """Highest seq in the window (0 when empty)."""
        return self.window[-1].seq if self.window else 0

    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it before looking, then wait on it."""
        return self._changed

    def offer(self, frame: Frame) -> bool:
        """Add a live frame. False if it left a gap (the window restarts at it, viewers heal)."""
        if self.window and frame.seq <= self.head:
            return True  # already have it (a log read got there first)
        gap = bool(self.window) and frame.seq != self.head + 1
        if gap:
            self.window.clear()
        self._append(frame)
        self._notify()
        return not gap

    def absorb(self, frames: list[Frame]) -> None:
        """Merge contiguous frames read from the log, so later viewers are served from memory."""
        if not frames:
            return
        if self.window:
            if frames[-1].seq < self.window[0].seq - 1 or frames[0].seq > self.head + 1:
                return  # not contiguous with the window: nothing to merge
            first = self.window[0].seq
            older = [f for f in frames if f.seq < first]
            room = self.capacity - len(self.window)
            if older and room > 0:
                self.window.extendleft(reversed(older[-room:]))
            frames = [f for f in frames if f.seq > self.head]
        for f in frames:
            self._append(f)
        self._notify()

    def needs_log(self, cursor: int) -> bool:
        """Must a viewer at ``cursor`` read the log? Not if the window reaches back to it, nor
        if the log was read past it since subscribing (what follows arrives live)."""
        if self.window:
            return self.window[0].seq > cursor + 1
        return self.read_to is None or cursor < self.read_to

    def frames_after(self, cursor: int) -> list[Frame] | None:
        """Window frames after ``cursor``; None when the window does not reach back to it."""
        if not self.window or self.window[0].seq > cursor + 1:
            return None
        if cursor >= self.head:
            return []
        start = cursor + 1 - self.window[0].seq
        return [self.window[i] for i in range(start, len(self.window))]

    async def read_log(self, store: Store, cursor: int, metrics: Metrics) -> list[Frame]:
        """Log events after ``cursor``; concurrent reads of the same range share one call.

        The read runs in a task of its own, so a viewer leaving mid-read cancels only its wait.
        """
        read = self._reads.get(cursor)
        if read is None:
            read = asyncio.ensure_future(self._read_log(store, cursor, metrics))
            self._reads[cursor] = read
            read.add_done_callback(lambda done: self._read_done(cursor, done))
        return await asyncio.shield(read)

    def _read_done(self, cursor: int, read: asyncio.Future[list[Frame]]) -> None:
        del self._reads[cursor]
        if not read.cancelled():
            read.exception()  # retrieved here: every waiter may have left already

    async def _read_log(self, store: Store, cursor: int, metrics: Metrics) -> list[Frame]:
        metrics.log_reads.inc()
        resyncs = self.resyncs
        frames = [to_frame(e) for e in await store.read_log(self.gen_id, cursor, LOG_READ_CHUNK)]
        self.absorb(frames)
        if len(frames) < LOG_READ_CHUNK and self.resyncs == resyncs:
            end = frames[-1].seq if frames else cursor
            self.read_to = end if self.read_to is None else max(self.read_to, end)
        return frames

    def _append(self, frame: Frame) -> None:
        self.window.append(frame)
        if len(self.window) > self.capacity:
            self.window.popleft()
        if frame.terminal:
            self.terminal_seq = frame.seq

    def resync(self) -> None:
        self.resyncs += 1
        self.read_to = None  # messages may have been missed since that read
        self._notify()

    def _notify(self) -> None:
        self.last_change = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class Hub:
    """Owns this edge's pub/sub connection and its topics."""

    def __init__(
        self, store: Store, metrics: Metrics, *, window: int, audit_interval: float,
        probe_interval: float,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.window = window
        self.audit_interval = audit_interval
        self.topics: dict[str, Topic] = {}
        # SUBSCRIBE commands sent per channel and not yet confirmed: a confirmation nobody
        # waits for is a resubscription after a reconnect (see ``_dispatch``).
        self._unconfirmed: dict[str, int] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._verifying: set[asyncio.Task[None]] = set()
        self.closing = False
        # Delivery probe: this edge publishes on a channel of its own and must see each probe
        # come back through its subscription. A connection that is up but silently stopped
        # delivering shows as probes published and never seen.
        self.probe_channel = f"broker:edge:{uuid.uuid4().hex}"
        self.probe_interval = probe_interval
        self.probe_timeout = 3 * probe_interval
        self._probe_seen_at: float | None = None
        self._unseen_since: float | None = None  # first probe published after the last seen

    def ready(self) -> bool:
        """True while probes make the round trip: Redis is reachable AND delivering to us."""
        seen = self._probe_seen_at
        return seen is not None and time.monotonic() - seen <= self.probe_timeout

    def close_streams(self) -> None:
        """Shutdown: every stream ends now (without a terminal event), so viewers reconnect."""
        self.closing = True
        for topic in self.topics.values():
            topic.resync()

    async def start(self) -> None:
        self._start_reader()
        self._tasks = [
            asyncio.create_task(self._audit_forever(self.audit_interval), name="hub-audit"),
            asyncio.create_task(self._probe_forever(), name="hub-probe"),
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._verifying, *([self._reader] if self._reader else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start_reader(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="hub-reader")

    async def _restart_reader(self) -> None:
        """Drop a stalled subscription: a new reader subscribes everything again and every
        topic catches up from the log."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._start_reader()

    async def _probe_forever(self) -> None:
        while True:
            now = time.monotonic()
            try:
                await self.store.redis.publish(self.probe_channel, str(now))
                if self._unseen_since is None:
                    self._unseen_since = now
            except (RedisError, OSError):
                self.metrics.redis_errors.labels("probe").inc()
            if self._unseen_since is not None and now - self._unseen_since > self.probe_timeout:
                log.warning("the pub/sub connection stopped delivering; resubscribing")
                self.metrics.pubsub_stalls.inc()
                self._unseen_since = None
                await self._restart_reader()
            self.metrics.readiness.set(1 if self.ready() else 0)
            await asyncio.sleep(self.probe_interval)

    @contextlib.asynccontextmanager
    async def watch(self, gen_id: str) -> AsyncIterator[Topic]:
        """The topic of ``gen_id``, subscribed; released (and unsubscribed if last) on exit."""
        topic = self.topics.get(gen_id)
        if topic is None:
            topic = Topic(gen_id, self.window, last_change=time.monotonic())
            self.topics[gen_id] = topic
            self.metrics.subscriptions.inc()
        topic.viewers += 1
        try:
            if not topic.subscribed.is_set():
                if topic.viewers == 1:
                    await self._subscribe(gen_id)
                try:
                    async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                        await topic.subscribed.wait()
                except TimeoutError as e:
                    raise RedisConnectionError("the subscription was not confirmed") from e
            yield topic
        finally:
            topic.viewers -= 1
            if topic.viewers == 0 and self.topics.get(gen_id) is topic:
                del self.topics[gen_id]
                self.metrics.subscriptions.dec()
                await self._unsubscribe(gen_id)

    async def _subscribe(self, gen_id: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # between connections: the reader subscribes every topic when it reconnects
        channel = protocol.live_channel(gen_id)
        self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        try:
            await pubsub.subscribe(channel)
        except (RedisError, OSError):
            self._unconfirmed[channel] -= 1  # the reader reconnects and subscribes it then

    async def _unsubscribe(self, gen_id: str) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                # A failed unsubscribe is harmless: stray messages for unknown topics are ignored.
                await self._pubsub.unsubscribe(protocol.live_channel(gen_id))

    async def _read_forever(self) -> None:
        """Own the pub/sub connection. After any failure it starts over on a new connection
        and subscribes every current topic again; their confirmations then make each topic
        check its generation and resync from the log (see ``_dispatch``)."""
        backoff = Backoff()
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                self._unconfirmed.clear()
                channels = [protocol.live_channel(gen_id) for gen_id in self.topics]
                await pubsub.subscribe(self.probe_channel, *channels)
                self._pubsub = pubsub
                while True:
                    message = await pubsub.get_message(timeout=None)
                    backoff.reset()
                    if message is not None:
                        self._dispatch(message)
            except (RedisError, OSError) as e:
                self.metrics.redis_errors.labels("subscribe").inc()
                self.metrics.pubsub_reconnects.inc()
                log.warning("pub/sub connection failed (%s); retrying in %.2fs", e, backoff.delay)
            finally:
                self._pubsub = None
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await backoff.sleep()

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        if channel == self.probe_channel:
            if kind == "message":
                self._probe_seen_at = time.monotonic()
                self._unseen_since = None
            return
        topic = self.topics.get(protocol.gen_id_of_channel(channel))
        if kind == "message":
            if topic is None:
                return
            try:
                event = protocol.decode_payload(message["data"])  # type: ignore[arg-type]
            except protocol.ProtocolError:
                log.exception("dropping a malformed live payload on %s", channel)
                return
            if not topic.offer(to_frame(event)):
                self.metrics.gaps.inc()
        elif kind == "subscribe":
            waiting = self._unconfirmed.get(channel, 0)
            if waiting > 1:
                self._unconfirmed[channel] = waiting - 1
                return
            self._unconfirmed.pop(channel, None)
            if topic is None:
                return
            if topic.subscribed.is_set():
                # A resubscription after a reconnect: anything published meanwhile was missed,
                # and if Redis restarted empty, the history itself is gone.
                self.metrics.resubscribes.inc()
                task = asyncio.create_task(self._verify(topic))
                self._verifying.add(task)
                task.add_done_callback(self._verifying.discard)
            topic.subscribed.set()

    async def _audit_forever(self, interval: float) -> None:
        """Resync topics idle for ``interval``: a missed last event must not leave them hanging."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            idle = [
                t for t in self.topics.values()
                if t.terminal_seq is None and now - t.last_change >= interval
            ]
            for topic in idle:
                await self._verify(topic)

    async def _verify(self, topic: Topic) -> None:
        """Does the generation still exist? Then viewers look in the log; else they end."""
        try:
            topic.lost = not await self.store.exists(topic.gen_id)
        except (RedisError, OSError) as e:
            self.metrics.redis_errors.labels("verify").inc()
            log.warning("could not check generation %s (%r); the next audit will", topic.gen_id, e)
            return
        topic.resync()
