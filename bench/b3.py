"""B3 idle connections: V viewers connected to ONE edge and idle; the edge's memory per viewer,
broker against the naive baseline.

A B1 cell (``bench.b1.run_cell``: fresh redis-server, edge, publisher, load generators) with
one message: the edge's RSS is read before the viewers connect and once all of them are
connected and subscribed, idle; then one message and ``end`` are published and every viewer
must receive exactly those (so a connection that silently broke would fail the run).

    .venv/bin/python -m bench.b3 --viewers 5000

Prints a markdown table, writes ``bench/results/b3.json`` and ``bench/results/b3_memory.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench import nchan
from bench.b1 import IMPLS, run_cell
from bench.cell import RESULTS, columns_table, figure, machine, save_figure
from bench.procs import BenchError

TARGET_KB_PER_VIEWER = 16  # the benchmark issue's target for the broker's edge

COLUMNS = [
    ("edge", lambda c: c["impl"]),
    ("V", lambda c: str(c["viewers"])),
    ("connect s", lambda c: f"{c['connect_s']:.1f}"),
    ("edge RSS before MB", lambda c: f"{c['edge_rss_before_connect_mb']:.1f}"),
    ("edge RSS connected MB", lambda c: f"{c['edge_rss_connected_mb']:.1f}"),
    ("KB per idle viewer", lambda c: f"{c['edge_rss_kb_per_idle_viewer']:.1f}"),
    ("Redis clients", lambda c: str(c["redis_connected_clients"])),
    ("edge connect CPU s", lambda c: f"{c['edge_connect_cpu_s']:.2f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.b3", description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=5000, help="idle viewers on the edge")
    parser.add_argument("--impls", default=",".join(IMPLS), help="which edges to run")
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.impl_list = [i.strip() for i in args.impls.split(",") if i.strip()]
    # The cell's other knobs: one message, then end.
    args.messages, args.rate, args.size, args.loadgens, args.run_timeout = 1, 1.0, 100, 0, 0.0
    args.edge_core = 0.0  # idle viewers: no CPU budget
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": "B3 idle connections", "params": {
        "viewers": args.viewers, "impls": args.impl_list}, "machine": machine(), "cells": []}
    try:
        if "nchan" in args.impl_list:
            nchan.find_installed()  # fail before any cell runs, saying how to install it
        for impl in args.impl_list:
            print(f"# running {impl} V={args.viewers} ...", file=sys.stderr, flush=True)
            out["cells"].append(await run_cell(impl, args.viewers, args))
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nB3 FAILED: {e}", file=sys.stderr)
    cells = {c["impl"]: c for c in out["cells"]}
    if "broker" in cells and "naive" in cells:
        b, n = cells["broker"], cells["naive"]
        out["ratios"] = {
            "naive/broker KB per idle viewer": round(
                n["edge_rss_kb_per_idle_viewer"] / b["edge_rss_kb_per_idle_viewer"], 2),
            "naive/broker Redis clients": round(
                n["redis_connected_clients"] / b["redis_connected_clients"], 2),
        }
    if "broker" in cells and "nchan" in cells:
        # As broker/nchan (above 1: the broker's edge costs more); nchan's is its worker's RSS.
        b, n = cells["broker"], cells["nchan"]
        kb_nchan = n["edge_rss_kb_per_idle_viewer"]
        out.setdefault("ratios", {})["broker/nchan KB per idle viewer"] = (
            round(b["edge_rss_kb_per_idle_viewer"] / kb_nchan, 2) if kb_nchan > 0 else None)
    return out


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    fig, ax = figure(figsize=(6, 4))
    names = [c["impl"] for c in cells]
    ax.bar(names, [c["edge_rss_kb_per_idle_viewer"] for c in cells],
           color=["tab:blue" if n == "broker" else "tab:gray" for n in names])
    ax.axhline(TARGET_KB_PER_VIEWER, color="tab:red", linestyle="--",
               label=f"target {TARGET_KB_PER_VIEWER} KB")
    ax.set_ylabel("edge RSS per idle viewer (KB)")
    ax.set_title(f"B3: {cells[0]['viewers']} idle viewers on one edge")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    out = asyncio.run(run(args))
    (results / "b3.json").write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        print(columns_table(COLUMNS, out["cells"]))
        for name, value in out.get("ratios", {}).items():
            print(f"\n{name}: {value}")
        broker = next((c for c in out["cells"] if c["impl"] == "broker"), None)
        if broker is not None:
            kb = broker["edge_rss_kb_per_idle_viewer"]
            verdict = "meets" if kb <= TARGET_KB_PER_VIEWER else "misses"
            print(f"\nbroker: {kb:.1f} KB per idle viewer ({verdict} the "
                  f"{TARGET_KB_PER_VIEWER} KB target)")
        plot(out["cells"], results / "b3_memory.png")
        print(f"\nresults: {results / 'b3.json'}, {results / 'b3_memory.png'}")
    raise SystemExit(1 if "failure" in out else 0)


if __name__ == "__main__":
    main()
