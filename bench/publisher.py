"""The benchmark's publisher: generations published through the product's own atomic path.

It does what the edge and a worker would: ``Store.create`` (meta + job), ``Store.claim`` under
an owner name, then ``Store.publish`` (the worker's ``PUBLISH_SCRIPT``) for seq 1..N at a fixed
rate and a final ``end`` event. Each message's text starts with ``t=<time.time_ns()> s=<seq> ``
taken just before its publish call, so viewers can compute publish→receive latency.

``--generations G`` publishes G generations side by side, each at ``--rate``, their schedules
staggered evenly over one interval (so the load is smooth, not G publishes at once);
``--ids-file`` receives their ids. ``--prefill K`` publishes seq 1..K of each generation as
fast as it can before saying ``ready`` (a log to resume from); the paced messages follow it.

Protocol with the orchestrator (lines): prints ``ready <first gen_id>`` once the generations
are running, waits for ``go`` on stdin, publishes, prints
``published <first_ns> <last_ns> <max lag ms>`` (lag: how late, at worst, a publish call
started against its schedule: a publisher that cannot keep up shows here).

With ``--nchan-url`` it publishes the same texts on the same schedule by HTTP POST to the Nchan
peer's publisher location instead (``run_nchan``), on the channel named by a new id (one
generation, no prefill).
"""

from __future__ import annotations

import argparse
import asyncio
import select
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect

OWNER = "bench-publisher"
PREPARE_IN_FLIGHT = 64  # creates + claims at once
FILLER = (  # long enough for B8's ~4 kB messages
    "The quick brown fox jumps over the lazy dog while the broker fans this sentence out. "
    * 60
)


def message_text(seq: int, size: int) -> str:
    """A sentence-like message of about ``size`` characters carrying its publish time."""
    head = f"t={time.time_ns()} s={seq} "
    return head + FILLER[: max(0, size - len(head) - 1)].rstrip() + "."


async def prepare(store: Store, gen_id: str) -> None:
    request = {"messages": [{"role": "user", "content": "benchmark"}]}
    await store.create(gen_id, request, store.settings.model)
    # An hour's lease: no worker renews it in the bench, and nothing may reap it.
    claimed = await store.claim(gen_id, OWNER, 3600.0)
    if claimed != "ok":
        raise SystemExit(f"claim failed: {claimed!r}")


async def publish_message(store: Store, gen_id: str, seq: int, size: int) -> int:
    """Publish message ``seq``; its publish time (ns, as carried in the text)."""
    text = message_text(seq, size)
    result = await store.publish(gen_id, OWNER, seq, [protocol.new_message(text)])
    if result != 1:
        raise SystemExit(f"publish of {gen_id} seq {seq} returned {result}")
    return int(text[2 : text.index(" ")])


class Schedule:
    """One generation's paced messages; the first and last publish, the worst lag."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.first_ns = 0
        self.max_lag = 0.0

    async def publish(self, store: Store, gen_id: str, start: float) -> None:
        args = self.args
        interval = 1.0 / args.rate
        for n in range(args.messages):
            due = start + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            sent_ns = await publish_message(store, gen_id, args.prefill + n + 1, args.size)
            if self.first_ns == 0 or sent_ns < self.first_ns:
                self.first_ns = sent_ns
        seq = args.prefill + args.messages + 1
        result = await store.publish(gen_id, OWNER, seq, [protocol.new_end("stop", None)])
        if result != 1:
            raise SystemExit(f"publish of {gen_id}'s end event returned {result}")


def write_ids(path: str, gen_ids: list[str]) -> None:
    Path(path).write_text("\n".join(gen_ids) + "\n", encoding="ascii")


async def gather_bounded(limit: int, coros: list[Coroutine[Any, Any, None]]) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def run(args: argparse.Namespace) -> None:
    settings = Settings(redis_url=args.redis_url)
    redis = connect(settings, "bench-publisher")
    store = Store(redis, settings)
    try:
        gen_ids = [protocol.new_generation_id() for _ in range(args.generations)]
        await gather_bounded(PREPARE_IN_FLIGHT, [prepare(store, g) for g in gen_ids])
        for seq in range(1, args.prefill + 1):  # seq by seq: every log grows together
            await asyncio.gather(*(publish_message(store, g, seq, args.size) for g in gen_ids))
        if args.ids_file:
            write_ids(args.ids_file, gen_ids)
        # Loaded before the window: otherwise the first publishes in flight at once each meet
        # NOSCRIPT and retry, which commandstats counts as extra EVALSHA calls.
        await redis.script_load(protocol.PUBLISH_SCRIPT)
        print(f"ready {gen_ids[0]}", flush=True)

        ready, _, _ = await asyncio.to_thread(select.select, [sys.stdin], [], [], args.wait_timeout)
        line = sys.stdin.readline() if ready else ""
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' on stdin, got {line!r}")

        schedule = Schedule(args)
        start = time.monotonic()
        stagger = 1.0 / args.rate / len(gen_ids)
        await asyncio.gather(*(
            schedule.publish(store, g, start + i * stagger) for i, g in enumerate(gen_ids)
        ))
        print(f"published {schedule.first_ns} {time.time_ns()} {schedule.max_lag * 1000:.1f}",
              flush=True)
    finally:
        await redis.aclose()


async def run_nchan(args: argparse.Namespace) -> None:
    """The same messages on the same schedule, POSTed to Nchan's publisher location.

    Each body is the JSON the broker's edge sends as ``data`` (``{"text": ...}``), so viewers
    parse both alike; the end marker is the broker's ``end`` data, named ``end`` by the
    ``X-EventSource-Event`` header. Nchan is told nothing else: the channel is ``gen_id``.
    """
    gen_id = protocol.new_generation_id()
    url = f"{args.nchan_url}/{gen_id}"
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as http:
        print(f"ready {gen_id}", flush=True)
        ready, _, _ = await asyncio.to_thread(select.select, [sys.stdin], [], [], args.wait_timeout)
        line = sys.stdin.readline() if ready else ""
        if line.strip() != "go":
            raise SystemExit(f"expected 'go' on stdin, got {line!r}")

        interval = 1.0 / args.rate
        start = time.monotonic()
        first_ns = 0
        for seq in range(1, args.messages + 1):
            delay = start + (seq - 1) * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            text = message_text(seq, args.size)
            if seq == 1:
                first_ns = int(text[2 : text.index(" ")])
            response = await http.post(url, content=protocol.message_data(text), headers=headers)
            if not response.is_success:
                raise SystemExit(f"publish of seq {seq} answered {response.status_code}")
        response = await http.post(url, content=protocol.end_data("stop", None),
                                   headers={**headers, "x-eventsource-event": "end"})
        if not response.is_success:
            raise SystemExit(f"publish of the end event answered {response.status_code}")
        print(f"published {first_ns} {time.time_ns()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--redis-url", help="publish through the store (broker, naive)")
    target.add_argument("--nchan-url", help="POST to Nchan's publisher location instead, "
                                            "e.g. http://127.0.0.1:8080/pub")
    parser.add_argument("--generations", type=int, default=1, help="generations published")
    parser.add_argument("--ids-file", help="write the generations' ids here, one per line")
    parser.add_argument("--prefill", type=int, default=0,
                        help="messages published at once per generation before 'ready'")
    parser.add_argument("--messages", type=int, default=300, help="paced messages each")
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--wait-timeout", type=float, default=300.0,
                        help="seconds to wait for 'go' before giving up")
    args = parser.parse_args()
    asyncio.run(run_nchan(args) if args.nchan_url else run(args))


if __name__ == "__main__":
    main()
