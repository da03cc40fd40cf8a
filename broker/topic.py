"""A generation's recent events as one edge holds them: a window of encoded frames and cursors.

A ``Topic`` keeps a window of the most recent events of one generation, each already encoded
to SSE bytes (encoded once per edge, not once per viewer). A viewer is only a cursor: it takes
what the window holds after its cursor, and whatever the window no longer (or not yet) holds
comes from the log, in one read shared by every viewer that needs the same range. So a slow
viewer costs no queue, a late or resuming viewer costs a log read, and a gap in the live ids
(missed pub/sub messages) is healed the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker import sse
from broker.metrics import Metrics
from broker.protocol import Event
from broker.store import Store

LOG_READ_CHUNK = 200
# Full chunks a topic keeps after reading them (log content never changes): in a resume storm
# each chunk is read once for every viewer, not once per group of viewers that happen to ask
# at the same moment. At most this many x LOG_READ_CHUNK frames, only while the topic lives.
KEPT_CHUNKS = 8


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
    # Log reads by chunk start: in flight, or done and full (then kept, least recently used
    # first, see KEPT_CHUNKS).
    _chunks: OrderedDict[int, asyncio.Future[list[Frame]]] = field(default_factory=OrderedDict)

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
            first = self.window[0].seq
            if frame.seq >= first and self.window[frame.seq - first].data != frame.data:
                self.diverged()
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

    async def read_log(
        self, store: Store, cursor: int, metrics: Metrics
    ) -> tuple[list[Frame], bool]:
        """Log events after ``cursor``, and whether more may follow them in the log.

        Reads go by chunks aligned on ``LOG_READ_CHUNK``, so viewers at different cursors in
        one chunk share one call, and a full chunk is kept for the next viewers. A read runs
        in a task of its own: a viewer leaving mid-read cancels only its own wait.
        """
        start = cursor - cursor % LOG_READ_CHUNK
        read = self._chunks.get(start)
        if read is None:
            read = asyncio.ensure_future(self._read_log(store, start, metrics))
            self._chunks[start] = read
            read.add_done_callback(lambda done: self._read_done(start, done))
        else:
            self._chunks.move_to_end(start)
        chunk = await asyncio.shield(read)
        return [f for f in chunk if f.seq > cursor], len(chunk) >= LOG_READ_CHUNK

    def _read_done(self, start: int, read: asyncio.Future[list[Frame]]) -> None:
        failed = read.cancelled() or read.exception() is not None  # retrieved: waiters may be gone
        if failed or len(read.result()) < LOG_READ_CHUNK:
            # Not kept: a short chunk grows as the generation goes on.
            if self._chunks.get(start) is read:
                del self._chunks[start]
            return
        done = [key for key, r in self._chunks.items() if r.done()]
        for key in done[: max(0, len(done) - KEPT_CHUNKS)]:
            del self._chunks[key]

    async def _read_log(self, store: Store, start: int, metrics: Metrics) -> list[Frame]:
        metrics.log_reads.inc()
        resyncs = self.resyncs
        frames = [to_frame(e) for e in await store.read_log(self.gen_id, start, LOG_READ_CHUNK)]
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
        # Redis may have come back with another history: read the log afresh.
        for start in [k for k, read in self._chunks.items() if read.done()]:
            del self._chunks[start]
        self._notify()

    def wake(self) -> None:
        """Wake the viewers without a change (they check their keepalive and deadline); the
        topic still counts as quiet for the audit."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _notify(self) -> None:
        self.last_change = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
