"""A generation's recent events as one edge holds them: a window of encoded frames and cursors.

A ``Topic`` keeps a window of the most recent events of one generation, each already encoded
to SSE bytes (encoded once per edge, not once per viewer). A viewer is only a cursor: it takes
what the window holds after its cursor, and whatever the window no longer (or not yet) holds
comes from the log, in one read shared by every viewer that needs the same range. So a slow
viewer costs no queue, a late or resuming viewer costs a log read, and a gap in the live ids
(missed pub/sub messages) is healed the same way. A viewer that has caught up parks at the head
(``park``), and the fan-out that follows each ``offer`` writes the new frames to it directly
(``LiveViewer.push``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from broker.core import sse
from broker.core.metrics import Metrics
from broker.core.protocol import Event, now_ms
from broker.core.store import Caller, Store
from broker.core.tasks import LazyEvent, SharedCalls

LOG_READ_CHUNK = 200
# Full chunks a topic keeps after reading them (log content never changes): in a resume storm
# each chunk is read once for every viewer, not once per group of viewers that happen to ask
# at the same moment. At most this many x LOG_READ_CHUNK frames, only while the topic lives.
KEPT_CHUNKS = 8

log = logging.getLogger(__name__)


# The most a fan-out writes to a viewer at once; more (a burst the reader fell behind on) goes
# the slow way, in batches of about this size.
MAX_WRITE_BYTES = 64 * 1024


class LiveViewer(Protocol):
    """A viewer parked at a topic's head (``Topic.park``)."""

    position: int  # the last seq it was sent
    # Set by the fan-out that wakes it to write the terminal event itself: that fan-out
    # observed the event's delivery latency, once for all its viewers, so the viewer does not.
    end_observed: bool

    def push(self, after: int, last: int, chunk: bytes, now: float) -> bool:
        """Write frames ``after + 1`` to ``last`` (``chunk``: framed by ``sse.http_chunk``) at
        once, if nothing stands before them (the viewer is at ``after``, its socket takes
        writes). True if written; ``now`` is ``time.monotonic()``."""
        ...


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
    # When the last live event arrived: its worker was alive then (the lease watch waits
    # for a topic to go quiet before it checks the lease).
    last_live: float = 0.0
    metrics: Metrics | None = None  # counts what the fan-out writes
    # Viewers parked at the head, each with the future that wakes it (see ``park``).
    live: dict[LiveViewer, asyncio.Future[None]] = field(default_factory=dict)
    _fan_out_soon: asyncio.Handle | None = None
    # The loop the topic lives on, taken once: under CPython 3.11 each
    # ``asyncio.get_running_loop()`` makes a ``getpid`` system call (its fork check), ~4 % of
    # the edge's CPU when it was called per live message (B7).
    _loop: asyncio.AbstractEventLoop | None = None
    _changed: asyncio.Event = field(default_factory=LazyEvent)
    # Log reads by chunk start: in flight, or done and full (then kept, see KEPT_CHUNKS; a
    # short chunk grows as the generation goes on).
    _chunks: SharedCalls[int, list[Frame]] = field(
        default_factory=lambda: SharedCalls(keep=_is_full, capacity=KEPT_CHUNKS)
    )

    @property
    def head(self) -> int:
        """Highest seq in the window (0 when empty)."""
        return self.window[-1].seq if self.window else 0

    def next_change(self) -> asyncio.Event:
        """An event set at the next change; take it before looking, then wait on it."""
        return self._changed

    def offer(self, frame: Frame) -> bool:
        """Add a live frame. False if it left a gap (the window restarts at it, viewers heal)."""
        if self.window and frame.seq <= self.head:
            first = self.window[0].seq
            if frame.seq >= first and self.window[frame.seq - first].data != frame.data:
                self.diverged()
            return True  # already have it (a log read got there first)
        gap = bool(self.window) and frame.seq != self.head + 1
        if gap:
            self.window.clear()
        self._append(frame)
        if gap:
            self._notify()  # live viewers too: they read what they miss from the log
        else:
            self._notify(live=False)
            if self.live and self._fan_out_soon is None:
                # Soon rather than now: frames that arrive together (the reader was behind)
                # then go out in one write per viewer.
                self._fan_out_soon = self._running_loop().call_soon(self._fan_out)
        self.last_live = self.last_change  # (just taken by _notify)
        return not gap

    async def park(self, viewer: LiveViewer) -> None:
        """Wait at the head, live: ``offer`` writes each next frame to ``viewer`` itself
        (``viewer.push``) and returns here only when the viewer has something else to do: a
        frame it could not take at once, the terminal event (not written: the viewer writes
        it with the end of its response), any other change (a gap, a resync, a log read), or
        a keepalive tick. So a fan-out wakes no task per viewer."""
        woken = self.parked(viewer)
        try:
            await woken
        finally:
            self.unpark(viewer, woken)

    def parked(self, viewer: LiveViewer) -> asyncio.Future[None]:
        """``park`` without its coroutine (an open stream then holds one frame less): the
        future to await; call ``unpark`` with it after, however the wait ended."""
        woken: asyncio.Future[None] = self._running_loop().create_future()
        self.live[viewer] = woken
        return woken

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def unpark(self, viewer: LiveViewer, woken: asyncio.Future[None]) -> None:
        if self.live.get(viewer) is woken:
            del self.live[viewer]

    def _fan_out(self) -> None:
        """Write what each parked viewer lacks, framed once per position (all parked viewers
        are normally at the same one); wake those that cannot take it, or are done."""
        self._fan_out_soon = None
        if not self.live:
            return
        now = time.monotonic()
        writes: dict[int, _Write | None] = {}  # by position
        delivered = 0
        ending = False  # a viewer was woken to write the terminal event (see below)
        # A copy: nothing a write triggers may change the set under the loop.
        for viewer, woken in list(self.live.items()):
            if woken.done():  # cancelled (its client left): its task is on its way out
                continue
            position = viewer.position
            if position not in writes:
                writes[position] = self._write_after(position)
            write = writes[position]
            if write is not None and not write.frames and not write.ends:
                continue  # nothing new for it (it parked after the last offer)
            if write is not None:
                pushed = not write.frames  # (nothing to write before the end)
                if write.frames:
                    try:
                        pushed = viewer.push(position, write.frames[-1].seq, write.chunk, now)
                    except Exception:
                        # One viewer's failure must not stop the fan-out (nor the pub/sub
                        # reader that runs it): it goes the slow way, where its own task meets
                        # the error.
                        log.exception("direct write to a viewer of %s failed", self.gen_id)
                    if pushed:
                        delivered += len(write.frames)
                if pushed and not write.ends:
                    continue
                if pushed:
                    ending = True
                    viewer.end_observed = True
            # It could not take the frames (it goes the slow way), or its stream ends: its own
            # task writes the terminal event with the response's end, in one write (one system
            # call) where a push and the end would take two.
            del self.live[viewer]
            woken.set_result(None)
        if (delivered or ending) and self.metrics is not None:
            if delivered:
                self.metrics.events_delivered.inc(delivered)
                self.metrics.direct_writes.inc(delivered)
            # One observation per fan-out: the newest frame (the terminal event, when it ends
            # the stream: its viewers write it next, without observing it again), after the
            # last write.
            newest = self.window[-1].published_ms
            self.metrics.delivery_latency.observe(max(0.0, now_ms() - newest) / 1000)

    def _write_after(self, position: int) -> _Write | None:
        """What the fan-out writes to a viewer at ``position``: the window's frames after it
        but a terminal event (left to the viewer, see ``_fan_out``), their chunk, and whether
        the terminal event follows them; None when the window does not reach back to
        ``position`` or the frames are too many for one write."""
        frames = self.frames_after(position)
        if frames is None:
            return None
        ends = bool(frames) and frames[-1].terminal
        if ends:
            frames = frames[:-1]
        if not frames:
            return _Write(frames, b"", ends)
        data = frames[0].data if len(frames) == 1 else b"".join(f.data for f in frames)
        if len(data) > MAX_WRITE_BYTES:
            return None
        return _Write(frames, sse.http_chunk(data), ends)

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
        if not frames:
            return  # only older frames: nobody waiting at the head has anything new
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

    async def read_log(
        self, store: Store, cursor: int, metrics: Metrics, via: Caller | None = None
    ) -> tuple[list[Frame], bool]:
        """Log events after ``cursor``, and whether more may follow them in the log.

        Reads go by chunks aligned on ``LOG_READ_CHUNK``, so viewers at different cursors in
        one chunk share one call, and a full chunk is kept for the next viewers. A read runs
        in a task of its own: a viewer leaving mid-read cancels only its own wait.
        """
        start = cursor - cursor % LOG_READ_CHUNK
        chunk, _ = await self._chunks.get(
            start, lambda: self._read_log(store, start, metrics, via))
        return [f for f in chunk if f.seq > cursor], _is_full(chunk)

    async def _read_log(
        self, store: Store, start: int, metrics: Metrics, via: Caller | None
    ) -> list[Frame]:
        metrics.log_reads.inc()
        resyncs = self.resyncs
        events = await store.read_log(self.gen_id, start, LOG_READ_CHUNK, via)
        frames = [to_frame(e) for e in events]
        self.absorb(frames)
        if len(frames) < LOG_READ_CHUNK and self.resyncs == resyncs:
            end = frames[-1].seq if frames else start
            self.read_to = end if self.read_to is None else max(self.read_to, end)
        return frames

    def _append(self, frame: Frame) -> None:
        self.window.append(frame)
        if len(self.window) > self.capacity:
            self.window.popleft()
        if frame.terminal:
            self.terminal_seq = frame.seq

    def diverged(self) -> None:
        """Redis now holds another history than the one this edge served (a failover lost
        acknowledged writes, or Redis restarted empty and a new run reused the seqs): what the
        viewers have can no longer be continued, so they end with ``history_lost``."""
        self.lost = True
        self._notify()

    def resync(self) -> None:
        self.resyncs += 1
        self.read_to = None  # messages may have been missed since that read
        # Redis may have come back with another history, and a read in flight may have been
        # answered before the missed events were written: later readers read afresh (those
        # already waiting on a read still get it).
        self._chunks.clear()
        self._notify()

    def wake(self) -> None:
        """Wake the viewers without a change (they check their keepalive and deadline); the
        topic still counts as quiet for the audit."""
        changed, self._changed = self._changed, LazyEvent()
        changed.set()
        self._wake_live()

    def _notify(self, live: bool = True) -> None:
        """Wake the viewers waiting for a change; ``live=False``: not the parked ones (the
        fan-out wrote the change to them)."""
        self.last_change = time.monotonic()
        changed, self._changed = self._changed, LazyEvent()
        changed.set()
        if live:
            self._wake_live()

    def _wake_live(self) -> None:
        live, self.live = self.live, {}
        for woken in live.values():
            if not woken.done():
                woken.set_result(None)


@dataclass(slots=True)
class _Write:
    """One fan-out write: ``frames`` framed as ``chunk``; ``ends``: the terminal event follows
    them (not in the chunk)."""

    frames: list[Frame]
    chunk: bytes
    ends: bool


def _is_full(chunk: list[Frame]) -> bool:
    return len(chunk) >= LOG_READ_CHUNK
