"""The worker's own decoding of a chunked LLM body (``worker.body``: ``ChunkDecoder``, and
``_read`` handing the chunks over from h11 and the last chunk back): whatever the reads'
boundaries, the data h11 would give, h11 ending the message as if it had read it all, and
refused where h11 refuses."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from worker.body import MAX_CHUNK_HEADER, BodyBroken, ChunkDecoder, _read

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


class Reads:
    """The connection's bytes, one read each; then the peer's end (``b""``)."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = list(reads)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def read(self) -> bytes:
        return self.reads.pop(0) if self.reads else b""


def awaiting_body(first_read: bytes) -> h11.Connection:
    """A client connection that sent its request and read the response's head from
    ``first_read`` (what came with it stays unread, as the SDK leaves it)."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="POST", target="/v1/chat/completions",
                                headers=[("host", "llm"), ("content-length", "0")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(first_read)
    assert type(connection.next_event()) is h11.Response
    return connection


async def body_of(reads: list[bytes]) -> tuple[bytes, h11.Connection]:
    """``HEAD`` and the body cut into ``reads`` (the first comes with the head)."""
    connection = awaiting_body(HEAD + reads[0])
    pieces = [piece async for piece in _read(connection, Reads(reads[1:]), None)]
    return b"".join(pieces), connection


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


chunk_data = st.binary(min_size=1, max_size=40) | st.text(max_size=20).map(str.encode).filter(bool)
header_style = st.sampled_from(
    ["{:x}", "{:X}", "{:04x}", "{:x};ext=1", "{:x} \t", "{:x};a;b=\"c\" "])
trailers = st.sampled_from([b"", b"x-usage: 12\r\n", b"a: 1\r\nb: 2\r\n"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A chunked body (as written by a server: sizes in any case, extensions, trailers) and
    the data it carries."""
    datas = draw(st.lists(chunk_data, max_size=8))
    wire = b"".join(draw(header_style).format(len(d)).encode() + b"\r\n" + d + b"\r\n"
                    for d in datas)
    wire += draw(st.sampled_from([b"0", b"000", b"0;last"])) + b"\r\n" + draw(trailers) + b"\r\n"
    return wire, b"".join(datas)


@given(chunked_bodies(), st.lists(st.integers(min_value=0, max_value=400), max_size=12))
@example((b"5\r\nhello\r\n0\r\n\r\n", b"hello"), [])  # all in the head's read: h11 alone
@example((b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n", b"helloabc"), [0, 10, 11, 12, 20])
async def test_any_reads_give_the_data_and_h11_ends_the_message(
    body: tuple[bytes, bytes], cuts: list[int],
) -> None:
    wire, data = body
    got, connection = await body_of(split(wire, cuts))
    assert got == data
    # h11 took the end as if it had read the whole body: the connection is reusable.
    assert connection.their_state is h11.DONE and connection.trailing_data == (b"", False)


async def test_the_chunks_are_decoded_here_once_h11_rests_between_two(
    chunk_decoders: list[ChunkDecoder],
) -> None:
    """Token by token, as an LLM streams: h11 reads the start, the decoder the rest. A
    head that came with half a chunk leaves h11 reading until it rests between two."""
    tokens = [b"data: {\"n\": %d}\n\n" % i for i in range(5)]
    chunks = [b"%x\r\n%s\r\n" % (len(t), t) for t in tokens]
    got, connection = await body_of([b"", *chunks, b"0\r\n\r\n"])
    assert got == b"".join(tokens) and connection.their_state is h11.DONE
    assert len(chunk_decoders) == 1 and chunk_decoders[0].last == b"0\r\n\r\n"

    chunk_decoders.clear()
    got, connection = await body_of([chunks[0][:7], chunks[0][7:] + chunks[1], *chunks[2:],
                                     b"0\r\n\r\n"])
    assert got == b"".join(tokens) and connection.their_state is h11.DONE
    assert len(chunk_decoders) == 1


@pytest.mark.parametrize("reads", [
    [b"", b"5\r\nhello\r\n", b"zz\r\nhello\r\n0\r\n\r\n"],  # a header that is not one
    [b"", b"5\r\nhello\r\n", b"5\r\nhelloXY0\r\n\r\n"],  # no CRLF after the data
    [b"", b"5\r\nhello\r\n", b"5" * (MAX_CHUNK_HEADER + 1)],  # a header without end
    [b"", b"5\r\nhello\r\n", b"5\r\nhel"],  # cut inside a chunk
    [b"", b"5\r\nhello\r\n", b"0\r\nx-trailer: 1"],  # cut inside the trailers
    [b"5\r\nhe"],  # cut while h11 still reads
])
async def test_broken_framing_and_a_cut_body_are_refused(reads: list[bytes]) -> None:
    # h11 refuses the same wire too (the decoder is no more lenient).
    with pytest.raises(h11.ProtocolError):
        oracle = awaiting_body(HEAD + b"".join(reads))
        oracle.receive_data(b"")
        while type(oracle.next_event()) is not h11.EndOfMessage:
            pass
    with pytest.raises(BodyBroken):
        await body_of(reads)


def test_the_decoder_keeps_a_header_split_over_reads() -> None:
    decoder = ChunkDecoder()
    assert decoder.feed(b"1") == [] and decoder.feed(b"0;x") == []
    assert decoder.feed(b"\r\n0123456789") == [b"0123456789"]
    assert decoder.feed(b"abcdef") == [b"abcdef"] and decoder.last is None
    assert decoder.feed(b"\r") == [] and decoder.feed(b"\n0\r\n") == []
    assert decoder.last == b"0\r\n"
    assert decoder.feed(b"\r\n") == [] and decoder.last == b"0\r\n\r\n"
