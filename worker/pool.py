"""The worker's pool of HTTP connections to the LLM, lean.

httpcore's ``AsyncConnectionPool`` re-plans its whole state on every request and again when
each response closes: every connection it holds is checked, and ``has_expired`` on an idle one
polls its socket (through anyio's attribute lookup, which builds a dict of providers per
call). With C requests in flight that is ~2 C socket polls per generation, ~14 % of the
worker's CPU on the create path (``bench/create.py`` at C = 8, py-spy), more as C grows.

``LeanPool`` keeps its idle connections on a stack per origin and takes the newest: a request
checks only the connection it is about to use (``has_expired``: its keep-alive and its
socket, as httpcore does), and the oldest idle connection by its idle time, without a poll.
The connections themselves are httpcore's (``create_connection``: TLS, socket options and
HTTP/1.1 as the stock pool makes them), and so is everything above it: httpx's transport
(request and response conversion, its exception mapping) and the SDK (auth, retries, status
errors). Limits as httpcore reads them: at most ``max_connections`` open (a request waits for
one up to its pool timeout, then ``PoolTimeout``), at most ``max_keepalive_connections`` idle.

HTTP/1.1 only (the SDK's client does not ask for HTTP/2): one request per connection at a
time. No proxies: httpx ignores ``HTTP(S)_PROXY`` in a client given its own transport, so
with a proxy set the worker keeps the SDK's client as it is (``worker.llm``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import anyio
import httpcore2
import httpx2

log = logging.getLogger(__name__)

Connection = httpcore2.AsyncConnectionInterface
OriginKey = tuple[bytes, bytes, int]  # (an ``Origin`` is not hashable)


class LeanPool(httpcore2.AsyncConnectionPool):
    """An ``AsyncConnectionPool`` with O(1) work per request (see the module's docstring).

    A subclass, so that httpx's transport takes it where it takes the stock pool; of its base
    it uses the constructor (the settings) and ``create_connection`` only."""

    def __init__(
        self, *, ssl_context: Any = None, max_connections: int | None = 10,
        max_keepalive_connections: int | None = None, keepalive_expiry: float | None = None,
    ) -> None:
        super().__init__(
            ssl_context=ssl_context, max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
        )
        self.limit = sys.maxsize if max_connections is None else max_connections
        self.keep = min(self.limit, sys.maxsize if max_keepalive_connections is None
                        else max_keepalive_connections)
        self.keepalive_expiry = keepalive_expiry
        # Per origin, the idle connections and when each went idle, the newest last.
        self.idle: dict[OriginKey, deque[tuple[float, Connection]]] = {}
        self.idle_count = 0
        # Every connection not yet closed (idle or busy), and the origin it was made for.
        self.open: dict[Connection, OriginKey] = {}
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    @property
    def connections(self) -> list[Connection]:
        return list(self.open)

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        if request.url.scheme not in (b"http", b"https"):
            # (no scheme, an unsupported one, websockets: the stock pool's errors and ways)
            return await super().handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        while True:
            connection = await self._acquire(request.url.origin, timeouts.get("pool"))
            try:
                response = await connection.handle_async_request(request)
            except httpcore2.ConnectionNotAvailable:
                await self._release(connection)  # (it became busy or closed: another one)
                continue
            except BaseException:
                await self._release(connection)
                raise
            break
        assert isinstance(response.stream, AsyncIterable)
        return httpcore2.Response(
            status=response.status, headers=response.headers,
            content=_PooledStream(response.stream, self, connection),
            extensions=response.extensions,
        )

    async def _acquire(self, origin: httpcore2.Origin, pool_timeout: float | None) -> Connection:
        """An idle connection to ``origin`` that is still good, or a new one; waits (up to
        ``pool_timeout``, then ``PoolTimeout``) while ``max_connections`` are open."""
        deadline = None if pool_timeout is None else time.monotonic() + pool_timeout
        while True:
            if self.closed:
                raise RuntimeError("the connection pool is closed")
            await self._expire_idle()
            connection = await self._take_idle(origin)
            if connection is not None:
                return connection
            if len(self.open) < self.limit:
                connection = self.create_connection(origin)
                self.open[connection] = _key(origin)
                return connection
            if not await self._wait_for_room(deadline):
                # Room for a new connection, but every idle one is for another origin.
                await self._close_oldest_idle()

    async def _wait_for_room(self, deadline: float | None) -> bool:
        """Wait until a connection goes idle or closes; True if the wait was needed, False if
        room could only be made by closing an idle connection of another origin."""
        if self.idle_count:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                raise httpcore2.PoolTimeout("no connection became free in time") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken but leaving: the room goes to the next in line
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
        return True

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _take_idle(self, origin: httpcore2.Origin) -> Connection | None:
        stack = self.idle.get(_key(origin))
        while stack:
            _, connection = stack.pop()
            self.idle_count -= 1
            if connection.is_closed():
                self.open.pop(connection, None)
                self._wake_one()  # a slot is free: a request waiting for one may open it
            elif connection.has_expired():  # its keep-alive ran out, or the server closed it
                await self._close(connection)
            else:
                return connection
        return None

    async def _expire_idle(self) -> None:
        """Close the idle connections past their keep-alive, oldest first, by the time each
        went idle (no socket poll)."""
        if self.keepalive_expiry is None or not self.idle_count:
            return
        too_old = time.monotonic() - self.keepalive_expiry
        for stack in list(self.idle.values()):  # (a release meanwhile may add an origin)
            while stack and stack[0][0] < too_old:
                _, connection = stack.popleft()
                self.idle_count -= 1
                await self._close(connection)

    async def _close_oldest_idle(self) -> None:
        oldest = min((stack for stack in self.idle.values() if stack),
                     key=lambda stack: stack[0][0], default=None)
        if oldest is not None:
            _, connection = oldest.popleft()
            self.idle_count -= 1
            await self._close(connection)

    async def _release(self, connection: Connection) -> None:
        """A request is done with ``connection``: idle again (its response read to the end and
        the connection reusable, as h11 says), or closed."""
        if connection.is_closed() or self.closed:
            await self._close(connection)
        elif connection.is_idle():
            stack = self.idle.setdefault(self.open[connection], deque())
            stack.append((time.monotonic(), connection))
            self.idle_count += 1
            if self.idle_count > self.keep:
                await self._close_oldest_idle()
            self._wake_one()
        else:
            await self._close(connection)  # (left mid-response: not reusable)

    async def _close(self, connection: Connection) -> None:
        self.open.pop(connection, None)
        self._wake_one()
        with anyio.CancelScope(shield=True):
            await connection.aclose()

    async def aclose(self) -> None:
        self.closed = True
        connections, self.open = list(self.open), {}
        self.idle.clear()
        self.idle_count = 0
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        with anyio.CancelScope(shield=True):
            for connection in connections:
                await connection.aclose()
        await super().aclose()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} [{len(self.open) - self.idle_count} busy, "
                f"{self.idle_count} idle]>")


def _key(origin: httpcore2.Origin) -> OriginKey:
    return (origin.scheme, origin.host, origin.port)


class _PooledStream:
    """A response's body; closing it hands the connection back to the pool.

    The connection's own stream is ``_stream``, as in httpcore's ``PoolByteStream``: the
    worker's lean body reader (``worker.body.lean_body``) finds the connection through it."""

    def __init__(self, stream: AsyncIterable[bytes], pool: LeanPool,
                 connection: Connection) -> None:
        self._stream = stream
        self._pool = pool
        self._connection = connection
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        iterator = aiter(self._stream)
        try:
            async for chunk in iterator:
                yield chunk
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                close = getattr(self._stream, "aclose", None)
                if close is not None:
                    await close()  # h11 decides: reusable (idle) or closed
        finally:
            await self._pool._release(self._connection)


def lean_transport(limits: httpx2.Limits) -> httpx2.AsyncHTTPTransport:
    """httpx's own transport, on a ``LeanPool`` with ``limits``; on the stock pool when this
    httpx's transport is not laid out as this code knows (logged once)."""
    transport = httpx2.AsyncHTTPTransport(limits=limits)
    if (type(getattr(transport, "_pool", None)) is not httpcore2.AsyncConnectionPool
            or not hasattr(httpcore2.AsyncConnectionPool, "create_connection")):
        log.warning("httpx's transport holds no httpcore connection pool where expected: "
                    "the LLM client keeps the stock pool")
        return transport
    transport._pool = LeanPool(
        ssl_context=httpx2.create_ssl_context(), max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )
    return transport


def transport_pool(transport: httpx2.AsyncHTTPTransport) -> LeanPool | None:
    """The ``LeanPool`` under ``transport`` (made by ``lean_transport``), if it has one."""
    pool = getattr(transport, "_pool", None)
    return pool if isinstance(pool, LeanPool) else None
