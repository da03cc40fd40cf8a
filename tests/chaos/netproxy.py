"""A TCP proxy that the chaos run puts on a link (the processes' Redis link, the viewers' link to
the entry point) to hurt it the way networks do: latency on every byte, and every connection
severed at once. It runs on a thread and an event loop of its own, so the harness's own load
never delays its traffic."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.support.procs import free_port, wait_until

READ_SIZE = 65536


class NetProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.delay = 0.0  # seconds added before each piece is forwarded, both ways
        self.severed = 0  # connections cut by sever()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"netproxy-{self.port}")

    def start(self) -> NetProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)
        wait_until(lambda: self._server is not None, 5, "the proxy")
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()
            self._close_all()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def sever(self) -> int:
        """Cut every connection open now (RST-like: both sides see it closed); new ones work."""
        async def cut() -> int:
            return self._close_all()

        count = asyncio.run_coroutine_threadsafe(cut(), self._loop).result(5)
        self.severed += count
        return count

    def _close_all(self) -> int:
        writers = list(self._writers)
        for writer in writers:
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._writers.clear()
        return len(writers) // 2

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(READ_SIZE):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()

        pumps = [asyncio.create_task(pump(reader, up_writer)),
                 asyncio.create_task(pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()
