"""Prometheus metrics. Each process (or test app) owns its registry, so apps can coexist."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class Tally:
    """A counter counted on the edge's per-delivery path: a plain integer, shown as a
    Prometheus counter (the same ``<name>_total`` and ``<name>_created`` samples as
    ``prometheus_client.Counter``) whenever the registry is collected. ``Counter.inc`` takes a
    lock and updates a value object (~450 ns); a fan-out counts on every message, so here it is
    ``value += n`` (~70 ns). Only the event loop's thread counts; a collection from another
    thread reads a value at most one increment old."""

    __slots__ = ("_created", "_documentation", "_name", "value")

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._created = time.time()
        self.value = 0
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, value=self.value,
                                    created=self._created)]


class LatencyTally:
    """A histogram observed on the edge's per-delivery path, as ``Tally`` is a counter: a count
    per bucket and a sum in plain numbers, shown as the samples of
    ``prometheus_client.Histogram`` (``_bucket`` by ``le``, ``_count``, ``_sum``, ``_created``)
    when the registry is collected. ``Histogram.observe`` takes two locks per call."""

    __slots__ = ("_bounds", "_counts", "_created", "_documentation", "_labels", "_name", "_sum")

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._name = name
        self._documentation = documentation
        self._bounds = bounds
        # ``le`` written as Histogram writes it (the function is untyped in prometheus_client).
        self._labels: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as Histogram counts it (``le``).
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[Metric]:
        cumulative, buckets = 0, []
        for label, count in zip(self._labels, self._counts, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        family = HistogramMetricFamily(self._name, self._documentation, buckets=buckets,
                                       sum_value=self._sum)
        family.add_sample(self._name + "_created", {}, self._created)
        return [family]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.viewers = Gauge("broker_viewers", "SSE viewers connected to this edge", registry=r)
        self.subscriptions = Gauge(
            "broker_live_subscriptions", "generations this edge is subscribed to", registry=r
        )
        self.conversation_subscriptions = Gauge(
            "broker_conversation_subscriptions",
            "conversations this edge is subscribed to (their turn notices)", registry=r,
        )
        self.generations_created = Counter(
            "broker_generations_created", "generations accepted by this edge", registry=r
        )
        self.generations_finished = Counter(
            "broker_generations_finished",
            "generations this process ended, by final status",
            ["status"],
            registry=r,
        )
        self.generations_running = Gauge(
            "broker_generations_running", "generations this worker is running", registry=r
        )
        self.workers_lost = Counter(
            "broker_workers_lost", "generations ended with worker_lost by this worker's reaper",
            registry=r,
        )
        self.lease_checks = Counter(
            "broker_lease_checks", "lease checks of the generations this edge serves (each one "
            "REAP_SCRIPT call, or a stream request's meta read: STREAM_META_SCRIPT)", registry=r,
        )
        self.leases_reaped = Counter(
            "broker_leases_reaped", "generations this edge ended with worker_lost: their lease "
            "ran out", registry=r,
        )
        self.events_published = Counter(
            "broker_events_published", "events this worker appended and published", registry=r
        )
        self.buffer_wait = Histogram(
            "broker_buffer_wait_seconds", "how long the oldest text of a message waited in the "
            "worker's sentence buffer", buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
            registry=r,
        )
        # Counted per delivery: tallies (see ``Tally``), not ``Counter``s.
        self.events_delivered = Tally(
            "broker_events_delivered", "events this edge wrote to viewers", registry=r
        )
        self.direct_writes = Tally(
            "broker_direct_writes", "events of broker_events_delivered the fan-out wrote "
            "straight to caught-up viewers' sockets (the fast path)", registry=r
        )
        self.resumes = Counter(
            "broker_resumes", "viewers that connected with a Last-Event-ID", registry=r
        )
        self.log_reads = Counter(
            "broker_log_reads", "reads of a generation log (late join, resume, gap)", registry=r
        )
        self.gaps = Counter(
            "broker_live_gaps", "gaps in live ids, filled from the log", registry=r
        )
        self.resubscribes = Counter(
            "broker_pubsub_resubscribes", "topics resubscribed after a pub/sub reconnect",
            registry=r,
        )
        self.pubsub_stalls = Counter(
            "broker_pubsub_stalls", "subscriptions dropped because probes stopped coming back",
            registry=r,
        )
        self.readiness = Gauge(
            "broker_readiness", "1 while delivery probes make the round trip, else 0", registry=r
        )
        self.slow_viewers_closed = Counter(
            "broker_slow_viewers_closed", "viewers closed because a write blocked too long",
            registry=r,
        )
        self.redis_errors = Counter(
            "broker_redis_errors", "Redis commands or connections that failed", ["where"],
            registry=r,
        )

        # -- latency and throughput
        self.time_to_first_message = Histogram(
            "broker_time_to_first_message_seconds",
            "from the job's enqueueing to its first message being published (worker)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r,
        )
        self.delivery_latency = LatencyTally(
            "broker_delivery_latency_seconds",
            "from the worker's publish to the edge's write, for viewers that are live (once per "
            "fan-out, after its last write)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r,
        )
        self.llm_tokens_per_second = Histogram(
            "broker_llm_tokens_per_second", "LLM stream speed per generation (deltas per second)",
            buckets=(5, 10, 20, 40, 80, 160, 320, 640), registry=r,
        )
        self.replayed_events = Tally(
            "broker_replayed_events", "events sent to viewers from the log (catch-up)", registry=r
        )
        self.pubsub_reconnects = Counter(
            "broker_pubsub_reconnects", "new pub/sub connections after a failure", registry=r
        )
        self.llm_errors = Counter(
            "broker_llm_errors", "generations the LLM failed, by cause", ["code"], registry=r
        )
        self.cancels = Counter("broker_cancels", "cancel requests accepted (202)", registry=r)
        self.queue_depth = Gauge(
            "broker_queue_depth", "jobs not yet taken by any worker", registry=r
        )
        self.oldest_pending_age = Gauge(
            "broker_oldest_pending_job_age_seconds",
            "age of the oldest job taken but not finished (0 when none)", registry=r,
        )
        # -- the worker's load: admission, queueing and lease renewals
        self.queue_wait = Histogram(
            "broker_queue_wait_seconds",
            "from the job's enqueueing to this worker's claim of it (worker)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.loop_lag = Gauge(
            "broker_worker_loop_lag_seconds",
            "how late the worker's event loop ran a timer, on average over the last half second",
            registry=r,
        )
        self.publish_time = Gauge(
            "broker_worker_publish_seconds",
            "how long the worker's publishes took, queueing for a Redis connection included, on "
            "average over the last half second", registry=r,
        )
        self.admission_waits = Counter(
            "broker_admission_waits", "times this worker left jobs queued because its event "
            "loop ran late or its publishes were slow (BROKER_ADMIT_MAX_LAG)", registry=r,
        )
        self.lease_renewal_interval = Histogram(
            "broker_lease_renewal_interval_seconds",
            "time between two rounds of this worker's lease renewals (a lease must outlast it)",
            buckets=(0.5, 1, 1.5, 1.75, 2, 2.5, 3, 4, 5, 10), registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
