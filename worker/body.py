"""The LLM's streamed response body, read lean.

The worker reads one small HTTP chunk per token. Through the SDK's client
(``Response.aiter_bytes``) each chunk climbed five nested async generators (httpx's response,
bound stream and transport stream, httpcore's pool and connection streams) and an anyio
``fail_after`` cancel scope per network read: ~40 % of the worker's CPU at 50 tokens/s (B5,
py-spy). Here the body is read from the same connection, with the same HTTP parser: the
connection's own ``h11`` state machine is fed straight from its network stream, every event
h11 has ready is taken in one go (all the chunks one read brought, as one piece), and one
timer bounds the silence of each read (the request's read timeout, the SDK's
``BROKER_LLM_IDLE_TIMEOUT``). The SDK still makes the request (retries, status errors, auth)
and closes the response: h11 then says whether the connection can be reused, as it would.

Only for what it knows: an HTTP/1.1 connection of httpcore's, a body with no
``Content-Encoding`` (``identity``). Anything else (a compressed body, HTTP/2, another
transport, a version of httpcore laid out differently) is read by ``aiter_bytes`` as before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
import h11
from anyio.abc import ByteStream

READ_BYTES = 65536


class BodyBroken(Exception):
    """The connection failed or broke the HTTP framing mid-body."""


class BodySilent(Exception):
    """No byte arrived within the read timeout."""


def lean_body(response: Any) -> AsyncIterator[bytes] | None:
    """The body of ``response`` (an httpx ``Response`` the SDK streams), read lean; None when
    it must be read the ordinary way."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    try:
        connection = response.stream._stream._httpcore_stream._stream._connection
        state = connection._h11_state
        network = connection._network_stream._stream
    except AttributeError:
        return None
    if not isinstance(state, h11.Connection) or not isinstance(network, ByteStream):
        return None
    timeout = (response.request.extensions.get("timeout") or {}).get("read")
    source = _SocketSource.of(network) or _StreamSource(network)
    return _read(state, source, timeout)


class _StreamSource:
    """Bytes from any anyio byte stream (TLS included), one ``receive`` per read."""

    def __init__(self, network: ByteStream) -> None:
        self.network = network

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def read(self) -> bytes:
        try:
            return await self.network.receive(READ_BYTES)
        except anyio.EndOfStream:
            return b""  # h11 decides: the end of a read-until-close body, or a cut one
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            raise BodyBroken(f"the LLM connection failed: {e!r}") from e


class _Transport(Protocol):
    """What ``_SocketSource`` uses of a transport (asyncio's, uvloop's)."""

    def resume_reading(self) -> None: ...
    def pause_reading(self) -> None: ...
    def is_closing(self) -> bool: ...


class _SocketSource:
    """Bytes from anyio's plain TCP stream (on asyncio's loop or uvloop), taken from its
    protocol's queue. Its ``receive`` resumes the transport's reading before each read and
    pauses it after (two ``epoll_ctl`` calls per token under uvloop); the body is read with
    reading resumed throughout, and paused again after, as anyio leaves it between its
    reads."""

    def __init__(self, transport: _Transport, protocol: Any) -> None:
        self.transport = transport
        self.protocol = protocol

    @classmethod
    def of(cls, network: ByteStream) -> _SocketSource | None:
        transport = getattr(network, "_transport", None)
        protocol = getattr(network, "_protocol", None)
        # The transport by what it does, not by class: uvloop's (the worker's loop) is not an
        # ``asyncio.Transport`` subclass, and a class check sent every body of the worker the
        # slower way while the tests (on asyncio's loop) took this one.
        if (transport is None or type(network).__name__ != "SocketStream"
                or not all(callable(getattr(transport, name, None))
                           for name in ("resume_reading", "pause_reading", "is_closing"))
                or not isinstance(getattr(protocol, "read_queue", None), deque)
                or not isinstance(getattr(protocol, "read_event", None), asyncio.Event)):
            return None
        return cls(transport, protocol)

    def start(self) -> None:
        self.transport.resume_reading()

    def stop(self) -> None:
        self.transport.pause_reading()
        # As anyio's receive leaves it: the event set exactly while bytes wait in the queue.
        if self.protocol.read_queue:
            self.protocol.read_event.set()
        else:
            self.protocol.read_event.clear()

    async def read(self) -> bytes:
        protocol = self.protocol
        queue: deque[bytes] = protocol.read_queue
        while not queue:
            if protocol.exception is not None:
                raise BodyBroken(f"the LLM connection failed: {protocol.exception!r}")
            if protocol.is_at_eof or self.transport.is_closing():
                return b""
            protocol.read_event.clear()
            await protocol.read_event.wait()
        data = queue.popleft() if len(queue) == 1 else b"".join(queue)
        queue.clear()
        return data


async def _read(
    state: h11.Connection, source: _StreamSource | _SocketSource, read_timeout: float | None
) -> AsyncIterator[bytes]:
    silence = _Silence(read_timeout)
    source.start()
    try:
        while True:
            parts: list[bytes] = []
            while True:
                try:
                    event = state.next_event()
                except h11.RemoteProtocolError as e:
                    raise BodyBroken(f"the LLM broke HTTP framing: {e}") from e
                if event is h11.NEED_DATA:
                    break
                if type(event) is h11.Data:
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                    if parts:
                        yield b"".join(parts)
                    return
                elif type(event) is h11.ConnectionClosed:
                    raise BodyBroken("the LLM closed the connection mid-body")
            if parts:
                yield b"".join(parts)
            silence.waiting_since = silence.loop.time()
            try:
                data = await source.read()
            except asyncio.CancelledError:
                if silence.expired():
                    raise BodySilent(f"no byte from the LLM for {read_timeout} s") from None
                raise
            finally:
                silence.waiting_since = None
            try:
                state.receive_data(data)
            except h11.RemoteProtocolError as e:
                raise BodyBroken(f"the LLM broke HTTP framing: {e}") from e
    finally:
        source.stop()
        silence.stop()


class _Silence:
    """The read timeout, as one timer for the whole body instead of one per read (a timer set
    and cancelled per token was ~8 % of the worker's CPU): when it fires it looks at how long
    the current read has waited, and cancels the reading task only if that is the whole
    timeout; else it sets itself again for the rest. Time spent elsewhere (publishing what the
    last read brought) does not count, as it did not with a timeout per read."""

    def __init__(self, timeout: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.waiting_since: float | None = None
        self._task = asyncio.current_task()
        self._fired = False
        self._handle = (self.loop.call_later(timeout, self._check)
                        if timeout is not None else None)

    def _check(self) -> None:
        assert self.timeout is not None
        since = self.waiting_since
        left = self.timeout if since is None else since + self.timeout - self.loop.time()
        if left > 0:
            self._handle = self.loop.call_later(left, self._check)
            return
        self._fired = True
        self._handle = None
        if self._task is not None:
            self._task.cancel()

    def expired(self) -> bool:
        """Was the cancel just caught ours? Then it is taken back (the task goes on to fail
        with ``BodySilent``, not as cancelled)."""
        if not self._fired:
            return False
        if self._task is not None:
            self._task.uncancel()
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
