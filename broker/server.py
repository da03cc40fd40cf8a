"""The HTTP server under the edge: uvicorn, with a bound on slow request headers and a shutdown
that ends SSE streams at once."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from broker.settings import Settings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn waits for request headers forever (its keep-alive timer runs only between
    requests), so a client trickling headers, or connecting and sending nothing, would hold a
    connection for good. Here each request's headers must arrive within ``header_timeout``."""

    header_timeout = 10.0
    _header_timer: asyncio.TimerHandle | None = None

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


class EdgeServer(uvicorn.Server):
    """Ends every SSE stream as shutdown begins, so viewers move to another edge at once
    instead of holding this one until the graceful-shutdown timeout."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, Starlette) and hasattr(app.state, "edge"):
            app.state.edge.hub.close_streams()
        await super().shutdown(sockets)


def serve(app: Starlette, settings: Settings) -> None:
    protocol = type("EdgeHttpProtocol", (HeaderTimeoutProtocol,),
                    {"header_timeout": settings.request_timeout})
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=5, lifespan="on", http=protocol,
        # No access log: its lines carry query strings, and viewer tokens travel in them.
        access_log=False, log_config=None,
    )
    EdgeServer(config).run()
