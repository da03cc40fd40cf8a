"""The worker's lean reader of the LLM's body (``worker.body``), through the real ``openai``
SDK against the fake LLM over real HTTP: it is the path a plain HTTP/1.1 answer takes, it
reads exactly the bytes httpx's own reader does (events cut at awkward places included), and
a silent or cut stream fails as before."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import uvloop
from openai import AsyncOpenAI

from broker.core.deltas import Piece, Text
from broker.core.settings import Settings
from broker.core.sse import SSEDecoder
from tests.support.fakellm import TRICKY_TEXT, FakeLLM, stream_failure
from worker.body import lean_body
from worker.llm import LLM


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
