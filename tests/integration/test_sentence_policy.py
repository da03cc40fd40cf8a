"""The worker's sentence policy through real processes (``broker edge`` + ``broker worker``
with default settings, a redis-server, the fake LLM over HTTP): at a slow token rate the
answer's first words show at once, and the rest reads in whole sentences."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from httpx_sse import aconnect_sse

from broker.core.settings import Settings
from broker.tools.mockllm import streamed_messages, tokenize
from tests.conftest import StartBroker
from tests.support.api import create, events_url, unique
from tests.support.fakellm import FakeLLM
from tests.support.procs import RedisServer

pytestmark = pytest.mark.timeout(60)

DEFAULTS = Settings()
# Three sentences of at most SENTENCE_TOKENS tokens, one word a token.
TEXT = "Hello there, this is sentence one. Here comes number two now. And three ends it."
SENTENCE_TOKENS = 6
# Slow enough that a sentence takes most of the bound (3/4 of it: each completes within it),
# far slower than the first text's wait.
TOKEN_GAP = 0.75 * DEFAULTS.flush_interval / SENTENCE_TOKENS
# The first text must arrive long before the bound would have sent it anyway: within its own
# wait plus half of what is left up to the bound (the path LLM -> worker -> Redis -> edge ->
# this reader).
FIRST_TEXT_WITHIN = DEFAULTS.first_text_wait + (
    DEFAULTS.flush_interval - DEFAULTS.first_text_wait) / 2


async def test_first_words_at_once_then_whole_sentences_at_a_slow_rate(
    own_redis: RedisServer, fake_llm: FakeLLM, start_broker: StartBroker,
    http: httpx.AsyncClient,
) -> None:
    tokens = tokenize(TEXT)
    assert max(len(tokenize(s)) for s in TEXT.split(". ")) <= SENTENCE_TOKENS
    # The LLM sends its first word, then holds until this test has seen the first message:
    # nothing but the first-text rule can send it (a sentence end never comes meanwhile, and
    # the bound is further away than the wait below).
    prompt = fake_llm.script(unique("slow answer"), tokens=tokens, delay=TOKEN_GAP, hold_at=1)
    reply = fake_llm.reply_for(prompt)
    edge = start_broker("edge", own_redis.url)
    start_broker("worker", own_redis.url, fake_llm)
    gen_id = await create(http, edge.url, prompt)

    arrivals: list[tuple[float, str]] = []
    finish: dict[str, object] = {}

    async def read() -> None:
        async with aconnect_sse(http, "GET", events_url(edge.url, gen_id)) as source:
            async for event in source.aiter_sse():
                if event.data == "":
                    continue  # no event for an empty data buffer (`retry:`)
                if event.event == "message":
                    arrivals.append((time.monotonic(), json.loads(event.data)["text"]))
                    reply.release.set()  # the first message is here: let the LLM go on
                elif event.event in ("end", "error"):
                    finish.update(json.loads(event.data), event=event.event)
                    return

    reader = asyncio.create_task(read())
    try:
        async with asyncio.timeout(30 + 2 * len(tokens) * TOKEN_GAP):
            await asyncio.shield(reader)
    finally:
        reply.release.set()
        reader.cancel()

    assert finish.get("event") == "end" and finish.get("finish_reason") == "stop", finish
    record = fake_llm.record_for(prompt)
    first_arrival, first_text = arrivals[0]
    assert first_text == "Hello"
    waited = first_arrival - record.sent_at[0]
    assert waited <= FIRST_TEXT_WITHIN, f"the first text took {waited:.3f}s after the token"
    messages = [text for _, text in arrivals]
    assert messages == streamed_messages(TEXT, first_text)
    assert messages[1:] == [" there, this is sentence one. ", "Here comes number two now. ",
                            "And three ends it."]
