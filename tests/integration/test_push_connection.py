"""broker.core.pubsub.PushConnection against a real redis-server: the lean path (redis-py's
connection streams, read directly) and the fallback through redis-py's public calls, taken
when those private streams are not where they were."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.core import pubsub
from broker.core.pubsub import Push, PushConnection
from tests.support.procs import RedisServer


async def pushes_until(connection: PushConnection, count: int) -> list[Push]:
    got: list[Push] = []
    while len(got) < count:
        got += await connection.read()
    return got


@pytest.mark.parametrize("path", ["lean", "fallback"])
async def test_subscribe_publish_unsubscribe(
    redis_server: RedisServer, path: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if path == "fallback":
        monkeypatch.setattr(pubsub, "_warned_redis_changed", False)
        real = pubsub.streams_of
        # As if redis-py kept its streams elsewhere: the real guard, shown a connection
        # without them.
        monkeypatch.setattr(pubsub, "streams_of", lambda connection: real(object()))
    client = aioredis.Redis.from_url(redis_server.url)
    connection = PushConnection(client)
    try:
        with caplog.at_level(logging.WARNING, logger="broker.core.pubsub"):
            await connection.connect()
        connection.send(b"SUBSCRIBE", "a", "b")  # one write for both, at the loop's next turn
        confirmed = await pushes_until(connection, 2)
        assert [(kind, channel) for kind, channel, _ in confirmed] == [
            (b"subscribe", b"a"), (b"subscribe", b"b")]
        payload = "tricky \u2028\u2029\u0085 \r\n end".encode()
        assert await client.publish("b", payload) == 1
        assert await client.publish("a", b"") == 1
        assert await pushes_until(connection, 2) == [
            (b"message", b"b", payload), (b"message", b"a", b"")]
        connection.send(b"UNSUBSCRIBE", "a")
        assert (await pushes_until(connection, 1))[0][:2] == (b"unsubscribe", b"a")
        assert await client.publish("a", b"gone") == 0
        if path == "fallback":
            assert "public calls" in caplog.text and "redis-py" in caplog.text
    finally:
        await connection.aclose()
        await client.aclose()
    with pytest.raises(RedisConnectionError):
        connection.send(b"SUBSCRIBE", "c")  # closed: the caller's loop reconnects

