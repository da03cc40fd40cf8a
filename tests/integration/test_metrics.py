"""The metrics operators read: on the edge's /metrics and on the worker's own port."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack
from tests.support.api import create, events_url, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import eventually
from tests.support.sse import read_events

ANSWER = f"First sentence. {TRICKY_TEXT} Second sentence! Third one? Done."


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: httpx.AsyncClient, url: str) -> dict:
    response = await http.get(url)
    assert response.status_code == 200
    return samples(response.text)


async def test_edge_and_worker_metrics_answer_operators_questions(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    assert stack.worker is not None
    worker_url = f"http://127.0.0.1:{stack.worker.metrics_port}/metrics"
    edge_before = await scrape(http, stack.a + "/metrics")

    async def worker_up() -> dict | None:
        try:
            return await scrape(http, worker_url)
        except httpx.ConnectError:
            return None  # the worker process may still be starting

    worker_before = await eventually(worker_up, 10, "the worker's /metrics")

    ok = fake_llm.script(unique("metrics-ok"), ANSWER, delay=0.01)
    broken = fake_llm.script(unique("metrics-broken"), ANSWER, break_after=2)
    slow = fake_llm.script(unique("metrics-cancel"), ANSWER * 50, delay=0.05)
    ok_id = await create(http, stack.a, ok)
    live = await read_events(http, events_url(stack.a, ok_id))
    resumed = await read_events(http, events_url(stack.a, ok_id), last_event_id=live.ids[0])
    assert resumed.ids == live.ids[1:]
    broken_id = await create(http, stack.a, broken)
    await read_events(http, events_url(stack.a, broken_id))
    slow_id = await create(http, stack.a, slow)
    await read_events(http, events_url(stack.a, slow_id), stop_after=1)
    assert (await http.post(f"{stack.a}/v1/generations/{slow_id}/cancel")).status_code == 202
    await read_events(http, events_url(stack.a, slow_id))

    edge = await scrape(http, stack.a + "/metrics")

    def grew(name: str, before: dict, after: dict, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("broker_resumes_total", edge_before, edge) >= 1
    assert grew("broker_replayed_events_total", edge_before, edge) >= len(resumed.events)
    assert grew("broker_cancels_total", edge_before, edge) == 1
    assert grew("broker_delivery_latency_seconds_count", edge_before, edge) >= 1
    assert value(edge, "broker_readiness") == 1
    for gauge in ("broker_viewers", "broker_live_subscriptions"):
        assert (gauge, ()) in edge

    seen: list[dict] = []  # the worker's error counts, per scrape

    async def worker_caught_up() -> dict | None:
        worker = await scrape(http, worker_url)
        seen.append({k: v for k, v in worker.items() if k[0] == "broker_llm_errors_total"})
        # The worker counts an event after Redis answered its publish, so a viewer may have
        # read it a moment before: wait for the counts of what the viewers saw.
        caught_up = (
            grew("broker_llm_errors_total", worker_before, worker, code="llm_stream_broken") == 1
            and grew("broker_time_to_first_message_seconds_count", worker_before, worker) >= 2
            and grew("broker_generations_finished_total", worker_before, worker,
                     status="cancelled") == 1
        )
        return worker if caught_up else None

    try:
        worker = await eventually(worker_caught_up, 10, "the worker's metrics")
    except TimeoutError as e:
        raise AssertionError(
            f"the worker's errors: {seen[-1] if seen else None}, before: "
            f"{ {k: v for k, v in worker_before.items() if k[0] == 'broker_llm_errors_total'} }"
        ) from e
    assert grew("broker_time_to_first_message_seconds_count", worker_before, worker) >= 2
    assert grew("broker_llm_tokens_per_second_count", worker_before, worker) >= 2
    assert grew("broker_generations_finished_total", worker_before, worker,
                status="cancelled") == 1
    assert grew("broker_events_published_total", worker_before, worker) >= len(live.events)
    for gauge in ("broker_generations_running", "broker_queue_depth",
                  "broker_oldest_pending_job_age_seconds"):
        assert (gauge, ()) in worker
