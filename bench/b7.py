"""B7 the realistic traffic shape: G answers at once, 1-2 viewers each who connect, watch one
answer and leave, behind the real load balancer, beside Nchan in the same shape.

For each cell, on fresh processes: a redis-server, the edge under test (``python -m broker
edge``, ``--edge-procs`` processes sharing its port; or nginx + Nchan, one worker, Redis
storage, one channel per answer), HAProxy in front of it with the product's configuration
(``broker.tools.loadbalancer.haproxy_config``), the publisher (``bench.churn``: the shape's
G x rounds answers, M messages each at R/s, then ``end``; no worker: the edge is what is
measured) and 1-2 load generators (``bench.loadgen --churn``): each viewer connects through
HAProxy when its answer starts, checks exactly-once, in-order delivery of the answer to
``end`` and closes. Connection setup and teardown are inside the measured window, which
runs from the shape's start to the last viewer's ``end``.

    .venv/bin/python -m bench.b7                      # G=100 and 1000, broker and nchan
    .venv/bin/python -m bench.b7 --baseline-repo /work/main  # and the main branch's edge

With ``--baseline-repo``, each broker cell runs again on that checkout's edge (on this
interpreter and its dependencies), in the same run: before and after side by side with Nchan.

Prints markdown tables, writes ``bench/results/b7.json`` and ``bench/results/b7_cost.png``.
Exits 1 if any viewer lost, repeated or reordered an event, or failed to connect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench import cpubudget, nchan
from bench.cell import (
    RESULTS,
    VIEWERS_PER_LOADGEN,
    ConnectionSampler,
    Costs,
    RssSampler,
    collect,
    columns_table,
    figure,
    loadavg,
    machine,
    markdown_table,
    per_process,
    save_figure,
    serving_processes,
)
from bench.churn import Shape
from bench.procs import (
    REPO,
    BenchError,
    Proc,
    ProcessGroup,
    child_env,
    poll,
    start_edge,
    start_redis,
)
from bench.support import free_port
from broker.tools.loadbalancer import haproxy_config

IMPLS = ("broker", "nchan")
START_DELAY_S = 3.0  # from starting the load generators to the shape's start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b7", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--g", default="100,1000", help="comma-separated G (answers at once)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="broker and/or nchan")
    parser.add_argument("--edge-procs", default="1",
                        help="comma-separated broker edge process counts (broker edge "
                             "--edge-workers N); each runs a broker cell")
    cpubudget.add_option(parser)
    parser.add_argument("--rounds", type=int, default=2, help="answers per slot, in turn")
    parser.add_argument("--messages", type=int, default=30, help="messages per answer")
    parser.add_argument("--rate", type=float, default=5.0, help="messages/s per answer")
    parser.add_argument("--lead", type=float, default=0.3,
                        help="seconds from an answer's viewers connecting to its first message")
    parser.add_argument("--max-viewers", type=int, default=2,
                        help="answer k has 1 + k mod this many viewers")
    parser.add_argument("--size", type=int, default=100, help="characters per message")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="also run each broker cell on this checkout's edge (e.g. the main "
                             "branch), in the same run")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        args.g_list = [int(g) for g in args.g.split(",") if g.strip()]
        args.procs_list = [int(p) for p in args.edge_procs.split(",") if p.strip()]
    except ValueError:
        parser.error("--g and --edge-procs take integers, e.g. 100,1000")
    if not args.g_list or min(args.g_list) < 1 or not args.procs_list or min(args.procs_list) < 1:
        parser.error("--g and --edge-procs need values >= 1")
    args.impl_list = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impl_list or set(args.impl_list) - set(IMPLS):
        parser.error(f"--impls takes a subset of {','.join(IMPLS)}")
    if args.edge_core < 0:
        parser.error("--edge-core is a share of a core, > 0 (0: no budget)")
    return args


async def start_haproxy(group: ProcessGroup, backend: str, check_path: str) -> tuple[Proc, str]:
    """HAProxy with the product's configuration in front of ``backend``; its URL."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise BenchError("haproxy is not installed (apt-get install haproxy)")
    port = free_port()
    config = group.log_dir / "haproxy.cfg"
    config.write_text(haproxy_config([backend], port=port, check_path=check_path))
    # -dR: no SO_REUSEPORT, so a port taken meanwhile fails loudly instead of being shared.
    proc = await group.start(Proc("haproxy", [binary, "-f", str(config), "-db", "-dR"],
                                  log_dir=group.log_dir))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=2) as http:
        async def ready() -> bool:
            return (await http.get(check_path)).status_code == 200

        await poll(ready, 30, "haproxy", proc)
    return proc, url


class Measured(Proc):
    """A process the cell measures but did not start itself (a child of the edge); never
    started or stopped through this object."""

    def __init__(self, name: str, pid: int, log_dir: Path) -> None:
        super().__init__(name, [], log_dir=log_dir)
        self._pid = pid

    @property
    def pid(self) -> int:
        return self._pid


async def run_cell(impl: str, g: int, procs: int, args: argparse.Namespace,
                   repo: Path = REPO) -> dict[str, Any]:
    shape = Shape(g, args.rounds, args.messages, args.rate, args.lead, args.max_viewers)
    group = ProcessGroup()
    samplers: list[RssSampler] = []
    conns: ConnectionSampler | None = None
    budget = None
    redis = None
    try:
        _, redis, redis_url = await start_redis(group)
        if impl == "nchan":
            edge, edge_url = await nchan.start_nchan(group, redis_url, first_message="oldest")
            lb, lb_url = await start_haproxy(group, edge_url, nchan.STATUS_PATH)
        else:
            extra = {"BROKER_EDGE_WORKERS": str(procs)} if procs > 1 else {}
            edge, edge_url = await start_edge(group, impl, redis_url, repo=repo, **extra)
            lb, lb_url = await start_haproxy(group, edge_url, "/readyz")
        if args.edge_core and impl == "broker":
            budget = cpubudget.CpuBudget(args.edge_core)
        # nginx's worker; the broker edge and, with --edge-workers N, its N serving processes (the
        # supervisor costs ~nothing, it is counted too).
        pids, serving, cgroups = await serving_processes(edge, procs, redis, budget)
        for pid in pids:
            samplers.append(RssSampler(pid))
            samplers[-1].start()

        ids_file = group.log_dir / "generations.txt"
        publisher = await group.start(Proc("publisher", [
            sys.executable, "-m", "bench.churn", *shape.argv(), "--ids-file", str(ids_file),
            "--size", str(args.size),
            *(["--nchan-url", edge_url + nchan.PUBLISH_PATH] if impl == "nchan"
              else ["--redis-url", redis_url]),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        await publisher.expect("ready", 60 + shape.answers / 20)

        concurrent = g * (1 + args.max_viewers) / 2
        count = max(1, min(2, round(concurrent / VIEWERS_PER_LOADGEN)))
        start_ns = time.time_ns() + int(START_DELAY_S * 1e9)
        run_budget = shape.duration + 60
        lb_port = lb_url.rsplit(":", 1)[1]
        loadgens = [await group.start(Proc(f"loadgen{i}", [
            sys.executable, "-m", "bench.loadgen", "--churn", *shape.argv(),
            "--port", lb_port, "--gen-ids-file", str(ids_file), "--start-at-ns", str(start_ns),
            "--loadgens", str(count), "--loadgen-index", str(i),
            "--out", str(group.log_dir / f"loadgen{i}.json"),
            "--connect-timeout", "30", "--run-timeout", str(run_budget),
            *(["--seq-from-text"] if impl == "nchan" else []),
        ], env=child_env(), lines=True, log_dir=group.log_dir)) for i in range(count)]
        for lg in loadgens:
            await lg.expect("ready", START_DELAY_S)

        procs_of: dict[str, list[Proc]] = {
            "edge": [Measured("edge", p, group.log_dir) for p in pids],
            "lb": [lb], "publisher": [publisher], "loadgens": loadgens,
            **{f"serving{i}": [Measured(f"serving{i}", p, group.log_dir)]
               for i, p in enumerate(serving)},
        }
        if impl == "broker":
            conns = ConnectionSampler(serving, int(edge_url.rsplit(":", 1)[1]))
            conns.start()
        throttled_0 = [g.throttled_s() for g in cgroups]
        load_0 = loadavg()
        before = await Costs.take(redis, procs_of)
        late = (time.time_ns() - start_ns) / 1e9
        if late > 0:
            raise BenchError(f"the cell's start passed {late:.2f} s before its first snapshot")
        await publisher.send(f"go {start_ns}")
        _, _, lag_ms = await publisher.expect("published", run_budget)
        for lg in loadgens:
            await lg.expect("done", 30)
        costs = (await Costs.take(redis, procs_of)).since(before)
        throttled = [g.throttled_s() - t for g, t in zip(cgroups, throttled_0, strict=True)]
        load_1 = loadavg()
        for s in samplers:
            await s.stop()
        if conns is not None:
            await conns.stop()

        what = f"{label_of(impl, procs, repo)} G={g}"
        tail = "".join(p.tail() for p in group.procs
                       if p.name in ("broker-edge", "nchan-edge", "haproxy"))
        verdict = collect(group, loadgens, what, shape.deliveries, tail)
        window_s = (verdict.max_of("last_recv_ns") - start_ns) / 1e9
        deliveries = verdict.deliveries
        edge_cpu = costs.cpu["edge"]
        serving_cpu = [costs.cpu[f"serving{i}"] for i in range(len(serving))]
        return {
            "impl": impl,
            "repo": None if repo == REPO else str(repo),
            "generations": g,
            "edge_processes": procs,
            "answers": shape.answers,
            "viewers": shape.viewers,
            "viewers_at_once": concurrent,
            "deliveries": deliveries,
            "window_s": round(window_s, 3),
            "deliveries_per_s": round(deliveries / window_s, 1),
            "connects_per_s": round(shape.viewers / window_s, 1),
            "latency_ms": verdict.latency_ms(),
            "edge_cpu_s": edge_cpu,
            "edge_cpu_us_per_delivery": round(edge_cpu / deliveries * 1e6, 1),
            "edge_cores": round(edge_cpu / window_s, 3),
            "edge_rss_peak_mb": round(sum(s.peak_kb for s in samplers) / 1024, 1),
            "redis_cpu_s": costs.redis_cpu,
            "redis_cpu_us_per_delivery": round(costs.redis_cpu / deliveries * 1e6, 1),
            "redis_commands": costs.commands,
            "redis_commandstats": costs.calls,
            "lb_cpu_s": costs.cpu["lb"],
            "publisher_cpu_s": costs.cpu["publisher"],
            "publisher_max_lag_ms": float(lag_ms),
            "loadgen_cpu_s": costs.cpu["loadgens"],
            "loadgens": count,
            "loadgen_cores": round(costs.cpu["loadgens"] / window_s, 3),
            "edge_core_budget": args.edge_core if cgroups else None,
            # Each serving process: its CPU over the window (at its budget when the budget is
            # what limits it), the time its cgroup spent throttled, its mean connections.
            "edge_process_cpu_s": serving_cpu,
            "edge_process_cores": [round(c / window_s, 3) for c in serving_cpu],
            "edge_process_throttled_s": [round(t, 3) for t in throttled],
            "edge_process_connections": conns.mean() if conns is not None else [],
            "loadavg_window": [load_0[0], load_1[0]],
        }
    finally:
        for s in samplers:
            await s.stop()
        if conns is not None:
            await conns.stop()
        try:
            await group.close(redis)
        finally:
            if budget is not None:
                budget.close()


def label(c: dict[str, Any]) -> str:
    repo = c.get("repo")
    return label_of(c["impl"], c.get("edge_processes", 1), REPO if repo is None else Path(repo))


def label_of(impl: str, procs: int, repo: Path) -> str:
    """``broker``, ``broker x2`` (edge processes), ``broker @ /work/main`` (a baseline)."""
    if impl != "broker":
        return impl
    return "broker" + (f" x{procs}" if procs > 1 else "") + ("" if repo == REPO else f" @ {repo}")


COLUMNS = [
    ("edge", label),
    ("G", lambda c: str(c["generations"])),
    ("viewers (at once)", lambda c: f"{c['viewers']} ({c['viewers_at_once']:.0f})"),
    ("deliveries/s", lambda c: f"{c['deliveries_per_s']:.0f}"),
    ("connects/s", lambda c: f"{c['connects_per_s']:.0f}"),
    ("p50 ms", lambda c: f"{c['latency_ms']['p50']:.2f}"),
    ("p99 ms", lambda c: f"{c['latency_ms']['p99']:.2f}"),
    ("edge CPU µs/delivery", lambda c: f"{c['edge_cpu_us_per_delivery']:.1f}"),
    ("edge cores", lambda c: f"{c['edge_cores']:.2f}"),
    ("edge RSS peak MB", lambda c: f"{c['edge_rss_peak_mb']:.1f}"),
    ("Redis CPU s", lambda c: f"{c['redis_cpu_s']:.2f}"),
    ("HAProxy CPU s", lambda c: f"{c['lb_cpu_s']:.2f}"),
    ("publisher CPU s / lag ms", lambda c: f"{c['publisher_cpu_s']:.1f} / "
                                           f"{c['publisher_max_lag_ms']:.0f}"),
    ("loadgen CPU s", lambda c: f"{c['loadgen_cpu_s']:.1f}"),
    ("core budget", lambda c: f"{c['edge_core_budget']:g}" if c.get("edge_core_budget")
     else "-"),
    ("cores per edge proc", lambda c: per_process(c.get("edge_process_cores"))),
    ("conns per edge proc (mean)", lambda c: per_process(c.get("edge_process_connections"),
                                                         "{:.0f}")),
    ("load avg", lambda c: per_process(c.get("loadavg_window"), "{:.1f}")),
]


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """broker (one process; this branch's, and the baseline's) / nchan per G: above 1, the
    broker costs more."""
    rows = []
    for c in cells:
        if c["impl"] != "broker" or c["edge_processes"] != 1:
            continue
        peer = next((n for n in cells if n["impl"] == "nchan"
                     and n["generations"] == c["generations"]), None)
        if peer is None:
            continue
        rows.append({
            "generations": c["generations"],
            "edge": label(c),
            "edge CPU / delivery": round(c["edge_cpu_us_per_delivery"]
                                         / peer["edge_cpu_us_per_delivery"], 2),
            "latency p50": round(c["latency_ms"]["p50"] / peer["latency_ms"]["p50"], 2),
            "latency p99": round(c["latency_ms"]["p99"] / peer["latency_ms"]["p99"], 2),
            "edge RSS peak": round(c["edge_rss_peak_mb"] / peer["edge_rss_peak_mb"], 2),
            "Redis CPU": round(c["redis_cpu_s"] / peer["redis_cpu_s"], 2)
            if peer["redis_cpu_s"] else None,
        })
    return rows


def baseline_ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This branch's broker / the baseline's, per G and edge process count (same run)."""
    rows = []
    for c in cells:
        if c["impl"] != "broker" or c.get("repo") is not None:
            continue
        base = next((b for b in cells if b["impl"] == "broker" and b.get("repo") is not None
                     and b["generations"] == c["generations"]
                     and b["edge_processes"] == c["edge_processes"]), None)
        if base is None:
            continue
        rows.append({
            "generations": c["generations"],
            "edge processes": c["edge_processes"],
            "edge CPU / delivery": round(c["edge_cpu_us_per_delivery"]
                                         / base["edge_cpu_us_per_delivery"], 2),
            "latency p50": round(c["latency_ms"]["p50"] / base["latency_ms"]["p50"], 2),
            "latency p99": round(c["latency_ms"]["p99"] / base["latency_ms"]["p99"], 2),
            "edge RSS peak": round(c["edge_rss_peak_mb"] / base["edge_rss_peak_mb"], 2),
            "Redis CPU": round(c["redis_cpu_s"] / base["redis_cpu_s"], 2)
            if base["redis_cpu_s"] else None,
        })
    return rows


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = figure(1, 2, figsize=(10, 4))
    labels = [f"{label(c)}\nG={c['generations']}" for c in cells]
    xs = range(len(cells))
    colors = ["tab:green" if c["impl"] == "nchan" else "tab:gray" if c.get("repo")
              else "tab:blue" for c in cells]
    left.bar(xs, [c["edge_cpu_us_per_delivery"] for c in cells], color=colors)
    left.set_ylabel("edge CPU µs per delivery (setup + teardown included)")
    right.bar(xs, [c["latency_ms"]["p99"] for c in cells], color=colors)
    right.set_ylabel("publish → viewer p99 ms")
    for ax in (left, right):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("B7 realistic shape: G answers x 1-2 viewers, 5 msg/s, viewers come and go")
    save_figure(fig, path)


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "B7 realistic traffic shape",
        "params": {"g": args.g_list, "impls": args.impl_list, "edge_procs": args.procs_list,
                   "rounds": args.rounds, "messages": args.messages, "rate": args.rate,
                   "lead": args.lead, "max_viewers": args.max_viewers, "size": args.size,
                   "edge_core": args.edge_core,
                   "baseline_repo": str(args.baseline_repo) if args.baseline_repo else None},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        if "nchan" in args.impl_list:
            nchan.find_installed()  # fail before any cell runs, saying how to install it
        repos = [REPO] + ([args.baseline_repo.resolve()] if args.baseline_repo else [])
        for g in args.g_list:
            runs = [("broker", p, repo) for p in args.procs_list for repo in repos
                    if "broker" in args.impl_list]
            runs += [("nchan", 1, REPO)] if "nchan" in args.impl_list else []
            for impl, procs, repo in runs:
                print(f"# running {label_of(impl, procs, repo)} G={g} ...", file=sys.stderr,
                      flush=True)
                cell = await run_cell(impl, g, procs, args, repo)
                out["cells"].append(cell)
                print(f"#   {cell['deliveries_per_s']:.0f} deliveries/s, p99 "
                      f"{cell['latency_ms']['p99']:.2f} ms, edge "
                      f"{cell['edge_cpu_us_per_delivery']:.1f} µs/delivery",
                      file=sys.stderr, flush=True)
    except (BenchError, cpubudget.BudgetUnavailable) as e:
        out["failure"] = str(e)
        print(f"\nB7 FAILED: {e}", file=sys.stderr)
        status = 1
    out["ratios_nchan"] = ratios(out["cells"])
    out["ratios_baseline"] = baseline_ratios(out["cells"])
    json_path = args.results / "b7.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        png_path = args.results / "b7_cost.png"
        plot(out["cells"], png_path)
        print(columns_table(COLUMNS, out["cells"]))
        if out["ratios_nchan"]:
            keys = [k for k in out["ratios_nchan"][0] if k != "generations"]
            print("\nbroker / nchan (above 1: the broker costs more)\n")
            print(markdown_table(["G", *keys], [[str(r["generations"]), *(str(r[k]) for k in keys)]
                                                for r in out["ratios_nchan"]]))
        if out["ratios_baseline"]:
            keys = [k for k in out["ratios_baseline"][0] if k != "generations"]
            print(f"\nthis branch / {args.baseline_repo} (below 1: this branch costs less)\n")
            print(markdown_table(["G", *keys], [[str(r["generations"]), *(str(r[k]) for k in keys)]
                                                for r in out["ratios_baseline"]]))
        print(f"\nresults: {json_path}, {png_path}")
    return status


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.edge_core:
        cpubudget.require(args.edge_core, "python -m bench.b7")
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
