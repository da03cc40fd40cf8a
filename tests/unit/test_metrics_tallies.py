"""The per-delivery tallies (``Tally``, ``LatencyTally``) show in a scrape exactly as the
prometheus_client ``Counter`` and ``Histogram`` they stand for would, given the same counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker.core.metrics import LatencyTally, Metrics, Tally

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# On a bound, just past one, zero, past the last bound (+Inf), a value summing inexactly.
OBSERVED = [0.001, 0.0010001, 0.0, 0.003, 0.02, 7.5, 1.0, 0.1, 0.3, 0.0025]


def scrape_lines(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines without the ``_created`` samples (a creation time differs)."""
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


def test_a_tally_scrapes_as_a_counter_with_the_same_count() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally("broker_things", "things counted", registry=ours)
    counter = Counter("broker_things", "things counted", registry=theirs)
    for amount in (1, 4, 1, 0, 250):
        tally.inc(amount)
        counter.inc(amount)
    assert scrape_lines(ours) == scrape_lines(theirs)
    assert ours.get_sample_value("broker_things_total") == 256
    assert ours.get_sample_value("broker_things_created") is not None


def test_a_latency_tally_scrapes_as_a_histogram_with_the_same_observations() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = LatencyTally("broker_wait_seconds", "waits", BUCKETS, registry=ours)
    histogram = Histogram("broker_wait_seconds", "waits", buckets=BUCKETS, registry=theirs)
    assert scrape_lines(ours) == scrape_lines(theirs)  # before any observation too
    for amount in OBSERVED:
        tally.observe(amount)
        histogram.observe(amount)
    assert scrape_lines(ours) == scrape_lines(theirs)
    assert ours.get_sample_value("broker_wait_seconds_bucket", {"le": "0.001"}) == 2
    assert ours.get_sample_value("broker_wait_seconds_bucket", {"le": "+Inf"}) == len(OBSERVED)
    assert ours.get_sample_value("broker_wait_seconds_count") == len(OBSERVED)
    assert ours.get_sample_value("broker_wait_seconds_created") is not None


def test_the_edge_metrics_render_the_tallies_counted_since_the_last_scrape_and_before() -> None:
    metrics = Metrics()
    metrics.events_delivered.inc(3)
    metrics.direct_writes.inc(2)
    metrics.replayed_events.inc(5)
    metrics.delivery_latency.observe(0.004)
    first = metrics.render().decode()
    assert "broker_events_delivered_total 3.0" in first
    metrics.events_delivered.inc()
    second = metrics.render().decode().splitlines()
    assert "broker_events_delivered_total 4.0" in second  # cumulative, as a counter
    assert "broker_direct_writes_total 2.0" in second
    assert "broker_replayed_events_total 5.0" in second
    assert 'broker_delivery_latency_seconds_bucket{le="0.005"} 1.0' in second
    assert 'broker_delivery_latency_seconds_bucket{le="0.0025"} 0.0' in second
    assert "broker_delivery_latency_seconds_count 1.0" in second
