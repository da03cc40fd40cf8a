"""B1 fan-out: one generation, V viewers on ONE edge; the broker's edge vs the naive baseline
and the Nchan peer.

For each V and each implementation (a "cell"), on fresh processes: a redis-server, the edge
(``python -m broker edge``, or ``python -m bench.naive_edge``), the publisher
(``bench.publisher``: create + claim + the worker's PUBLISH_SCRIPT, N messages at R/s, then
``end``) and 1-2 load generators (``bench.loadgen``: V raw-socket SSE viewers that check
exactly-once, in-order delivery and record publish→receive latency). The publisher starts only
once every viewer is connected; the costs are measured over the publishing window (from the
first publish until every viewer has received the terminal event).

The ``nchan`` cells (``bench.nchan``: nginx + Nchan, Redis storage, one worker) differ where
Nchan does: the publisher POSTs to Nchan (``--nchan-url``), the load generator checks order on
the ``s=<seq>`` in each text (``--seq-from-text``), readiness is read from
``nchan_stub_status``, and the edge's CPU and RSS are the nginx worker's.

    .venv/bin/python -m bench.b1 --viewers 1,100,1000

Prints a markdown table, writes ``bench/results/b1.json`` and ``bench/results/b1_latency.png``.
Exits 1 (loudly) if any viewer lost, repeated or reordered an event.
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

from bench import cpubudget, nchan
from bench.cell import (
    RESULTS,
    VIEWERS_PER_LOADGEN,
    RssSampler,
    collect,
    columns_table,
    edge_viewers,
    figure,
    loadavg,
    machine,
    markdown_table,
    per_process,
    save_figure,
    serving_processes,
    start_loadgens,
)
from bench.procs import BenchError, Proc, ProcessGroup, child_env, start_edge, start_redis
from bench.support import (
    calls_delta,
    command_calls,
    cpu_seconds,
    established_by_pid,
    redis_cpu,
    status_kb,
)
from broker.core import protocol

IMPLS = ("broker", "naive", "nchan")
EDGE_CLIENT_NAMES = ("broker-edge-", "bench-naive-edge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b1", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--viewers", default="1,100,1000",
                        help="comma-separated viewer counts V (3000 works too)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="which edges to run")
    parser.add_argument("--messages", type=int, default=300, help="messages published")
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--loadgens", type=int, default=0,
                        help=f"load generator processes (0: one per {VIEWERS_PER_LOADGEN} "
                             "viewers, at most 2: the machine has 2 cores)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds for all viewers to connect")
    parser.add_argument("--run-timeout", type=float, default=0.0,
                        help="seconds for the publishing window to complete, every viewer "
                             "included (0: 60 + 6 x messages/rate)")
    parser.add_argument("--edge-procs", default="1",
                        help="comma-separated process counts of the broker edge (broker edge "
                             "--edge-workers N): a broker cell for each; N > 1 shows as "
                             "'broker xN'")
    cpubudget.add_option(parser)
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    try:
        args.procs_list = [int(p) for p in args.edge_procs.split(",") if p.strip()]
    except ValueError:
        parser.error("--edge-procs takes integers, e.g. 1,2")
    if not args.procs_list or min(args.procs_list) < 1:
        parser.error("--edge-procs needs counts >= 1")
    if args.edge_core < 0:
        parser.error("--edge-core is a share of a core, > 0 (0: no budget)")
    try:
        args.viewer_counts = [int(v) for v in args.viewers.split(",") if v.strip()]
    except ValueError:
        parser.error("--viewers takes integers, e.g. 1,100,1000")
    if not args.viewer_counts or min(args.viewer_counts) < 1:
        parser.error("--viewers needs counts >= 1")
    args.impl_list = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impl_list or set(args.impl_list) - set(IMPLS):
        parser.error(f"--impls takes a subset of {','.join(IMPLS)}")
    return args


# -- one cell ------------------------------------------------------------------------------


async def run_cell(impl: str, viewers: int, args: argparse.Namespace,
                   procs: int = 1) -> dict[str, Any]:
    group = ProcessGroup()
    rss: RssSampler | None = None
    redis = None
    budget = None
    try:
        _, redis, redis_url = await start_redis(group)
        if impl == "nchan":  # edge.pid is its worker's; the master is measured apart
            edge, edge_url = await nchan.start_nchan(group, redis_url)
        else:
            extra_env = {"BROKER_EDGE_WORKERS": str(procs)} if procs > 1 else {}
            edge, edge_url = await start_edge(group, impl, redis_url, **extra_env)
        master_pid: int | None = getattr(edge, "master_pid", None)
        if args.edge_core and impl == "broker":
            budget = cpubudget.CpuBudget(args.edge_core)
        pids, serving, cgroups = await serving_processes(edge, procs, redis, budget)
        rss = RssSampler(*pids)
        rss.start()

        publisher = await group.start(Proc("publisher", [
            sys.executable, "-m", "bench.publisher",
            *(["--nchan-url", edge_url + nchan.PUBLISH_PATH] if impl == "nchan"
              else ["--redis-url", redis_url]),
            "--messages", str(args.messages), "--rate", str(args.rate), "--size", str(args.size),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        (gen_id,) = await publisher.expect("ready", 30)

        # Connect phase: every viewer connected and subscribed before anything is published.
        rss_idle_kb = sum(status_kb(p, "VmRSS") for p in pids)
        calls_0 = command_calls(await redis.info("commandstats"))
        edge_cpu_0 = sum(cpu_seconds(p) for p in pids)
        t_connect = time.monotonic()
        run_budget = args.run_timeout or 60 + 6 * args.messages / args.rate
        loadgens = await start_loadgens(group, [int(edge_url.rsplit(":", 1)[1])], viewers, [
            # One argument with "=": an id may start with "-", which argparse would take for an
            # option.
            f"--gen-id={gen_id}", "--messages", str(args.messages),
            "--connect-timeout", str(args.connect_timeout), "--run-timeout", str(run_budget),
            *(["--seq-from-text"] if impl == "nchan" else []),
        ], requested=args.loadgens)
        for lg in loadgens:
            await lg.expect("ready", args.connect_timeout + 10)
        async with httpx.AsyncClient(base_url=edge_url, timeout=5) as http:
            deadline = time.monotonic() + 30
            count = nchan.subscribers if impl == "nchan" else edge_viewers
            # With N processes each counts its own viewers (a scrape reaches one of them):
            # their headers, which come after the subscription, are the check then.
            while procs == 1 and (seen := await count(http)) != viewers:
                if time.monotonic() > deadline:
                    raise BenchError(f"{impl} edge reports {seen} viewers, expected {viewers}")
                await asyncio.sleep(0.1)
        if impl == "nchan":  # its headers come before its Redis subscription is confirmed
            await nchan.wait_subscribed(redis, gen_id)
        connect_s = time.monotonic() - t_connect
        # What the viewers cost the edge while connected and idle (B3 reads this).
        rss_connected_kb = sum(status_kb(p, "VmRSS") for p in pids)
        edge_port = int(edge_url.rsplit(":", 1)[1])
        connections = established_by_pid(serving, edge_port) if impl == "broker" else {}

        clients = await redis.client_list()
        edge_conns = sum(1 for c in clients if c.get("name", "").startswith(EDGE_CLIENT_NAMES))
        if impl == "nchan":  # nchan names none of its connections; everything else here does
            edge_conns = sum(1 for c in clients if not c.get("name"))
        connected = int((await redis.info("clients"))["connected_clients"])
        live = nchan.redis_channel(gen_id) if impl == "nchan" else protocol.live_channel(gen_id)
        subscribers = dict(await redis.pubsub_numsub(live))
        channel_subs = int(next(iter(subscribers.values()), 0))

        # Publish window.
        calls_1 = command_calls(await redis.info("commandstats"))
        redis_cpu_1 = redis_cpu(await redis.info("cpu"))
        edge_cpu_1 = sum(cpu_seconds(p) for p in pids)
        master_cpu_1 = cpu_seconds(master_pid) if master_pid else 0.0
        lg_cpu_1 = sum(cpu_seconds(lg.pid) for lg in loadgens)
        serving_cpu_1 = [cpu_seconds(p) for p in serving]
        throttled_1 = [g.throttled_s() for g in cgroups]
        load_1 = loadavg()
        await publisher.send("go")
        first_ns, published_ns = map(int, (await publisher.expect("published", run_budget))[:2])
        for lg in loadgens:
            await lg.expect("done", run_budget + 10)
        edge_cpu_2 = sum(cpu_seconds(p) for p in pids)
        master_cpu_2 = cpu_seconds(master_pid) if master_pid else 0.0
        lg_cpu_2 = sum(cpu_seconds(lg.pid) for lg in loadgens)
        serving_cpu = [cpu_seconds(p) - c for p, c in zip(serving, serving_cpu_1, strict=True)]
        throttled = [g.throttled_s() - t for g, t in zip(cgroups, throttled_1, strict=True)]
        load_2 = loadavg()
        redis_cpu_2 = redis_cpu(await redis.info("cpu"))
        calls_2 = command_calls(await redis.info("commandstats"))
        await rss.stop()
        hwm_kb = sum(status_kb(p, "VmHWM") for p in pids)
        extra: dict[str, Any] = {}
        if master_pid:  # nginx: the edge columns are its worker's; its master's figures here
            extra = {
                "nginx_master_cpu_s": round(master_cpu_2 - master_cpu_1, 3),
                "nginx_master_rss_mb": round(status_kb(master_pid, "VmRSS") / 1024, 1),
                # Part of the worker's RSS: nchan's shared memory zone pages it touched.
                "edge_rss_shmem_mb": round(status_kb(edge.pid, "RssShmem") / 1024, 1),
            }

        verdict = collect(group, loadgens, f"{impl} V={viewers}", viewers * args.messages,
                          edge.tail())
        deliveries = verdict.deliveries
        last_recv_ns = verdict.max_of("last_recv_ns")
        window_s = (last_recv_ns - first_ns) / 1e9
        edge_cpu = edge_cpu_2 - edge_cpu_1
        window_calls = calls_delta(calls_1, calls_2)
        connect_calls = calls_delta(calls_0, calls_1)
        return {
            "impl": impl if procs == 1 else f"{impl} x{procs}",
            "edge_processes": procs,
            "viewers": viewers,
            "loadgens": len(loadgens),
            "deliveries": deliveries,
            "window_s": round(window_s, 3),
            "publish_s": round((published_ns - first_ns) / 1e9, 3),
            "deliveries_per_s": round(deliveries / window_s, 1),
            "latency_ms": verdict.latency_ms(),
            "edge_cpu_s": round(edge_cpu, 3),
            "edge_cpu_s_per_1000_deliveries": round(edge_cpu / deliveries * 1000, 4),
            "edge_connect_cpu_s": round(edge_cpu_1 - edge_cpu_0, 3),
            "edge_rss_peak_mb": round(rss.peak_kb / 1024, 1),
            "edge_vmhwm_mb": round(hwm_kb / 1024, 1),
            "redis_cpu_s": round(redis_cpu_2 - redis_cpu_1, 3),
            "redis_commands": sum(window_calls.values()),
            "redis_commands_per_message": round(sum(window_calls.values()) / args.messages, 2),
            "redis_commandstats": window_calls,
            "redis_connect_commands": sum(connect_calls.values()),
            "redis_connect_commandstats": connect_calls,
            "redis_connected_clients": connected,
            "edge_redis_connections": edge_conns,
            "channel_subscribers": channel_subs,
            "loadgen_cpu_s": round(lg_cpu_2 - lg_cpu_1, 3),
            "connect_s": round(connect_s, 2),
            "edge_rss_before_connect_mb": round(rss_idle_kb / 1024, 1),
            "edge_rss_connected_mb": round(rss_connected_kb / 1024, 1),
            "edge_rss_kb_per_idle_viewer": round((rss_connected_kb - rss_idle_kb) / viewers, 2),
            "edge_core_budget": args.edge_core if cgroups else None,
            # Each serving process: its CPU over the window (at its budget when the budget is
            # what limits it), the time its cgroup spent throttled, the viewers it holds.
            "edge_process_cpu_s": [round(c, 3) for c in serving_cpu],
            "edge_process_cores": [round(c / window_s, 3) for c in serving_cpu],
            "edge_process_throttled_s": [round(t, 3) for t in throttled],
            "edge_process_connections": [connections.get(p, 0) for p in serving]
            if connections else [],
            "loadgen_cores": round((lg_cpu_2 - lg_cpu_1) / window_s, 3),
            "loadavg_window": [load_1[0], load_2[0]],
            **extra,
        }
    finally:
        if rss is not None:
            await rss.stop()
        try:
            await group.close(redis)
        finally:
            if budget is not None:
                budget.close()


# -- report --------------------------------------------------------------------------------

COLUMNS = [
    ("edge", lambda c: c["impl"]),
    ("V", lambda c: str(c["viewers"])),
    ("deliveries/s", lambda c: f"{c['deliveries_per_s']:.0f}"),
    ("p50 ms", lambda c: f"{c['latency_ms']['p50']:.2f}"),
    ("p99 ms", lambda c: f"{c['latency_ms']['p99']:.2f}"),
    ("max ms", lambda c: f"{c['latency_ms']['max']:.2f}"),
    ("edge CPU s /1000 deliv", lambda c: f"{c['edge_cpu_s_per_1000_deliveries']:.4f}"),
    ("edge CPU s", lambda c: f"{c['edge_cpu_s']:.2f}"),
    ("edge RSS peak MB", lambda c: f"{c['edge_rss_peak_mb']:.1f}"),
    ("Redis CPU s", lambda c: f"{c['redis_cpu_s']:.3f}"),
    ("Redis cmds/msg", lambda c: f"{c['redis_commands_per_message']:.2f}"),
    ("Redis clients", lambda c: str(c["redis_connected_clients"])),
    ("edge→Redis conns", lambda c: str(c["edge_redis_connections"])),
    ("channel subs", lambda c: str(c["channel_subscribers"])),
    ("loadgen CPU s", lambda c: f"{c['loadgen_cpu_s']:.2f}"),
    ("core budget", lambda c: f"{c['edge_core_budget']:g}" if c.get("edge_core_budget")
     else "-"),
    ("cores per edge proc", lambda c: per_process(c.get("edge_process_cores"))),
    ("viewers per edge proc", lambda c: per_process(c.get("edge_process_connections"), "{}")),
    ("load avg", lambda c: per_process(c.get("loadavg_window"), "{:.1f}")),
]

RATIOS = [
    ("edge→Redis conns", lambda c: c["edge_redis_connections"]),
    ("Redis clients", lambda c: c["redis_connected_clients"]),
    ("Redis CPU", lambda c: c["redis_cpu_s"]),
    ("edge CPU / delivery", lambda c: c["edge_cpu_s_per_1000_deliveries"]),
    ("latency p99", lambda c: c["latency_ms"]["p99"]),
]

# Against the Nchan peer, as broker/nchan: above 1, the broker's edge costs more.
NCHAN_RATIOS = [
    ("edge CPU / delivery", lambda c: c["edge_cpu_s_per_1000_deliveries"]),
    ("latency p99", lambda c: c["latency_ms"]["p99"]),
    ("Redis CPU", lambda c: c["redis_cpu_s"]),
    ("Redis cmds/msg", lambda c: c["redis_commands_per_message"]),
    ("edge RSS peak", lambda c: c["edge_rss_peak_mb"]),
]
NCHAN_TARGET = 3.0  # issue 6: the broker within 3x of Nchan's edge CPU per delivery...
NCHAN_TARGET_V = 1000  # ...on B1 at V=1000


def ratios(cells: list[dict[str, Any]], numerator: str = "naive", denominator: str = "broker",
           specs: list[Any] = RATIOS) -> list[dict[str, Any]]:
    by_key = {(c["impl"], c["viewers"]): c for c in cells}
    out = []
    for v in sorted({c["viewers"] for c in cells}):
        top, bottom = by_key.get((numerator, v)), by_key.get((denominator, v))
        if top is None or bottom is None:
            continue
        row: dict[str, Any] = {"viewers": v}
        for name, get in specs:
            b, n = get(bottom), get(top)
            row[name] = round(n / b, 2) if b else None
        out.append(row)
    return out


def ratio_table(label: str, specs: list[Any], rows: list[dict[str, Any]]) -> str:
    names = [name for name, _ in specs]
    return markdown_table(
        ["V", *[f"{label} {n}" for n in names]],
        [[str(r["viewers"]), *("n/a" if r[n] is None else f"{r[n]:.2f}" for n in names)]
         for r in rows],
    )


def nchan_verdict(nchan_rows: list[dict[str, Any]]) -> str:
    row = next((r for r in nchan_rows if r["viewers"] == NCHAN_TARGET_V), None)
    if row is None or row["edge CPU / delivery"] is None:
        return ""
    ratio = row["edge CPU / delivery"]
    verdict = "meets" if ratio <= NCHAN_TARGET else "misses"
    return (f"broker/nchan edge CPU per delivery at V={NCHAN_TARGET_V}: {ratio:.2f} "
            f"({verdict} the within-{NCHAN_TARGET:g}x target)")


def report(cells: list[dict[str, Any]], ratio_rows: list[dict[str, Any]],
           nchan_rows: list[dict[str, Any]] | None = None) -> str:
    parts = [columns_table(COLUMNS, cells)]
    if ratio_rows:
        parts.append(ratio_table("naive/broker", RATIOS, ratio_rows))
    if nchan_rows:
        parts.append(ratio_table("broker/nchan", NCHAN_RATIOS, nchan_rows))
        if verdict := nchan_verdict(nchan_rows):
            parts.append(verdict)
    return "\n\n".join(parts)


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    fig, ax = figure(figsize=(7, 4.5))
    colors = {"broker": "tab:blue", "naive": "tab:red", "nchan": "tab:green"}
    for impl in dict.fromkeys(c["impl"] for c in cells):
        mine = sorted((c for c in cells if c["impl"] == impl), key=lambda c: c["viewers"])
        if not mine:
            continue
        xs = [c["viewers"] for c in mine]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            ys = [c["latency_ms"][q] for c in mine]
            ax.plot(xs, ys, style, color=colors.get(impl, "tab:purple"), label=f"{impl} {q}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("viewers on one edge (V)")
    ax.set_ylabel("publish → receive latency (ms)")
    ax.set_title("B1 fan-out: one generation, 30 msg/s, one edge (2 shared cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "B1 fan-out",
        "params": {"viewers": args.viewer_counts, "impls": args.impl_list,
                   "messages": args.messages, "rate": args.rate, "size": args.size,
                   "edge_core": args.edge_core},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        if "nchan" in args.impl_list:
            nchan.find_installed()  # fail before any cell runs, saying how to install it
        for viewers in args.viewer_counts:
            runs = [(impl, p) for impl in args.impl_list
                    for p in (args.procs_list if impl == "broker" else [1])]
            for impl, procs in runs:
                print(f"# running {impl} V={viewers} edge processes={procs} ...",
                      file=sys.stderr, flush=True)
                cell = await run_cell(impl, viewers, args, procs)
                out["cells"].append(cell)
                print(f"#   {cell['deliveries_per_s']:.0f} deliveries/s, "
                      f"p99 {cell['latency_ms']['p99']:.2f} ms", file=sys.stderr, flush=True)
    except (BenchError, cpubudget.BudgetUnavailable) as e:
        out["failure"] = str(e)
        print(f"\nB1 FAILED: {e}", file=sys.stderr)
        status = 1
    out["ratios"] = ratios(out["cells"])
    out["ratios_nchan"] = ratios(out["cells"], "broker", "nchan", NCHAN_RATIOS)
    json_path = args.results / "b1.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        png_path = args.results / "b1_latency.png"
        plot(out["cells"], png_path)
        print(report(out["cells"], out["ratios"], out["ratios_nchan"]))
        print(f"\nresults: {json_path}, {png_path}")
    return status


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.edge_core:
        cpubudget.require(args.edge_core, "python -m bench.b1")
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
