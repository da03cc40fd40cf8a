"""A fast fake OpenAI-compatible LLM for the worker benchmarks (B5, direct).

``POST /v1/chat/completions`` with ``"stream": true`` answers a chunked SSE stream of
``chat.completion.chunk`` objects, as the ``openai`` SDK expects: a first chunk with the
role, then one chunk per token at ``--rate`` tokens/s per stream, then a chunk with
``finish_reason: "stop"``, the usage chunk (``stream_options.include_usage``) and
``data: [DONE]``. The connection stays open for the client's next request (keep-alive).

Cheap enough for hundreds of concurrent streams on a shared 2-core machine: a raw asyncio
protocol (uvloop), pre-encoded chunks, and ONE ticker for every stream. A period
(1/rate) is split into ``--slots`` ticks; a new stream joins the slot with the fewest
streams, and each tick writes the next token to every stream of its slot: no task or timer
per stream, and the writes of many streams are spread over the period instead of all
landing at once.

The answer: sentences of ``--sentence-tokens`` tokens (a range, cycled by a per-request
seed so sentence ends of concurrent streams do not line up), ``--tokens`` tokens in all.
The seed is the request's ``seed`` field if it has one (same seed, same answer but for the
stamps), else derived from the request's key.
A sentence's words are plain lowercase tokens (``Word``, `` word``); its LAST token is
`` t=<time.time_ns() when written>.\\n``: the dot and line feed let the worker's
sentence buffer end the message at once (after a space it would wait for the next token: a
combining mark could still join the space), and the stamp lets a client compute
token→receive latency. (`` t=<19 digits>`` is no abbreviation or list marker to
``broker.core.sentences``.)

With ``--script FILE`` (B6) the answers are scripted instead: the file holds
``{"answers": [[token, ...], ...]}`` and a request gets answer ``seed % len(answers)``, its
first token at once (no prefill time) and then one token every 1/rate s on the stream's own
schedule (``loop.call_at``: a few streams, exact pacing), each token's send time
(``time.time_ns()``) recorded as ``token_ns``.

Each request is keyed by the content of its last user message; per key the server keeps
what it sent (token count and SHA-256 of the text, stamps included) so a benchmark can
check that a generation's published text is exactly what the LLM sent.
``GET /stats`` returns those records and the server's counters as JSON
(``GET /stats?reset=1`` also clears them).

Prints ``listening <port>`` on stdout once it accepts connections.

    python -m bench.fastllm --port 0 --rate 50 --tokens 300 --sentence-tokens 6-10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    uvloop = None  # type: ignore[assignment]

MODEL = "fastllm"
CHUNK_ID = "chatcmpl-fastllm"
STAMP_DIGITS = 19  # len(str(time.time_ns())) until the year 2286
MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
    "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "basil",
    "cedar", "dune", "ember", "fern", "grove", "heath", "iris", "jade", "kelp", "linen",
    "maple", "nectar", "olive", "pine", "quartz", "river", "sage", "thyme", "umber", "violet",
    "willow", "yarrow", "zinc",
]


def frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (``Transfer-Encoding: chunked``)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


CREATED = int(time.time())


def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": CHUNK_ID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def content_chunk(text: str) -> bytes:
    return frame(sse(chunk({"content": text}, None)))


# Pre-encoded: every word token, capitalised (first of a sentence) or with its leading space.
WORD_CHUNKS = [content_chunk(" " + w) for w in WORDS]
CAP_CHUNKS = [content_chunk(w.capitalize()) for w in WORDS]
# The stamp token's chunk split around the digits; its length is fixed, so is the frame size.
_STAMP = content_chunk(" t=" + "0" * STAMP_DIGITS + ".\n")
_AT = _STAMP.index(b" t=") + 3
STAMP_HEAD, STAMP_TAIL = _STAMP[:_AT], _STAMP[_AT + STAMP_DIGITS :]
ROLE_CHUNK = frame(sse(chunk({"role": "assistant", "content": ""}, None)))
FINISH_CHUNK = frame(sse(chunk({}, "stop")))
DONE = frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"  # and the end of the chunked body
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)

STAMP = -1  # plan(): the sentence's last token, carrying the send time


def plan(seed: int, tokens: int, lo: int, hi: int) -> Iterator[int]:
    """The answer as token codes: a word index (``+ len(WORDS)`` when capitalised) or STAMP.
    Sentence k has ``lo + (seed + 3k) % (hi - lo + 1)`` tokens; the last token is a stamp."""
    n_words = len(WORDS)
    span = hi - lo + 1
    k = 0
    left = lo + seed % span
    first = True
    for i in range(tokens):
        if left == 1 or i == tokens - 1:
            yield STAMP
            k += 1
            left = lo + (seed + 3 * k) % span
            first = True
        else:
            w = (seed + 7 * i) % n_words
            yield w + n_words if first else w
            first = False
            left -= 1


def answer_text(seed: int, tokens: int, lo: int, hi: int, stamps: list[int]) -> str:
    """The text a stream with this seed sent, given its stamps in order."""
    parts: list[str] = []
    n_words = len(WORDS)
    stamp_iter = iter(stamps)
    for code in plan(seed, tokens, lo, hi):
        if code == STAMP:
            parts.append(f" t={next(stamp_iter)}.\n")
        elif code >= n_words:
            parts.append(WORDS[code - n_words].capitalize())
        else:
            parts.append(" " + WORDS[code])
    return "".join(parts)


class Stream:
    """One streaming answer in progress."""

    __slots__ = ("conn", "done", "key", "plan", "seed", "sent", "stamps", "tail")

    def __init__(self, conn: Conn, key: str, seed: int, tail: bytes, server: Server) -> None:
        self.conn = conn
        self.key = key
        self.seed = seed
        self.plan = plan(seed, server.tokens, server.lo, server.hi)
        self.tail = tail
        self.stamps: list[int] = []
        self.sent = 0
        self.done = False


class ScriptedStream:
    """One scripted answer in progress (``--script``)."""

    __slots__ = ("answer", "chunks", "conn", "done", "handle", "key", "sent", "t0", "tail",
                 "times")

    def __init__(self, conn: Conn, key: str, answer: int, chunks: list[bytes],
                 tail: bytes) -> None:
        self.conn = conn
        self.key = key
        self.answer = answer
        self.chunks = chunks
        self.tail = tail
        self.sent = 0
        self.done = False
        self.times: list[int] = []  # time.time_ns() as each token was written
        self.t0 = 0.0
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = None


def load_script(path: Path) -> list[list[str]]:
    answers = json.loads(path.read_text())["answers"]
    if not answers or not all(isinstance(a, list) and a for a in answers):
        raise SystemExit(f"{path}: expected {{\"answers\": [[token, ...], ...]}}")
    return answers


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rate: float = args.rate
        self.script: list[list[str]] = load_script(args.script) if args.script else []
        self.script_chunks = [[content_chunk(token) for token in a] for a in self.script]
        self.tokens: int = args.tokens
        self.lo, self.hi = args.lo, args.hi
        self.n_slots: int = args.slots
        self.slots: list[list[Stream]] = [[] for _ in range(self.n_slots)]
        self.active = 0
        self.wake = asyncio.Event()
        self.records: dict[str, dict[str, Any]] = {}
        self.counters = dict.fromkeys(
            ("requests", "streams_started", "streams_completed", "streams_aborted",
             "tokens_sent", "ticks", "late_ticks"), 0)
        self.max_tick_lag_ms = 0.0

    # -- streams ---------------------------------------------------------------------------

    def start_stream(self, conn: Conn, body: dict[str, Any]) -> Stream | ScriptedStream:
        key = _last_user_content(body)
        seed = body.get("seed")
        if not isinstance(seed, int) or seed < 0:
            seed = zlib.crc32(key.encode())
        record = self.records.setdefault(key, {"requests": 0})
        record["requests"] += 1
        record["arrived_ns"] = time.time_ns()  # the request, read whole
        tokens = len(self.script[seed % len(self.script)]) if self.script else self.tokens
        tail = FINISH_CHUNK
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(str(m.get("content", "")).split())
                         for m in body.get("messages") or [] if isinstance(m, dict))
            usage = {"prompt_tokens": prompt, "completion_tokens": tokens,
                     "total_tokens": prompt + tokens}
            tail += frame(sse({**chunk({}, None), "choices": [], "usage": usage}))
        self.counters["streams_started"] += 1
        if self.script:  # its own schedule: not one of the ticker's ``active`` streams
            index = seed % len(self.script)
            scripted = ScriptedStream(conn, key, index, self.script_chunks[index], tail + DONE)
            scripted.t0 = asyncio.get_running_loop().time()
            # The first token at once, after the caller has made this its connection's stream.
            scripted.handle = asyncio.get_running_loop().call_soon(self.step_scripted, scripted)
            return scripted
        stream = Stream(conn, key, seed, tail + DONE, self)
        self.active += 1
        min(self.slots, key=len).append(stream)
        self.wake.set()
        return stream

    def step_scripted(self, s: ScriptedStream) -> None:
        """Write the next token of ``s`` and schedule the one after it (on an absolute
        schedule: a late token is caught up at once)."""
        if s.done:
            return
        s.times.append(time.time_ns())
        out = s.chunks[s.sent]
        s.sent += 1
        if s.sent == len(s.chunks):
            out += s.tail
            s.done = True
            self.counters["streams_completed"] += 1
            self.counters["tokens_sent"] += s.sent
            text = "".join(self.script[s.answer])
            record = self.records[s.key]
            record.update(
                completed=record.get("completed", 0) + 1, tokens=s.sent, chars=len(text),
                sha256=hashlib.sha256(text.encode()).hexdigest(), answer=s.answer,
                token_ns=s.times,
            )
        s.conn.write(out)
        if s.done:
            s.conn.stream_over()
        else:
            s.handle = asyncio.get_running_loop().call_at(
                s.t0 + s.sent / self.rate, self.step_scripted, s)

    def step(self, s: Stream) -> None:
        """Write the next token of ``s`` (and, after its last, the end of the stream)."""
        code = next(s.plan)
        if code == STAMP:
            ns = time.time_ns()
            s.stamps.append(ns)
            out = STAMP_HEAD + b"%d" % ns + STAMP_TAIL
        elif code >= len(WORD_CHUNKS):
            out = CAP_CHUNKS[code - len(WORD_CHUNKS)]
        else:
            out = WORD_CHUNKS[code]
        s.sent += 1
        if s.sent == self.tokens:
            out += s.tail
            s.done = True
            self._finished(s)
        s.conn.write(out)
        if s.done:
            s.conn.stream_over()

    def _finished(self, s: Stream) -> None:
        self.active -= 1
        self.counters["streams_completed"] += 1
        self.counters["tokens_sent"] += s.sent
        text = answer_text(s.seed, self.tokens, self.lo, self.hi, s.stamps)
        record = self.records[s.key]
        record.update(
            completed=record.get("completed", 0) + 1, tokens=s.sent, chars=len(text),
            sha256=hashlib.sha256(text.encode()).hexdigest(),
        )

    def abort(self, s: Stream | ScriptedStream) -> None:
        """The client went away mid-stream (a cancel, a timeout): stop writing to it."""
        if s.done:
            return
        s.done = True
        if isinstance(s, ScriptedStream):
            if s.handle is not None:
                s.handle.cancel()
        else:
            self.active -= 1
        self.counters["streams_aborted"] += 1
        self.counters["tokens_sent"] += s.sent
        record = self.records[s.key]
        record["aborted"] = record.get("aborted", 0) + 1

    async def tick_forever(self) -> None:
        """One tick per 1/(rate·slots) s on an absolute schedule: a late tick is caught up
        at once (so the rate holds on average) and counted."""
        loop = asyncio.get_running_loop()
        tick = 1.0 / self.rate / self.n_slots
        while True:
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
            t0 = loop.time()
            k = 0
            while self.active:
                k += 1
                delay = t0 + k * tick - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag_ms = -delay * 1000
                    self.max_tick_lag_ms = max(self.max_tick_lag_ms, lag_ms)
                    if lag_ms > tick * 1000:
                        self.counters["late_ticks"] += 1
                self.counters["ticks"] += 1
                slot = self.slots[k % self.n_slots]
                any_done = False
                for s in slot:
                    if not s.done:
                        self.step(s)
                    any_done = any_done or s.done
                if any_done:
                    slot[:] = [s for s in slot if not s.done]

    def stats(self, reset: bool) -> dict[str, Any]:
        times = os.times()
        out = {
            **self.counters, "active": self.active,
            "max_tick_lag_ms": round(self.max_tick_lag_ms, 3),
            "cpu_s": round(times.user + times.system, 3),
            "config": {"rate": self.rate, "tokens": self.tokens, "slots": self.n_slots,
                       "sentence_tokens": [self.lo, self.hi], "scripted": len(self.script)},
            "records": self.records,
        }
        if reset:
            self.records = {}
            for name in self.counters:
                self.counters[name] = 0
            self.max_tick_lag_ms = 0.0
        return out


def _last_user_content(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: requests one after the other (keep-alive, no pipelining)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.stream: Stream | ScriptedStream | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.server.abort(self.stream)
            self.stream = None
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def stream_over(self) -> None:
        self.stream = None
        if self.close_after and self.transport is not None:
            self.transport.close()
        elif self.buf:  # (not from inside the ticker's loop over a slot)
            asyncio.get_running_loop().call_soon(self._serve)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.stream is None:
            self._serve()

    def _serve(self) -> None:
        while self.stream is None and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._reply(431, {"error": {"message": "headers too large"}}, close=True)
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            request_line, _, header_text = head.partition("\r\n")
            headers = {}
            for line in header_text.split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding"):
                self._reply(411, {"error": {"message": "send a content-length"}}, close=True)
                return
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": {"message": "body too large"}}, close=True)
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.close_after = headers.get("connection", "").lower() == "close"
            self._dispatch(request_line, body)

    def _dispatch(self, request_line: str, body: bytes) -> None:
        parts = request_line.split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path, _, query = target.partition("?")
        server = self.server
        if method == "POST" and path == "/v1/chat/completions":
            server.counters["requests"] += 1
            try:
                request = json.loads(body)
            except ValueError:
                self._reply(400, {"error": {"message": "invalid JSON"}})
                return
            if not isinstance(request, dict) or not request.get("stream"):
                self._reply(400, {"error": {"message": "this fake LLM only streams"}})
                return
            self.write(STREAM_HEAD + ROLE_CHUNK)
            self.stream = server.start_stream(self, request)
        elif method == "GET" and path == "/stats":
            self._reply(200, server.stats(reset="reset=1" in query))
        elif method == "GET" and path == "/v1/models":
            self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._reply(404, {"error": {"message": f"no route {method} {path}"}})

    def _reply(self, status: int, obj: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(obj).encode()
        connection = b"close" if close or self.close_after else b"keep-alive"
        self.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: %s\r\n\r\n%s" % (status, len(body), connection, body)
        )
        if (close or self.close_after) and self.transport is not None:
            self.transport.close()


async def serve(args: argparse.Namespace) -> None:
    server = Server(args)
    loop = asyncio.get_running_loop()
    # A deep backlog: hundreds of generations connect at the same moment.
    listener = await loop.create_server(lambda: Conn(server), args.host, args.port, backlog=4096)
    port = listener.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with listener:
        await server.tick_forever()


def parse_range(raw: str) -> tuple[int, int]:
    lo, _, hi = raw.partition("-")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected LO-HI with 1 <= LO <= HI, got {raw!r}")
    return low, high


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fastllm", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per stream")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--sentence-tokens", type=parse_range, default=(6, 10),
                        help="tokens per sentence, LO-HI")
    parser.add_argument("--script", type=Path, default=None,
                        help="JSON {\"answers\": [[token, ...], ...]}: scripted answers (B6)")
    parser.add_argument("--slots", type=int, default=4,
                        help="ticks per token period, streams spread over them")
    args = parser.parse_args(argv)
    args.lo, args.hi = args.sentence_tokens
    runner = uvloop.run if uvloop is not None else asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args))


if __name__ == "__main__":
    main()
