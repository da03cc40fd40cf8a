"""Fault-suite fixtures: a fresh deployment per test (its own redis-server, edges, workers),
so a test can kill, stop and restart any part of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cluster import RedisClusterServers
from tests.support.fakellm import FakeLLM
from tests.support.procs import BrokerProcess, RedisServer, free_port


class Deployment:
    """A redis-server with broker processes around it; everything is stopped at teardown."""

    def __init__(self, llm: FakeLLM, redis: RedisServer | RedisClusterServers,
                 settings: dict[str, Any]):
        self.llm = llm
        self.settings = {k.upper(): str(v) for k, v in settings.items()}
        self.redis = redis
        self.edges: list[BrokerProcess] = []
        self.workers: list[BrokerProcess] = []

    def _env(self, settings: dict[str, Any]) -> dict[str, str]:
        env = {"REDIS_URL": self.redis.url, "OPENAI_BASE_URL": self.llm.base_url,
               "OPENAI_API_KEY": "test-key", **self.settings}
        env.update({k.upper(): str(v) for k, v in settings.items()})
        return env

    def add_edge(self, **settings: Any) -> BrokerProcess:
        edge = BrokerProcess("edge", self._env(settings), free_port()).wait_ready()
        self.edges.append(edge)
        return edge

    def add_worker(self, **settings: Any) -> BrokerProcess:
        worker = BrokerProcess("worker", self._env(settings))
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for proc in [*self.edges, *self.workers]:
            proc.stop(timeout=5)
        self.redis.stop()


@pytest.fixture
def deploy(fake_llm: FakeLLM) -> Iterator[Any]:
    """``deploy(edges=2, workers=1, redis_args=(...), **settings)`` -> Deployment; with
    ``cluster=(masters, replicas)`` on a Redis Cluster instead of one redis-server."""
    made: list[Deployment] = []

    def make(edges: int = 1, workers: int = 1, redis_args: tuple[str, ...] = (),
             cluster: tuple[int, int] | None = None, **settings: Any) -> Deployment:
        redis = (RedisClusterServers(*cluster).start() if cluster
                 else RedisServer(*redis_args).start())
        d = Deployment(fake_llm, redis, settings)
        made.append(d)
        for _ in range(edges):
            # Ready, not only listening: an edge reaps a lease only after seeing Redis healthy
            # for a lease from its first probe, so the tests' bounds hold from the claim on.
            d.add_edge().wait_ready(path="/readyz")
        for _ in range(workers):
            d.add_worker()
        return d

    yield make
    for d in made:
        d.stop()
