"""B2 many generations: G concurrent generations, a few viewers each, spread over TWO edges.

For each cell, on fresh processes: a redis-server, two edges (``python -m broker edge``, or
the naive baseline ``bench.naive_edge``), the publisher (``bench.publisher --generations G``:
G generations created and claimed, then each publishes M messages at R/s through the worker's
PUBLISH_SCRIPT, schedules staggered so the load is smooth) and 1-2 load generators
(``bench.loadgen``: viewer i watches generation i // per-gen on edge i mod 2, so every
generation has viewers on both edges; each checks exactly-once, in-order delivery).

The figures of B1 (deliveries/s, latency, edge CPU per delivery, edge RSS) plus Redis CPU and
Redis commands per published message: the fan-out happens in the edges, so the commands per
message must stay the same whatever the number of viewers (the default cells include one with
10x the viewers per generation to show it), and the worker's publish is one round trip
(one EVALSHA per message).

    .venv/bin/python -m bench.b2                      # G=100 and 1000 x 3 viewers, G=100 x 30

Prints markdown tables, writes ``bench/results/b2.json`` and ``bench/results/b2_cost.png``.
Exits 1 if any viewer lost, repeated or reordered an event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.cell import (
    RESULTS,
    Costs,
    RssSampler,
    collect,
    columns_table,
    figure,
    machine,
    save_figure,
    start_loadgens,
    wait_viewers,
)
from bench.procs import BenchError, Proc, ProcessGroup, child_env, start_edge, start_redis
from broker.core import protocol

IMPLS = ("broker", "naive")
EDGES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b2", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--cells", default="100x3,1000x3,100x30",
                        help="comma-separated GxV: G generations with V viewers each")
    parser.add_argument("--impls", default="broker", help="broker and/or naive")
    parser.add_argument("--messages", type=int, default=20, help="messages per generation")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="messages per second per generation: an LLM at ~50 tokens/s "
                             "writes 2-3 sentences a second, but at G=1000 that would need "
                             "more than the 2 shared cores for the publisher alone")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--connect-timeout", type=float, default=180.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        args.cell_list = [tuple(int(x) for x in c.lower().split("x")) for c in
                          args.cells.split(",") if c.strip()]
    except ValueError:
        parser.error("--cells takes GxV pairs, e.g. 100x3,1000x3")
    if not args.cell_list or any(len(c) != 2 or min(c) < 1 for c in args.cell_list):
        parser.error("--cells takes GxV pairs of positive integers, e.g. 100x3,1000x3")
    args.impl_list = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impl_list or set(args.impl_list) - set(IMPLS):
        parser.error(f"--impls takes a subset of {','.join(IMPLS)}")
    return args


async def run_cell(impl: str, generations: int, per_gen: int,
                   args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    samplers: list[RssSampler] = []
    redis = None
    viewers = generations * per_gen
    try:
        _, redis, redis_url = await start_redis(group)
        edges: list[Proc] = []
        urls: list[str] = []
        for _ in range(EDGES):
            edge, url = await start_edge(group, impl, redis_url)
            edges.append(edge)
            urls.append(url)
            samplers.append(RssSampler(edge.pid))
            samplers[-1].start()

        ids_file = group.log_dir / "generations.txt"
        publisher = await group.start(Proc("publisher", [
            sys.executable, "-m", "bench.publisher", "--redis-url", redis_url,
            "--generations", str(generations), "--ids-file", str(ids_file),
            "--messages", str(args.messages), "--rate", str(args.rate), "--size", str(args.size),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        (first_id,) = await publisher.expect("ready", 60 + generations / 20)

        t_connect = time.monotonic()
        run_budget = 60 + 6 * args.messages / args.rate
        loadgens = await start_loadgens(group, [int(u.rsplit(":", 1)[1]) for u in urls], viewers, [
            "--gen-ids-file", str(ids_file), "--viewers-per-gen", str(per_gen),
            "--messages", str(args.messages), "--connect-timeout", str(args.connect_timeout),
            "--run-timeout", str(run_budget),
        ])
        for lg in loadgens:
            await lg.expect("ready", args.connect_timeout + 10)
        on_first = sum(1 for i in range(viewers) if i % EDGES == 0)
        await wait_viewers(urls, [on_first, viewers - on_first])
        connect_s = time.monotonic() - t_connect

        clients = int((await redis.info("clients"))["connected_clients"])
        numsub = dict(await redis.pubsub_numsub(protocol.live_channel(first_id)))
        channel_subs = int(next(iter(numsub.values()), 0))
        procs = {"edges": edges, "publisher": [publisher], "loadgens": loadgens}
        before = await Costs.take(redis, procs)
        await publisher.send("go")
        first_ns, _, lag_ms = (await publisher.expect("published", run_budget))
        for lg in loadgens:
            await lg.expect("done", run_budget + 10)
        costs = (await Costs.take(redis, procs)).since(before)
        for s in samplers:
            await s.stop()

        what = f"{impl} G={generations} x {per_gen}"
        published = generations * (args.messages + 1)  # the end events are publishes too
        verdict = collect(group, loadgens, what, viewers * args.messages,
                          "".join(e.tail() for e in edges))
        window_s = (verdict.max_of("last_recv_ns") - int(first_ns)) / 1e9
        deliveries = verdict.deliveries
        edge_cpu = costs.cpu["edges"]
        return {
            "impl": impl,
            "generations": generations,
            "viewers_per_generation": per_gen,
            "viewers": viewers,
            "messages_published": published,
            "deliveries": deliveries,
            "window_s": round(window_s, 3),
            "publisher_max_lag_ms": float(lag_ms),
            "deliveries_per_s": round(deliveries / window_s, 1),
            "latency_ms": verdict.latency_ms(),
            "edges_cpu_s": edge_cpu,
            "edge_cpu_s_per_1000_deliveries": round(edge_cpu / deliveries * 1000, 4),
            "edges_rss_peak_mb": [round(s.peak_kb / 1024, 1) for s in samplers],
            "redis_cpu_s": costs.redis_cpu,
            "redis_commands": costs.commands,
            "redis_commands_per_message": round(costs.commands / published, 2),
            # The worker's publish is one script call: one round trip per message.
            "publish_round_trips_per_message": round(costs.calls.get("evalsha", 0) / published, 3),
            "redis_commandstats": costs.calls,
            "redis_connected_clients": clients,
            "channel_subscribers": channel_subs,
            "publisher_cpu_s": costs.cpu["publisher"],
            "loadgen_cpu_s": costs.cpu["loadgens"],
            "connect_s": round(connect_s, 2),
        }
    finally:
        for s in samplers:
            await s.stop()
        await group.close(redis)


COLUMNS = [
    ("edge", lambda c: c["impl"]),
    ("G", lambda c: str(c["generations"])),
    ("viewers/gen", lambda c: str(c["viewers_per_generation"])),
    ("deliveries/s", lambda c: f"{c['deliveries_per_s']:.0f}"),
    ("p50 ms", lambda c: f"{c['latency_ms']['p50']:.2f}"),
    ("p99 ms", lambda c: f"{c['latency_ms']['p99']:.2f}"),
    ("max ms", lambda c: f"{c['latency_ms']['max']:.2f}"),
    ("edge CPU s /1000 deliv", lambda c: f"{c['edge_cpu_s_per_1000_deliveries']:.4f}"),
    ("edges CPU s", lambda c: f"{c['edges_cpu_s']:.2f}"),
    ("edge RSS peak MB", lambda c: " / ".join(f"{m:.0f}" for m in c["edges_rss_peak_mb"])),
    ("Redis CPU s", lambda c: f"{c['redis_cpu_s']:.2f}"),
    ("Redis cmds/msg", lambda c: f"{c['redis_commands_per_message']:.2f}"),
    ("publish round trips/msg", lambda c: f"{c['publish_round_trips_per_message']:.2f}"),
    ("Redis clients", lambda c: str(c["redis_connected_clients"])),
    ("subs/channel", lambda c: str(c["channel_subscribers"])),
    ("publisher CPU s / lag ms", lambda c: f"{c['publisher_cpu_s']:.1f} / "
                                           f"{c['publisher_max_lag_ms']:.0f}"),
    ("loadgen CPU s", lambda c: f"{c['loadgen_cpu_s']:.1f}"),
]


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = figure(1, 2, figsize=(10, 4))
    labels = [f"{c['impl']}\nG={c['generations']}x{c['viewers_per_generation']}" for c in cells]
    xs = range(len(cells))
    left.bar(xs, [c["redis_commands_per_message"] for c in cells], color="tab:blue")
    left.set_ylabel("Redis commands per published message")
    right.bar(xs, [c["edge_cpu_s_per_1000_deliveries"] for c in cells], color="tab:orange")
    right.set_ylabel("edge CPU s per 1000 deliveries")
    for ax in (left, right):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("B2 many generations over two edges (2 shared cores)")
    save_figure(fig, path)


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "B2 many generations",
        "params": {"cells": args.cell_list, "impls": args.impl_list, "edges": EDGES,
                   "messages": args.messages, "rate": args.rate, "size": args.size},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        for generations, per_gen in args.cell_list:
            for impl in args.impl_list:
                print(f"# running {impl} G={generations} x {per_gen} ...", file=sys.stderr,
                      flush=True)
                cell = await run_cell(impl, generations, per_gen, args)
                out["cells"].append(cell)
                print(f"#   {cell['deliveries_per_s']:.0f} deliveries/s, p99 "
                      f"{cell['latency_ms']['p99']:.2f} ms", file=sys.stderr, flush=True)
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nB2 FAILED: {e}", file=sys.stderr)
        status = 1
    json_path = args.results / "b2.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        png_path = args.results / "b2_cost.png"
        plot(out["cells"], png_path)
        print(columns_table(COLUMNS, out["cells"]))
        print(f"\nresults: {json_path}, {png_path}")
    return status


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
