"""The B5 monitor: watches every generation's live channel and times each published message.

One raw Redis connection (an ``asyncio.Protocol``, no client library, so timestamps are
taken when the bytes are read) sends ``PSUBSCRIBE {gen:*}:live`` and decodes each payload
with ``broker.core.protocol.decode_payload``. A message whose text ends with the fake LLM's
`` t=<ns>.\\n`` stamp (the sentence's last token, see ``bench.fastllm``) yields one
token→publish latency: the receive time minus that stamp. Messages without a stamp (cut by
the worker's flush interval or size limit) are counted, not timed.

Per generation it checks the live order: seqs 1, 2, 3, ... then one terminal event. A gap or
a repeat is an error (the orchestrator checks the logs in Redis as well).

Protocol with the orchestrator (lines): ``ready`` once subscribed; ``done`` once
``--generations`` terminal events arrived (or ``dump`` was read on stdin), with the results
written to ``--out`` (JSON; latencies in ``<out>.lat``, per-message receive times and token
counts in ``<out>.msgs``); then it waits for stdin to close, so its CPU can be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from typing import Any

from broker.core import protocol

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    uvloop = None  # type: ignore[assignment]

PATTERN = protocol.live_channel("*")
MAX_ERRORS_KEPT = 20


def stamp_of(text: str) -> int | None:
    """The ``t=`` stamp a message ends with (`` t=<19 digits>.\\n``), else None."""
    if not text.endswith(".\n"):
        return None
    at = text.rfind("t=")
    digits = text[at + 2 : -2] if at >= 0 else ""
    return int(digits) if digits.isdigit() else None


class Monitor:
    def __init__(self, generations: int) -> None:
        self.generations = generations
        self.latencies_ms = array("d")
        self.recv_ns = array("q")  # per message: when it was read
        self.tokens = array("i")  # per message: tokens (words) it carries
        self.next_seq: dict[str, int] = {}
        self.messages = 0
        self.unstamped = 0
        self.terminals: dict[str, str] = {}  # gen -> "end:<finish_reason>" / "error:<code>"
        self.errors: list[str] = []
        self.error_count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.subscribed = asyncio.Event()
        self.finished = asyncio.Event()

    def fail(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    def on_publish(self, channel: bytes, payload: bytes, now: int) -> None:
        gen = protocol.gen_id_of_channel(channel.decode())
        try:
            event = protocol.decode_payload(payload)
        except protocol.ProtocolError as e:
            self.fail(f"{gen}: {e}")
            return
        expected = self.next_seq.get(gen, 1)
        if event.seq != expected or gen in self.terminals:
            self.fail(f"{gen}: live seq {event.seq} ({event.kind}), expected {expected}")
            return
        self.next_seq[gen] = expected + 1
        if self.first_ns == 0:
            self.first_ns = now
        self.last_ns = now
        data = json.loads(event.data)
        if event.kind == "message":
            text = data["text"]
            self.messages += 1
            self.recv_ns.append(now)
            self.tokens.append(len(text.split()))
            stamp = stamp_of(text)
            if stamp is None:
                self.unstamped += 1
            else:
                self.latencies_ms.append((now - stamp) / 1e6)
            return
        what = data.get("finish_reason") if event.kind == "end" else data.get("code")
        self.terminals[gen] = f"{event.kind}:{what}"
        if len(self.terminals) >= self.generations:
            self.finished.set()

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "unstamped": self.unstamped,
            "timed": len(self.latencies_ms),
            "terminals": self.terminals,
            "generations_seen": len(self.next_seq),
            "error_count": self.error_count,
            "errors": self.errors,
            "first_recv_ns": self.first_ns,
            "last_recv_ns": self.last_ns,
        }


class RespSubscriber(asyncio.Protocol):
    """Just enough RESP2 for push messages: arrays of bulk strings and integers."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"CLIENT SETNAME bench-livemon\r\n")
        pattern = PATTERN.encode()
        self.transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pattern), pattern))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf
        buf += data
        pos = 0
        while True:
            item, end = _parse(buf, pos)
            if end < 0:
                break
            pos = end
            if isinstance(item, list) and len(item) == 4 and item[0] == b"pmessage":
                self.monitor.on_publish(item[2], item[3], now)
            elif isinstance(item, list) and item and item[0] == b"psubscribe":
                self.monitor.subscribed.set()
            elif isinstance(item, bytes) and item.startswith(b"-"):
                self.monitor.fail(f"redis said {item!r}")
        del buf[:pos]


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP value at ``pos``: (value, end), or (None, -1) if incomplete."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None, -1
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : eol])
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, eol + 2
        end = eol + 2 + n
        if len(buf) < end + 2:
            return None, -1
        return bytes(buf[eol + 2 : end]), end + 2
    if kind == b"*":
        items = []
        at = eol + 2
        for _ in range(int(line)):
            item, at = _parse(buf, at)
            if at < 0:
                return None, -1
            items.append(item)
        return items, at
    if kind == b":":
        return int(line), eol + 2
    if kind == b"-":
        return b"-" + line, eol + 2
    return line, eol + 2  # +OK


def write_results(monitor: Monitor, out: str) -> None:
    with open(out + ".lat", "wb") as f:
        monitor.latencies_ms.tofile(f)
    with open(out + ".msgs", "wb") as f:
        monitor.recv_ns.tofile(f)
        monitor.tokens.tofile(f)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(monitor.summary(), f)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    monitor = Monitor(args.generations)
    _, sub = await loop.create_connection(
        lambda: RespSubscriber(monitor), args.redis_host, args.redis_port
    )
    async with asyncio.timeout(10):
        await monitor.subscribed.wait()
    print("ready", flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def dump_requested() -> None:
        while line := await reader.readline():
            if line.strip() == b"dump":
                return
        await asyncio.Future()  # stdin closed early: wait for the other conditions

    waits = [asyncio.ensure_future(monitor.finished.wait()),
             asyncio.ensure_future(dump_requested()), sub.lost]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits[:2]:
        waiting.cancel()  # (the stdin reader is read again below)
    await asyncio.gather(*waits[:2], return_exceptions=True)
    if sub.lost.done():
        monitor.fail(f"the subscription connection closed: {sub.lost.result()!r}")
    write_results(monitor, args.out)
    print("done", flush=True)
    # Stay alive until the orchestrator has read our CPU time (it closes our stdin).
    while await reader.readline():
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--generations", type=int, required=True,
                        help="terminal events to wait for")
    parser.add_argument("--out", required=True, help="results file (JSON)")
    args = parser.parse_args()
    runner = uvloop.run if uvloop is not None else asyncio.run
    runner(run(args))


if __name__ == "__main__":
    main()
