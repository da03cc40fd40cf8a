"""Redis failing under a live stream: restarts with and without persistence, pub/sub overflow."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.faults.helpers import (
    assert_exact_once,
    until_messages,
    viewers_mid_stream,
    wait_ready_status,
    watch,
)
from tests.support.api import assert_error_body, create, events_url, metric, status, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import BrokerProcess, wait_until
from tests.support.sse import Received

ANSWER = "".join(
    f"Sentence {i} of the answer, with 3.14 and 你好。 And an emoji 🎉.\r\n" for i in range(60)
) + TRICKY_TEXT
AOF = ("--appendonly", "yes", "--appendfsync", "always")


async def test_redis_restart_with_aof_loses_nothing(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=2, workers=1, redis_args=AOF)
    prompt = fake_llm.script(unique("aof"), ANSWER, delay=0.01)
    async with httpx.AsyncClient(timeout=60) as http:
        gen_id, viewers, _ = await viewers_mid_stream(http, d, prompt, 4, messages=2)

        d.redis.kill()
        down_at = time.monotonic()
        for edge in d.edges:
            await wait_ready_status(http, edge, 503)
        d.redis.start()  # same port and directory: the AOF is replayed
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
        elapsed = time.monotonic() - down_at
        for edge in d.edges:
            await wait_ready_status(http, edge, 200)

        for got in results:
            assert_exact_once(got, ANSWER)
            assert got.terminal_data()["finish_reason"] == "stop"
        assert (await status(http, d.edges[1].url, gen_id))["text"] == ANSWER
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"Redis restart (AOF): every viewer had the exact text {elapsed:.2f}s after the kill")


async def test_redis_restart_without_persistence_ends_streams_with_history_lost(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=1, workers=1)
    prompt = fake_llm.script(unique("amnesia"), ANSWER, delay=0.05)
    base = d.edges[0].url
    async with httpx.AsyncClient(timeout=60) as http:
        gen_id = await create(http, base, prompt)
        progress: list[Received] = []
        viewers = [watch(http, events_url(base, gen_id), progress) for _ in range(3)]
        await until_messages(progress, 3, 2)

        d.redis.restart()  # empty: no AOF, no RDB
        restarted_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*viewers), 30)
        elapsed = time.monotonic() - restarted_at

        for got in results:
            assert got.terminal is not None and got.terminal.event == "error"
            assert got.terminal_data()["code"] == "history_lost"
            assert ANSWER.startswith(got.text)
        resume = await http.get(events_url(base, gen_id), headers={"last-event-id": "1"})
        assert_error_body(resume, 404, "not_found")
        # The worker noticed too and stopped reading from the LLM.
        record = fake_llm.record_for(prompt)
        assert await asyncio.to_thread(record.closed_by_client.wait, 10)
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"Redis restart (empty): every viewer had history_lost {elapsed:.2f}s after it")


def subscriber_of(d, edge: BrokerProcess) -> dict | None:
    name = f"broker-edge-{edge.proc.pid}"
    return next((c for c in d.redis.client().client_list()
                 if c["name"] == name and int(c["sub"]) > 0), None)


async def test_pubsub_overflow_drops_the_subscriber_and_the_log_fills_the_gap(
    deploy, fake_llm: FakeLLM, record_property: pytest.RecordProperty
):
    d = deploy(edges=1, workers=1, broker_max_message_chars=4000)
    d.redis.client().config_set("client-output-buffer-limit", "pubsub 64kb 64kb 1")
    edge = d.edges[0]
    block = ("overflow " * 450).rstrip() + ". "  # ~4 kB per message
    tokens = ["Warm up. ", "Still warming up. ", *([block] * 3000), "The end."]  # ~12 MB
    prompt = fake_llm.script(unique("overflow"), tokens=tokens, delay=0, hold_at=2)
    expected = "".join(tokens)
    async with httpx.AsyncClient(timeout=120) as http:
        gen_id = await create(http, edge.url, prompt)
        progress: list[Received] = []
        viewers = [watch(http, events_url(edge.url, gen_id), progress) for _ in range(2)]
        await until_messages(progress, 2, 1)
        original = subscriber_of(d, edge)
        assert original is not None

        edge.signal(signal.SIGSTOP)  # the edge stops reading: Redis's buffer for it fills up
        try:
            fake_llm.reply_for(prompt).release.set()
            dropped = await asyncio.to_thread(
                wait_until, lambda: subscriber_of(d, edge) is None, 60, "Redis to drop the edge"
            )
            assert dropped
            dropped_at = time.monotonic()
        finally:
            edge.signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*viewers), 90)
        elapsed = time.monotonic() - dropped_at

        for got in results:
            assert_exact_once(got, expected)
        metrics = (await http.get(edge.url + "/metrics")).text
        assert metric(metrics, "broker_pubsub_resubscribes_total") >= 1
        assert metric(metrics, "broker_pubsub_reconnects_total") >= 1  # the drop is counted
        now = subscriber_of(d, edge)
        assert now is not None and now["id"] != original["id"]
    record_property("seconds_to_terminal", round(elapsed, 2))
    print(f"pub/sub overflow: viewers had the exact text {elapsed:.2f}s after the drop")
