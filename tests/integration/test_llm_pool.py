"""The worker's lean HTTP connection pool (``worker.pool``), under the real ``openai`` SDK
against the fake LLM over real HTTP: the worker's client takes it, reuses its connections,
keeps the limits httpcore's pool keeps (at most ``max_connections`` open, a request waiting
for one up to its pool timeout, at most ``max_keepalive_connections`` idle, none past its
keep-alive) and never reuses a connection left mid-response."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpcore2
import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from broker.core.deltas import Piece, Text
from broker.core.settings import Settings
from tests.support.fakellm import FakeLLM, stream_failure
from tests.support.procs import free_port
from worker.llm import LLM
from worker.pool import LeanPool, lean_transport, transport_pool


def sdk_on(transport: httpx2.AsyncHTTPTransport, fake_llm: FakeLLM,
           timeout: openai.Timeout | None = None) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="k", base_url=fake_llm.base_url, max_retries=0,
                       timeout=timeout or openai.Timeout(30.0),
                       http_client=openai.DefaultAsyncHttpxClient(transport=transport))


def pool_of(transport: httpx2.AsyncHTTPTransport) -> LeanPool:
    pool = transport_pool(transport)
    assert pool is not None, "lean_transport must put a LeanPool under httpx's transport"
    return pool


async def answer(client: AsyncOpenAI, prompt: str) -> str:
    stream = await client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": prompt}])
    return "".join([chunk.choices[0].delta.content or ""
                    async for chunk in stream if chunk.choices])


@pytest.fixture
async def lean(fake_llm: FakeLLM) -> AsyncIterator[tuple[AsyncOpenAI, LeanPool]]:
    transport = lean_transport(httpx2.Limits(max_connections=3, max_keepalive_connections=2))
    client = sdk_on(transport, fake_llm)
    yield client, pool_of(transport)
    await client.close()


async def test_the_workers_llm_client_is_on_the_lean_pool(fake_llm: FakeLLM) -> None:
    llm = LLM(Settings(openai_base_url=fake_llm.base_url, openai_api_key="k",
                       llm_max_retries=0))
    try:
        assert llm.pool is not None
        assert llm.pool.limit == openai.DEFAULT_CONNECTION_LIMITS.max_connections
        texts: list[str] = []

        async def collect(pieces: list[Piece]) -> None:
            texts.extend(p.text for p in pieces if isinstance(p, Text))

        prompt = fake_llm.script("pool worker", "Two words.", delay=0.0)
        for _ in range(3):
            await llm.stream({"model": "m", "messages": [{"role": "user", "content": prompt}]},
                             collect)
        assert "".join(texts) == "Two words." * 3
        # Each went back to the pool (or closed, if the answer's last bytes came after its
        # [DONE]): one connection at most, and a reused one served the next request (before
        # the lean reader was closed with the response, a reused connection never answered).
        assert len(llm.pool.connections) <= 1
    finally:
        await llm.aclose()
    assert llm.pool.connections == []


async def test_connections_are_reused_and_bounded(
    lean: tuple[AsyncOpenAI, LeanPool], fake_llm: FakeLLM,
) -> None:
    client, pool = lean
    prompt = fake_llm.script("pool reuse", "Some words here.", delay=0.01)
    answers = await asyncio.gather(*(answer(client, prompt) for _ in range(3)))
    assert answers == ["Some words here."] * 3
    # Three at once made three connections; two stay idle (max_keepalive_connections).
    assert len(pool.connections) == 2 and pool.idle_count == 2
    first = set(pool.connections)
    assert await answer(client, prompt) == "Some words here."
    assert set(pool.connections) == first  # reused, not a new one

    # Six at once on three connections at most: the others wait for one and then run.
    busiest = 0

    async def watch() -> None:
        nonlocal busiest
        while True:
            busiest = max(busiest, len(pool.connections))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(answer(client, prompt) for _ in range(6)))
    watcher.cancel()
    assert answers == ["Some words here."] * 6
    assert busiest == 3 and not pool.waiters


async def test_a_request_waits_up_to_its_pool_timeout(fake_llm: FakeLLM) -> None:
    transport = lean_transport(httpx2.Limits(max_connections=1))
    client = sdk_on(transport, fake_llm, timeout=openai.Timeout(5.0, pool=0.2))
    pool = pool_of(transport)
    held = fake_llm.script("pool held", "Held words.", hold_at=1)
    try:
        async with client.chat.completions.with_streaming_response.create(
                model="m", stream=True, messages=[{"role": "user", "content": held}]):
            with pytest.raises(openai.APITimeoutError):
                await answer(client, fake_llm.script("pool other", "Other."))
            assert not pool.waiters
            # Released while the other waits: it gets the connection, once it is free.
            other = asyncio.create_task(answer(client, "pool other"))
            await asyncio.sleep(0.05)
            assert len(pool.waiters) == 1
            fake_llm.reply_for(held).release.set()
        # The held response was left unread: its connection closed, a new one serves.
        assert await other == "Other."
        assert len(pool.connections) == 1 and pool.idle_count == 1
    finally:
        await client.close()


async def test_a_waiter_cancelled_leaves_the_line(fake_llm: FakeLLM) -> None:
    transport = lean_transport(httpx2.Limits(max_connections=1))
    client = sdk_on(transport, fake_llm)
    pool = pool_of(transport)
    held = fake_llm.script("pool held 2", "Held words.", hold_at=1)
    try:
        async with client.chat.completions.with_streaming_response.create(
                model="m", stream=True, messages=[{"role": "user", "content": held}]):
            prompt = fake_llm.script("pool waiter", "Waited.")
            cancelled = asyncio.create_task(answer(client, prompt))
            waiting = asyncio.create_task(answer(client, prompt))
            await asyncio.sleep(0.05)
            assert len(pool.waiters) == 2
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert len(pool.waiters) == 1
            fake_llm.reply_for(held).release.set()
        assert await waiting == "Waited."
        assert not pool.waiters and len(pool.connections) == 1
    finally:
        await client.close()


async def test_a_waiter_woken_then_cancelled_passes_the_room_on() -> None:
    pool = LeanPool(max_connections=1)
    first = asyncio.create_task(pool._wait_for_room(None))
    second = asyncio.create_task(pool._wait_for_room(None))
    await asyncio.sleep(0)
    assert len(pool.waiters) == 2
    pool._wake_one()  # room for one: the first in line is woken ...
    first.cancel()  # ... and cancelled before it ran
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) is True  # the room went to the next in line
    assert not pool.waiters


async def test_an_idle_connection_past_its_keepalive_is_not_reused(fake_llm: FakeLLM) -> None:
    transport = lean_transport(httpx2.Limits(max_connections=5, keepalive_expiry=0.1))
    client = sdk_on(transport, fake_llm)
    pool = pool_of(transport)
    prompt = fake_llm.script("pool expiry", "Words.", delay=0.0)
    try:
        await answer(client, prompt)
        [first] = pool.connections
        await asyncio.sleep(0.2)
        await answer(client, prompt)
        [second] = pool.connections
        assert second is not first and first.is_closed()
    finally:
        await client.close()


async def test_a_connection_left_mid_response_is_closed(
    lean: tuple[AsyncOpenAI, LeanPool], fake_llm: FakeLLM,
) -> None:
    client, pool = lean
    prompt = fake_llm.script("pool left", "Many words in this answer here.", delay=0.01)
    stream = await client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": prompt}])
    async for _chunk in stream:
        break
    [connection] = pool.connections
    await stream.close()
    assert connection.is_closed() and pool.connections == [] and pool.idle_count == 0
    assert await answer(client, prompt) == "Many words in this answer here."


async def test_a_cut_stream_closes_its_connection(
    lean: tuple[AsyncOpenAI, LeanPool], fake_llm: FakeLLM,
) -> None:
    client, pool = lean
    prompt = fake_llm.script("pool cut", "Some words here and more.", break_after=2)
    with pytest.raises(Exception):  # noqa: B017 (the SDK's choice of error: not this test's)
        await answer(client, prompt)
    assert pool.connections == [] and pool.idle_count == 0


async def test_an_unreachable_llm_fails_as_with_the_stock_pool(fake_llm: FakeLLM) -> None:
    transport = lean_transport(httpx2.Limits(max_connections=2))
    client = AsyncOpenAI(api_key="k", base_url="http://127.0.0.1:9/v1", max_retries=1,
                         http_client=openai.DefaultAsyncHttpxClient(transport=transport))
    try:
        with pytest.raises(openai.APIConnectionError):
            await answer(client, "unreachable")
        assert pool_of(transport).connections == []  # (two failed connects, none left)
    finally:
        await client.close()


def test_an_unknown_transport_layout_keeps_the_stock_pool(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    class Elsewhere(httpx2.AsyncHTTPTransport):
        def __init__(self, limits: httpx2.Limits) -> None:
            super().__init__(limits=limits)
            self.pool_elsewhere = self.__dict__.pop("_pool")

    monkeypatch.setattr(httpx2, "AsyncHTTPTransport", Elsewhere)
    with caplog.at_level(logging.WARNING, logger="worker.pool"):
        transport = lean_transport(httpx2.Limits())
    assert transport_pool(transport) is None
    assert isinstance(transport, Elsewhere)
    assert isinstance(transport.pool_elsewhere, httpcore2.AsyncConnectionPool)
    assert "keeps the stock pool" in caplog.text


async def test_the_workers_request_is_the_sdks(fake_llm: FakeLLM) -> None:
    """What the worker sends, read off the wire by a bare HTTP server: the SDK's path, auth,
    headers and JSON body, and its retry of a 5xx (a second connection, the same request)."""
    heads: list[bytes] = []
    bodies: list[dict[str, object]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        bodies.append(json.loads(await reader.readexactly(length)))
        heads.append(head)
        if len(heads) == 1:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
        else:
            chunk = {"choices": [{"index": 0, "delta": {"content": "Hi."}}]}
            body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    llm = LLM(Settings(openai_base_url=f"http://127.0.0.1:{port}/v1", openai_api_key="sk-t",
                       llm_max_retries=1))
    texts: list[str] = []

    async def collect(pieces: list[Piece]) -> None:
        texts.extend(p.text for p in pieces if isinstance(p, Text))

    try:
        request = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        await llm.stream(request, collect)
    finally:
        await llm.aclose()
        server.close()
    assert texts == ["Hi."] and len(heads) == 2
    for head, body in zip(heads, bodies, strict=True):
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
        headers = {k.lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        assert headers["authorization"] == "Bearer sk-t"
        assert headers["content-type"] == "application/json"
        assert headers["x-stainless-lang"] == "python"
        assert body == {**request, "stream": True, "stream_options": {"include_usage": True}}
    assert "x-stainless-retry-count: 1" in heads[1].decode().lower()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
async def test_a_proxy_in_the_environment_is_used_and_the_stock_pool_kept(
    fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch, variable: str,
) -> None:
    # httpx honours the proxy variables only in a client that makes its own transport: with
    # one set, the worker keeps the SDK's client, and the request goes to the proxy (here a
    # port nobody listens on, so it fails to connect instead of reaching the fake LLM).
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, f"http://127.0.0.1:{free_port()}")
    llm = LLM(Settings(openai_base_url=fake_llm.base_url, openai_api_key="k",
                       llm_max_retries=0))
    try:
        assert llm.pool is None
        prompt = fake_llm.script("through a proxy", "Never read.", delay=0.0)
        assert (await stream_failure(llm, prompt)).code == "llm_unreachable"
    finally:
        await llm.aclose()


def test_no_proxy_alone_keeps_the_lean_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert LLM(Settings(openai_api_key="k")).pool is not None
