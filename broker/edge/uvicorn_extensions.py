"""The HTTP server under the edge: uvicorn, with bounds on request heads (time, bytes, header
lines) and JSON answers to what it refuses, word of a lost connection for long responses,
direct writes for the SSE fan-out, and a shutdown that ends SSE streams at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import socket
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from broker.core.settings import Settings
from broker.core.tasks import LazyEvent
from broker.edge.connection import EXTENSION
from broker.edge.headers import NOSNIFF

log = logging.getLogger(__name__)


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests (it calls ``appendleft`` and ``pop``), as a list:
    an empty list is 56 bytes, an empty deque ~700."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class _HeadState:
    """What ``HeaderTimeoutProtocol`` keeps per connection about request heads."""

    __slots__ = ("bytes", "deferred", "done", "in_head", "lines", "refused", "timer")

    def __init__(self) -> None:
        self.in_head = True  # the next bytes belong to a request head (until its headers end)
        self.bytes = 0  # bytes of that head received so far
        self.lines = 0  # its header lines so far
        self.done = 0  # request heads completed on this connection
        self.refused = False  # answered an error and half-closed: what still arrives is dropped
        # A refusal waiting for the response under way to end: (status, code, message).
        self.deferred: tuple[int, str, str] | None = None
        self.timer: asyncio.TimerHandle | None = None  # the header timeout


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounds on what a request head may cost the edge.

    - Time: uvicorn waits for request headers forever (its keep-alive timer runs only between
      requests), so a client trickling headers, or connecting and sending nothing, would hold
      a connection for good. Here each request's headers must arrive within ``header_timeout``.
    - Size: httptools has no limit on a head (h11 has ``h11_max_incomplete_event_size``; this
      protocol has no such option) and joins a long header from every read by copying it
      again: a 48 MiB header held the event loop for seconds. Here the bytes of a head (the
      request line included) are counted as they arrive, and what lies past
      ``max_header_bytes`` is never parsed; a head that long, or with more than
      ``max_headers`` header lines, is answered ``431`` with the JSON error body.
    - Shape: a request that is not HTTP is answered ``400`` with the JSON error body (uvicorn
      answers plain text).

    It also publishes itself in each request's ``scope["extensions"]`` as the request's
    ``broker.edge.connection.Connection``: a long response hears at once that its client left,
    so an SSE stream needs no task of its own blocked in ``receive()`` for
    ``http.disconnect``, and the fan-out writes to its socket directly."""

    header_timeout = 10.0
    max_header_bytes = 64 * 1024
    max_headers = 100
    # Per connection, in ONE attribute: uvicorn's protocol sets 27 of its own, and CPython
    # shares the keys of instance dicts only up to 29 attributes; past that each connection's
    # dict is a table of its own, 1.6 kB instead of 0.3 (B3 counts it per open stream).
    _head: _HeadState
    # One table for all connections: an attribute more on each would cost each a bigger dict.
    _lost_callbacks: ClassVar[dict[HeaderTimeoutProtocol, Callable[[], None]]] = {}

    # (asyncio hands a protocol a Transport; uvicorn narrows the parameter, as here)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head = _HeadState()
        super().connection_made(transport)
        self._arm()
        self._lighten()

    def _lighten(self) -> None:
        """What uvicorn keeps per connection for good, made small: every open stream holds a
        connection, and B3 counts the bytes. Its flow control's event and (per request) the
        request's event each hold a waiter deque of ~600 bytes that an SSE response never
        uses (``LazyEvent``), and its queue of pipelined requests is a deque of ~700 bytes
        (``_Pipeline``: a list)."""
        try:
            writable = LazyEvent()
            writable.set()
            self.flow._is_writable_event = writable
            self.pipeline = _Pipeline()  # type: ignore[assignment]
        except AttributeError:
            _uvicorn_changed()

    def data_received(self, data: bytes) -> None:
        if self._head.refused:
            return  # read and dropped, so the client gets to read the answer (see _refuse)
        if self._head.in_head:
            room = self.max_header_bytes - self._head.bytes
            if len(data) > room:
                self._feed_past_the_bound(data, room)
                return
            # Counted per read: bytes of a next request that arrive in the same read as the
            # end of this one are not counted (at most one read more, never unbounded).
            self._head.bytes += len(data)
        super().data_received(data)

    def _feed_past_the_bound(self, data: bytes, room: int) -> None:
        """Parse only what the head may still take; if the head ends within it, the rest is
        a body or a next request, fed as any other read. If not, the head is too large."""
        heads_done = self._head.done
        self._head.bytes += room
        if room:
            super().data_received(data[:room])
        if self.transport.is_closing() or self._head.refused:
            return
        if self._head.done == heads_done:
            self._too_large(f"the request head is larger than {self.max_header_bytes} bytes")
            return
        self.data_received(data[room:])

    def on_message_begin(self) -> None:
        if self._head.refused:
            return
        super().on_message_begin()
        self._head.lines = 0
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head.refused:
            return
        self._head.lines += 1
        if self._head.lines > self.max_headers:
            self._too_large(f"the request has more than {self.max_headers} header lines")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head.refused:
            return
        self._disarm()
        self._head.in_head = False
        self._head.done += 1
        super().on_headers_complete()
        self._publish_connection()
        cycle = self.cycle
        if isinstance(cycle, RequestResponseCycle) and not cycle.message_event.is_set():
            cycle.message_event = LazyEvent()  # (see ``_lighten``)

    def _publish_connection(self) -> None:
        """Put this connection (``broker.edge.connection.Connection``: this protocol) in the
        request's scope, before its app runs (uvicorn has created the app's task, which runs
        on the loop's next turn). Nothing more per request: thousands of streams hold it."""
        try:
            cycle = self.cycle
            if not isinstance(cycle, RequestResponseCycle) or cycle.scope is not self.scope:
                return  # an upgrade: no request cycle of ours
            extensions = cycle.scope.setdefault("extensions", {})
            # Not a dict, as uvicorn types extensions: the connection itself (connection.py).
            extensions[EXTENSION] = self  # type: ignore[assignment]
        except AttributeError:
            _uvicorn_changed()

    # -- broker.edge.connection.Connection ---------------------------------------------------
    # These rely on uvicorn internals (the request cycle's ``transport``, ``flow``,
    # ``disconnected``, ``response_started``, ``response_complete``, ``chunked_encoding``), not
    # its public API: where they differ, each says so once (``_uvicorn_changed``) and answers as
    # if it could not help (the stream then goes the slower ASGI way). Tested where uvicorn runs
    # the edge: the contract test of ``broker_direct_writes_total`` fails if direct writes stop.

    def direct_writer(self, scope: Scope) -> DirectWriter | None:
        try:
            cycle = self.cycle
            if (
                cycle is None
                or cycle.scope is not scope  # a pipelined request's: not this response
                or not cycle.response_started
                or cycle.response_complete
                or cycle.chunked_encoding is not True
            ):
                return None
            writer = DirectWriter(cycle)
            writer.ready()  # every attribute it relies on is there
        except AttributeError:
            _uvicorn_changed()
            return None
        return writer

    def on_lost(self, callback: Callable[[], None] | None) -> bool:
        try:
            if callback is None:
                self._lost_callbacks.pop(self, None)
            elif self.cycle is None or self.cycle.disconnected or self.transport.is_closing():
                return False
            else:
                self._lost_callbacks[self] = callback
        except AttributeError:
            _uvicorn_changed()
            return False
        return True

    async def hang_up(self) -> bool:
        try:
            if self.cycle is not None and self.cycle.disconnected:
                return True
            lost = asyncio.Event()
            self._lost_callbacks[self] = lost.set
            self.transport.abort()
        except AttributeError:
            _uvicorn_changed()
            return False
        # The transport reports the loss on the loop's next turn; bounded all the same.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await lost.wait()
        return True

    def on_body(self, body: bytes) -> None:
        if not self._head.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head.refused:
            return
        self._head.in_head, self._head.bytes = True, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse (it logged ``msg`` already)."""
        if not self._head.refused:
            self._refuse(400, "invalid_http", "the request is not valid HTTP/1.1")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        callback = self._lost_callbacks.pop(self, None)
        if callback is not None:
            callback()

    def _too_large(self, message: str) -> None:
        log.info("refused a request: %s", message)
        self._refuse(431, "headers_too_large", message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error body and end the connection.

        The client may still be sending (a 48 MiB header): closing now, with its bytes unread,
        would reset the connection and could destroy the answer before it is read. So this
        side is half-closed and what still arrives is dropped unparsed, until the client
        closes too or ``header_timeout`` passes (as nginx's lingering close)."""
        self._head.refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            if getattr(self.cycle, "more_body", False):
                # The bad bytes are inside its body (a broken chunked body): it cannot end.
                self.transport.close()
                return
            # A response is under way on this connection (a valid request, then bytes that
            # are not one in the same packet, or a body longer than its Content-Length): an
            # answer now would land in the middle of it, and closing now would lose the
            # answer to a request that ran (a generation created, its id never told). The
            # refusal follows that response, and the requests pipelined before the bad
            # bytes (``on_response_complete``); the bad bytes' head timer (armed as they
            # began) must not cut a long response meanwhile (an SSE stream).
            self._disarm()
            self._head.deferred = (status, code, message)
            return
        self._answer_refusal(status, code, message)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        deferred = self._head.deferred
        if deferred is None or self.transport.is_closing():
            return
        try:
            # (``cycle``: the last request parsed, which uvicorn may have just started)
            if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request pipelined before the bad bytes runs: the refusal follows
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
        except AttributeError:
            _uvicorn_changed()
        self._head.deferred = None
        self._answer_refusal(*deferred)

    def _answer_refusal(self, status: int, code: str, message: str) -> None:
        self.transport.write(raw_error_response(status, code, message,
                                                self._default_headers()))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm()  # the lingering ends at the header timeout at the latest
        else:
            self.transport.close()

    def _default_headers(self) -> list[tuple[bytes, bytes]]:
        """uvicorn's own headers of every answer (``date``, ``server``), if it still has them."""
        headers = getattr(self.server_state, "default_headers", None)
        return headers if isinstance(headers, list) else []

    def _arm(self) -> None:
        self._disarm()
        self._head.timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._head.timer is not None:
            self._head.timer.cancel()
            self._head.timer = None

    def _headers_too_slow(self) -> None:
        self._head.timer = None
        if not self.transport.is_closing():
            self.transport.close()


def raw_error_response(status: int, code: str, message: str,
                       extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 answer with the JSON error body, for the server's own refusals (they
    happen before any ASGI app sees the request); it closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    headers = [*extra_headers, (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
               NOSNIFF]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class DirectWriter:
    """Body chunks written straight to a streaming response's socket, beside its ASGI ``send``.

    A fan-out writes the same event to every live viewer: through ``send`` that is a task
    wake-up and uvicorn's framing per viewer; here it is one ``transport.write`` of bytes
    framed once for all. Only for uvicorn's httptools responses in chunked encoding, once
    started; ``send`` still starts and ends the response and does every write that has to wait
    (``ready`` is False while flow control holds writes back)."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    def ready(self) -> bool:
        """Would a write go out now: the connection open, flow control not holding writes?"""
        return not (
            self._flow.write_paused or self._cycle.disconnected or self._transport.is_closing()
        )

    def write(self, chunk: bytes) -> None:
        """Write one chunk framed by ``sse.http_chunk``; only when ``ready``."""
        self._transport.write(chunk)


_warned = False


def _uvicorn_changed() -> None:
    """uvicorn's internals differ from what ``HeaderTimeoutProtocol``'s connection methods
    rely on (they are not its public API): the edge still works, the slow way. Say so once."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("uvicorn %s: its internals changed; streams take the slower ASGI path",
                    uvicorn.__version__)


# How long uvicorn lets open requests finish on shutdown. SSE streams do not wait for it: the
# edge ends them as shutdown begins (``EdgeServer``), so only short requests ever use it.
GRACEFUL_SHUTDOWN_SECONDS = 5


class EdgeServer(uvicorn.Server):
    """Ends every SSE stream as shutdown begins, so viewers move to another edge at once
    instead of holding this one until the graceful-shutdown timeout."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, Starlette) and hasattr(app.state, "edge"):
            app.state.edge.hub.close_streams()
        await super().shutdown(sockets)


class ListenError(Exception):
    """The server cannot listen where it was told to; the message is one line for the user."""


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to serve on. Bound before the app starts, so
    a port in use is one clear line (``ListenError``) rather than a worker started in vain and
    uvicorn's log of the bind failure. ``reuse_port``: with ``SO_REUSEPORT``, so the processes
    of ``broker edge --edge-workers N`` each listen on the port and the kernel spreads the
    connections among them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ListenError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose "
                          "another address with --host (BROKER_HOST)") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        what = ("port with --port (BROKER_PORT)" if e.errno in (errno.EADDRINUSE, errno.EACCES)
                else "address with --host/--port (BROKER_HOST/BROKER_PORT)")
        raise ListenError(
            f"cannot listen on {host}:{port} ({(e.strerror or str(e)).lower()}); choose "
            f"another {what}") from e
    return sock


# Allocations (net of deallocations) between two collections of the youngest generation:
# CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def collect_less() -> None:
    """Make the cyclic garbage collector cheaper for a serving edge. Measured in B7 (perf,
    G=1000): 5 % of the edge's CPU was ``gc_collect_main`` and its visits, though little of
    what a stream allocates is cyclic garbage (refcounting frees it). So: the youngest
    generation is collected after ``GC_YOUNG_THRESHOLD`` allocations instead of 700 (most
    per-event objects are gone by then, so fewer are traversed and promoted), and what exists
    once the app is made (modules, classes, functions, settings: the bulk of the heap) is
    frozen out of every later collection, instead of being traversed by each full one. For
    the process: ``serve`` runs once in each (``broker edge``, ``broker dev``, each child of
    ``--edge-workers``); what a second call found would stay frozen too."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(app: Starlette, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve the edge's ``app`` on ``sock`` (default: ``listen`` on the settings' host and
    port; ``ListenError`` if that fails)."""
    sock = sock or listen(settings.host, settings.port)
    collect_less()
    protocol = type("EdgeHttpProtocol", (HeaderTimeoutProtocol,), {
        "header_timeout": settings.request_timeout, "max_header_bytes": settings.max_header_bytes,
        "max_headers": settings.max_headers,
    })
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, lifespan="on", http=protocol,
        # No access log: its lines carry query strings, and viewer tokens travel in them.
        access_log=False, log_config=None,
        # Nothing reads the client's address: no X-Forwarded-For rewriting per request (its
        # middleware was a frame more in every open stream).
        proxy_headers=False,
    )
    EdgeServer(config).run(sockets=[sock])
