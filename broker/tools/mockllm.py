"""An OpenAI-compatible mock LLM: streams a scripted answer token by token over HTTP.

``broker dev`` and the compose stack use it when no API key is set; the tests script it to
fail in every way an upstream can (HTTP errors, a stream cut midway, silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.core.sentences import SentenceBuffer  # the worker's rule, not a second copy of it


@dataclass
class Reply:
    """What the mock answers to one request."""

    tokens: list[str] = field(default_factory=list)  # the answer, one content delta each
    # Or: each chunk's whole delta, in order (reasoning, tool-call fragments, a refusal, text;
    # see ``text_deltas``, ``tool_call_deltas``); ``tokens`` is then not used. Everything said
    # of tokens below (delays, break_after, ...) counts these instead.
    deltas: list[dict[str, Any]] | None = None
    delay: float = 0.02  # seconds between tokens
    delays: list[float] | None = None  # or: seconds before each token, one per token
    finish_reason: str | None = "stop"  # None: no chunk with a finish_reason (``[DONE]`` ends it)
    status: int = 200  # non-200: answer this HTTP error instead of a stream
    break_after: int | None = None  # cut the connection after this many tokens
    stall_after: int | None = None  # go silent (but keep the connection) after this many
    # End the body cleanly after this many tokens, with no finish_reason and no ``[DONE]``: a
    # stream cut where a proxy ended the response properly.
    end_after: int | None = None
    hold_at: int | None = None  # before this token, wait until ``release`` is set
    release: threading.Event = field(default_factory=threading.Event)
    # How the SSE bytes go out: what ends each line (``"\n"``, ``"\r\n"`` or ``"\r"``: all
    # three are SSE line ends), a UTF-8 byte order mark first, and each event cut into
    # separate writes at the awkward places (see ``awkward_pieces``), so a reader meets line
    # ends and characters split across network reads.
    line_end: str = "\n"
    bom: bool = False
    split_writes: bool = False
    # Write each chunk's JSON with ``\\u`` escapes for every non-ASCII character (what Python
    # servers using ``json.dumps``' default send): an astral character is then a surrogate
    # pair, which a tool call's argument fragments may cut in two.
    ascii_json: bool = False

    def chunk_deltas(self) -> list[dict[str, Any]]:
        return self.deltas if self.deltas is not None else text_deltas_of(self.tokens)


@dataclass
class Record:
    """One request the mock received, and how its stream ended."""

    body: dict[str, Any]
    sent_tokens: int = 0
    sent_at: list[float] = field(default_factory=list)  # time.monotonic() as each token went
    completed: bool = False
    closed_by_client: threading.Event = field(default_factory=threading.Event)


Script = Callable[[dict[str, Any]], Reply]

_TOKEN_RE = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """Split like an LLM would, roughly: a word with its leading whitespace per token."""
    return _TOKEN_RE.findall(text)


def text_deltas(text: str, field: str = "content") -> list[dict[str, Any]]:
    """``text`` as deltas of one token each, in ``field``: ``content`` (the answer),
    ``reasoning_content`` or ``reasoning`` (the two names servers give reasoning), ``refusal``."""
    return text_deltas_of(tokenize(text), field)


def text_deltas_of(tokens: list[str], field: str = "content") -> list[dict[str, Any]]:
    return [{field: token} for token in tokens]


@dataclass(frozen=True)
class ScriptedCall:
    """A tool call as the mock streams it: a first fragment with its ``id`` and name (and
    empty arguments, as OpenAI sends it), then one fragment per piece of ``arguments``."""

    index: int
    id: str
    name: str
    pieces: list[str]

    def fragments(self) -> list[dict[str, Any]]:
        head = {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": ""}}
        return [head, *({"index": self.index, "function": {"arguments": piece}}
                        for piece in self.pieces)]


def tool_call_deltas(calls: list[ScriptedCall], interleave: bool = True) -> list[dict[str, Any]]:
    """The calls' fragments as deltas, one fragment each: one call after the other, or
    interleaved (each call's next fragment in turn, as servers running calls in parallel may
    send them)."""
    streams = [call.fragments() for call in calls]
    if interleave:
        order = [f for group in itertools.zip_longest(*streams) for f in group if f is not None]
    else:
        order = [f for stream in streams for f in stream]
    return [{"tool_calls": [fragment]} for fragment in order]


_ANSWER = (
    "Great question! Here is how it works, step by step.\n\n"
    "When you ask something, the edge stores a job in Redis and returns an id right away. "
    "A worker picks the job up, calls the model, and groups the tokens into whole sentences. "
    "Each sentence is appended to a log with an increasing id, e.g. 1, 2, 3, and published "
    "to every edge that has viewers.\n\n"
    "Your browser's EventSource remembers the last id it saw. If the connection drops, it "
    "reconnects with that id, and the edge replays exactly what you missed... nothing more, "
    "nothing less. That works on any edge, because the log in Redis is the truth.\n\n"
    "Numbers like 3.14 or URLs such as https://example.com/docs.html stay intact. "
    "So do emoji 🎉 and other scripts: 句子也会被完整地传送。Enjoy!"
)


# The default answer's pace: one word a token, at a steady rate like a hosted model's. The
# worker shows the first word at once and reads the rest out in whole sentences (no sentence
# of the answer takes longer than its wait at this rate).
TOKENS_PER_SECOND = 40


_REASONING = (
    "The user asks how the broker works. I should follow one question through it: the edge, "
    "Redis, a worker, the viewers. Mention resuming, since that is what people worry about. "
    "Keep it friendly and short."
)
_WEATHER_TEXT = "Let me look up the weather for you. "
# Its arguments come in pieces, cut inside a string and after an escape, as LLMs stream them.
WEATHER_CALL = ScriptedCall(
    0, "call_weather_1", "get_weather",
    ['{"city": "Par', 'is", "unit": "cel', 'sius", "when": "\\', '"now\\""}'],
)


def default_script(body: dict[str, Any]) -> Reply:
    """A realistic multi-sentence answer that quotes the question. With "think" in the
    question, reasoning comes first; with "weather", a short text and one tool call
    (``get_weather``) instead of the answer, ending with ``finish_reason: "tool_calls"``.
    After a tool's result (the last message's role is ``tool``), a short answer quoting it."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        # A tool's result came back (an agent loop's second call): answer from it, so a loop
        # that calls tools until the model stops asking for them ends.
        answer = f"The tool answered {str(last.get('content', ''))[:200]}. That settles it."
        return Reply(tokenize(answer), delay=1 / TOKENS_PER_SECOND)
    question = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            question = str(message.get("content", ""))[:200]
            break
    intro = f'You asked: "{question.strip()}"\n\n' if question.strip() else ""
    pace = 1 / TOKENS_PER_SECOND
    lowered = question.lower()
    if "think" not in lowered and "weather" not in lowered:
        return Reply(tokenize(intro + _ANSWER), delay=pace)
    deltas = text_deltas(_REASONING, "reasoning_content") if "think" in lowered else []
    if "weather" in lowered:
        deltas += text_deltas(_WEATHER_TEXT) + tool_call_deltas([WEATHER_CALL])
        return Reply(deltas=deltas, delay=pace, finish_reason="tool_calls")
    return Reply(deltas=deltas + text_deltas(intro + _ANSWER), delay=pace)


def sentences(text: str) -> list[str]:
    """``text`` split as the worker's sentence buffer splits it when it all arrives at once."""
    buffer = SentenceBuffer()
    return [s for s in (*buffer.feed(text, now=0.0), buffer.flush()) if s]


def streamed_messages(text: str, first_text: str) -> list[str]:
    """The messages the worker sends for ``text`` streamed at a steady pace whose first text
    was ``first_text``: that (the first words, out at once), the rest of the first sentence,
    then one message per sentence. (``first_text`` may be the whole first sentence.)"""
    first, *rest = sentences(text)
    if not first.startswith(first_text) or not first_text:
        raise ValueError(f"{first_text!r} does not begin the first sentence {first!r}")
    remainder = first[len(first_text) :]
    return [first_text, *([remainder] if remainder else []), *rest]


def create_mock_llm_app(script: Script = default_script) -> Starlette:
    records: list[Record] = []

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "invalid JSON")
        if request.headers.get("authorization", "") in ("", "Bearer bad-key"):
            return _error(401, "Incorrect API key provided")
        reply = script(body)
        record = Record(body)
        records.append(record)
        if reply.status != 200:
            return _error(reply.status, f"mock upstream failure {reply.status}")
        if not body.get("stream"):
            return JSONResponse(_completion(body, reply))
        return StreamingResponse(
            _stream(body, reply, record), media_type="text/event-stream"
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "mock", "object": "model"}]})

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ])
    app.state.records = records
    return app


async def _stream(body: dict[str, Any], reply: Reply, record: Record) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(_events(body, reply, record)) as events:
        async for event in events:
            if reply.split_writes:
                for piece in awkward_pieces(event):
                    yield piece
            else:
                yield event


def awkward_pieces(data: bytes) -> list[bytes]:
    """``data`` cut after every CR (a CRLF arrives as CR, then LF) and after the first byte of
    every multi-byte UTF-8 character (a character arrives in two reads). Each piece is a write
    of its own, so an HTTP chunk of its own, which the client reads as such."""
    cuts = [i + 1 for i, byte in enumerate(data) if byte == 0x0D or byte >= 0xC0]
    bounds = [0, *(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


async def _events(
    body: dict[str, Any], reply: Reply, record: Record
) -> AsyncGenerator[bytes, None]:
    """The stream's events, each as the bytes of one SSE event ending in a blank line."""
    cid = "chatcmpl-" + uuid.uuid4().hex[:12]
    model = body.get("model", "mock")
    end = reply.line_end.encode()
    try:
        if reply.bom:
            yield b"\xef\xbb\xbf"
        for i, delta in enumerate(reply.chunk_deltas()):
            if reply.break_after is not None and i >= reply.break_after:
                raise ConnectionAbortedError("mock: cutting the stream")
            if reply.stall_after is not None and i >= reply.stall_after:
                await asyncio.sleep(3600)
            if reply.end_after is not None and i >= reply.end_after:
                record.completed = True
                return
            # The gate is a test's threading.Event: wait for it in short slices, so a stream
            # closed meanwhile does not keep a worker thread blocked forever.
            while i == reply.hold_at and not await asyncio.to_thread(reply.release.wait, 0.1):
                pass
            delay = reply.delay if reply.delays is None else reply.delays[i]
            if delay:
                await asyncio.sleep(delay)
            if not i:
                delta = {"role": "assistant", **delta}
            record.sent_at.append(time.monotonic())
            yield _sse(_chunk(cid, model, delta, None), end, reply.ascii_json)
            record.sent_tokens = i + 1
        if reply.finish_reason is not None:
            yield _sse(_chunk(cid, model, {}, reply.finish_reason), end, reply.ascii_json)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = _usage(body, reply)
            yield _sse({**_chunk(cid, model, {}, None), "choices": [], "usage": usage}, end)
        yield b"data: [DONE]" + end + end
        record.completed = True
    finally:
        if not record.completed:
            record.closed_by_client.set()


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(obj: dict[str, Any], end: bytes = b"\n", ascii_json: bool = False) -> bytes:
    # By default ensure_ascii=False, as servers that write UTF-8 JSON do: U+2028, U+0085,
    # emoji... go out as raw UTF-8, not as \u escapes (only the JSON-mandatory controls are
    # escaped). ``ascii_json``: every non-ASCII character escaped (a lone surrogate a fragment
    # holds too, which UTF-8 could not carry).
    return b"data: " + json.dumps(obj, ensure_ascii=ascii_json).encode() + end + end


def _usage(body: dict[str, Any], reply: Reply) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion = len(reply.chunk_deltas())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion",
        "created": int(time.time()), "model": body.get("model", "mock"),
        "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                     "message": {"role": "assistant", "content": "".join(
                         str(d.get("content", "")) for d in reply.chunk_deltas())}}],
        "usage": _usage(body, reply),
    }


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}},
                        status_code=status)
