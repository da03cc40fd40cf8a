"""B4 resume storm: V viewers reconnect at once with ``Last-Event-ID`` halfway through a log.

On fresh processes: a redis-server, ONE broker edge (fresh: it has no subscription and no
window for the generation, as after the edge the viewers were on died), the publisher
(``bench.publisher --prefill 2000``: one running generation whose log already holds 2000
messages) and the load generators (``bench.loadgen --last-event-id 1000``). At one instant
(``--start-at-ns``, shared by the load generators) every viewer connects with
``Last-Event-ID: 1000``; each must get 1001..2000 replayed, in order, exactly once. The storm
ends when the last viewer has event 2000 (the log's head: from then on it is live).

Then the publisher publishes 60 more messages at 30/s and ``end``: every viewer must get
exactly those too (live, after the replay), which gives the live latency after a storm.

Reported: time from the storm's start until every viewer is live again (and until every
response had started), the Redis commands the edge issued during the storm (by command),
edge CPU and peak RSS, then the live phase's latency.

    .venv/bin/python -m bench.b4                      # 1000 viewers, 2000-message log

Prints a markdown table, writes ``bench/results/b4.json`` and ``bench/results/b4_storm.png``.
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

TARGET_S = 2.0  # the benchmark issue's target: all live again within 2 s
LOADGEN_STARTUP_S = 2.0  # time for the load generator processes to start before the storm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b4", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--log", type=int, default=2000, help="messages in the log")
    parser.add_argument("--resume-from", type=int, default=0,
                        help="the Last-Event-ID the viewers send (0: half the log)")
    parser.add_argument("--live", type=int, default=60, help="messages published after")
    parser.add_argument("--rate", type=float, default=30.0, help="live messages per second")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.resume_from = args.resume_from or args.log // 2
    if not 0 < args.resume_from < args.log:
        parser.error("--resume-from must be inside the log")
    return args


async def run_storm(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    rss: RssSampler | None = None
    redis = None
    try:
        _, redis, redis_url = await start_redis(group)
        edge, url = await start_edge(group, "broker", redis_url)
        rss = RssSampler(edge.pid)
        rss.start()
        publisher = await group.start(Proc("publisher", [
            sys.executable, "-m", "bench.publisher", "--redis-url", redis_url,
            "--prefill", str(args.log), "--messages", str(args.live), "--rate", str(args.rate),
            "--size", str(args.size),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        (gen_id,) = await publisher.expect("ready", 60 + args.log / 100)

        procs: dict[str, list[Proc]] = {"edge": [edge]}
        before = await Costs.take(redis, procs)
        start_ns = time.time_ns() + int(LOADGEN_STARTUP_S * 1e9)
        loadgens = await start_loadgens(group, [int(url.rsplit(":", 1)[1])], args.viewers, [
            f"--gen-id={gen_id}", "--messages", str(args.log + args.live),
            "--last-event-id", str(args.resume_from), "--caught-up-at", str(args.log),
            "--start-at-ns", str(start_ns), "--connects-in-flight", str(args.viewers),
            "--connect-timeout", str(args.timeout), "--run-timeout", str(args.timeout),
        ])
        procs["loadgens"] = loadgens
        for lg in loadgens:
            await lg.expect("ready", LOADGEN_STARTUP_S + args.timeout)
        for lg in loadgens:
            await lg.expect("caught_up", args.timeout)
        storm = (await Costs.take(redis, procs)).since(before)
        await wait_viewers([url], [args.viewers])
        rss_storm_kb = rss.peak_kb

        live_before = await Costs.take(redis, procs)
        await publisher.send("go")
        first_ns, _, _ = await publisher.expect("published", args.timeout)
        for lg in loadgens:
            await lg.expect("done", args.timeout)
        live = (await Costs.take(redis, procs)).since(live_before)
        await rss.stop()

        verdict = collect(group, loadgens, f"B4 V={args.viewers}", args.viewers * args.live,
                          edge.tail())
        started = verdict.min_of("connect_start_ns")
        if started < start_ns:
            raise BenchError("a load generator started its storm early")
        all_live_s = (verdict.max_of("last_caught_up_ns") - start_ns) / 1e9
        replayed = args.viewers * (args.log - args.resume_from)
        return {
            "viewers": args.viewers,
            "log_messages": args.log,
            "resume_from": args.resume_from,
            "replayed_events": replayed,
            "late_start_ms": round((verdict.max_of("connect_start_ns") - start_ns) / 1e6, 1),
            "all_live_s": round(all_live_s, 3),
            "replayed_per_s": round(replayed / all_live_s),
            "storm_edge_cpu_s": storm.cpu["edge"],
            "storm_loadgen_cpu_s": storm.cpu["loadgens"],
            "storm_redis_cpu_s": storm.redis_cpu,
            "storm_redis_commands": storm.commands,
            "storm_redis_commandstats": storm.calls,
            "edge_rss_peak_storm_mb": round(rss_storm_kb / 1024, 1),
            "live_latency_ms": verdict.latency_ms(),
            "live_window_s": round((verdict.max_of("last_recv_ns") - int(first_ns)) / 1e9, 3),
            "live_edge_cpu_s": live.cpu["edge"],
            "live_redis_commands": live.commands,
            "edge_rss_peak_mb": round(rss.peak_kb / 1024, 1),
            "live_after_s": sorted(round((ns - start_ns) / 1e9, 4) for r in verdict.results
                                   for ns in r["caught_up_ns"]),
        }
    finally:
        if rss is not None:
            await rss.stop()
        await group.close(redis)


COLUMNS = [
    ("V", lambda c: str(c["viewers"])),
    ("replayed events", lambda c: str(c["replayed_events"])),
    ("all live s", lambda c: f"{c['all_live_s']:.2f}"),
    ("replayed/s", lambda c: f"{c['replayed_per_s']:.0f}"),
    ("edge CPU s", lambda c: f"{c['storm_edge_cpu_s']:.2f}"),
    ("loadgen CPU s", lambda c: f"{c['storm_loadgen_cpu_s']:.2f}"),
    ("Redis cmds", lambda c: str(c["storm_redis_commands"])),
    ("Redis cmds by name", lambda c: ", ".join(f"{k} {v}" for k, v in
                                                c["storm_redis_commandstats"].items())),
    ("Redis CPU s", lambda c: f"{c['storm_redis_cpu_s']:.3f}"),
    ("edge RSS peak MB", lambda c: f"{c['edge_rss_peak_storm_mb']:.0f}"),
    ("live p50 / p99 ms", lambda c: f"{c['live_latency_ms']['p50']:.1f} / "
                                    f"{c['live_latency_ms']['p99']:.1f}"),
]


def plot(cell: dict[str, Any], path: Path) -> None:
    times = cell["live_after_s"]
    fig, ax = figure(figsize=(7, 4))
    ax.plot(times, [(i + 1) / len(times) * 100 for i in range(len(times))], color="tab:blue")
    ax.axvline(TARGET_S, color="tab:red", linestyle="--", label=f"target {TARGET_S:.0f} s")
    ax.set_xlabel("seconds since the storm started")
    ax.set_ylabel("% of viewers live again")
    each = cell["replayed_events"] // cell["viewers"]
    ax.set_title(f"B4: {cell['viewers']} viewers resume {each} events each at once "
                 "(2 shared cores)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "B4 resume storm",
        "params": {"viewers": args.viewers, "log": args.log, "resume_from": args.resume_from,
                   "live": args.live, "rate": args.rate, "size": args.size},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        print(f"# running B4: {args.viewers} viewers resume from {args.resume_from} of "
              f"{args.log} ...", file=sys.stderr, flush=True)
        out["cells"].append(await run_storm(args))
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nB4 FAILED: {e}", file=sys.stderr)
        status = 1
    json_path = args.results / "b4.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        cell = out["cells"][0]
        print(columns_table(COLUMNS, [cell]))
        verdict = "meets" if cell["all_live_s"] <= TARGET_S else "misses"
        print(f"\nall {cell['viewers']} live again after {cell['all_live_s']:.2f} s "
              f"({verdict} the {TARGET_S:.0f} s target)")
        png_path = args.results / "b4_storm.png"
        plot(cell, png_path)
        print(f"\nresults: {json_path}, {png_path}")
    return status


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
