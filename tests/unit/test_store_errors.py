"""What the cluster client turns into a retryable ConnectionError, and what it must not: a
command whose connection was closed under it and a cluster in transition are outages that
pass; any other RuntimeError or AttributeError is a bug and goes on up as it is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core.metrics import Metrics
from broker.core.protocol import Event
from broker.core.store import ClusterInTransition, WaitingRedisCluster, closed_under_the_command
from worker.generation import Publisher

CLOSED_UVLOOP_TRANSPORT = RuntimeError(
    "unable to perform operation on <TCPTransport closed=True reading=False 0x7f>; "
    "the handler is closed")


def attribute_error_of(value: Any) -> AttributeError:
    try:
        value.write(b"PING")
    except AttributeError as e:
        return e
    raise AssertionError("no AttributeError")


def test_a_closed_connection_is_told_from_a_bug():
    assert closed_under_the_command(attribute_error_of(None))  # the writer a disconnect dropped
    assert closed_under_the_command(CLOSED_UVLOOP_TRANSPORT)
    assert not closed_under_the_command(attribute_error_of(object()))
    assert not closed_under_the_command(RuntimeError("dictionary changed size during iteration"))


@pytest.mark.parametrize(("raised", "expected"), [
    (ClusterDownError("The cluster is down"), ClusterInTransition),
    (TryAgainError("Multiple keys request during rehashing of slot"), ClusterInTransition),
    (attribute_error_of(None), RedisConnectionError),
    (CLOSED_UVLOOP_TRANSPORT, RedisConnectionError),
    (RuntimeError("a bug"), RuntimeError),
    (attribute_error_of(object()), AttributeError),
])
async def test_the_cluster_client_passes_on_outages_as_connection_errors_and_bugs_as_they_are(
    monkeypatch: pytest.MonkeyPatch, raised: Exception, expected: type[Exception]
):
    async def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise raised

    monkeypatch.setattr(aioredis.RedisCluster, "execute_command", failing)
    client = WaitingRedisCluster(host="127.0.0.1", port=1, max_in_flight=2)
    with pytest.raises(expected) as caught:
        await client.execute_command("GET", "x")
    assert issubclass(expected, RedisConnectionError) == isinstance(caught.value,
                                                                    RedisConnectionError)
    assert client._in_flight._value == 2  # the slot is given back either way


async def test_a_publish_that_meets_a_cluster_in_transition_is_retried():
    class Store:
        calls = 0

        async def publish(self, *args: Any, **kwargs: Any) -> int:
            self.calls += 1
            if self.calls == 1:
                raise ClusterInTransition("CLUSTERDOWN The cluster is down")
            return 1

    store = Store()
    publisher = Publisher(store, "gen", "worker", Metrics(), 0)  # type: ignore[arg-type]
    assert await asyncio.wait_for(publisher._with_retries(Event(1, "message", "{}", 0), {}), 5) == 1
    assert store.calls == 2
