"""A TCP proxy of the tests' own, to break connections in ways a real network does: a reply lost
on the way, a subscriber connection that stops delivering, latency on every byte, every
connection severed at once. It runs on a thread and an event loop of its own, so the test's
(or the chaos run's) own load never delays its traffic."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

from .procs import free_port, wait_until


@dataclass(eq=False)  # each link is itself: removed from ``links`` by identity
class _Link:
    subscriber: bool = False  # the client sent a (S)SUBSCRIBE on it
    frozen: bool = False  # server -> client bytes are swallowed: up, but delivering nothing
    losing: bytes | None = None  # the next reply is lost (see ``lose_reply_to``): its marker


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port`` from a thread of its own."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.links: list[_Link] = []  # the connections open now
        self.delay = 0.0  # seconds added before each piece is forwarded, both ways
        self.severed = 0  # connections cut by ``sever``
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every open connection
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"tcpproxy-{self.port}")
        self._lose_reply_to: bytes | None = None
        self._lose_times = 0
        self.replies_lost = 0

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)
        wait_until(lambda: self._server is not None, 5, "the proxy")
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            if self._server:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def sever(self) -> int:
        """Cut every connection open now, both ends at once (aborted, as by a reset); new ones
        work. Returns how many were cut."""
        async def cut() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.transport.abort()
            return len(writers) // 2

        count = asyncio.run_coroutine_threadsafe(cut(), self._loop).result(5)
        self.severed += count
        return count

    def freeze_subscribers(self) -> int:
        """Silently stop delivering to every pub/sub connection open now; new ones work."""
        frozen = [link for link in self.links if link.subscriber]
        for link in frozen:
            link.frozen = True
        return len(frozen)

    def lose_reply_to(self, marker: bytes, times: int = 1) -> None:
        """``times`` times: the next command carrying ``marker`` reaches the server, and its
        reply is lost with the connection (cut before a byte of it reaches the client), as when
        a network fails between a command and its answer. A ``-NOSCRIPT`` reply passes: the
        command did not run."""
        self._lose_reply_to = marker
        self._lose_times = times

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link()
        self.links.append(link)
        self._writers |= {writer, up_writer}

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if b"SUBSCRIBE" in data.upper():
                    link.subscriber = True
                if self._lose_reply_to is not None and self._lose_reply_to in data:
                    link.losing, self._lose_reply_to = self._lose_reply_to, None
                if self.delay:
                    await asyncio.sleep(self.delay)
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if link.losing is not None and data.startswith(b"-NOSCRIPT"):
                    # Not run: the client loads the script and sends it again, armed again.
                    link.losing, self._lose_reply_to = None, link.losing
                elif link.losing is not None:
                    self.replies_lost += 1
                    self._lose_times -= 1
                    if self._lose_times > 0:
                        self._lose_reply_to = link.losing  # armed for the client's next try
                    return  # the pumps stop, both connections close: the reply is lost
                if self.delay:
                    await asyncio.sleep(self.delay)
                if not link.frozen:
                    writer.write(data)
                    await writer.drain()

        pumps = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self.links.remove(link)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
