"""One generation on a worker: LLM deltas -> typed events (answer and reasoning through their
sentence buffers, tool calls, a refusal) -> atomic append+publish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core import protocol
from broker.core.backoff import Backoff
from broker.core.deltas import Piece, Text, TextChannels
from broker.core.metrics import Metrics
from broker.core.protocol import JobEntry, NewEvent
from broker.core.sentences import SentenceBuffer
from broker.core.settings import Settings
from broker.core.store import Store
from broker.core.tasks import cancel_and_wait
from worker.batch import PublishBatcher
from worker.llm import LLM, Completion, LLMError

log = logging.getLogger(__name__)

PUBLISH_RETRY_DEADLINE = 30.0


class Stop(Exception):
    """The generation must stop without publishing more: it is no longer ours (or is gone)."""


class Publisher:
    """Numbers the events of one generation and publishes them in order, retrying safely."""

    def __init__(
        self, store: Store, gen_id: str, owner: str, metrics: Metrics, enqueued_ms: int,
        on_published: Callable[[float], None] | None = None,
        batcher: PublishBatcher | None = None,
    ) -> None:
        """``on_published``: told how long each publish took, queueing for the lock and a
        Redis connection included (the worker's admission watches it). ``batcher``: the
        worker's, sending the publishes of all its generations ready together in one round
        trip (``worker.batch``); without it each goes alone."""
        self.store = store
        self.send = batcher.publish if batcher is not None else store.publish
        self.gen_id = gen_id
        self.owner = owner
        self.metrics = metrics
        self.enqueued_ms = enqueued_ms
        self.on_published = on_published
        self.seq = 0
        self.lock = asyncio.Lock()  # one publish at a time, so seqs reach Redis in order

    async def error(self, code: str, message: str) -> None:
        await self.publish([protocol.new_error(code, message)])

    async def publish(self, events: list[NewEvent]) -> None:
        """Publish ``events`` as the next seqs, in one atomic call (all or none)."""
        # Shielded: a caller cancelled mid-call (a cancel, a shutdown) must not leave Redis
        # holding events whose seqs this publisher never counted.
        await asyncio.shield(asyncio.ensure_future(self._publish_next(events)))

    async def _publish_next(self, events: list[NewEvent]) -> None:
        asked = time.monotonic()
        async with self.lock:
            first = self.seq == 0
            result = await self._with_retries(self.seq + 1, events)
            if result < 0:
                raise Stop("generation gone" if result == -1 else "lease lost")
            self.seq += len(events)
            if self.on_published is not None:
                self.on_published(time.monotonic() - asked)
            self.metrics.events_published.inc(len(events))
            final_status = events[-1].final_status
            if final_status:
                self.metrics.generations_finished.labels(final_status).inc()
            if first and not events[0].terminal:  # what a viewer sees first, of any kind
                waited = max(0, protocol.now_ms() - self.enqueued_ms) / 1000
                self.metrics.time_to_first_message.observe(waited)

    async def _with_retries(self, seq: int, events: list[NewEvent]) -> int:
        """Retry through a Redis restart: the explicit seq makes a repeated call a no-op."""
        deadline = time.monotonic() + PUBLISH_RETRY_DEADLINE
        backoff = Backoff(cap=1.0)
        published_ms = protocol.now_ms()
        while True:
            try:
                return await self.send(self.gen_id, self.owner, seq, events, published_ms)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self.metrics.redis_errors.labels("publish").inc()
                if time.monotonic() + backoff.delay > deadline:
                    raise
                await backoff.sleep()


class GenerationRun:
    """Runs one claimed generation to its terminal event."""

    def __init__(
        self, gen_id: str, request: dict[str, Any], *, job_entry: JobEntry, owner: str,
        store: Store,
        llm: LLM, settings: Settings, metrics: Metrics,
        on_published: Callable[[float], None] | None = None,
        batcher: PublishBatcher | None = None,
    ) -> None:
        self.gen_id = gen_id
        self.job_entry = job_entry
        self.job_request = request  # as the job carries it: checked when the run starts
        self.owner = owner
        self.store = store
        self.llm = llm
        self.settings = settings
        self.metrics = metrics
        self.publisher = Publisher(
            store, gen_id, owner, metrics, protocol.entry_time_ms(job_entry.entry_id),
            on_published, batcher,
        )
        # The answer's and the reasoning's sentence buffers (broker.core.deltas).
        self.channels = TextChannels(lambda: sentence_buffer(settings))
        # What stops the run before the LLM's answer ends; setting any of them wakes the run
        # (one future, not a task waiting on each event: three tasks per generation made and
        # cancelled were ~3 % of the worker's CPU on the create path).
        self._stop: asyncio.Future[None] | None = None
        self.cancel_requested = _StopFlag(self._stop_requested)
        self.shutdown_requested = _StopFlag(self._stop_requested)
        self.lost = _StopFlag(self._stop_requested)
        self._pending = asyncio.Event()  # a buffer holds text the flusher must time
        self.stopped = False  # a publish was refused (see ``Stop``): no terminal event from us
        self.tokens_in = 0
        self._first_token_at: float | None = None
        self._last_token_at = 0.0
        self.longest_wait = 0.0

    async def run(self) -> None:
        """Run to the terminal event. A failure of this run that is not the store's (a bug, a
        job the code did not expect) ends it with ``worker_error``: the job is done, not left
        for a reaper to end as ``worker_lost`` as if this worker had died."""
        try:
            await self._run()
        except (RedisError, OSError):
            raise  # Redis failed: the job stays pending and a reaper ends it
        except Exception:
            log.exception("generation %s failed in the worker", self.gen_id)
            try:
                await self.publisher.error(
                    "worker_error", "the worker failed while running this generation")
            except Stop as e:
                log.warning("generation %s stopped: %s", self.gen_id, e)

    async def _run(self) -> None:
        request = {"model": self.settings.model, **self.job_request}
        llm_task = asyncio.create_task(self.llm.stream(request, self._on_pieces))
        flusher = asyncio.create_task(self._flush_on_time())
        stop = self._stop = asyncio.get_running_loop().create_future()
        if any(f.is_set() for f in (self.cancel_requested, self.shutdown_requested, self.lost)):
            stop.set_result(None)
        try:
            await asyncio.wait([llm_task, stop], return_when=asyncio.FIRST_COMPLETED)
            if not llm_task.done():
                llm_task.cancel()  # closes the upstream response (``async with stream``)
            outcome = await _outcome(llm_task)
            # Only the flusher stops before the rest of the text goes out (the worker's lease
            # keeper renews the lease until the run returns, after the terminal event).
            await cancel_and_wait(flusher)
            if self.lost.is_set():
                log.warning("generation %s: lease lost; another party ended it", self.gen_id)
                return
            await self._finish(outcome)
        except Stop as e:
            self.stopped = True
            log.warning("generation %s stopped: %s", self.gen_id, e)
        finally:
            stop.cancel()
            await cancel_and_wait(llm_task, flusher)

    def _stop_requested(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    def _note_speed(self) -> None:
        first = self._first_token_at
        if first is not None and self.tokens_in > 1 and self._last_token_at > first:
            speed = (self.tokens_in - 1) / (self._last_token_at - first)
            self.metrics.llm_tokens_per_second.observe(speed)

    async def _finish(self, outcome: Completion | LLMError | None) -> None:
        self._note_speed()
        # The text still pending goes out with the terminal event, in one batch.
        events = self._flush_all()
        if isinstance(outcome, Completion):
            events.append(protocol.new_end(outcome.finish_reason, outcome.usage))
        elif isinstance(outcome, LLMError):
            log.info("generation %s failed upstream: %s", self.gen_id, outcome)
            self.metrics.llm_errors.labels(outcome.code).inc()
            events.append(protocol.new_error(outcome.code, outcome.message))
        elif self.cancel_requested.is_set():
            events.append(protocol.new_end("cancelled", None))
        else:
            events.append(protocol.new_error(
                "worker_shutdown", "the worker stopped before the answer was complete"
            ))
        await self.publisher.publish(events)

    def _flush_all(self) -> list[NewEvent]:
        """Every buffer's pending text, as events."""
        since = self.channels.pending_since
        events = self.channels.flush()
        if events and since is not None:
            self._note_wait(since)
        return events

    async def _on_pieces(self, pieces: list[Piece]) -> None:
        """What one LLM chunk brought: the events it completes go out as one batch. Text goes
        through its kind's sentence buffer; a tool call or a refusal goes out after the text
        before it (``deltas``: the upstream's order)."""
        now = time.monotonic()
        events: list[NewEvent] = []
        for piece in pieces:
            if isinstance(piece, Text):
                self._note_token(now)
                since = self.channels.pending_since or now
                texts = self.channels.feed(piece.kind, piece.text, now)
                if texts:
                    self._note_wait(since)
                events += texts
            else:
                events += self._flush_all()
                events.append(piece.event())
        if events:
            await self.publisher.publish(events)
        if self.channels.pending_since is not None:
            self._pending.set()

    def _note_token(self, now: float) -> None:
        self.tokens_in += 1
        self._last_token_at = now
        if self._first_token_at is None:
            self._first_token_at = now

    def _note_wait(self, since: float) -> None:
        """Record how long the oldest text of a message waited in the buffer."""
        waited = time.monotonic() - since
        self.longest_wait = max(self.longest_wait, waited)
        self.metrics.buffer_wait.observe(waited)

    async def _flush_on_time(self) -> None:
        """Publish pending text when the buffer says it is due: the first text soon after the
        first token, later text when no sentence end came in time (never past the bound)."""
        while True:
            deadline = self.channels.deadline()
            if deadline is None:
                self._pending.clear()
                await self._pending.wait()
                continue
            # Sleeping until a deadline computed now never oversleeps the bound: every deadline
            # is at most the oldest pending character's arrival + BROKER_FLUSH_INTERVAL, and
            # the oldest pending character only gets younger. (Text arriving meanwhile may move
            # the deadline either way; waking early just computes it again.)
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            since = self.channels.pending_since
            events = self.channels.flush_due(time.monotonic())
            if events and since is not None:
                self._note_wait(since)
                await self.publisher.publish(events)

    def lease_state(self, state: str) -> None:
        """What a renewal of this run's lease brought back (``worker.leases``): 'cancel' (a
        cancel was requested; its pub/sub notice may have been missed) or 'lost' (no longer
        ours)."""
        if state == "cancel":
            self.cancel_requested.set()
        elif state == "lost":
            self.lost.set()


class _StopFlag(asyncio.Event):
    """An ``asyncio.Event`` that also tells its run when it is set."""

    def __init__(self, on_set: Callable[[], None]) -> None:
        super().__init__()
        self._on_set = on_set

    def set(self) -> None:
        super().set()
        self._on_set()


def sentence_buffer(settings: Settings) -> SentenceBuffer:
    """A buffer for one text channel of one generation, with the settings' timing."""
    return SentenceBuffer(
        settings.max_message_chars, first_wait=settings.first_text_wait,
        max_wait=settings.flush_interval,
    )


async def _outcome(llm_task: asyncio.Task[Completion]) -> Completion | LLMError | None:
    """What the LLM call came to: a completion, its error, or None if it was stopped. The
    caller's own cancellation (a shutdown cancelling the run) goes on up."""
    try:
        return await llm_task
    except LLMError as e:
        return e
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return None  # the LLM task was stopped (a cancel, a shutdown, a lost lease)
