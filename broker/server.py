"""The HTTP server under the edge: uvicorn, with a bound on slow request headers, word of a
lost connection for long responses, direct writes for the SSE fan-out, and a shutdown that
ends SSE streams at once."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from broker.settings import Settings

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn waits for request headers forever (its keep-alive timer runs only between
    requests), so a client trickling headers, or connecting and sending nothing, would hold a
    connection for good. Here each request's headers must arrive within ``header_timeout``.

    It also tells a long response at once that its client left (``when_lost``), so an SSE
    stream needs no task of its own blocked in ``receive()`` for ``http.disconnect``."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    # One table for all connections: an attribute more on each would cost each a bigger dict.
    _lost_callbacks: ClassVar[dict[HeaderTimeoutProtocol, Callable[[], None]]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        callback = self._lost_callbacks.pop(self, None)
        if callback is not None:
            callback()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class DirectWriter:
    """Body chunks written straight to a streaming response's socket, beside its ASGI ``send``.

    A fan-out writes the same event to every live viewer: through ``send`` that is a task
    wake-up, three Starlette wrappers and uvicorn's framing per viewer; here it is one
    ``transport.write`` of bytes framed once for all. Only for uvicorn's httptools responses in
    chunked encoding, once started; ``send`` still starts and ends the response and does every
    write that has to wait (``ready`` is False while flow control holds writes back)."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    @staticmethod
    def of(scope: Scope, receive: Receive) -> DirectWriter | None:
        """The writer for the response ``receive`` belongs to, if uvicorn's httptools protocol
        serves it in chunked encoding and it has started; else None (use ``send``)."""
        cycle = getattr(receive, "__self__", None)  # middleware may have wrapped receive
        try:
            if (
                not isinstance(cycle, RequestResponseCycle)
                or cycle.scope is not scope
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

    def ready(self) -> bool:
        """Would a write go out now: the connection open, flow control not holding writes?"""
        return not (
            self._flow.write_paused or self._cycle.disconnected or self._transport.is_closing()
        )

    def write(self, chunk: bytes) -> None:
        """Write one chunk framed by ``sse.http_chunk``; only when ``ready``."""
        self._transport.write(chunk)


def when_lost(receive: Receive, callback: Callable[[], None] | None) -> bool:
    """Have ``callback`` called as soon as the connection of the request whose ``receive`` this
    is is lost (None: not any more). False when that cannot be told here (another server or
    protocol, a wrapped ``receive``, or the connection is closing already): then wait for
    ``http.disconnect`` instead."""
    cycle = getattr(receive, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle):
        return False
    try:
        protocol = cycle.transport.get_protocol()
        if not isinstance(protocol, HeaderTimeoutProtocol):
            return False
        if callback is None:
            protocol._lost_callbacks.pop(protocol, None)
        elif cycle.disconnected or cycle.transport.is_closing():
            return False
        else:
            protocol._lost_callbacks[protocol] = callback
    except AttributeError:
        _uvicorn_changed()
        return False
    return True


_warned = False


def _uvicorn_changed() -> None:
    """uvicorn's internals differ from what ``DirectWriter`` and ``when_lost`` rely on (they
    are not its public API): the edge still works, the slow way. Say so once."""
    global _warned
    if not _warned:
        _warned = True
        log.warning("uvicorn %s: its internals changed; streams take the slower ASGI path",
                    uvicorn.__version__)


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


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to serve on. Bound before the app starts, so
    a port in use is one clear line (``ListenError``) rather than a worker started in vain and
    uvicorn's log of the bind failure."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ListenError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose "
                          "another address with --host (BROKER_HOST)") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
    except OSError as e:
        sock.close()
        what = ("port with --port (BROKER_PORT)" if e.errno in (errno.EADDRINUSE, errno.EACCES)
                else "address with --host/--port (BROKER_HOST/BROKER_PORT)")
        raise ListenError(
            f"cannot listen on {host}:{port} ({(e.strerror or str(e)).lower()}); choose "
            f"another {what}") from e
    return sock


def serve(app: Starlette, settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve the edge's ``app`` on ``sock`` (default: ``listen`` on the settings' host and
    port; ``ListenError`` if that fails)."""
    sock = sock or listen(settings.host, settings.port)
    protocol = type("EdgeHttpProtocol", (HeaderTimeoutProtocol,),
                    {"header_timeout": settings.request_timeout})
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=5, lifespan="on", http=protocol,
        # No access log: its lines carry query strings, and viewer tokens travel in them.
        access_log=False, log_config=None,
    )
    EdgeServer(config).run(sockets=[sock])
