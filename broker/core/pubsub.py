"""A pub/sub subscription that survives its connection: the one reconnect loop of the edge's
subscriptions and the worker's cancel listener; and ``PushConnection``, the lean subscriber
connection the edge reads its live messages from."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import hiredis
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.core.backoff import Backoff

log = logging.getLogger(__name__)


class Closable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def subscribe_forever(
    connect: Callable[[], C],
    session: Callable[[C, Callable[[], None]], Awaitable[None]],
    failed: Callable[[Exception, float], None],
    *,
    stopped: Callable[[], bool] = lambda: False,
    after_failure: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``session`` on a new pub/sub connection from ``connect``, and again on a new one
    after each failure of Redis, until ``stopped()``. ``session(pubsub, connected)`` subscribes,
    calls ``connected()`` (the next failure then waits from the shortest delay again) and reads
    until it fails; ``failed(error, delay)`` hears of each failure and how long until the next
    attempt, ``after_failure`` runs after that wait (a cluster re-reads its slot map)."""
    backoff = Backoff()
    while not stopped():
        pubsub = connect()
        try:
            await session(pubsub, backoff.reset)
        except (RedisError, RedisClusterException, OSError) as e:
            failed(e, backoff.delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await close(pubsub)
        await backoff.sleep()
        if after_failure is not None:
            await after_failure()


async def close(pubsub: Closable) -> None:
    await pubsub.aclose()


# -- the edge's subscriber connection ------------------------------------------------------

READ_SIZE = 64 * 1024
Push = tuple[bytes, bytes, Any]  # kind (b"message", b"subscribe", ...), channel, data or count
# How long a command sent beside the subscriptions (``PushConnection.call``) may wait for its
# reply: redis-py's own socket timeout for a command.
CALL_TIMEOUT = 5.0


class PushConnection:
    """A connection in subscribe mode whose replies are parsed by a lean reader.

    redis-py's ``PubSub`` handles each message through its general async client, one awaited
    read per reply and a dict per message: in the edge's realistic load (B7) that was a
    quarter of the edge's CPU. Here the connection is made by redis-py (address, TLS, AUTH,
    ``HELLO``, client name: whatever the client's URL says), then its socket is read in
    64 kB chunks and every complete push in a chunk is parsed at once (``PushParser``).
    Commands (``SUBSCRIBE``, ``SSUBSCRIBE``, their opposites) are written at once, without
    waiting: Redis confirms each with a push the reader hands on like any other.

    Under RESP3 (redis-py's default), where Redis tells pushes from replies and takes any
    command in subscribe mode, other commands may be sent on it too (``call``): their replies
    come in order among the pushes. A read sent that way costs a write and a future instead of
    redis-py's call (~0.15-0.2 ms of CPU each: B7's viewers read a meta each, new topics a
    log range), and follows every subscription sent before it on the same connection.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        # Its own connection, not one of the pool's: the subscription holds it for good.
        self._connection = pool.connection_class(**pool.connection_kwargs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._open = False
        self._parser = PushParser()
        self._pending: list[bytes] = []  # commands to write at the end of this loop turn
        self._writes: set[asyncio.Task[None]] = set()  # (the slower path's writes)
        self._calls: deque[asyncio.Future[Any]] = deque()  # ``call``s awaiting replies, in order
        self.takes_calls = False  # (see ``call``)

    async def connect(self) -> None:
        connection = self._connection
        await connection.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py 8.1
        # The handshake's replies were read to their end: nothing else is in flight yet.
        # The streams are redis-py internals: if they are not what they were (redis-py
        # changed), the same pushes are read through its public calls, more slowly.
        self._reader, self._writer = streams_of(connection)
        resp3 = str(getattr(connection, "protocol", "")) == "3"
        self._parser = PushParser(resp3=resp3)
        self.takes_calls = resp3 and self._reader is not None
        self._open = True

    def send(self, command: bytes, *channels: str) -> None:
        """Write ``command channel...`` (no reply awaited: the confirmations are pushes).
        Commands sent in one turn of the event loop go out in one write: viewers come and go
        in bursts, and a write is a system call."""
        self._queue(encode_command(command, channels))

    async def call(self, command: bytes, *args: str | bytes | int) -> Any:
        """Send ``command args...`` on this connection and return its reply as hiredis reads
        it (RESP3 types: a map is a dict); only while ``takes_calls``. An error reply or a
        failed connection raises ``RedisError`` (the connection then starts over: an error
        reply cannot be told from a refused subscription); no reply within ``CALL_TIMEOUT``
        raises ``TimeoutError``."""
        if not self.takes_calls:
            raise RedisConnectionError("this pub/sub connection takes no commands")
        self._queue(encode_command(command, args))
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.append(reply)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await reply
        except TimeoutError as e:
            raise RedisTimeoutError(f"no reply to {command.decode()} on the pub/sub "
                                    "connection") from e

    def _queue(self, packed: bytes) -> None:
        writer = self._writer
        if not self._open or (writer is not None and writer.is_closing()):
            raise RedisConnectionError("the pub/sub connection is not open")
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(packed)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not self._open or not pending:
            return  # (closed meanwhile: the reader reconnects and subscribes every channel)
        data = b"".join(pending)
        writer = self._writer
        if writer is None:
            # The public call writes at once too (its awaits come after the write), so the
            # writes keep their order; a failure shows to the reader as a lost connection.
            write = asyncio.ensure_future(self._connection.send_packed_command(data, False))
            self._writes.add(write)
            write.add_done_callback(_written_by(self._writes))
        elif not writer.is_closing():
            writer.write(data)

    async def read(self) -> list[Push]:
        """The pushes that arrived: waits for at least one read, returns every complete push
        in the bytes so far (possibly none)."""
        if not self._open:
            raise RedisConnectionError("the pub/sub connection is not open")
        reader = self._reader
        if reader is None:
            return [_push_of(await self._connection.read_response(push_request=True))]
        data = await reader.read(READ_SIZE)
        if not data:
            raise RedisConnectionError("Redis closed the pub/sub connection")
        calls = self._calls
        try:
            pushes, replies = self._parser.feed(data)
        except ResponseError as e:
            if calls:
                raise CallRefused(str(e)) from e
            raise
        for reply in replies:
            if not calls:
                continue  # a reply to nothing of ours (a PONG): skipped
            waiting = calls.popleft()
            if not waiting.done():  # (its caller may have given up: the reply is its still)
                waiting.set_result(reply)
        return pushes

    async def aclose(self) -> None:
        self._open = False
        self._reader = self._writer = None
        calls, self._calls = self._calls, deque()
        for waiting in calls:
            if not waiting.done():
                waiting.set_exception(RedisConnectionError("the pub/sub connection closed"))
        await self._connection.disconnect()


_warned_redis_changed = False


def streams_of(
    connection: Any,
) -> tuple[asyncio.StreamReader | None, asyncio.StreamWriter | None]:
    """The asyncio streams of a connected redis-py connection (its private ``_reader`` and
    ``_writer``), or (None, None) if they are not there: ``PushConnection`` then goes the
    slower way through the connection's public calls, and says so once."""
    global _warned_redis_changed
    reader = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter):
        return reader, writer
    if not _warned_redis_changed:
        _warned_redis_changed = True
        # Expected of `broker dev`'s in-memory store (fakeredis has no socket); elsewhere it
        # means redis-py changed: worth a warning, the edge keeps working.
        in_memory = type(connection).__module__.startswith("fakeredis")
        log.log(logging.DEBUG if in_memory else logging.WARNING,
                "%s has no socket streams; pub/sub messages are read through redis-py's public "
                "calls (slower)", "the in-memory store" if in_memory
                else f"redis-py {getattr(redis, '__version__', '?')}")
    return None, None


def _push_of(reply: Any) -> Push:
    """A reply read by redis-py as a push (``[kind, channel, data or count]``)."""
    if isinstance(reply, ResponseError):
        raise reply
    if not isinstance(reply, list) or len(reply) < 3 or not isinstance(reply[0], bytes):
        raise RedisConnectionError(f"not a pub/sub push: {reply!r:.80}")
    return reply[0].lower(), reply[1], reply[2]


def _written_by(writes: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(write: asyncio.Task[None]) -> None:
        writes.discard(write)
        if not write.cancelled():
            write.exception()  # retrieved: the reader sees the connection fail
    return done


def encode_command(command: bytes, args: tuple[str | bytes | int, ...]) -> bytes:
    parts = [b"*%d\r\n$%d\r\n%s\r\n" % (len(args) + 1, len(command), command)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class CallRefused(ResponseError):
    """An error reply came while ``PushConnection.call``s waited: perhaps one of them refused
    (an ACL without ``EVAL``, say). It cannot be told from a refused subscription, and the
    connection starts over either way."""

    def for_good(self) -> bool:
        """A refusal that would come again (no permission, no such command): its owner should
        send no more calls there."""
        return str(self).startswith(("NOPERM", "ERR unknown command"))


class PushParser:
    """Pushes, and the replies among them, out of the bytes of a subscribe-mode connection,
    fed as they arrive.

    Parsed by hiredis (C; the RESP2/RESP3 reader redis-py itself uses with hiredis installed),
    ~0.6-0.9 µs per push against ~4.4 in a Python parser (the edge's per-message path in B7).
    Under RESP3 a push is what Redis sends as one (``>``), anything else a reply; under RESP2
    (no commands but subscriptions are sent then) a push is an array of kind, channel and
    data (or the subscription count), and any other reply (a ``PONG``) is handed on as a
    reply. An error reply raises ``ResponseError``. A reply split over reads waits in the
    reader for its rest."""

    __slots__ = ("_reader", "_resp3")

    def __init__(self, *, resp3: bool = False) -> None:
        self._reader = hiredis.Reader()
        self._resp3 = resp3

    def feed(self, data: bytes) -> tuple[list[Push], list[Any]]:
        reader = self._reader
        reader.feed(data)
        pushes: list[Push] = []
        replies: list[Any] = []
        resp3 = self._resp3
        while (reply := reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
            pushed = (isinstance(reply, hiredis.PushNotification) if resp3
                      else isinstance(reply, list) and len(reply) >= 3)
            if not pushed:
                replies.append(reply)
            elif len(reply) >= 3 and isinstance(reply[0], bytes):
                pushes.append((reply[0].lower(), reply[1], reply[2]))
        return pushes, replies
