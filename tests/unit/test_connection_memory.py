"""What the edge's HTTP server keeps per open connection stays small (B3 counts it per idle
viewer): a real uvicorn server with the edge's protocol, a real socket, a response held open.

- The protocol's instance dict stays key-shared: uvicorn sets 27 attributes, CPython shares
  the keys of instance dicts up to 29, and past that every connection pays a 1.6 kB table.
- uvicorn's per-connection events hold no waiter deque until someone waits (``LazyEvent``),
  and its pipeline queue is a list, not a ~700-byte deque.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import sys
from typing import Any

import uvicorn

from broker.core.tasks import LazyEvent
from broker.edge.uvicorn_extensions import HeaderTimeoutProtocol


async def streaming_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
    await asyncio.Event().wait()  # held open, as an idle viewer's stream is


async def test_an_open_stream_keeps_a_small_connection() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connects queue until the server accepts: no wait for its start
    port = sock.getsockname()[1]
    config = uvicorn.Config(streaming_app, http=HeaderTimeoutProtocol, lifespan="off",
                            log_config=None, access_log=False, proxy_headers=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    writer = None
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            assert (await reader.readuntil(b": open\n\n")).startswith(b"HTTP/1.1 200")
        (protocol,) = server.server_state.connections
        assert isinstance(protocol, HeaderTimeoutProtocol)
        # A key-shared dict of ~28 values is ~300 bytes; a table of its own is 1584.
        assert len(vars(protocol)) <= 29, sorted(vars(protocol))
        assert sys.getsizeof(vars(protocol)) < 600
        writable = protocol.flow._is_writable_event
        assert isinstance(writable, LazyEvent) and writable.is_set()
        assert not isinstance(writable._waiters, collections.deque)
        assert not isinstance(protocol.pipeline, collections.deque)
    finally:
        if writer is not None:
            writer.close()
        server.should_exit = True
        server.force_exit = True
        async with asyncio.timeout(10):
            await serving


async def test_a_lazy_event_still_wakes_its_waiters() -> None:
    event = LazyEvent()
    waiter = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    event.set()
    assert await asyncio.wait_for(waiter, 1) is True
    event.clear()
    assert not event.is_set()
