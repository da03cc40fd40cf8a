"""The LLM's streamed response body, read lean.

The worker reads one small HTTP chunk per token. Through the SDK's client
(``Response.aiter_bytes``) each chunk climbed five nested async generators (httpx's response,
bound stream and transport stream, httpcore's pool and connection streams) and an anyio
``fail_after`` cancel scope per network read: ~40 % of the worker's CPU at 50 tokens/s (B5,
py-spy). Here the body is read from the same connection: one timer bounds the silence of each
read (the request's read timeout, the SDK's ``BROKER_LLM_IDLE_TIMEOUT``), and all a read
brought is handed on as one piece. The SDK still makes the request (retries, status errors,
auth) and closes the response: the connection's ``h11`` state machine then says whether the
connection can be reused, as it would.

The framing: ``h11``, the connection's own parser, reads the body's start; a chunked body (what
an LLM streams over HTTP/1.1) is then decoded here (``ChunkDecoder``, a few slices per chunk:
``h11`` took ~20 % of the worker's CPU per token, most of it its general event machinery)
from the first moment ``h11`` rests between two chunks with nothing unread, and the last
chunk (``0``, trailers, the end) is handed back to it, so it ends the message as if it had
read it all (it never saw the chunks between: they are not its state). A body of another
framing stays with ``h11``.

The bytes: from a plain TCP connection (on asyncio's loop or uvloop) the transport's protocol
is swapped for the length of the body (``asyncio.BaseTransport.set_protocol``) for one that
wakes the reader with a future of its own, reading resumed throughout, instead of anyio's
``receive``, which resumes and pauses the transport's reading around each read (two
``epoll_ctl`` calls per token under uvloop) and waits on an ``asyncio.Event`` (a ``getpid``
system call per wait under CPython 3.11); anyio's protocol gets back what is unread, and hears
of an end or a lost connection when it happens. Any other stream (TLS) is read with its
``receive``.

Only for what it knows: an HTTP/1.1 connection of httpcore's, a body with no
``Content-Encoding`` (``identity``). Anything else (a compressed body, HTTP/2, another
transport, a version of httpcore or h11 laid out differently) is read by ``aiter_bytes`` or
``h11`` as before.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
import h11
from anyio.abc import ByteStream

READ_BYTES = 65536
# The longest chunk header (size, extensions) waited for: h11's default limit on an
# unfinished event (httpcore raises it to 100 kB for a response's head).
MAX_CHUNK_HEADER = 16 * 1024
# A chunk header as h11 takes it: 1-20 hex digits, extensions ignored, trailing blanks allowed.
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")


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


class ChunkDecoder:
    """The data of a chunked HTTP/1.1 body (RFC 9112, 7.1), fed as it arrives, from a chunk
    boundary on, up to the last chunk: its bytes and all after them are ``last`` then. What
    h11 refuses is refused (``ValueError``): a header that is not one, no CRLF after a chunk's
    data, a header longer than ``MAX_CHUNK_HEADER``."""

    __slots__ = ("_buffer", "_footer", "_left", "last")

    def __init__(self) -> None:
        self._buffer = b""  # an unfinished chunk header
        self._left = 0  # bytes of the current chunk's data still to come
        self._footer = b""  # what is still to come of the CRLF after a chunk's data
        self.last: bytes | None = None  # the last chunk (``0``...) and what came after it

    def feed(self, data: bytes) -> list[bytes]:
        """The chunk data in ``data``, in order (parts of a chunk split over reads included)."""
        if self.last is not None:
            self.last += data
            return []
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        size = len(buffer)
        parts: list[bytes] = []
        at = 0
        while at < size:
            if self._left:
                end = at + self._left
                if end > size:
                    parts.append(buffer[at:])
                    self._left = end - size
                    return parts
                parts.append(buffer[at:end])
                self._left = 0
                self._footer = b"\r\n"
                at = end
                continue
            if self._footer:
                got = buffer[at:at + len(self._footer)]
                if not self._footer.startswith(got):
                    raise ValueError(f"malformed chunk footer: {got!r}")
                self._footer = self._footer[len(got):]
                at += len(got)
                continue
            eol = buffer.find(b"\r\n", at)
            if eol < 0:
                if size - at > MAX_CHUNK_HEADER:
                    raise ValueError(f"a chunk header longer than {MAX_CHUNK_HEADER} bytes")
                self._buffer = buffer[at:]
                return parts
            header = _CHUNK_HEADER.fullmatch(buffer, at, eol)
            if header is None:
                raise ValueError(f"illegal chunk header: {buffer[at:eol]!r}")
            chunk_size = int(header[1], 16)
            if chunk_size == 0:
                self.last = buffer[at:]
                return parts
            self._left = chunk_size
            at = eol + 2
        return parts


def _resting_between_chunks(state: h11.Connection) -> bool:
    """h11 reads a chunked body, stands between two chunks and holds nothing unread: the
    decoding may be taken from it here and the last chunk given back (h11 internals, checked:
    where they are not as expected, h11 reads the whole body)."""
    reader = getattr(state, "_reader", None)
    return (state.their_state is h11.SEND_BODY and type(reader).__name__ == "ChunkedReader"
            and getattr(reader, "_bytes_in_chunk", None) == 0
            and getattr(reader, "_bytes_to_discard", None) == b""
            and getattr(reader, "_reading_trailer", None) is False
            and state.trailing_data == (b"", False))


class Source(Protocol):
    """Where ``_read`` takes the connection's bytes from: ``read`` returns ``b""`` at the
    peer's end, raises ``BodyBroken`` on a failed connection."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    async def read(self) -> bytes: ...


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
            return b""  # the framing decides: the end of a read-until-close body, or a cut one
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as e:
            raise BodyBroken(f"the LLM connection failed: {e!r}") from e


class _Transport(Protocol):
    """What ``_SocketSource`` uses of a transport (asyncio's, uvloop's)."""

    def get_protocol(self) -> Any: ...
    def set_protocol(self, protocol: Any) -> None: ...
    def resume_reading(self) -> None: ...
    def pause_reading(self) -> None: ...
    def is_closing(self) -> bool: ...


class _SocketSource(asyncio.Protocol):
    """Bytes from anyio's plain TCP stream (on asyncio's loop or uvloop): the transport's
    protocol while the body is read (see the module's doc). anyio's protocol (``anyio_``)
    hears of an end or a lost connection at once, as it would have, and gets back what is
    unread, its read event set as its ``receive`` leaves it."""

    def __init__(self, transport: _Transport, anyio_: Any) -> None:
        self.transport = transport
        self.anyio_ = anyio_
        self.queue: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False  # the peer ended its side, or the connection is gone
        self.exception: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def of(cls, network: ByteStream) -> _SocketSource | None:
        transport = getattr(network, "_transport", None)
        protocol = getattr(network, "_protocol", None)
        # The transport by what it does, not by class: uvloop's (the worker's loop) is not an
        # ``asyncio.Transport`` subclass, and a class check sent every body of the worker the
        # slower way while the tests (on asyncio's loop) took this one.
        if (transport is None or type(network).__name__ != "SocketStream"
                or not all(callable(getattr(transport, name, None))
                           for name in ("get_protocol", "set_protocol", "resume_reading",
                                        "pause_reading", "is_closing"))
                or not isinstance(protocol, asyncio.Protocol)
                or transport.get_protocol() is not protocol
                or not isinstance(getattr(protocol, "read_queue", None), deque)
                or not isinstance(getattr(protocol, "read_event", None), asyncio.Event)
                or not hasattr(protocol, "is_at_eof") or not hasattr(protocol, "exception")):
            return None
        return cls(transport, protocol)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        anyio_ = self.anyio_
        self.queue.extend(anyio_.read_queue)  # bytes anyio took but no one read yet come first
        anyio_.read_queue.clear()
        anyio_.read_event.clear()
        self.exception = anyio_.exception
        self.ended = anyio_.is_at_eof or self.exception is not None
        self.transport.set_protocol(self)
        self.transport.resume_reading()

    def stop(self) -> None:
        self.transport.pause_reading()
        self.transport.set_protocol(self.anyio_)
        anyio_ = self.anyio_
        anyio_.read_queue.extend(self.queue)
        self.queue.clear()
        if anyio_.read_queue or self.ended:
            anyio_.read_event.set()
        else:
            anyio_.read_event.clear()

    async def read(self) -> bytes:
        queue = self.queue
        while not queue:
            if self.exception is not None:
                raise BodyBroken(f"the LLM connection failed: {self.exception!r}")
            if self.ended or self.transport.is_closing():
                return b""  # the framing decides: a read-until-close body's end, or a cut one
            assert self.loop is not None
            waiter = self.waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        data = queue.popleft() if len(queue) == 1 else b"".join(queue)
        queue.clear()
        return data

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- asyncio.Protocol, while the body is read ---------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.queue.append(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self.ended = True
        self._wake()
        return self.anyio_.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.exception = exc
        self._wake()
        self.anyio_.connection_lost(exc)

    def pause_writing(self) -> None:
        self.anyio_.pause_writing()

    def resume_writing(self) -> None:
        self.anyio_.resume_writing()


async def _read(
    state: h11.Connection, source: Source, read_timeout: float | None
) -> AsyncIterator[bytes]:
    silence = _Silence(read_timeout)
    source.start()
    chunks: ChunkDecoder | None = None  # while the chunks are decoded here, not by h11
    decoded: list[bytes] = []  # data decoded here, handed on with h11's end of the message
    try:
        while True:
            if chunks is None:
                parts, decoded = decoded, []
                while True:
                    try:
                        event = state.next_event()
                    except (h11.RemoteProtocolError, h11.LocalProtocolError) as e:
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
                # (Never again once h11 has the last chunk: it reads the trailers then.)
                if _resting_between_chunks(state):
                    chunks = ChunkDecoder()
            silence.waiting_since = silence.loop.time()
            try:
                data = await source.read()
            except asyncio.CancelledError:
                if silence.expired():
                    raise BodySilent(f"no byte from the LLM for {read_timeout} s") from None
                raise
            finally:
                silence.waiting_since = None
            if chunks is None:
                try:
                    state.receive_data(data)
                except h11.RemoteProtocolError as e:
                    raise BodyBroken(f"the LLM broke HTTP framing: {e}") from e
                continue
            if not data:
                raise BodyBroken("the LLM closed the connection mid-body")
            try:
                parts = chunks.feed(data)
            except ValueError as e:
                raise BodyBroken(f"the LLM broke HTTP framing: {e}") from e
            if chunks.last is not None:
                # The last chunk to h11, which stood between two chunks: it ends the message
                # before the data that came with it is handed on (above, with h11's events),
                # so a reader that stops at `[DONE]`, as the worker does, leaves the message
                # ended and the connection reusable.
                state.receive_data(chunks.last)
                chunks = None
                decoded = parts
                continue
            if parts:
                yield parts[0] if len(parts) == 1 else b"".join(parts)
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
