"""A TCP proxy that drops SSE connections right after an event: resumes under test."""

from __future__ import annotations

import asyncio

import httpx


class DroppingProxy:
    """A TCP proxy to an edge that cuts a connection right after the first event (of any
    kind: the first ``data:`` line's event) it carries: once, then it forwards every other
    connection untouched; or, with ``every_connection``, each connection, so that a follower
    receives each event on a fresh connection resumed with ``Last-Event-ID``."""

    def __init__(self, target: str, every_connection: bool = False) -> None:
        url = httpx.URL(target)
        self.target = (url.host, url.port)
        self.every_connection = every_connection
        self.cut = asyncio.Event()  # a connection was cut
        self.cuts = 0
        self.requests: list[bytearray] = []  # what each connection sent to the edge
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> DroppingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resumed_with(self) -> list[bytes]:
        """The ``Last-Event-ID`` values of the requests sent so far."""
        values = []
        for sent in self.requests:
            for line in bytes(sent).split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"last-event-id":
                    values.append(value.strip())
        return values

    async def close(self) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        edge_r, edge_w = await asyncio.open_connection(*self.target)
        self._writers += [client_w, edge_w]
        sent = bytearray()
        self.requests.append(sent)

        async def to_edge() -> None:
            while data := await client_r.read(65536):
                sent.extend(data)
                edge_w.write(data)
                await edge_w.drain()

        async def to_client() -> None:
            seen = bytearray()
            while data := await edge_r.read(65536):
                if self.every_connection or not self.cut.is_set():
                    seen.extend(data)
                    start = seen.find(b"data: ")
                    end = seen.find(b"\n\n", start) if start >= 0 else -1
                    if end >= 0:  # forward up to the end of that event, then hang up
                        client_w.write(data[: end + 2 - (len(seen) - len(data))])
                        await client_w.drain()
                        self.cuts += 1
                        self.cut.set()
                        return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(to_edge()), asyncio.create_task(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_w, edge_w):
                writer.close()
