"""Fixtures shared by the integration suites: real redis-server, fake LLM, broker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.support.fakellm import FakeLLM
from tests.support.procs import BrokerProcess, RedisServer, free_port


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM().start()
    yield llm
    llm.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


StartBroker = Callable[..., BrokerProcess]


@pytest.fixture(scope="session")
def start_broker() -> Iterator[StartBroker]:
    """Start ``broker edge`` / ``broker worker`` processes; all are stopped at session end."""
    started: list[BrokerProcess] = []

    def start(command: str, redis_url: str, llm: FakeLLM | None = None,
              **settings: str) -> BrokerProcess:
        env = {"REDIS_URL": redis_url, **{k.upper(): str(v) for k, v in settings.items()}}
        if llm is not None:
            env |= {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "test-key"}
        port = free_port() if command == "edge" else None
        proc = BrokerProcess(command, env, port)
        started.append(proc)
        return proc.wait_ready() if port else proc

    yield start
    for proc in started:
        proc.stop()


class Stack:
    """Two edges and a worker on one Redis, as a load balancer would spread them."""

    def __init__(self, redis: RedisServer, edges: list[BrokerProcess],
                 worker: BrokerProcess | None) -> None:
        self.redis = redis
        self.edges = edges
        self.worker = worker

    @property
    def a(self) -> str:
        return self.edges[0].url

    @property
    def b(self) -> str:
        return self.edges[-1].url


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer, fake_llm: FakeLLM, start_broker: StartBroker) -> Stack:
    edges = [start_broker("edge", redis_server.url) for _ in range(2)]
    worker = start_broker("worker", redis_server.url, fake_llm, broker_max_concurrency="100")
    return Stack(redis_server, edges, worker)


@pytest.fixture(scope="session")
def queue_only(start_broker: StartBroker) -> Iterator[Stack]:
    """An edge with no worker behind it: generations stay queued until a test acts."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_keepalive_interval="0.3")
    yield Stack(redis, [edge], None)
    redis.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
        yield client
