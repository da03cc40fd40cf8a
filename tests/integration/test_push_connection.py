"""broker.core.pubsub.PushConnection against a real redis-server: the lean path (redis-py's
connection streams, read directly) and the fallback through redis-py's public calls, taken
when those private streams are not where they were."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core import protocol, pubsub
from broker.core.metrics import Metrics
from broker.core.pubsub import Push, PushConnection
from broker.core.settings import Settings
from broker.core.store import SHORT_LOG_READ, Store, connect
from broker.edge.subscriptions import Subscriptions
from tests.support.procs import RedisServer, eventually
from tests.support.tcpproxy import TcpProxy


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



async def read_while(connection: PushConnection, call: Awaitable[Any]) -> Any:
    """Await ``call`` while the connection's reader runs (as the edge's session does)."""
    pushes: list[Push] = []

    async def reader() -> None:
        while True:
            pushes.extend(await connection.read())

    reading = asyncio.create_task(reader())
    try:
        return await call
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError):
            await reading


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[aioredis.Redis, PushConnection]]:
    """A client on ``url`` and a connected ``PushConnection`` made from it; both closed after."""
    client = aioredis.Redis.from_url(url)
    connection = PushConnection(client)
    try:
        await connection.connect()
        yield client, connection
    finally:
        await connection.aclose()
        await client.aclose()


async def test_commands_beside_the_subscriptions_get_their_replies_in_order(
    redis_server: RedisServer,
) -> None:
    """Under RESP3 (redis-py's default) the connection takes reads beside its subscriptions:
    each reply reaches its own call, pushes in between stay pushes, a reply shaped like a
    push (a script's array of three, bytes first) stays a reply."""
    async with connected(redis_server.url) as (client, connection):
        assert connection.takes_calls
        await client.hset("m", mapping={"status": "running", "seq": "2"})
        await client.xadd("log", {"k": "message", "d": "x"}, id="0-1")
        await client.xadd("log", {"k": "end", "d": "y"}, id="0-2")
        connection.send(b"SUBSCRIBE", "a")
        calls = asyncio.gather(
            connection.call(b"HGETALL", "m"),
            connection.call(b"XRANGE", "log", "(0-1", "+", "COUNT", 10),
            connection.call(b"EVAL", "return {'running', 5, {}}", 0),
            connection.call(b"HGETALL", "nothing"),
        )
        meta, log, script, none = await read_while(connection, calls)
        assert meta == {b"status": b"running", b"seq": b"2"}
        assert log == [[b"0-2", [b"k", b"end", b"d", b"y"]]]
        assert script == [b"running", 5, []]
        assert none == {}


async def test_an_error_reply_answers_its_own_call_and_the_connection_goes_on(
    redis_server: RedisServer,
) -> None:
    """Redis answers a connection's commands in order, so an error reply reaches the call it
    answers, and the calls after it, the subscriptions and the messages go on as if nothing
    happened. A call given up on (timed out, its viewer gone) still takes its own reply."""
    async with connected(redis_server.url) as (client, connection):
        connection.send(b"SUBSCRIBE", "a")
        given_up = asyncio.ensure_future(connection.call(b"GET", "nothing"))
        await asyncio.sleep(0)
        given_up.cancel()
        calls = asyncio.gather(
            connection.call(b"NOSUCHCOMMAND"),
            connection.call(b"EVAL", "return redis.error_reply('BAD one')", 0),
            connection.call(b"EVAL", "redis.setresp(3); return false", 0),
            connection.call(b"ECHO", "after"),
            return_exceptions=True,
        )
        unknown, bad, false, after = await read_while(connection, calls)
        assert isinstance(unknown, ResponseError) and "unknown command" in str(unknown)
        assert isinstance(bad, ResponseError) and str(bad) == "BAD one"
        assert false is False and after == b"after"
        assert connection.takes_calls is False  # an unknown command would come again
        assert await client.publish("a", b"still") == 1
        assert (await pushes_until(connection, 1))[-1] == (b"message", b"a", b"still")


async def test_a_refused_subscription_or_a_closed_connection_fails_what_waits(
    own_redis: RedisServer,
) -> None:
    """A subscription refused (an ACL without the channel) fails the connection as before, and
    with it every call waiting on it; RESP2 takes no call at all."""
    own_redis.client().acl_setuser("viewer", enabled=True, passwords=["+pw"], keys=["~*"],
                                   channels=["allowed"], commands=["+@all"])
    client = aioredis.Redis.from_url(own_redis.url.replace("redis://", "redis://viewer:pw@"))
    connection = PushConnection(client)
    try:
        await connection.connect()
        connection.send(b"SUBSCRIBE", "forbidden")
        waiting = asyncio.ensure_future(connection.call(b"PING"))
        with pytest.raises(ResponseError, match="NOPERM"):
            while True:
                await connection.read()
        await connection.aclose()
        with pytest.raises(RedisConnectionError):
            await waiting
    finally:
        await connection.aclose()
        await client.aclose()
    resp2 = aioredis.Redis.from_url(own_redis.url, protocol=2)
    connection = PushConnection(resp2)
    try:
        await connection.connect()
        assert not connection.takes_calls  # RESP2 takes only subscriptions in subscribe mode
        with pytest.raises(RedisConnectionError):
            await connection.call(b"PING")
    finally:
        await connection.aclose()
        await resp2.aclose()


async def test_few_calls_in_flight(redis_server: RedisServer) -> None:
    """Replies count against Redis's output buffer limit for pub/sub clients: past
    MAX_CALLS_IN_FLIGHT the connection takes no more until replies come."""
    async with connected(redis_server.url) as (_, connection):
        calls = [asyncio.ensure_future(connection.call(b"ECHO", str(i)))
                 for i in range(pubsub.MAX_CALLS_IN_FLIGHT)]
        await asyncio.sleep(0)
        assert not connection.takes_calls
        replies = await read_while(connection, asyncio.gather(*calls))
        assert replies == [str(i).encode() for i in range(pubsub.MAX_CALLS_IN_FLIGHT)]
        assert connection.takes_calls


async def test_the_store_reads_the_same_through_the_connection(own_store: Store) -> None:
    """What ``Store`` reads on the pub/sub connection (``via``) is what it reads through
    redis-py: the meta, the stream meta with its lease check, a log's short tail with every
    character an LLM may send (a longer one is read through redis-py)."""
    store = own_store
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": [], "metadata": {"k": "v \u2028 é"}}, "m")
    assert await store.claim(gen_id, "w1", 5.0) == "ok"
    assert await store.publish(gen_id, "w1", 1, [protocol.new_message("One. ")]) == 1
    connection = PushConnection(store.redis)  # type: ignore[arg-type]  # one Redis
    answered: list[bytes] = []  # the calls the connection answered (the store falls back
    # to redis-py quietly when it does not)

    class Counted:
        async def call(self, command: bytes, *args: str | bytes | int) -> Any:
            reply = await connection.call(command, *args)
            answered.append(command)
            return reply

    try:
        await connection.connect()

        async def both(read: Callable[[Any], Awaitable[Any]]) -> tuple[Any, Any]:
            calls = len(answered)
            lean = await read_while(connection, read(Counted()))
            assert len(answered) == calls + 1
            return lean, await read(None)

        lean, plain = await both(lambda via: store.meta(gen_id, via))
        assert lean == plain and lean is not None and lean.seq == 1
        lean, plain = await both(lambda via: store.stream_meta(gen_id, "edge", 10.0, via))
        assert lean[0] == plain[0] and lean[1].outcome == plain[1].outcome == "running"
        assert abs(lean[1].wait - plain[1].wait) < 1  # (the lease's time left, read twice)
        texts = ["tricky \u2028\u2029\u0085 \r\n ", "é 🙂 \x00 end. "]
        for seq, text in enumerate(texts, 2):
            assert await store.publish(gen_id, "w1", seq, [protocol.new_message(text)]) == 1
        lean, plain = await both(lambda via: store.read_log(gen_id, 1, 200, via))
        assert lean == plain and [json.loads(e.data)["text"] for e in lean] == texts
        # A longer tail than SHORT_LOG_READ: asked, found long, read through redis-py.
        for seq in range(4, 4 + SHORT_LOG_READ):
            assert await store.publish(gen_id, "w1", seq, [protocol.new_message("x. ")]) == 1
        lean, plain = await both(lambda via: store.read_log(gen_id, 0, 200, via))
        assert lean == plain and [e.seq for e in lean] == list(range(1, 4 + SHORT_LOG_READ))
        unknown = protocol.new_generation_id()
        assert await both(lambda via: store.meta(unknown, via)) == (None, None)
        lean, plain = await both(lambda via: store.stream_meta(unknown, "edge", 10.0, via))
        assert lean[0] is None and plain[0] is None
        assert await both(lambda via: store.read_log(unknown, 0, 200, via)) == ([], [])
        assert set(answered) == {b"HGETALL", b"EVAL", b"XRANGE"}
    finally:
        await connection.aclose()


async def test_a_redis_that_refuses_the_reads_there_answers_them_through_redis_py(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL without ``EVAL`` (``EVALSHA`` allowed): the refused read is answered through
    redis-py, the pub/sub connection goes on (no reconnect), and takes no more reads."""
    own_redis.client().acl_setuser("edge", enabled=True, passwords=["+pw"], keys=["~*"],
                                   channels=["*"], commands=["+@all", "-eval"])
    settings = Settings(redis_url=own_redis.url.replace("redis://", "redis://edge:pw@"))
    client = connect(settings, "test-refused")
    store = Store(client, settings)

    class Listener:
        def on_message(self, channel: str, data: bytes | str) -> None: ...
        def on_confirmed(self, channel: str) -> None: ...

    metrics = Metrics()
    subscriptions = Subscriptions(client, metrics, Listener(), probe_interval=0.1)
    await subscriptions.start()
    try:
        await eventually(lambda: _true(subscriptions.ready()), 5, "the pub/sub connection")
        via = subscriptions.caller()
        assert via is not None
        gen_id = protocol.new_generation_id()
        await store.create(gen_id, {"messages": []}, "m")
        with caplog.at_level(logging.WARNING, logger="broker.core.pubsub"):
            meta, _ = await store.stream_meta(gen_id, "edge", 10.0, via)
        assert meta is not None and meta.status == "queued"
        assert "refused a read" in caplog.text
        assert subscriptions.caller() is None
        assert metrics.registry.get_sample_value("broker_pubsub_reconnects_total") == 0
    finally:
        await subscriptions.stop()
        await client.aclose()
        await client.connection_pool.disconnect()  # (given to the client: not closed with it)


async def _true(value: bool) -> bool:
    return value


async def test_a_call_unanswered_in_time_fails_the_connection_too(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis answers in order: a call unanswered within ``CALL_TIMEOUT`` (a frozen
    connection, a peer gone without a word) means nothing later will be answered either. The
    call fails with a timeout, and so does the connection: its reader ends with that error,
    so its owner starts over on a new one instead of every later call waiting as long."""
    monkeypatch.setattr(pubsub, "CALL_TIMEOUT", 0.2)
    proxy = TcpProxy(redis_server.port).start()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    connection = PushConnection(client)
    try:
        await connection.connect()
        connection.send(b"SUBSCRIBE", "frozen-test")

        async def read_forever() -> None:
            while True:
                await connection.read()

        reading = asyncio.create_task(read_forever())  # (replies reach calls through reads)
        assert await connection.call(b"PING") == b"PONG"
        assert proxy.freeze_subscribers() == 1
        with pytest.raises(RedisTimeoutError, match="no reply to PING"):
            await connection.call(b"PING")
        assert not connection.takes_calls
        with pytest.raises(RedisTimeoutError, match="no reply to PING"):
            await reading
    finally:
        await connection.aclose()
        await client.aclose()
        proxy.stop()
