"""``broker edge --edge-workers 2``: two processes serve one port, both serve streams, each with
its own subscriptions; a SIGTERM to the supervisor ends them all, a process that crashes is
started again, and a port in use stops it with one line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect
from broker.tools.edgeprocesses import STARTUP_SECONDS
from tests.conftest import StartBroker
from tests.support.procs import RedisServer, eventually, free_port, wait_until

OWNER = "test-producer"
MAX_STREAMS = 48  # opened one by one until both processes serve some (each ~1/2 per stream)


def child_pids(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return {int(p) for p in f.read().split()}


async def started_processes(redis_url: str) -> set[int]:
    """Edge pids whose pub/sub connection (made as the app starts) is subscribed."""
    client = connect(Settings(redis_url=redis_url), "test-observer")
    try:
        return {int(c["name"].rsplit("-", 1)[1]) for c in await client.client_list()
                if re.fullmatch(r"broker-edge-\d+", c.get("name", "")) and int(c.get("sub", 0))}
    finally:
        await client.connection_pool.disconnect()


async def serving_processes(redis_url: str) -> dict[int, int]:
    """Edge pid -> channels its pub/sub connection holds beyond its probe (``CLIENT LIST``)."""
    client = connect(Settings(redis_url=redis_url), "test-observer")
    try:
        serving: dict[int, int] = {}
        for c in await client.client_list():
            name = c.get("name", "")
            if re.fullmatch(r"broker-edge-\d+", name) and int(c.get("sub", 0)) > 1:
                serving[int(name.rsplit("-", 1)[1])] = int(c["sub"]) - 1
        return serving
    finally:
        await client.connection_pool.disconnect()


@pytest.mark.timeout(60)
async def test_two_processes_share_the_port_and_both_serve_streams(
    own_redis: RedisServer, start_broker: StartBroker,
) -> None:
    edge = start_broker("edge", own_redis.url, broker_edge_workers="2")
    processes = wait_until(lambda: len(child_pids(edge.proc.pid)) == 2 and child_pids(
        edge.proc.pid), 15, "two edge processes")
    # Each process has started its app (its pub/sub connection is there) and so listens on
    # the port: connections made before the second one listens would all go to the first.
    async def both_started() -> bool:
        return processes <= await started_processes(own_redis.url)

    await eventually(both_started, 20, "both edge processes to start their app")
    redis = connect(Settings(redis_url=own_redis.url), "test-producer")
    store = Store(redis, Settings(redis_url=own_redis.url))
    streams: list[tuple[str, httpx.Response]] = []
    try:
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(
                base_url=edge.url, timeout=10, limits=httpx.Limits(max_connections=None)))
            serving: dict[int, int] = {}
            while len(serving) < 2 and len(streams) < MAX_STREAMS:
                gen_id = protocol.new_generation_id()
                await store.create(gen_id, {"messages": [{"role": "user", "content": "hi"}]},
                                   "model")
                assert await store.claim(gen_id, OWNER, 60.0) == "ok"
                # Headers come once the serving process's subscription is confirmed.
                response = await stack.enter_async_context(
                    http.stream("GET", f"/v1/generations/{gen_id}/events"))
                assert response.status_code == 200
                streams.append((gen_id, response))
                serving = await serving_processes(own_redis.url)
            assert set(serving) == processes, (serving, processes, len(streams))
            assert sum(serving.values()) == len(streams)  # one subscription per generation

            # Every stream, on either process, gets exactly its own answer.
            for gen_id, _ in streams:
                assert await store.publish(gen_id, OWNER, 1,
                                           [protocol.new_message(f"answer {gen_id}")]) == 1
                assert await store.publish(gen_id, OWNER, 2,
                                           [protocol.new_end("stop", None)]) == 1

            async def read_all(gen_id: str, response: httpx.Response) -> None:
                body = b"".join([chunk async for chunk in response.aiter_bytes()]).decode()
                frames = [f for f in body.split("\n\n") if f.startswith("id:")]
                assert frames == [
                    f'id: 0000000001\ndata: {{"text":"answer {gen_id}"}}',
                    'id: 0000000002\nevent: end\ndata: {"finish_reason":"stop","usage":null}',
                ], body

            async with asyncio.timeout(20):
                await asyncio.gather(*(read_all(g, r) for g, r in streams))
    finally:
        await redis.connection_pool.disconnect()

    edge.signal(15)  # SIGTERM: the supervisor stops both processes, then exits
    assert await asyncio.to_thread(edge.proc.wait, 20) == 0
    left = [pid for pid in processes if await asyncio.to_thread(os.path.exists, f"/proc/{pid}")]
    assert not left


def test_a_port_in_use_is_one_line_and_starts_nothing(
    own_redis: RedisServer, start_broker: StartBroker,
) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "broker", "edge", "--edge-workers", "2", "--port", str(port),
             "--insecure"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
                 "REDIS_URL": own_redis.url},
            capture_output=True, text=True, timeout=30, check=False,
        )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_a_process_that_dies_is_started_again(
    own_redis: RedisServer, start_broker: StartBroker,
) -> None:
    edge = start_broker("edge", own_redis.url, broker_edge_workers="2")
    first = wait_until(lambda: len(child_pids(edge.proc.pid)) == 2 and child_pids(
        edge.proc.pid), 15, "two edge processes")
    # Past its startup: a death then is a crash to recover from, not a setting that cannot work.
    time.sleep(STARTUP_SECONDS + 0.5)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    after = wait_until(lambda: (c := child_pids(edge.proc.pid)) and len(c) == 2
                       and victim not in c and c, 15, "a new edge process")
    assert len(after & first) == 1  # the other one went on
    assert edge.proc.poll() is None
    wait_until(lambda: httpx.get(edge.url + "/readyz", timeout=2).status_code == 200, 15,
               "the edge ready")
    edge.wait_for_log(f"edge process {victim} exited with -9; starting another")
