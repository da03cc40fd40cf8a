"""B7's traffic shape and its publisher: G answers at once, each watched by 1-2 viewers who
connect, watch that one answer and leave, the next answer of the slot starting as one ends.

``Shape`` is the schedule every process of a B7 cell derives from the same numbers and the
same start instant (``time.time_ns()``), so nothing is said per answer between processes:
answer ``k`` (``0 <= k < G * rounds``) belongs to slot ``k % G`` and round ``k // G``; its
viewers connect at ``connect_at(k)``, its message ``n`` (1..M) is published at
``publish_at(k, n)`` and its ``end`` at ``publish_at(k, M + 1)``. The slots are staggered
evenly over one period, so the load (publishes, connects, disconnects) is smooth.

The publisher (``python -m bench.churn``) publishes every answer on that schedule:

- broker (``--redis-url``): the G x rounds generations are created and claimed before
  ``ready`` (``Store.create`` + ``Store.claim``, as ``bench.publisher`` does; creating is the
  worker's and the create path's cost, not the edge's), then every message due is published
  through the worker's ``PUBLISH_SCRIPT``, all those due at one tick in one pipeline (one
  ``EVALSHA`` each), so one Python process keeps up with thousands of messages a second;
- Nchan (``--nchan-url``): the same texts POSTed to Nchan's publisher location on a few
  keep-alive connections (raw HTTP/1.1, requests pipelined), ``end`` with
  ``X-EventSource-Event: end``.

Protocol: ``ready`` once the ids are in ``--ids-file`` (one per answer, in answer order), then
``go <start ns>`` on stdin, then ``published <first ns> <last ns> <max lag ms>``.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.publisher import OWNER, gather_bounded, message_text, prepare, write_ids
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect

TICK_S = 0.005  # the publisher's schedule resolution
NCHAN_CONNECTIONS = 8


@dataclass(frozen=True)
class Shape:
    generations: int  # answers streaming at once (slots)
    rounds: int  # answers per slot, one after the other
    messages: int  # messages per answer (then ``end``)
    rate: float  # messages per second per answer
    lead: float  # seconds from the viewers' connect to the answer's first message
    max_viewers: int = 2  # answer k has 1 + k % max_viewers viewers

    @property
    def answers(self) -> int:
        return self.generations * self.rounds

    @property
    def period(self) -> float:
        """One answer of a slot, connect to ``end``; the slot's next answer starts then."""
        return self.lead + self.messages / self.rate

    def connect_at(self, k: int) -> float:
        """Seconds after the start when answer ``k``'s viewers connect."""
        slot, round_ = k % self.generations, k // self.generations
        return (round_ + slot / self.generations) * self.period

    def publish_at(self, k: int, n: int) -> float:
        """Seconds after the start when event ``n`` (1..messages, messages + 1 = ``end``) of
        answer ``k`` is published."""
        return self.connect_at(k) + self.lead + (n - 1) / self.rate

    def viewers_of(self, k: int) -> int:
        return 1 + k % self.max_viewers

    @property
    def viewers(self) -> int:
        """Viewer connections over the whole run."""
        return sum(self.viewers_of(k) for k in range(self.answers))

    @property
    def deliveries(self) -> int:
        """Message events every viewer must receive (``end`` not counted)."""
        return self.viewers * self.messages

    @property
    def duration(self) -> float:
        """From the start to the last answer's ``end``."""
        return self.publish_at(self.answers - 1, self.messages + 1)

    def viewer_plan(self) -> Iterator[tuple[float, int]]:
        """(connect offset s, answer) of every viewer, in connect order; viewer i is the
        i-th of this sequence."""
        for k in sorted(range(self.answers), key=self.connect_at):
            for _ in range(self.viewers_of(k)):
                yield self.connect_at(k), k

    def publishes(self) -> Iterator[tuple[float, int, int]]:
        """(offset s, answer, n) of every event, in time order."""
        return heapq.merge(*(self._events_of(k) for k in range(self.answers)))

    def _events_of(self, k: int) -> Iterator[tuple[float, int, int]]:
        for n in range(1, self.messages + 2):
            yield self.publish_at(k, n), k, n

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--generations", type=int, required=True)
        parser.add_argument("--rounds", type=int, default=2)
        parser.add_argument("--messages", type=int, default=30)
        parser.add_argument("--rate", type=float, default=5.0)
        parser.add_argument("--lead", type=float, default=0.3)
        parser.add_argument("--max-viewers", type=int, default=2)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Shape:
        return cls(args.generations, args.rounds, args.messages, args.rate, args.lead,
                   args.max_viewers)

    def argv(self) -> list[str]:
        return ["--generations", str(self.generations), "--rounds", str(self.rounds),
                "--messages", str(self.messages), "--rate", str(self.rate),
                "--lead", str(self.lead), "--max-viewers", str(self.max_viewers)]


class Pacer:
    """Yields, tick by tick, the events that are due; records how late the worst one was."""

    def __init__(self, shape: Shape, start_ns: int) -> None:
        self.events = shape.publishes()
        self.start = time.monotonic() + (start_ns - time.time_ns()) / 1e9
        self.max_lag = 0.0
        self.first_ns = 0
        self._next: tuple[float, int, int] | None = next(self.events, None)

    async def due(self) -> list[tuple[int, int]]:
        """The next non-empty batch of (answer, n) due now; [] when all are published."""
        if self._next is None:
            return []
        delay = self.start + self._next[0] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic() - self.start + TICK_S
        batch = []
        while self._next is not None and self._next[0] <= now:
            at, k, n = self._next
            self.max_lag = max(self.max_lag, now - TICK_S - at)
            batch.append((k, n))
            self._next = next(self.events, None)
        return batch


async def wait_go(within: float) -> int:
    ready, _, _ = await asyncio.to_thread(select.select, [sys.stdin], [], [], within)
    fields = (sys.stdin.readline() if ready else "").split()
    if len(fields) != 2 or fields[0] != "go":
        raise SystemExit(f"expected 'go <start ns>' on stdin, got {fields!r}")
    return int(fields[1])


async def run_broker(args: argparse.Namespace, shape: Shape) -> None:
    settings = Settings(redis_url=args.redis_url)
    redis = connect(settings, "bench-publisher")
    store = Store(redis, settings)
    try:
        gen_ids = [protocol.new_generation_id() for _ in range(shape.answers)]
        await gather_bounded(64, [prepare(store, g) for g in gen_ids])
        write_ids(args.ids_file, gen_ids)
        sha = await redis.script_load(protocol.PUBLISH_SCRIPT)
        print("ready", flush=True)
        pacer = Pacer(shape, await wait_go(args.wait_timeout))
        end = protocol.new_end("stop", None)
        while batch := await pacer.due():
            pipe = redis.pipeline(transaction=False)
            now_ms = protocol.now_ms()
            for k, n in batch:
                gen_id = gen_ids[k]
                if n <= shape.messages:
                    text = message_text(n, args.size)
                    if not pacer.first_ns:
                        pacer.first_ns = int(text[2 : text.index(" ")])
                    event = protocol.new_message(text)
                else:
                    event = end
                keys = protocol.generation_keys(gen_id)
                pipe.evalsha(sha, len(keys), *keys, *protocol.publish_args(
                    OWNER, n, [event], now_ms, maxlen=store.maxlen, ttl_ms=store.ttl_ms,
                    channel=protocol.live_channel(gen_id), publish_cmd=store.publish_cmd))
            for (k, n), result in zip(batch, await pipe.execute(), strict=True):
                if result != 1:
                    raise SystemExit(f"publish of {gen_ids[k]} seq {n} returned {result}")
        print(f"published {pacer.first_ns} {time.time_ns()} {pacer.max_lag * 1000:.1f}",
              flush=True)
    finally:
        await redis.aclose()


class NchanConnection:
    """One keep-alive HTTP/1.1 connection to Nchan's publisher; a batch of POSTs is written
    at once (pipelined) and its answers read in order."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, requests: list[bytes]) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"".join(requests))
        for _ in requests:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            if status[:1] != b"2":
                raise SystemExit(f"nchan answered a publish {head[:40]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await self.reader.readexactly(length)

    def request(self, channel: str, body: bytes, event: str = "") -> bytes:
        extra = f"X-EventSource-Event: {event}\r\n" if event else ""
        return (f"POST {self.path}/{channel} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                ).encode() + body


async def run_nchan(args: argparse.Namespace, shape: Shape) -> None:
    url = urlsplit(args.nchan_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    gen_ids = [protocol.new_generation_id() for _ in range(shape.answers)]
    write_ids(args.ids_file, gen_ids)
    connections = [NchanConnection(host, port, url.path) for _ in range(NCHAN_CONNECTIONS)]
    for c in connections:
        await c.open()
    print("ready", flush=True)
    pacer = Pacer(shape, await wait_go(args.wait_timeout))
    end = protocol.end_data("stop", None).encode()
    try:
        while batch := await pacer.due():
            split: list[list[bytes]] = [[] for _ in connections]
            for k, n in batch:
                # One answer always on the same connection: its events stay in order.
                target = connections[k % len(connections)]
                if n <= shape.messages:
                    text = message_text(n, args.size)
                    if not pacer.first_ns:
                        pacer.first_ns = int(text[2 : text.index(" ")])
                    request = target.request(gen_ids[k], protocol.message_data(text).encode())
                else:
                    request = target.request(gen_ids[k], end, "end")
                split[k % len(connections)].append(request)
            await asyncio.gather(*(c.post(r) for c, r in zip(connections, split, strict=True)
                                   if r))
    finally:
        for c in connections:
            if c.writer is not None:
                c.writer.close()
    print(f"published {pacer.first_ns} {time.time_ns()} {pacer.max_lag * 1000:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--redis-url", help="publish through the store (the broker's edges)")
    target.add_argument("--nchan-url", help="POST to Nchan's publisher location instead, "
                                            "e.g. http://127.0.0.1:8080/pub")
    Shape.add_arguments(parser)
    parser.add_argument("--ids-file", required=True)
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--wait-timeout", type=float, default=300.0)
    args = parser.parse_args()
    shape = Shape.from_args(args)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        runner = asyncio.run
    runner(run_nchan(args, shape) if args.nchan_url else run_broker(args, shape))


if __name__ == "__main__":
    main()
