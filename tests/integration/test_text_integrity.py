"""Every character an LLM may send arrives exactly, end to end over real HTTP.

The fake LLM (a real HTTP server, ``broker/tools/mockllm.py``) writes its chunks as UTF-8 JSON with
``ensure_ascii=False``, as real servers do, so U+2028, U+0085, emoji... travel as raw bytes;
it ends SSE lines with LF, CRLF or a lone CR, may open with a BOM, and may cut every event into
separate writes after each CR and inside each multi-byte character. A real ``broker worker``
reads it through the real ``openai`` SDK and publishes to a real redis-server; a real
``broker edge`` serves the stream. The test reads it back three ways, and each must equal the
text the LLM sent: ``broker.client.Follower`` (httpx-sse, as ``broker tail`` does), the raw
bytes through ``broker.core.sse.SSEDecoder`` (the WHATWG rules a browser's EventSource follows),
and ``GET /v1/generations/{id}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from broker.client import Follower
from broker.core import sse
from broker.tools.mockllm import tokenize
from tests.conftest import StartBroker
from tests.support.api import create, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import BrokerProcess, RedisServer

NOT_LINE_ENDS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines breaks, SSE does not


def _combining(c: str) -> bool:
    return unicodedata.category(c) in ("Mn", "Mc", "Me")


# The classes of code points texts are drawn from: how to draw one, how to recognise one. Each
# must turn up in several drawn texts (checked after the run).
CLASSES: dict[str, tuple[st.SearchStrategy[str], Callable[[str], bool]]] = {
    "splitlines-only line breaks": (st.sampled_from(NOT_LINE_ENDS), NOT_LINE_ENDS.__contains__),
    "CR and LF": (st.sampled_from("\r\n"), "\r\n".__contains__),
    "astral: 4 UTF-8 bytes": (st.characters(min_codepoint=0x10000, codec="utf-8"),
                              lambda c: ord(c) >= 0x10000),
    "CJK: 3 UTF-8 bytes": (st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
                           lambda c: 0x4E00 <= ord(c) <= 0x9FFF),
    "2 UTF-8 bytes": (st.characters(min_codepoint=0x80, max_codepoint=0x7FF),
                      lambda c: 0x80 <= ord(c) <= 0x7FF),
    "combining marks": (st.characters(categories=("Mn", "Mc", "Me")), _combining),
    "U+FEFF inside the text": (st.just("\ufeff"), "\ufeff".__eq__),
    "any other (NUL-free)": (st.characters(codec="utf-8", exclude_characters="\x00"),
                             lambda c: True),
}
# A class first, then a character of it: every class is about as likely (one_of is not).
CHARS = st.sampled_from([draw for draw, _ in CLASSES.values()]).flatmap(lambda draw: draw)
TOKENS = st.lists(
    st.one_of(st.text(CHARS, min_size=1, max_size=10),
              st.sampled_from(["\r\n", "\r", "e\u0301", "👨\u200d👩\u200d👧", ". ", "。"])),
    min_size=1, max_size=16,
)
WIRE = {"line_end": st.sampled_from(["\n", "\r\n", "\r"]), "bom": st.booleans(),
        "split_writes": st.booleans()}


@dataclass(frozen=True)
class Deployment:
    edge: BrokerProcess
    worker: BrokerProcess


@pytest.fixture(scope="module")
def deployment(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[Deployment]:
    """One edge and one worker with default settings, on a redis-server of their own (so no
    other test's worker runs these generations)."""
    redis = RedisServer().start()
    yield Deployment(start_broker("edge", redis.url),
                     start_broker("worker", redis.url, fake_llm))
    redis.stop()


async def read_three_ways(base: str, gen_id: str) -> tuple[str, str, str]:
    """The generation's text as the Python client, a spec-following reader of the raw bytes,
    and the status endpoint see it (after checking it ended with ``stop``)."""
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        follower = Follower(http, f"/v1/generations/{gen_id}/events")
        followed = "".join([message.text async for message in follower])
        assert follower.result is not None and follower.result.finish_reason == "stop"

        async with http.stream("GET", f"/v1/generations/{gen_id}/events") as response:
            raw = b"".join([piece async for piece in response.aiter_bytes()])
        datas = [json.loads(d) for d in sse.SSEDecoder().feed(raw)]
        from_bytes = "".join(d["text"] for d in datas if "text" in d)
        assert datas[-1].get("finish_reason") == "stop", datas[-1]

        status = (await http.get(f"/v1/generations/{gen_id}")).json()
        assert status["status"] == "completed", status
        return followed, from_bytes, status["text"]


DRAWN: list[str] = []  # every text the property ran with
EXAMPLES = 120


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=TOKENS, **WIRE)
@example(tokens=tokenize(TRICKY_TEXT), line_end="\r\n", bom=True, split_writes=True)
@example(tokens=tokenize(TRICKY_TEXT), line_end="\r", bom=False, split_writes=True)
@example(tokens=["a\u2028b"], line_end="\n", bom=False, split_writes=False)
@example(tokens=["Plain ", "ASCII."], line_end="\n", bom=True, split_writes=False)
def run_one(deployment: Deployment, fake_llm: FakeLLM, tokens: list[str], line_end: str,
            bom: bool, split_writes: bool) -> None:
    text = "".join(tokens)
    DRAWN.append(text)
    note(f"text={text!r} line_end={line_end!r} bom={bom} split_writes={split_writes}")
    prompt = fake_llm.script(unique("integrity"), tokens=tokens, delay=0, line_end=line_end,
                             bom=bom, split_writes=split_writes)

    async def check() -> None:
        async with httpx.AsyncClient(timeout=20) as http:
            gen_id = await create(http, deployment.edge.url, prompt)
        assert await read_three_ways(deployment.edge.url, gen_id) == (text, text, text)

    asyncio.run(check())


def test_every_character_arrives_exactly_through_worker_and_edge(
    deployment: Deployment, fake_llm: FakeLLM
) -> None:
    DRAWN.clear()
    run_one(deployment, fake_llm)
    assert len(DRAWN) >= EXAMPLES
    texts_with = {name: sum(any(map(is_one, text)) for text in DRAWN)
                  for name, (_, is_one) in CLASSES.items()}
    print(f"\ntext integrity: {len(DRAWN)} texts; texts with each class: {texts_with}")
    assert min(texts_with.values()) >= 5, texts_with


def test_fake_llm_cuts_its_writes_where_a_reader_must_hold_its_decision(fake_llm: FakeLLM):
    """The property's awkward cases reach the reader: with ``split_writes`` each piece arrives
    as a read of its own (an HTTP chunk), a CRLF as CR then LF, a character in two reads."""
    prompt = fake_llm.script(unique("pieces"), tokens=["é😀", "\u2028汉"], delay=0,
                             line_end="\r\n", bom=True, split_writes=True)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", fake_llm.base_url + "/chat/completions", json=body,
                      headers={"authorization": "Bearer k"}) as response:
        reads = list(response.iter_bytes())
    pairs = list(itertools.pairwise(reads))
    assert reads[0] == b"\xef"  # inside the BOM
    assert any(a.endswith(b"\r") and b.startswith(b"\n") for a, b in pairs)
    assert any(a[-1] >= 0xC0 for a in reads)  # ends on the lead byte of a character
    whole = b"".join(reads)
    assert whole.startswith(b"\xef\xbb\xbfdata: ") and "\u2028".encode() in whole  # unescaped
    chunks = [json.loads(d) for d in sse.SSEDecoder().feed(whole) if d != "[DONE]"]
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(deltas) == "é😀\u2028汉"
