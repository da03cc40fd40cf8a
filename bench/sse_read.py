"""The worker's reading of its LLM's stream, alone: CPU per chunk of ``broker.core.sse.SSEDecoder``
against httpx's ``aiter_lines`` (what the worker used before: it split lines like
``str.splitlines``, at U+2028 and friends, which SSE does not), on the same recorded stream in
one run.

    .venv/bin/python -m bench.sse_read              # ~20 s

The stream is what an OpenAI-compatible server sends for a 300-token answer (a role chunk,
one content chunk per token, the finish chunk, the usage chunk, ``[DONE]``), in the compact
JSON of ``bench.fastllm``, ASCII or multilingual text (CJK, emoji, accents; no U+2028, which
aiter_lines would break the chunks at, so both readers do the same work), read one event per
network read (a server flushing each token) or 16 per read (a worker that fell behind). Both
readers get it through a real ``httpx2.Response`` (the SDK's HTTP client: its content
decoder, its chunking) and hand on the ``data`` of each event; ``json.loads`` of each chunk,
the same for both, is timed separately for scale. Prints a markdown table: microseconds of
CPU per chunk, the best of several repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2

from bench.fastllm import chunk, sse
from broker.core.sse import aiter_sse_data

ASCII_WORDS = ["alpha", "bravo", "charlie", "delta", "echo.", "foxtrot", "golf", "hotel!"]
MULTILINGUAL_WORDS = ["汉字", "句子。", "emoji 🎉", "naïve", "Grüße", "😀", "ok.", "kilo"]


def recorded_stream(words: list[str], tokens: int) -> list[bytes]:
    """The events of one answer, each the bytes of one SSE event."""
    events = [sse(chunk({"role": "assistant", "content": ""}, None))]
    events += [sse(chunk({"content": " " + words[i % len(words)]}, None)) for i in range(tokens)]
    events.append(sse(chunk({}, "stop")))
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": tokens + 12}
    events.append(sse({**chunk({}, None), "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def reads(events: list[bytes], per_read: int) -> list[bytes]:
    return [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]


class Recorded(httpx2.AsyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def response(pieces: list[bytes]) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                           stream=Recorded(pieces))


async def read_with_aiter_lines(pieces: list[bytes]) -> list[str]:
    """The worker's reader before: httpx's line splitting, then the data lines joined."""
    out: list[str] = []
    data: list[str] = []
    async for line in response(pieces).aiter_lines():
        if not line:
            if data:
                out.append("\n".join(data))
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    return out


async def read_with_decoder(pieces: list[bytes]) -> list[str]:
    """The worker's reader now (``worker.llm``): bytes, split by the SSE rules."""
    return [data async for data in aiter_sse_data(response(pieces).aiter_bytes())]


Reader = Callable[[list[bytes]], Any]


def cpu_us_per_chunk(reader: Reader, pieces: list[bytes], streams: int, repeats: int) -> float:
    chunks = len(asyncio.run(reader(pieces)))

    async def many() -> None:
        for _ in range(streams):
            await reader(pieces)

    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        asyncio.run(many())
        best = min(best, time.process_time() - started)
    return best / (streams * chunks) * 1e6


def json_us_per_chunk(pieces: list[bytes], repeats: int) -> float:
    datas = asyncio.run(read_with_decoder(pieces))[:-1]  # not "[DONE]"
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(50):
            for data in datas:
                json.loads(data)
        best = min(best, time.process_time() - started)
    return best / (50 * len(datas)) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_read",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--streams", type=int, default=100, help="answers read per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many")
    args = parser.parse_args(argv)
    print("| text | events per read | aiter_lines µs/chunk | SSEDecoder µs/chunk | ratio "
          "| json.loads µs/chunk |")
    print("|---|---|---|---|---|---|")
    for label, words in (("ASCII", ASCII_WORDS), ("multilingual", MULTILINGUAL_WORDS)):
        events = recorded_stream(words, args.tokens)
        for per_read in (1, 16):
            pieces = reads(events, per_read)
            decoded = asyncio.run(read_with_decoder(pieces))
            # The same work: no U+2028 and friends here, where aiter_lines would break lines.
            assert asyncio.run(read_with_aiter_lines(pieces)) == decoded
            old = cpu_us_per_chunk(read_with_aiter_lines, pieces, args.streams, args.repeats)
            new = cpu_us_per_chunk(read_with_decoder, pieces, args.streams, args.repeats)
            loads = json_us_per_chunk(pieces, args.repeats)
            print(f"| {label} | {per_read} | {old:.2f} | {new:.2f} | {new / old:.2f} "
                  f"| {loads:.2f} |", flush=True)


if __name__ == "__main__":
    main()
