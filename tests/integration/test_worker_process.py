"""``broker worker`` as a user runs it: several on one host with default settings, a metrics
port that cannot be had, and what the worker logs (no request lines, its drain)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from broker.core import protocol
from tests.conftest import StartBroker
from tests.support.api import create, events_url, metric, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import BrokerProcess, RedisServer, wait_until
from tests.support.sse import read_events

METRICS_AT = re.compile(r"worker metrics on http://127\.0\.0\.1:(\d+)/metrics")
# How many generations a round may create while waiting for every worker to take one: jobs
# go to the worker blocked longest in XREADGROUP, so each worker gets one within a few.
CREATES_PER_WORKER = 10


def start_default_worker(redis: RedisServer, llm: FakeLLM) -> BrokerProcess:
    """A worker with default settings but for where Redis and the LLM are (no metrics port)."""
    env = {"REDIS_URL": redis.url, "OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "k"}
    return BrokerProcess("worker", env, own_metrics_port=False)


async def owner_of(redis: RedisServer, gen_id: str) -> str:
    """The worker that claimed the generation (its consumer name: host-pid-random)."""
    client = redis.client()
    try:
        owner = await asyncio.to_thread(wait_until, lambda: client.hget(
            protocol.meta_key(gen_id), "owner"), 20, f"a worker to claim {gen_id}")
        return str(owner.decode())
    finally:
        client.close()


async def every_worker_takes_jobs(
    http: httpx.AsyncClient, edge: BrokerProcess, redis: RedisServer, fake_llm: FakeLLM,
    workers: list[BrokerProcess],
) -> dict[int, int]:
    """Create generations one at a time until each worker owned one; follow them all to their
    end. Returns how many each worker (by pid) ran."""
    ran = {w.proc.pid: 0 for w in workers}
    ids = []
    for _ in range(CREATES_PER_WORKER * len(workers)):
        gen_id = await create(http, edge.url, unique("host"))
        ids.append(gen_id)
        pid = int((await owner_of(redis, gen_id)).rsplit("-", 2)[1])
        ran[pid] += 1
        if all(ran.values()):
            break
    for gen_id in ids:
        got = await read_events(http, events_url(edge.url, gen_id))
        assert got.terminal_data().get("finish_reason") == "stop", got.events[-1]
    assert all(ran.values()), f"generations run per worker pid: {ran}"
    return ran


async def test_two_then_three_workers_with_default_settings_on_one_host(
    own_redis: RedisServer, fake_llm: FakeLLM, start_broker: StartBroker,
    http: httpx.AsyncClient,
):
    edge = start_broker("edge", own_redis.url)
    workers: list[BrokerProcess] = []
    ran_in_all: dict[int, int] = {}  # generations run so far, by worker pid
    try:
        for count in (2, 3):
            while len(workers) < count:
                workers.append(start_default_worker(own_redis, fake_llm))
            for w in workers:
                w.wait_for_log("taking jobs")
            ports = {w.proc.pid: int(w.wait_for_log(METRICS_AT)[1]) for w in workers}
            assert len(set(ports.values())) == count, ports
            assert all(9100 <= port <= 9199 for port in ports.values()), ports
            ran = await every_worker_takes_jobs(http, edge, own_redis, fake_llm, workers)
            for pid, n in ran.items():
                ran_in_all[pid] = ran_in_all.get(pid, 0) + n
            # Each logged port is that worker's own: its /metrics counts what it ran.
            for pid, port in ports.items():
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                completed = 'broker_generations_finished_total{status="completed"}'
                assert metric(text, completed) == ran_in_all[pid], (pid, port, ran_in_all)
        for w in workers:
            if ports[w.proc.pid] != 9100:  # 9100 was taken when it started: it says so
                w.wait_for_log(r"\((port 9100|ports 9100-\d+) in use, so the next free one")
    finally:
        for w in workers:
            w.stop()


@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_set_metrics_port_that_is_taken_stops_the_worker_with_one_line(how: str):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"}
        args = [sys.executable, "-m", "broker", "worker"]
        if how == "env":
            env["BROKER_WORKER_METRICS_PORT"] = str(port)
        else:
            args += ["--worker-metrics-port", str(port)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output
    assert output.strip().splitlines() == [
        f"broker worker: cannot serve metrics on 127.0.0.1:{port}: address in use; "
        "set --worker-metrics-port / BROKER_WORKER_METRICS_PORT (0: no metrics server)"
    ]


async def test_worker_logs_no_request_lines_and_tells_its_drain(
    own_redis: RedisServer, fake_llm: FakeLLM, start_broker: StartBroker,
    http: httpx.AsyncClient,
):
    edge = start_broker("edge", own_redis.url)
    worker = start_default_worker(own_redis, fake_llm)  # default log level: info
    try:
        worker.wait_for_log("taking jobs")
        done_id = await create(http, edge.url, unique("quiet"))
        assert (await read_events(http, events_url(edge.url, done_id))).terminal is not None
        held = fake_llm.script(unique("held"), "First. Second.", hold_at=1)
        held_id = await create(http, edge.url, held)
        await asyncio.to_thread(lambda: fake_llm.record_for(held))  # running now

        worker.signal(signal.SIGTERM)
        worker.wait_for_log(r"stopping: taking no more jobs, draining 1 generation\(s\) for "
                            r"up to 30 s \(BROKER_DRAIN_TIMEOUT\)")
        fake_llm.reply_for(held).release.set()
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
        got = await read_events(http, events_url(edge.url, held_id))
        assert got.text == "First. Second." and got.terminal_data()["finish_reason"] == "stop"
        output = worker.output()
        assert "stopped: 1 generation(s) finished during the drain, 0 ended with " \
               "worker_shutdown" in output, output
        assert "HTTP Request:" not in output and "Traceback" not in output, output
    finally:
        worker.stop()


def pubsub_clients_of(redis: RedisServer, name_prefix: str) -> list[dict[str, str]]:
    """``CLIENT LIST``'s subscribed clients named ``name_prefix...``, each as its fields."""
    client = redis.client()
    try:
        listed = client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
    finally:
        client.close()
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    clients = [dict(field.split("=", 1) for field in line.split() if "=" in field)
               for line in text.splitlines()]
    return [c for c in clients if c.get("name", "").startswith(name_prefix)]


async def test_on_one_redis_the_worker_publishes_beside_its_cancel_subscription(
    own_redis: RedisServer, fake_llm: FakeLLM, start_broker: StartBroker,
    http: httpx.AsyncClient,
):
    """A default worker's events go to Redis on the connection that listens for cancel
    notices (Redis says so: that client's last command is the publish script's EVALSHA).
    Killed mid-answer, the publishes go on through redis-py until it is back, and the
    answer is whole and exact."""
    edge = start_broker("edge", own_redis.url)
    worker = start_default_worker(own_redis, fake_llm)
    try:
        worker.wait_for_log("taking jobs")
        text = "First sentence here. " + TRICKY_TEXT + " Last one."
        held = fake_llm.script(unique("beside"), text, hold_at=4)
        gen_id = await create(http, edge.url, held)
        await asyncio.to_thread(lambda: fake_llm.record_for(held))
        listener = await asyncio.to_thread(wait_until, lambda: [
            c for c in pubsub_clients_of(own_redis, "broker-worker-") if c["cmd"] == "evalsha"],
            20, "the worker's first text published on its cancel listener")
        assert len(listener) == 1 and listener[0]["sub"] == "1", listener

        killer = own_redis.client()
        try:
            assert killer.client_kill_filter(_id=listener[0]["id"]) == 1
        finally:
            killer.close()
        fake_llm.reply_for(held).release.set()
        got = await read_events(http, events_url(edge.url, gen_id))
        assert got.text == text and got.terminal_data()["finish_reason"] == "stop"
        # A new listener took the old one's place, and the publishes again (the next answer).
        after = await create(http, edge.url, unique("after"))
        assert (await read_events(http, events_url(edge.url, after))).terminal is not None
        assert [c["cmd"] for c in pubsub_clients_of(own_redis, "broker-worker-")] == ["evalsha"]
    finally:
        worker.stop()
