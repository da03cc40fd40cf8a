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
# Calls awaiting replies at most (``takes_calls`` is False past it): their replies count
# against Redis's output buffer limit for pub/sub clients (``client-output-buffer-limit
# pubsub``, 8 MB soft by default) with the messages, so only short replies go there, and few.
MAX_CALLS_IN_FLIGHT = 64
# Error replies to a call that every later call would get too (no permission, no such
# command, not in this context): calls stop on that connection.
LASTING_REFUSALS = ("NOPERM", "ERR unknown command", "ERR Can't execute")
# The (un)subscription confirmations Redis pushes, one per channel named.
_CONFIRMATIONS = frozenset({b"subscribe", b"unsubscribe", b"ssubscribe", b"sunsubscribe"})


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
    command in subscribe mode, short reads may be sent on it too (``call``): a write and a
    future instead of redis-py's call (~0.15-0.2 ms of CPU each; every viewer of B7 reads a
    meta). Redis answers the commands of a connection in order, so what it still owes is kept
    in that order (``_owed``): a (un)subscription's confirmations (pushes, one per channel) or
    a call's reply. An error reply goes to the command it answers: a call gets it as its own
    answer, a refused subscription fails the connection as before.
    """

    def __init__(self, client: aioredis.Redis, *, calls: bool = True) -> None:
        """``calls``: whether ``call`` may be used (not on a cluster's connections, where Redis
        also pushes unasked ``sunsubscribe``s when a slot moves)."""
        pool = client.connection_pool
        # Its own connection, not one of the pool's: the subscription holds it for good.
        self._connection = pool.connection_class(**pool.connection_kwargs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._open = False
        self._failure: RedisError | None = None  # why this side ended the connection
        self._loop: asyncio.AbstractEventLoop  # (the running loop's, from ``connect``)
        self._parser = PushParser()
        self._pending: list[bytes] = []  # commands to write at the end of this loop turn
        self._writes: set[asyncio.Task[None]] = set()  # (the slower path's writes)
        self._calls_wanted = calls
        self._owed: deque[_Owed] = deque()  # (kept while calls are taken)
        self._calls_in_flight = 0
        self._tracking = False  # calls are taken on this connection (see ``call``)
        self._refused = False  # a call was refused for good: no more

    async def connect(self) -> None:
        connection = self._connection
        await connection.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py 8.1
        # The handshake's replies were read to their end: nothing else is in flight yet.
        # The streams are redis-py internals: if they are not what they were (redis-py
        # changed), the same pushes are read through its public calls, more slowly.
        self._reader, self._writer = streams_of(connection)
        resp3 = str(getattr(connection, "protocol", "")) == "3"
        self._parser = PushParser(resp3=resp3)
        self._tracking = self._calls_wanted and resp3 and self._reader is not None
        self._loop = asyncio.get_running_loop()
        self._open = True

    @property
    def takes_calls(self) -> bool:
        """``call`` may be used now: RESP3, the lean reader, and not too many in flight."""
        return (self._tracking and self._open and not self._refused
                and self._calls_in_flight < MAX_CALLS_IN_FLIGHT)

    def send(self, command: bytes, *channels: str) -> None:
        """Write ``command channel...`` (no reply awaited: the confirmations are pushes).
        Commands sent in one turn of the event loop go out in one write: viewers come and go
        in bursts, and a write is a system call."""
        self._queue(encode_command(command, channels))
        if self._tracking:
            self._owed.append(_Owed(confirmations=len(channels)))

    async def call(self, command: bytes, *args: str | bytes | int) -> Any:
        """Send ``command args...`` on this connection and return its reply as hiredis reads
        it (RESP3 types: a map is a dict); only while ``takes_calls``, and only for commands
        with one short reply. An error reply raises ``ResponseError`` (the connection goes
        on), a failed connection ``RedisConnectionError``, no reply within ``CALL_TIMEOUT``
        ``TimeoutError`` (and the connection fails: see ``_unanswered``)."""
        if not self.takes_calls:
            raise RedisConnectionError("this pub/sub connection takes no commands now")
        self._queue(encode_command(command, args))
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._owed.append(_Owed(reply=reply))
        self._calls_in_flight += 1
        # A timer on the reply, not ``asyncio.timeout``: that looks up the running loop and
        # task (a ``getpid`` system call each under CPython 3.11) for every call, and the
        # worker makes one per published message.
        expiry = self._loop.call_later(CALL_TIMEOUT, self._unanswered, reply, command)
        try:
            return await reply
        finally:
            expiry.cancel()
            self._calls_in_flight -= 1

    def _unanswered(self, reply: asyncio.Future[Any], command: bytes) -> None:
        """A call had no reply within ``CALL_TIMEOUT``: Redis answers in order, so nothing
        sent after it will be answered either (a frozen connection, a peer gone without a
        word). The call fails, and so does the connection: its reader ends with this error
        and its owner starts over on a new one (else every later call would wait as long)."""
        if reply.done():
            return
        error = RedisTimeoutError(f"no reply to {command.decode()} on the pub/sub connection "
                                  f"within {CALL_TIMEOUT:g} s")
        reply.set_exception(error)
        if self._open:
            self._open = False
            self._failure = error
            if self._writer is not None:
                self._writer.transport.abort()  # the reader wakes to the end of the stream

    def _queue(self, packed: bytes) -> None:
        writer = self._writer
        if not self._open or (writer is not None and writer.is_closing()):
            raise RedisConnectionError("the pub/sub connection is not open")
        if not self._pending:
            self._loop.call_soon(self._flush)
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
            raise self._failure or RedisConnectionError("the pub/sub connection is not open")
        reader = self._reader
        if reader is None:
            return [_push_of(await self._connection.read_response(push_request=True))]
        data = await reader.read(READ_SIZE)
        if not data:
            raise self._failure or RedisConnectionError("Redis closed the pub/sub connection")
        items = self._parser.feed(data)
        if not self._tracking:
            pushes: list[Push] = []
            for item in items:
                if isinstance(item, Reply):
                    if isinstance(item.value, ResponseError):
                        raise item.value  # a refused subscription
                    continue  # a reply to nothing of ours (a PONG): skipped
                pushes.append(item)
            return pushes
        return self._settle(items)

    def _settle(self, items: list[Push | Reply]) -> list[Push]:
        """Match what arrived with what Redis owes, in order; the pushes to hand on."""
        owed = self._owed
        pushes = []
        for item in items:
            head = owed[0] if owed else None
            if not isinstance(item, Reply):
                if item[0] in _CONFIRMATIONS:
                    if head is None or head.reply is not None or head.confirmations < 1:
                        raise RedisConnectionError(
                            f"an unasked {item[0].decode()} on the pub/sub connection")
                    head.confirmations -= 1
                    if head.confirmations == 0:
                        owed.popleft()
                pushes.append(item)
                continue
            if head is None or head.reply is None:
                if isinstance(item.value, ResponseError):
                    raise item.value  # a refused subscription: the connection starts over
                raise RedisConnectionError("a reply to nothing sent on the pub/sub connection")
            owed.popleft()
            error = item.value if isinstance(item.value, ResponseError) else None
            if error is not None and str(error).startswith(LASTING_REFUSALS) and not self._refused:
                # It would come again for every call: the callers go through redis-py.
                self._refused = True
                log.warning("Redis refused a read on the pub/sub connection (%s); such reads "
                            "go through redis-py", error)
            waiting = head.reply
            if waiting.done():
                continue  # its caller gave up (timed out, or left)
            if error is not None:
                waiting.set_exception(error)
            else:
                waiting.set_result(item.value)
        return pushes

    async def aclose(self) -> None:
        self._open = False
        self._reader = self._writer = None
        owed, self._owed = self._owed, deque()
        for item in owed:
            if item.reply is not None and not item.reply.done():
                item.reply.set_exception(RedisConnectionError("the pub/sub connection closed"))
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


class _Owed:
    """What Redis still owes for one command sent on a connection that takes calls: the
    confirmations of a (un)subscription, or a call's reply."""

    __slots__ = ("confirmations", "reply")

    def __init__(self, confirmations: int = 0, reply: asyncio.Future[Any] | None = None) -> None:
        self.confirmations = confirmations
        self.reply = reply


class Reply:
    """A reply that is not a push: to a call, or an error to a refused subscription."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value  # an error reply is a ``ResponseError``

    def __repr__(self) -> str:
        return f"Reply({self.value!r})"


_INCOMPLETE = object()  # hiredis's answer when the bytes so far end inside a reply


class PushParser:
    """Pushes, and the replies among them, out of the bytes of a subscribe-mode connection,
    fed as they arrive, in the order they came.

    Parsed by hiredis (C; the RESP2/RESP3 reader redis-py itself uses with hiredis installed),
    ~0.6-0.9 µs per push against ~4.4 in a Python parser (the edge's per-message path in B7).
    Under RESP3 a push is what Redis sends as one (``>``), anything else a ``Reply``; under
    RESP2 (no commands but subscriptions are sent then) a push is an array of kind, channel
    and data (or the subscription count), anything else a ``Reply`` (a ``PONG``, an error). A
    reply split over reads waits in the reader for its rest; bytes that are not RESP raise
    ``RedisConnectionError``."""

    __slots__ = ("_reader", "_resp3")

    def __init__(self, *, resp3: bool = False) -> None:
        # A sentinel for "incomplete": hiredis's default, False, is also RESP3's false.
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE, replyError=ResponseError,
                                      protocolError=RedisConnectionError)
        self._resp3 = resp3

    def feed(self, data: bytes) -> list[Push | Reply]:
        reader = self._reader
        reader.feed(data)
        items: list[Push | Reply] = []
        resp3 = self._resp3
        while (reply := reader.gets()) is not _INCOMPLETE:
            pushed = (isinstance(reply, hiredis.PushNotification) if resp3
                      else isinstance(reply, list) and len(reply) >= 3
                      and isinstance(reply[0], bytes))
            if not pushed:
                items.append(Reply(reply))
            elif len(reply) >= 3 and isinstance(reply[0], bytes):
                items.append((reply[0].lower(), reply[1], reply[2]))
        return items
