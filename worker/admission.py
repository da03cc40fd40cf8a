"""Admission: a worker takes a new job only while its event loop keeps time and its
publishes go out promptly.

``BROKER_MAX_CONCURRENCY`` alone let one worker take 1000 jobs it could not serve: each one
made every other one late. So the worker measures its loop (how late a timer fires) and,
while the lag of the last half second is above ``BROKER_ADMIT_MAX_LAG``, reads no job: they
stay in the queue, for another worker or for this one once it keeps time again. The lag is
the mean over the window, not its peak: starting a batch of generations makes one late
timer, a loop that cannot keep up makes every timer late. Jobs are
taken a few at a time, each batch only after a fresh sample, so the lag can show what the
last batch cost before the next is read.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from broker.core.metrics import Metrics
from broker.core.settings import Settings

SAMPLE_INTERVAL = 0.025
# The lag is the mean of the samples of this window.
WINDOW = 0.5
# Jobs taken per fresh sample at most, while the loop keeps time.
BATCH = 16


class Admission:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.max_lag = settings.admit_max_lag
        self.metrics = metrics
        self._samples: deque[float] = deque(maxlen=max(1, round(WINDOW / SAMPLE_INTERVAL)))
        self._publishes: deque[tuple[float, float]] = deque()  # (when, how long), the window's
        self._sampled: asyncio.Event | None = None

    @property
    def limited(self) -> bool:
        return self.max_lag > 0

    @property
    def lag(self) -> float:
        """Seconds the loop ran a timer late, on average over the last ``WINDOW``."""
        return sum(self._samples) / len(self._samples) if self._samples else 0.0

    @property
    def publish_time(self) -> float:
        """Seconds a publish took (queueing included), on average over the last ``WINDOW``."""
        self._forget_old_publishes(time.monotonic())
        if not self._publishes:
            return 0.0
        return sum(took for _, took in self._publishes) / len(self._publishes)

    def note_publish(self, took: float) -> None:
        now = time.monotonic()
        self._publishes.append((now, took))
        self._forget_old_publishes(now)

    def _forget_old_publishes(self, now: float) -> None:
        while self._publishes and self._publishes[0][0] < now - WINDOW:
            self._publishes.popleft()

    async def measure_forever(self) -> None:
        self._sampled = asyncio.Event()
        while True:
            asked = time.monotonic()
            await asyncio.sleep(SAMPLE_INTERVAL)
            self._samples.append(max(0.0, time.monotonic() - asked - SAMPLE_INTERVAL))
            self.metrics.loop_lag.set(self.lag)
            self.metrics.publish_time.set(self.publish_time)
            self._sampled.set()
            self._sampled = asyncio.Event()

    def allowance(self, wanted: int, running: int) -> int:
        """How many of ``wanted`` jobs may be read now, with ``running`` taken already. A
        worker running nothing always takes some: whatever delays its loop, it is not its
        generations, and a job left queued would wait for nothing."""
        if not self.limited:
            return wanted
        if running and (self.lag > self.max_lag or self.publish_time > self.max_lag):
            return 0
        return min(wanted, BATCH)

    async def next_sample(self) -> None:
        """Until the loop's lag has been sampled again (at most a sample interval, plus the
        lag itself)."""
        if self._sampled is None:
            await asyncio.sleep(SAMPLE_INTERVAL)
            return
        await self._sampled.wait()
