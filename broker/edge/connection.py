"""What a long response may ask of the connection it is served on, beside ASGI's ``send`` and
``receive``: the server publishes it in the request's ``scope["extensions"]`` (uvicorn, through
``broker.edge.uvicorn_extensions``). A stream served by another server finds none there and
goes the ordinary way: every write through ``send``, a task waiting for ``http.disconnect``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

# scope["extensions"][EXTENSION] is the request's Connection itself (not a dict of one entry,
# as ASGI extensions usually are: every open stream holds it, and a dict each would cost ~200
# bytes a stream).
EXTENSION = "broker.connection"


class DirectWriter(Protocol):
    """Body chunks written straight to a started response's socket, beside ``send``."""

    def ready(self) -> bool:
        """Would a write go out now: the connection open, flow control not holding writes?"""
        ...

    def write(self, chunk: bytes) -> None:
        """Write one chunk framed by ``broker.core.sse.http_chunk``; only when ``ready``."""
        ...


class Connection(Protocol):
    def direct_writer(self, scope: Any) -> DirectWriter | None:
        """The writer of the response to ``scope``, once started, if its body goes out in
        chunked encoding; else None (use ``send``)."""
        ...

    def on_lost(self, callback: Callable[[], None] | None) -> bool:
        """Have ``callback`` called as soon as the connection is lost (None: not any more).
        False when that cannot be told (the connection is closing already): then wait for
        ``http.disconnect``."""
        ...

    async def hang_up(self) -> bool:
        """Abort the connection (a viewer too slow to read: its backlog goes with it) and
        return once the server has noted the loss. False when that cannot be done."""
        ...


def connection_of(scope: dict[str, Any] | Any) -> Connection | None:
    """The connection the server published for this request, if any."""
    connection: Connection | None = scope.get("extensions", {}).get(EXTENSION)
    return connection
