"""An edge keeps nothing per generation once its viewers are gone: after generations come and
go (read to their end, left mid-stream, resumed, asked for after they ended), every structure
the edge holds per generation or per stream is back to empty, and no topic, stream or lease
entry is alive. A real uvicorn server with the edge's protocol (so the direct writes and the
lost-connection callbacks run), a real redis-server, this test as the worker.

Looking for what kept the edge's RSS creeping over 6,000 generations (docs/failure-model.md)
found none of these structures growing, but the lease watch holding the last batch of topics
it checked (windows, kept log chunks) while it waited, for good once the edge went idle, and
the send watch the last stream it looked at: ``alive`` below."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import connect
from broker.edge.app import EdgeApp, create_app
from broker.edge.hub import Hub
from broker.edge.routes import Edge
from broker.edge.stream import EventStream
from broker.edge.topic import Topic
from broker.edge.uvicorn_extensions import HeaderTimeoutProtocol
from tests.support.procs import RedisServer, eventually
from tests.support.sse import read_events

OWNER = "test-worker"


@contextlib.asynccontextmanager
async def serving(app: EdgeApp) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=HeaderTimeoutProtocol, lifespan="on", log_config=None,
                            access_log=False, proxy_headers=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    try:
        await eventually(started, within=10, what="the edge to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def held(edge: Edge) -> dict[str, int]:
    """The size of everything the edge keeps per generation, per channel or per stream."""
    hub: Hub = edge.hub
    sizes = {
        "hub.topics": len(hub.topics),
        "hub.background": len(hub._background),
        "leases.watched": len(hub.leases._watched),
        "leases.due": len(hub.leases._due),
        "subscriptions.connection_of": len(hub.subscriptions._connection_of),
        "subscriptions.dropped": len(hub.subscriptions._dropped),
        "subscriptions.background": len(hub.subscriptions._background),
        "edge.meta_reads": len(edge._meta_reads),
        "open_streams.taken": edge.open_streams.taken,
        "open_streams.running": len(edge.open_streams.running),
        "lost_callbacks": len(HeaderTimeoutProtocol._lost_callbacks),
    }
    for connection in hub.subscriptions.connections.values():
        sizes[f"{connection.name}.channels"] = len(connection.channels)
        sizes[f"{connection.name}.unconfirmed"] = len(connection._unconfirmed)
    return sizes


def alive(edge: Edge) -> list[object]:
    """This edge's topics and streams still alive (other tests' are not counted)."""
    gc.collect()
    return [o for o in gc.get_objects()
            if (isinstance(o, Topic) and o.metrics is edge.metrics)
            or (isinstance(o, EventStream) and o.hub is edge.hub)]


async def generation(http: httpx.AsyncClient, base: str, edge: Edge, events: int,
                     how: str) -> None:
    """One generation created through the edge, run by this test, watched ``how``."""
    response = await http.post(f"{base}/v1/generations",
                               json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 201, response.text
    gen_id = response.json()["id"]
    url = f"{base}/v1/generations/{gen_id}/events"
    store = edge.store
    assert await store.claim(gen_id, OWNER, 30.0) == "ok"

    async def run() -> None:
        for seq in range(1, events + 1):
            await asyncio.sleep(0.002)
            assert await store.publish(gen_id, OWNER, seq, [protocol.new_message(f"{seq}. ")]) == 1
        assert await store.publish(gen_id, OWNER, events + 1,
                                   [protocol.new_end("stop", None)]) == 1

    if how == "left":  # the viewer hangs up mid-stream; the generation goes on without it
        worker = asyncio.create_task(run())
        got = await read_events(http, url, stop_after=2)
        assert len(got.events) == 2
        await worker
        return
    worker = asyncio.create_task(run())
    got = await read_events(http, url)
    await worker
    assert got.terminal is not None and got.terminal.event == "end"
    if how == "resumed":  # then asks again from the middle, and once more after the end
        again = await read_events(http, url, last_event_id=got.ids[1])
        assert again.terminal is not None
        after = await http.get(url, headers={"last-event-id": got.ids[-1]})
        assert after.status_code == 204


async def test_an_edge_keeps_nothing_per_generation_once_its_viewers_are_gone(
    own_redis: RedisServer,
) -> None:
    settings = Settings(insecure=True, redis_url=own_redis.url)
    client = connect(settings, "test-edge")
    app = create_app(settings, redis=client)
    assert isinstance(app, EdgeApp)
    edge: Edge = app.state.edge
    try:
        await watch_generations_come_and_go(app, edge)
    finally:
        await client.aclose()
        await client.connection_pool.disconnect()  # (given to the client: not closed with it)


async def watch_generations_come_and_go(app: EdgeApp, edge: Edge) -> None:
    async with serving(app) as base, httpx.AsyncClient(timeout=30) as http:
        empty = held(edge)
        assert set(empty.values()) == {0}, empty
        for _ in range(3):  # rounds of 12 generations at once: read, left, resumed
            await asyncio.gather(*(
                generation(http, base, edge, events=5 + i, how=("read", "left", "resumed")[i % 3])
                for i in range(12)
            ))

        async def nothing_held() -> bool:
            return held(edge) == empty

        # A viewer that hung up leaves as soon as the server notes the loss: at once, but on
        # the loop's next turns.
        await eventually(nothing_held, within=5, what="the edge to let go of every generation")
        assert edge.metrics.subscriptions._value.get() == 0
        assert edge.metrics.viewers._value.get() == 0
        # Nor anything else: a topic (window and kept log chunks) or a stream left in a local
        # of a loop that waits stayed alive until that loop's next turn, for good once the
        # edge went idle (the lease watch, the send watch).
        assert alive(edge) == []
        # Each generation subscribed its channel once and let it go (Redis agrees).
        channels: Any = await edge.store.redis.pubsub_channels("*:live")
        assert channels == []
