"""The benchmark's publisher: one generation published through the product's own atomic path.

It does what the edge and a worker would: ``Store.create`` (meta + job), ``Store.claim`` under
an owner name, then ``Store.publish`` (the worker's ``PUBLISH_SCRIPT``) for seq 1..N at a fixed
rate and a final ``end`` event. Each message's text starts with ``t=<time.time_ns()> s=<seq> ``
taken just before its publish call, so viewers can compute publish→receive latency.

Protocol with the orchestrator (lines): prints ``ready <gen_id>`` once the generation is
running, waits for ``go`` on stdin, publishes, prints ``published <first_ns> <last_ns>``.

With ``--nchan-url`` it publishes the same texts on the same schedule by HTTP POST to the Nchan
peer's publisher location instead (``run_nchan``), on the channel named by a new id.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import sys
import time

import httpx

from broker import protocol
from broker.protocol import Event
from broker.settings import Settings
from broker.store import Store, connect

OWNER = "bench-publisher"
FILLER = (
    "The quick brown fox jumps over the lazy dog while the broker fans this sentence out. "
    * 20
)


def message_text(seq: int, size: int) -> str:
    """A sentence-like message of about ``size`` characters carrying its publish time."""
    head = f"t={time.time_ns()} s={seq} "
    return head + FILLER[: max(0, size - len(head) - 1)].rstrip() + "."


async def run(args: argparse.Namespace) -> None:
    settings = Settings(redis_url=args.redis_url)
    redis = connect(settings, "bench-publisher")
    store = Store(redis, settings)
    try:
        gen_id = protocol.new_generation_id()
        request = {"messages": [{"role": "user", "content": "benchmark"}]}
        await store.create(gen_id, request, settings.model)
        lease_until = protocol.now_ms() + 3_600_000  # no worker or reaper runs in the bench
        claimed = await store.claim(gen_id, OWNER, lease_until)
        if claimed != "ok":
            raise SystemExit(f"claim failed: {claimed!r}")
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
            event = Event(seq, "message", protocol.message_data(text), protocol.now_ms())
            result = await store.publish(gen_id, OWNER, event, text=text)
            if result != 1:
                raise SystemExit(f"publish of seq {seq} returned {result}")
        end = Event(args.messages + 1, "end", protocol.end_data("stop", None), protocol.now_ms())
        result = await store.publish(
            gen_id, OWNER, end, final_status="completed", finish_reason="stop"
        )
        if result != 1:
            raise SystemExit(f"publish of the end event returned {result}")
        print(f"published {first_ns} {time.time_ns()}", flush=True)
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
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--wait-timeout", type=float, default=300.0,
                        help="seconds to wait for 'go' before giving up")
    args = parser.parse_args()
    asyncio.run(run_nchan(args) if args.nchan_url else run(args))


if __name__ == "__main__":
    main()
