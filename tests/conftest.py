"""Fixtures shared by the integration suites: real redis-server, fake LLM, broker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvloop
from hypothesis import settings

from broker.core.settings import Settings
from broker.core.store import Store, connect
from tests.support.cluster import RedisClusterServers
from tests.support.fakellm import FakeLLM
from tests.support.procs import BrokerProcess, RedisServer, free_port
from worker import body

# The suite is deterministic: hypothesis draws the same examples every run (CI must not fail
# on a new draw). To hunt for new failures, run with `--hypothesis-profile=explore`. No
# per-example deadline: on a busy machine (the suite runs in parallel processes) one example
# may take longer than hypothesis' 200 ms for no fault of the code.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile("deterministic")


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


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own: no other test's worker takes its jobs (the session's
    ``redis_server`` has the contract stack's worker on it, whatever ran before)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def own_store(own_redis: RedisServer) -> AsyncIterator[Store]:
    """A ``Store`` on the test's own redis-server."""
    settings = Settings(redis_url=own_redis.url)
    client = connect(settings, "test-own-store")
    yield Store(client, settings)
    await client.aclose()
    await client.connection_pool.disconnect()  # (given to the client: not closed with it)


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
    """Two edges and a worker on one Redis or on a Redis Cluster, as a load balancer would
    spread them."""

    def __init__(self, redis: RedisServer | RedisClusterServers, edges: list[BrokerProcess],
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

    @property
    def cluster(self) -> bool:
        return isinstance(self.redis, RedisClusterServers)

    def numsub(self, channel: str) -> int:
        """Subscribers of a generation's channel (sharded ones, summed over masters, on a
        cluster)."""
        if isinstance(self.redis, RedisClusterServers):
            return sum(int(reply[1]) for reply in self.redis.everywhere(
                "PUBSUB", "SHARDNUMSUB", channel))
        return int(dict(self.redis.client().pubsub_numsub(channel))[channel.encode()])

    def connections_of(self, client_name: str) -> list[list[dict[str, Any]]]:
        """``CLIENT LIST`` entries named ``client_name``, one list per (live) node."""
        servers = (self.redis.live_nodes() if isinstance(self.redis, RedisClusterServers)
                   else [self.redis])
        return [[c for c in server.client().client_list() if c["name"] == client_name]
                for server in servers]


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(masters=3).start()
    yield cluster
    cluster.stop()


# On a cluster the jobs queue is spread over streams in different slots (and nodes).
CLUSTER_JOB_SHARDS = "6"


@pytest.fixture(scope="session", params=["redis", "cluster"])
def stack(request: pytest.FixtureRequest, fake_llm: FakeLLM, start_broker: StartBroker,
          started_stacks: dict[str, Stack]) -> Stack:
    """The contract's stack, run once on one Redis and once on a three-master Redis Cluster.

    Started once per session and kind: pytest sets a parametrized session fixture up again
    when the test order switches back to a parameter it already tore down (it does, under
    pytest-xdist's distribution), and a second stack on the same Redis would leave the first
    one's worker taking the jobs the test expects the second's to run."""
    started = started_stacks.get(request.param)
    if started is not None:
        return started
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url, settings = cluster.url, {"broker_job_shards": CLUSTER_JOB_SHARDS}
        redis: RedisServer | RedisClusterServers = cluster
    else:
        redis = request.getfixturevalue("redis_server")
        url, settings = redis.url, {}
    edges = [start_broker("edge", url, **settings) for _ in range(2)]
    worker = start_broker("worker", url, fake_llm, broker_max_concurrency="100", **settings)
    started_stacks[request.param] = Stack(redis, edges, worker)
    return started_stacks[request.param]


@pytest.fixture(scope="session")
def started_stacks() -> dict[str, Stack]:
    return {}


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


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test on uvloop, the loop the edge and the worker run on
    (``broker.tools.cli``): a path that works on asyncio's loop alone is not one users run."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def chunk_decoders(monkeypatch: pytest.MonkeyPatch) -> list[body.ChunkDecoder]:
    """Every ``worker.body.ChunkDecoder`` the worker's body reader makes during the test: it
    makes one when it takes a chunked body's decoding over from h11."""
    made: list[body.ChunkDecoder] = []

    class Counted(body.ChunkDecoder):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(body, "ChunkDecoder", Counted)
    return made
