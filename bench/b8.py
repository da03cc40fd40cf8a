"""B8 slow viewer: one viewer reading ~100x slower than the stream, beside two fast ones, on
ONE broker edge: what its lag costs the edge's memory and the other viewers' latency.

One cell on fresh processes: a redis-server, the edge (``python -m broker edge`` with
``BROKER_SEND_TIMEOUT``), the publisher (``bench.publisher``: N messages of ~4 kB at R/s through
the worker's publish script, then ``end``), one load generator with two fast viewers
(``bench.loadgen``: exactly-once, in-order, publish→receive latency) and the slow viewer
(``bench.slowviewer``: the product's ``Follower`` on a 64 kB receive buffer, sleeping after
each message until the edge closes it, then resuming with ``Last-Event-ID`` at full speed).
The edge's RSS is read with every viewer connected (the baseline), sampled every 50 ms, and
read again at the moment its ``broker_slow_viewers_closed_total`` first counts the slow
viewer, with the bytes streamed by then (the ``text`` key's length).

    .venv/bin/python -m bench.b8

Prints a markdown table, writes ``bench/results/b8.json``. Exits 1 if a viewer lost, repeated
or reordered an event, or if the slow viewer was never closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cell import (
    RESULTS,
    collect,
    columns_table,
    machine,
    start_loadgens,
    wait_viewers,
)
from bench.procs import BenchError, Proc, ProcessGroup, child_env, start_edge, start_redis
from bench.support import status_kb
from broker.core import protocol
from broker.edge.topic import KEPT_CHUNKS, LOG_READ_CHUNK, MAX_WRITE_BYTES

FAST_VIEWERS = 2
SAMPLE_EVERY = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b8", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=6000, help="messages published")
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second")
    parser.add_argument("--size", type=int, default=4000, help="characters per message")
    parser.add_argument("--send-timeout", type=float, default=6.0,
                        help="the edge's BROKER_SEND_TIMEOUT, seconds")
    parser.add_argument("--slow-delay", type=float, default=0.2,
                        help="seconds the slow viewer sleeps after each message")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    return parser.parse_args(argv)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


class EdgeWatch:
    """Samples the edge's RSS, and notes it (with the bytes streamed so far) when the edge
    first reports a slow viewer closed."""

    def __init__(self, pid: int, edge_url: str, redis: Any, gen_id: str, slow: Proc) -> None:
        self.pid = pid
        self.slow = slow
        self.edge_url = edge_url
        self.redis = redis
        self.gen_id = gen_id
        self.peak_kb = 0
        self.at_close: dict[str, float] | None = None

    async def run(self, started: float) -> None:
        async with httpx.AsyncClient(base_url=self.edge_url, timeout=5) as http:
            while True:
                rss_kb = status_kb(self.pid, "VmRSS")
                self.peak_kb = max(self.peak_kb, rss_kb)
                if self.at_close is None:
                    closed = metric((await http.get("/metrics")).text,
                                    "broker_slow_viewers_closed_total")
                    if closed >= 1:
                        streamed = await self.redis.strlen(protocol.text_key(self.gen_id))
                        self.at_close = {"rss_kb": rss_kb, "streamed_bytes": streamed,
                                         "seconds": time.monotonic() - started,
                                         "ns": time.time_ns()}
                        await self.slow.send("closed")  # it may read at full speed now
                await asyncio.sleep(SAMPLE_EVERY)


async def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    redis = None
    watcher: asyncio.Task[None] | None = None
    try:
        _, redis, redis_url = await start_redis(group)
        edge, edge_url = await start_edge(group, "broker", redis_url,
                                          BROKER_SEND_TIMEOUT=str(args.send_timeout))
        publisher = await group.start(Proc("publisher", [
            sys.executable, "-m", "bench.publisher", "--redis-url", redis_url,
            "--messages", str(args.messages), "--rate", str(args.rate), "--size", str(args.size),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        (gen_id,) = await publisher.expect("ready", 30)

        run_budget = 120 + 4 * args.messages / args.rate
        loadgens = await start_loadgens(group, [int(edge_url.rsplit(":", 1)[1])], FAST_VIEWERS, [
            f"--gen-id={gen_id}", "--messages", str(args.messages), "--run-timeout",
            str(run_budget),
        ])
        for lg in loadgens:
            await lg.expect("ready", 60)
        slow_out = group.log_dir / "slowviewer.json"
        slow = await group.start(Proc("slowviewer", [
            sys.executable, "-m", "bench.slowviewer",
            "--url", f"{edge_url}/v1/generations/{gen_id}/events",
            "--messages", str(args.messages), "--delay", str(args.slow_delay),
            "--timeout", str(run_budget), "--out", str(slow_out),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        await wait_viewers([edge_url], [FAST_VIEWERS + 1])
        baseline_kb = status_kb(edge.pid, "VmRSS")

        watch = EdgeWatch(edge.pid, edge_url, redis, gen_id, slow)
        started = time.monotonic()
        watcher = asyncio.create_task(watch.run(started))
        await publisher.send("go")
        _, published_ns = map(int, (await publisher.expect("published", run_budget))[:2])
        for lg in loadgens:
            await lg.expect("done", run_budget)
        await slow.expect("done", run_budget)
        watcher.cancel()

        fast = collect(group, loadgens, "B8 fast viewers", FAST_VIEWERS * args.messages,
                       edge.tail())
        slow_result = json.loads(slow_out.read_text())
        if slow_result["errors"]:
            raise BenchError("B8 slow viewer: " + "; ".join(slow_result["errors"]) + edge.tail())
        if watch.at_close is None or not slow_result["reconnects"]:
            raise BenchError("B8: the edge never closed the slow viewer (raise --messages or "
                             f"lower --send-timeout){edge.tail()}")
        mb = 1024 * 1024
        frame_bytes = args.size + 100  # the text, its JSON and SSE framing
        return {
            "messages": args.messages,
            "message_chars": args.size,
            "rate": args.rate,
            "send_timeout_s": args.send_timeout,
            "streamed_mb": round(args.messages * args.size / mb, 1),
            "edge_rss_baseline_mb": round(baseline_kb / 1024, 1),
            "closed_after_s": round(watch.at_close["seconds"], 2),
            "streamed_at_close_mb": round(watch.at_close["streamed_bytes"] / mb, 1),
            "edge_rss_growth_at_close_mb": round((watch.at_close["rss_kb"] - baseline_kb) / 1024,
                                                 1),
            "edge_rss_peak_growth_mb": round((watch.peak_kb - baseline_kb) / 1024, 1),
            # What the edge may hold for one generation whatever its viewers' lag: the replay
            # window (default 512 frames), the kept log chunks, one write batch per viewer.
            "edge_may_hold_mb": round(((512 + KEPT_CHUNKS * LOG_READ_CHUNK) * frame_bytes
                                       + (FAST_VIEWERS + 1) * MAX_WRITE_BYTES) / mb, 1),
            "fast_latency_ms": fast.latency_ms(),
            "fast_done_after_end_s": round(
                (fast.max_of("last_recv_ns") - published_ns) / 1e9, 3),
            "slow_reconnects": slow_result["reconnects"],
            "slow_resumed_after_close_s": round(
                (slow_result["first_message_after_reconnect_ns"] - watch.at_close["ns"]) / 1e9,
                2),
        }
    finally:
        if watcher is not None:
            watcher.cancel()
        await group.close(redis)


COLUMNS = [
    ("MB streamed", lambda c: f"{c['streamed_mb']:.1f}"),
    ("send timeout s", lambda c: f"{c['send_timeout_s']:g}"),
    ("closed after s", lambda c: f"{c['closed_after_s']:.1f}"),
    ("MB streamed by then", lambda c: f"{c['streamed_at_close_mb']:.1f}"),
    ("edge RSS growth then MB", lambda c: f"{c['edge_rss_growth_at_close_mb']:.1f}"),
    ("edge RSS peak growth MB", lambda c: f"{c['edge_rss_peak_growth_mb']:.1f}"),
    ("edge may hold MB", lambda c: f"{c['edge_may_hold_mb']:.1f}"),
    ("fast p99 ms", lambda c: f"{c['fast_latency_ms']['p99']:.1f}"),
    ("fast max ms", lambda c: f"{c['fast_latency_ms']['max']:.1f}"),
    ("slow reconnects", lambda c: str(c["slow_reconnects"])),
    ("slow resumed after s", lambda c: f"{c['slow_resumed_after_close_s']:.1f}"),
]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "B8 slow viewer", "params": {
        "messages": args.messages, "rate": args.rate, "size": args.size,
        "send_timeout": args.send_timeout, "slow_delay": args.slow_delay,
    }, "machine": machine(), "cells": []}
    try:
        print("# running the slow viewer cell ...", file=sys.stderr, flush=True)
        out["cells"].append(await run_cell(args))
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nB8 FAILED: {e}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    out = asyncio.run(run(args))
    (args.results / "b8.json").write_text(json.dumps(out, indent=2))
    print("## B8 slow viewer\n")
    if out["cells"]:
        print(columns_table(COLUMNS, out["cells"]))
    raise SystemExit(1 if "failure" in out else 0)


if __name__ == "__main__":
    main()
