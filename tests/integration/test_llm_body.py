"""The worker's lean reader of the LLM's body (``worker.body``), through the real ``openai``
SDK against the fake LLM over real HTTP: it is the path a plain HTTP/1.1 answer takes, it
reads exactly the bytes httpx's own reader does (events cut at awkward places included), and
a silent or cut stream fails as before."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop
from openai import AsyncOpenAI

from broker.core.deltas import Piece, Text
from broker.core.settings import Settings
from broker.core.sse import SSEDecoder
from broker.tools.loadbalancer import self_signed_certificate
from tests.support.fakellm import TRICKY_TEXT, FakeLLM, stream_failure
from worker.body import ChunkDecoder, lean_body
from worker.llm import DONE_DRAIN, LLM


@pytest.fixture
async def client(fake_llm: FakeLLM) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0)
    yield sdk
    await sdk.close()


async def body_of(client: AsyncOpenAI, prompt: str, lean: bool) -> bytes:
    call = client.chat.completions.with_streaming_response.create(
        model="m", stream=True, messages=[{"role": "user", "content": prompt}])
    async with call as response:
        http = response.http_response
        pieces = lean_body(http)
        assert pieces is not None, "a plain HTTP/1.1 answer must take the lean path"
        # ... straight from the socket's queue (plain TCP): the reader's source says so.
        assert type(pieces.ag_frame.f_locals["source"]).__name__ == "_SocketSource"  # type: ignore[attr-defined]
        if not lean:
            pieces = http.aiter_bytes()
        return b"".join([piece async for piece in pieces])


@pytest.mark.parametrize("split_writes", [False, True])
async def test_the_lean_reader_reads_what_httpx_reads(
    client: AsyncOpenAI, fake_llm: FakeLLM, split_writes: bool,
) -> None:
    prompt = fake_llm.script(f"lean-body {split_writes}", TRICKY_TEXT, delay=0.0,
                             split_writes=split_writes, line_end="\r\n")
    lean = await body_of(client, prompt, lean=True)
    plain = await body_of(client, prompt, lean=False)
    assert chunks_of(lean) == chunks_of(plain)
    assert lean.endswith(b"data: [DONE]\r\n\r\n")
    # Read to its end, the connection went back to the pool and serves the next request.
    assert chunks_of(await body_of(client, prompt, lean=True)) == chunks_of(lean)


def test_the_lean_reader_takes_the_socket_path_on_uvloop(fake_llm: FakeLLM) -> None:
    """The worker runs on uvloop (``broker.tools.cli``), whose transports are not
    ``asyncio.Transport`` subclasses: a class check there sent every body of the worker the
    slower way while the tests, on asyncio's loop, took this one. The same reads, on uvloop."""
    prompt = fake_llm.script("lean-body uvloop", TRICKY_TEXT, delay=0.0, split_writes=True)

    async def both() -> tuple[bytes, bytes]:
        async with AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0) as sdk:
            return (await body_of(sdk, prompt, lean=True), await body_of(sdk, prompt, lean=False))

    lean, plain = uvloop.run(both())
    assert chunks_of(lean) == chunks_of(plain) and lean.endswith(b"data: [DONE]\n\n")


def chunks_of(body: bytes) -> list[object]:
    """The body's events, without what differs between two answers (id, creation time)."""
    datas = list(SSEDecoder().feed(body))
    return [data if data.startswith("[DONE]") else
            {k: v for k, v in json.loads(data).items() if k not in ("id", "created")}
            for data in datas]


async def test_a_silent_llm_times_out_on_the_lean_path(fake_llm: FakeLLM) -> None:
    prompt = fake_llm.script("lean-body silent", "Some words here.", stall_after=1)
    llm = LLM(Settings(openai_base_url=fake_llm.base_url, openai_api_key="k",
                       llm_idle_timeout=0.3, llm_max_retries=0))
    try:
        assert (await stream_failure(llm, prompt)).code == "llm_timeout"
    finally:
        await llm.aclose()


async def test_a_cut_stream_breaks_on_the_lean_path(fake_llm: FakeLLM) -> None:
    prompt = fake_llm.script("lean-body cut", "Some words here and more.", break_after=2)
    llm = LLM(Settings(openai_base_url=fake_llm.base_url, openai_api_key="k",
                       llm_max_retries=0))
    try:
        assert (await stream_failure(llm, prompt)).code == "llm_stream_broken"
    finally:
        await llm.aclose()


async def test_a_stream_ended_without_finish_reason_or_done_is_broken_not_complete(
    fake_llm: FakeLLM,
) -> None:
    """A body that ends cleanly with neither a finish_reason nor `[DONE]` (a proxy ending a
    cut stream properly) is an answer cut short: `llm_stream_broken`, not `stop`. `[DONE]`
    alone, with no finish_reason, is a whole answer."""
    llm = LLM(Settings(openai_base_url=fake_llm.base_url, openai_api_key="k",
                       llm_max_retries=0))
    cut = fake_llm.script("lean-body ended early", "Some words here and more.", end_after=2)
    whole = fake_llm.script("lean-body done only", "Some words here.", finish_reason=None)
    texts: list[str] = []

    async def keep(pieces: list[Piece]) -> None:
        texts.extend(p.text for p in pieces if isinstance(p, Text))

    try:
        assert (await stream_failure(llm, cut, keep)).code == "llm_stream_broken"
        assert "".join(texts) == "Some words"
        texts.clear()
        completion = await llm.stream(
            {"model": "m", "messages": [{"role": "user", "content": whole}]}, keep)
        assert completion.finish_reason == "stop" and "".join(texts) == "Some words here."
    finally:
        await llm.aclose()


async def test_the_chunks_are_decoded_by_the_lean_reader_and_h11_ends_the_body(
    client: AsyncOpenAI, fake_llm: FakeLLM, chunk_decoders: list[ChunkDecoder],
) -> None:
    """Token by token, as an LLM streams: after the body's start the chunks are decoded by
    ``worker.body.ChunkDecoder``, and the last one handed back to the connection's h11, which
    ends the message (the connection then serves the next request)."""
    prompt = fake_llm.script("lean-body chunks", TRICKY_TEXT, delay=0.002)
    first = await body_of(client, prompt, lean=True)
    [decoder] = chunk_decoders
    assert decoder.last is not None and decoder.last.startswith(b"0")
    assert chunks_of(first) == chunks_of(await body_of(client, prompt, lean=False))
    assert chunks_of(await body_of(client, prompt, lean=True)) == chunks_of(first)


class RawLLM:
    """An HTTP/1.1 server that answers every request with the same bytes, as given: framing
    the fake LLM's server would never write (extensions, trailers, a head and body in one
    write, one byte per write, broken chunks). Counts the connections it accepted."""

    def __init__(self, writes: list[bytes | float], tls: ssl.SSLContext | None = None) -> None:
        """``writes``: bytes to write, or seconds to wait before the next (a pause on the
        wire). ``tls``: served over TLS with this context (each write a record of its own)."""
        self.writes = writes
        self.tls = tls
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                for write in self.writes:
                    if isinstance(write, float):
                        await asyncio.sleep(write)
                        continue
                    writer.write(write)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


RAW_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def sse_chunks(*datas: str, header: bytes = b"%x") -> list[bytes]:
    events = [f"data: {d}\n\n".encode() for d in datas]
    return [header % len(e) + b"\r\n" + e + b"\r\n" for e in events]


TOKENS = [json.dumps({"choices": [{"index": 0, "delta": {"content": t}}]}, ensure_ascii=False)
          for t in ("Hello", " wörld", " 😀\u2028", ".")] + ["[DONE]"]


@pytest.mark.parametrize("writes", [
    pytest.param([RAW_HEAD, *sse_chunks(*TOKENS), b"0\r\n\r\n"], id="a write per chunk"),
    pytest.param([RAW_HEAD + b"".join(sse_chunks(*TOKENS)) + b"0\r\n\r\n"], id="one write"),
    pytest.param([RAW_HEAD + sse_chunks(*TOKENS)[0][:9], sse_chunks(*TOKENS)[0][9:],
                  *sse_chunks(*TOKENS[1:]), b"0\r\n\r\n"], id="the head with half a chunk"),
    pytest.param([RAW_HEAD, *sse_chunks(*TOKENS, header=b"%X;ext=\"1\" "),
                  b"0;end\r\nx-usage: 7\r\n\r\n"], id="extensions and trailers"),
    pytest.param([bytes([b]) for b in RAW_HEAD + b"".join(sse_chunks(*TOKENS)) + b"0\r\n\r\n"],
                 id="a byte per write"),
])
async def test_any_framing_of_a_chunked_answer_reads_exactly_and_reuses_the_connection(
    writes: list[bytes],
) -> None:
    raw = RawLLM(writes)
    async with raw as base_url, AsyncOpenAI(api_key="k", base_url=base_url,
                                            max_retries=0) as sdk:
        first = await body_of(sdk, "raw", lean=True)
        assert [d for d in SSEDecoder().feed(first)] == TOKENS
        assert await body_of(sdk, "raw", lean=True) == first
    assert raw.connections == 1  # the body's end left the connection reusable


@pytest.mark.parametrize("bad", [
    pytest.param(b"zz\r\n", id="a chunk header that is not one"),
    pytest.param(b"5\r\nhelloXY", id="no CRLF after a chunk"),
])
async def test_broken_chunk_framing_mid_answer_is_llm_stream_broken(bad: bytes) -> None:
    async with RawLLM([RAW_HEAD, *sse_chunks(*TOKENS[:2]), bad]) as base_url:
        llm = LLM(Settings(openai_base_url=base_url, openai_api_key="k", llm_max_retries=0))
        try:
            assert (await stream_failure(llm, "raw")).code == "llm_stream_broken"
        finally:
            await llm.aclose()


DONE_CHUNK = sse_chunks(*TOKENS)[-1]


@pytest.mark.parametrize("ending", [
    pytest.param([DONE_CHUNK + b"0\r\n\r\n"], id="the end in the same read as [DONE]"),
    # A pause well within the wait for the end after [DONE]: the end comes in a read of its own.
    pytest.param([DONE_CHUNK, DONE_DRAIN / 10, b"0\r\n\r\n"], id="the end in a read of its own"),
])
async def test_the_worker_stopping_at_done_leaves_the_connection_reusable(
    ending: list[bytes | float],
) -> None:
    """The worker stops reading at `[DONE]`; the body's end, after it in the same read or the
    next, still reaches h11, which ends the message: three answers, one connection."""
    raw = RawLLM([RAW_HEAD, b"".join(sse_chunks(*TOKENS[:-1])), DONE_DRAIN / 10, *ending])
    await three_answers_on_one_connection(raw)


async def test_over_tls_the_worker_keeps_its_connection_to_the_llm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over TLS every record is a read of its own, so the body's end came in a read after
    `[DONE]`, which the worker did not make: each answer paid a new connection and TLS
    handshake (2.9-3.1 ms of the worker's CPU per answer, against 1.3 with the connection
    kept). The LLM's client trusts the certificate the way a user's would: SSL_CERT_FILE."""
    pem = self_signed_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pem)
    await three_answers_on_one_connection(
        RawLLM([RAW_HEAD, *sse_chunks(*TOKENS), b"0\r\n\r\n"], tls=tls))


async def three_answers_on_one_connection(raw: RawLLM) -> None:
    async with raw as base_url:
        llm = LLM(Settings(openai_base_url=base_url, openai_api_key="k", llm_max_retries=0))
        texts: list[str] = []

        async def keep(pieces: list[Piece]) -> None:
            texts.extend(p.text for p in pieces if isinstance(p, Text))

        try:
            for _ in range(3):
                completion = await llm.stream(
                    {"model": "m", "messages": [{"role": "user", "content": "raw"}]}, keep)
                assert completion.finish_reason == "stop"
        finally:
            await llm.aclose()
    assert "".join(texts) == "Hello wörld 😀\u2028." * 3
    assert raw.connections == 1
