"""The chaos run's deployments, as real processes on free ports:

- ``small``: one redis-server (AOF, ``appendfsync always``), one edge, one worker;
- ``scaled``: the same Redis, three edges behind the shipped HAProxy configuration, two workers;
- ``cluster``: a three-master Redis Cluster with a replica each, three edges behind HAProxy, two
  workers.

On one Redis every broker process reaches it through a ``TcpProxy`` (the Redis link the run may
slow down or sever); viewers always reach the entry point (the edge, or HAProxy) through another
one (client connections the run may sever). The LLM is ``tests.chaos.llm`` in its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from tests.support.cluster import RedisClusterServers
from tests.support.haproxy import HAProxy
from tests.support.procs import RedisServer, free_port, wait_until
from tests.support.tcpproxy import TcpProxy

TOPOLOGIES = ("small", "scaled", "cluster")
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: a SIGTERM when the harness dies (killed by a test timeout,
    say), so no edge, worker or LLM outlives its run on a shared machine."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def process_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Slot:
    """One broker process (``edge`` or ``worker``) that the run kills, stops and starts again,
    always with the same name, port and settings; its log appends across restarts."""

    def __init__(self, command: str, name: str, env: dict[str, str], logs: Path,
                 port: int | None = None) -> None:
        self.command = command
        self.name = name
        self.env = env
        self.port = port
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
        env.update(self.env)
        if self.port is not None:
            env["BROKER_PORT"] = str(self.port)
        if self.command == "worker":
            env["BROKER_WORKER_METRICS_PORT"] = str(free_port())
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "broker", self.command],
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)
        self.starts += 1

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        if self.port is None:
            return

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200

        wait_until(ready, timeout, f"{self.name} on {self.port}")

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.proc.terminate()
        if not self.wait_exit(10):
            self.proc.kill()
            self.proc.wait(5)

    def rss_kb(self) -> int:
        return process_rss_kb(self.proc.pid) if self.alive() and self.proc else 0

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Topology:
    """Everything one chaos run starts; ``stop()`` ends all of it."""

    def __init__(self, kind: str, out: Path, settings: dict[str, str]) -> None:
        if kind not in TOPOLOGIES:
            raise ValueError(f"unknown topology {kind!r} (one of {', '.join(TOPOLOGIES)})")
        self.kind = kind
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.redis: RedisServer | None = None
        self.cluster: RedisClusterServers | None = None
        self.redis_link: TcpProxy | None = None  # broker processes -> Redis (one Redis only)
        self.viewer_link: TcpProxy | None = None  # viewers -> the entry point
        self.haproxy: HAProxy | None = None
        self.llm: subprocess.Popen[bytes] | None = None
        self.llm_port = free_port()
        self.edges: list[Slot] = []
        self.workers: list[Slot] = []

    @property
    def edge_count(self) -> int:
        return 1 if self.kind == "small" else 3

    @property
    def worker_count(self) -> int:
        return 1 if self.kind == "small" else 2

    @property
    def entry_url(self) -> str:
        assert self.viewer_link is not None
        return f"http://127.0.0.1:{self.viewer_link.port}"

    def redis_url(self) -> str:
        if self.cluster is not None:
            # Every node a seed: a process (re)started while a master is down still finds the
            # cluster (with one seed down it would not start: docs/deployment.md).
            seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.cluster.nodes)
            return f"redis+cluster://{seeds}"
        assert self.redis_link is not None
        return f"redis://127.0.0.1:{self.redis_link.port}/0"

    def start(self) -> Topology:
        with (self.logs / "llm.log").open("ab") as out:
            self.llm = subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.llm", "--port", str(self.llm_port)],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.llm_port}/v1/models",
                                     timeout=1).status_code < 500, START_TIMEOUT, "the LLM")
        if self.kind == "cluster":
            self.cluster = RedisClusterServers(masters=3, replicas=1).start()
        else:
            self.redis = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
            self.redis_link = TcpProxy(self.redis.port).start()
        env = {"REDIS_URL": self.redis_url(),
               "OPENAI_BASE_URL": f"http://127.0.0.1:{self.llm_port}/v1",
               "OPENAI_API_KEY": "chaos-key", "BROKER_INSECURE": "1", **self.settings}
        if self.kind == "cluster":
            env.setdefault("BROKER_JOB_SHARDS", "6")
        self.edges = [Slot("edge", f"edge{i}", env, self.logs, free_port())
                      for i in range(self.edge_count)]
        self.workers = [Slot("worker", f"worker{i}", env, self.logs)
                        for i in range(self.worker_count)]
        for slot in [*self.edges, *self.workers]:
            slot.start()
        for edge in self.edges:
            edge.wait_ready()
        if self.kind == "small":
            entry_port = self.edges[0].port
        else:
            self.haproxy = HAProxy([edge.url for edge in self.edges]).start()
            entry_port = self.haproxy.port
        assert entry_port is not None
        self.viewer_link = TcpProxy(entry_port).start()
        return self

    def admin(self) -> Any:
        """A client straight to Redis (not through the link the run hurts), for the checker."""
        if self.cluster is not None:
            node = self.cluster.live_nodes()[0]
            return aioredis.RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=3)
        assert self.redis is not None
        return aioredis.Redis(port=self.redis.port, socket_timeout=3)

    def redis_nodes(self) -> list[RedisServer]:
        if self.cluster is not None:
            return self.cluster.live_nodes()
        return [self.redis] if self.redis is not None else []

    def redis_memory(self) -> dict[str, int]:
        """used_memory (and its data part, without the replication backlog, client buffers and
        other overhead that failovers and reconnects change) summed over the live masters (or
        the one Redis), and their key count.

        The statistics are reset first: Redis 7 keeps a latency histogram per command type a
        node has run (``latency-tracking``, ~25 kB each), counted in ``used_memory_dataset``.
        A node that ran more kinds of commands since the baseline (a replica promoted by a
        failover, a slot moved in) would otherwise look as if it kept data."""
        used = dataset = scripts = keys = 0
        for node in self.redis_nodes():
            try:
                client: redis.Redis = node.client()
                if self.cluster is not None and self.cluster.role(node) != "master":
                    continue
                client.config_resetstat()
                memory = client.info("memory")
                used += int(memory["used_memory"])
                dataset += int(memory["used_memory_dataset"])
                scripts += int(memory.get("used_memory_scripts", 0))
                keys += int(client.dbsize())
            except redis.RedisError:
                continue
        return {"used_memory": used, "used_memory_dataset": dataset,
                "used_memory_scripts": scripts, "keys": keys}

    def stop(self) -> None:
        for slot in [*self.edges, *self.workers]:
            slot.stop()
        for link in (self.viewer_link, self.redis_link):
            if link is not None:
                link.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.cluster is not None:
            for node in self.cluster.nodes:
                if node.proc is not None:
                    node.proc.send_signal(signal.SIGCONT)
            self.cluster.stop()
        if self.redis is not None:
            if self.redis.proc is not None:
                self.redis.proc.send_signal(signal.SIGCONT)
            self.redis.stop()
        if self.llm is not None:
            self.llm.terminate()
            self.llm.wait(10)
