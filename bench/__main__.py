"""Run every benchmark scenario, one after the other, then summarise the targets.

    .venv/bin/python -m bench                 # everything (~17 minutes on 2 cores)
    .venv/bin/python -m bench --only b1,b4    # some scenarios
    .venv/bin/python -m bench --quick         # small sizes: proves the harness, not the numbers

Each scenario runs as its own process (``python -m bench.<name>``) with the sizes the
benchmark issue asks for; its markdown goes to ``bench/results/<name>.md`` and its JSON and
plots next to it. Then ``bench/results/summary.md`` (also printed) holds the figures the
targets are about and whether each is met, read from those JSON files. Exits 1 if any
scenario failed (a correctness check included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cell import RESULTS, markdown_table

# name -> (full arguments, quick arguments)
SCENARIOS: dict[str, tuple[list[str], list[str]]] = {
    "b1": (["--viewers", "1,100,1000,3000", "--edge-procs", "1,2"],
           ["--viewers", "1,50", "--messages", "30"]),
    "b2": ([], ["--cells", "20x3,20x6", "--messages", "5"]),
    "b3": (["--viewers", "5000"], ["--viewers", "200"]),
    "b4": ([], ["--viewers", "100", "--log", "400", "--live", "10"]),
    "b5": ([], ["--g", "10", "--tokens", "60", "--refine", "0"]),
    "direct": ([], ["--generations", "4", "--tokens", "40"]),
    "b6": ([], ["--rates", "100", "--answers", "emoji,cjk", "--repeat", "1"]),
    "b8": ([], ["--messages", "1500", "--send-timeout", "2"]),
    "b7": (["--edge-procs", "1,2"],
           ["--g", "20", "--rounds", "2", "--messages", "10", "--impls", "broker",
            "--edge-procs", "1,2"]),
    "producers": ([], ["--producers", "4", "--batches", "20", "--generations", "4",
                       "--tokens", "40"]),
    "overload": ([], ["--g", "20", "--tokens", "30"]),
    "create": ([], ["--generations", "20", "--warmup", "2"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated scenarios to run")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to check the harness end to end in a few minutes")
    parser.add_argument("--summary-only", action="store_true",
                        help="don't run anything: summarise the results already there")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(args.names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    return args


def run_scenario(name: str, args: argparse.Namespace) -> bool:
    full, quick = SCENARIOS[name]
    argv = [sys.executable, "-m", f"bench.{name}", *(quick if args.quick else full),
            "--results", str(args.results)]
    print(f"\n## {name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    (args.results / f"{name}.md").write_text(done.stdout)
    print(done.stdout, flush=True)
    print(f"# {name}: exit {done.returncode} after {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    return done.returncode == 0


# -- the summary: each target, read from the scenarios' JSON ---------------------------------


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cell(data: dict[str, Any] | None, **match: Any) -> dict[str, Any] | None:
    for c in (data or {}).get("cells", []):
        if all(c.get(k) == v for k, v in match.items()):
            return c
    return None


Row = tuple[str, str, str, str]  # target, measured, verdict, note


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def b1_rows(results: Path) -> list[Row]:
    data = load(results, "b1")
    c = cell(data, impl="broker", viewers=1000)
    if c is None:
        return [("B1 V=1000", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    per_cpu_s = 1000 / c["edge_cpu_s_per_1000_deliveries"]
    rows: list[Row] = [
        ("B1 V=1000: zero loss", f"{c['deliveries']} deliveries, all in order", verdict(True), ""),
        ("B1 V=1000: p99 ≤ 50 ms", f"{c['latency_ms']['p99']:.1f} ms",
         verdict(c["latency_ms"]["p99"] <= 50), f"p50 {c['latency_ms']['p50']:.1f} ms"),
        ("B1 V=1000: ≥ 60,000 deliveries per edge CPU-s", f"{per_cpu_s:,.0f}",
         verdict(per_cpu_s >= 60_000), f"{c['edge_cpu_s_per_1000_deliveries']:.4f} s/1000"),
    ]
    nchan_row = next((r for r in data.get("ratios_nchan", []) if r["viewers"] == 1000), None)
    if nchan_row is not None and nchan_row.get("edge CPU / delivery") is not None:
        ratio = nchan_row["edge CPU / delivery"]
        rows.append(("B1 V=1000: within 3x of Nchan's CPU per delivery", f"{ratio:.2f}x",
                     verdict(ratio <= 3), f"p99 broker/nchan {nchan_row['latency p99']:.2f}"))
    rows += scaling_rows("B1", [c for c in data["cells"] if c["impl"].startswith("broker")],
                         "viewers", "V")
    naive = next((r for r in data.get("ratios", []) if r["viewers"] == 1000), None)
    if naive is not None:
        rows.append(("B1 V=1000: naive/broker (no target)",
                     f"Redis conns {naive['edge→Redis conns']}x, Redis CPU {naive['Redis CPU']}x",
                     "", f"edge CPU/delivery {naive['edge CPU / delivery']}x, "
                         f"p99 {naive['latency p99']}x"))
    return rows


SCALING_TARGET = 1.7  # deliveries per wall-second, 2 edge processes over 1, at saturation


def scaling_rows(name: str, cells: list[dict[str, Any]], key: str, label: str) -> list[Row]:
    """1 vs 2 edge processes at the largest load both ran: the target is about saturation, so
    it is judged where one process could not carry the offered load (its deliveries/s below
    the other's, or its edge cores near 1); elsewhere the figures are shown without a verdict."""
    ones = {c[key]: c for c in cells if c.get("edge_processes", 1) == 1}
    twos = {c[key]: c for c in cells if c.get("edge_processes", 1) == 2}
    common = sorted(set(ones) & set(twos))
    if not common:
        return []
    size = common[-1]
    one, two = ones[size], twos[size]
    ratio = two["deliveries_per_s"] / one["deliveries_per_s"]
    saturated = ratio > 1.05
    return [(f"{name} {label}={size}: 2 edge processes ≥ {SCALING_TARGET}x the deliveries per "
             "wall-second of 1 at saturation",
             f"{two['deliveries_per_s']:.0f} vs {one['deliveries_per_s']:.0f} ({ratio:.2f}x)",
             verdict(ratio >= SCALING_TARGET) if saturated else "n/a (1 process kept up)",
             f"p99 {two['latency_ms']['p99']:.1f} vs {one['latency_ms']['p99']:.1f} ms"
             + (f", {budget:g} core per process (--edge-core)"
                if (budget := one.get("edge_core_budget")) else ""))]


def b2_rows(results: Path) -> list[Row]:
    data = load(results, "b2")
    cells = [c for c in (data or {}).get("cells", []) if c["impl"] == "broker"]
    if not cells:
        return [("B2", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    per_msg = [c["redis_commands_per_message"] for c in cells]
    trips = [c["publish_round_trips_per_message"] for c in cells]
    spread = (max(per_msg) - min(per_msg)) / min(per_msg)
    shown = ", ".join(f"{c['generations']}x{c['viewers_per_generation']}: "
                      f"{c['redis_commands_per_message']:.2f}" for c in cells)
    return [
        ("B2: Redis commands per message constant in V", shown, verdict(spread <= 0.05),
         f"spread {spread:.1%}"),
        ("B2: worker publish = 1 round trip", ", ".join(f"{t:.2f}" for t in trips),
         verdict(all(t == 1.0 for t in trips)), "EVALSHA calls per published event"),
    ]


def b3_rows(results: Path) -> list[Row]:
    data = load(results, "b3")
    c = cell(data, impl="broker")
    if c is None:
        return [("B3", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    kb = c["edge_rss_kb_per_idle_viewer"]
    others = ", ".join(f"{o['impl']} {o['edge_rss_kb_per_idle_viewer']:.1f} KB"
                       for o in data["cells"] if o["impl"] != "broker")
    return [(f"B3: ≤ 16 KB edge RSS per idle viewer (V={c['viewers']})", f"{kb:.1f} KB",
             verdict(kb <= 16), others)]


def b4_rows(results: Path) -> list[Row]:
    data = load(results, "b4")
    c = cell(data)
    if c is None:
        return [("B4", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    return [(f"B4: all {c['viewers']} live again within 2 s", f"{c['all_live_s']:.2f} s",
             verdict(c["all_live_s"] <= 2), f"{c['storm_redis_commands']} Redis commands")]


def b5_rows(results: Path) -> list[Row]:
    data = load(results, "b5")
    if not data or not data.get("cells"):
        return [("B5", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    largest = data.get("largest_g_within_target")
    c = cell(data, g=largest) if largest else None
    measured = f"G = {largest}" if largest else "none"
    note = (f"{c['worker_cpu_us_per_token']:.0f} µs worker CPU per token, "
            f"{c['steady_tokens_per_s']:.0f} tokens/s" if c else "")
    rows: list[Row] = [("B5: largest G before token→publish p99 > 50 ms (no target)",
                        measured, "" if c else "n/a", note)]
    at_50 = cell(data, g=50)
    if at_50 is not None:
        us = at_50["worker_cpu_us_per_token"]
        rows.append(("B5: worker CPU ≤ 60 µs per token at G = 50", f"{us:.1f} µs",
                     verdict(us <= 60), f"p99 {at_50['latency_ms']['p99']:.1f} ms"))
    return rows


def direct_rows(results: Path) -> list[Row]:
    data = load(results, "direct")
    if not data or "comparison" not in data:
        return [("direct", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    rows = {(r["metric"], r["q"]): r for r in data["comparison"]}
    out: list[Row] = []
    for metric in ("time-to-first-text", "time-to-first-sentence", "per-message latency"):
        p50, p99 = rows[metric, "p50"], rows[metric, "p99"]
        out.append((f"direct: what the broker adds to {metric} (no target)",
                    f"p50 {p50['broker_minus_direct_ms']:+.1f} ms, "
                    f"p99 {p99['broker_minus_direct_ms']:+.1f} ms", "",
                    f"broker p50 {p50['broker_ms']:.1f} ms vs direct {p50['direct_ms']:.1f} ms"))
    return out


def b6_rows(results: Path) -> list[Row]:
    data = load(results, "b6")
    cells = (data or {}).get("cells", [])
    if not cells:
        return [("B6", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    v = data["verdicts"]
    bound_ms = 1000 * data["settings"]["flush_interval"]
    in_range = [c for c in cells if 20 <= c["rate"] <= 100]
    longest = max(cells, key=lambda c: c["wait_ms"]["max"])
    return [
        ("B6: ≥ 95 % of messages after the first text end on a sentence/paragraph/block "
         "end at 20-100 tokens/s",
         ", ".join(f"{c['rate']:g}: {100 * (c['share_on_end_after_first'] or 0):.1f} %"
                   for c in in_range) or "no cell in range", verdict(v["share"]),
         "all messages, the first texts included: " + ", ".join(
             f"{c['rate']:g}: {100 * c['share_on_end']:.1f} %" for c in in_range)),
        ("B6: first text ≤ direct + 30 ms (POST → first text vs SDK → first token, p50)",
         ", ".join(f"{c['rate']:g}: {c['ttft_over_direct_p50_ms']:+.1f} ms" for c in cells),
         verdict(v["first_text"]),
         "first text after the LLM's first token p50: " + ", ".join(
             f"{c['first_text_after_llm_ms']['p50']:.1f}" for c in cells) + " ms"),
        (f"B6: no text waits beyond the bound ({bound_ms:.0f} ms at the worker)",
         f"longest {longest['wait_ms']['max']:.0f} ms (at {longest['rate']:g} tokens/s)",
         verdict(v["bound"]), "LLM send → viewer receive; allowance 50 ms for the path"),
    ]


def b8_rows(results: Path) -> list[Row]:
    data = load(results, "b8")
    c = cell(data)
    if c is None:
        return [("B8", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    return [("B8: a slow viewer costs the edge no backlog (no target)",
             f"RSS +{c['edge_rss_growth_at_close_mb']:.1f} MB while "
             f"{c['streamed_at_close_mb']:.1f} MB streamed past it", "",
             f"peak +{c['edge_rss_peak_growth_mb']:.1f} MB with its resume; fast viewers p99 "
             f"{c['fast_latency_ms']['p99']:.1f} ms, max {c['fast_latency_ms']['max']:.1f} ms")]


def b7_rows(results: Path) -> list[Row]:
    data = load(results, "b7")
    cells = (data or {}).get("cells", [])
    if not cells:
        return [("B7", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    rows: list[Row] = []
    for r in data.get("ratios_nchan", []):
        g = r["generations"]
        broker = cell(data, impl="broker", generations=g, edge_processes=1) or {}
        peer = cell(data, impl="nchan", generations=g) or {}
        rows.append((f"B7 G={g}: edge CPU per delivery ≤ Nchan's",
                     f"{broker['edge_cpu_us_per_delivery']:.1f} µs vs "
                     f"{peer['edge_cpu_us_per_delivery']:.1f} µs ({r['edge CPU / delivery']}x)",
                     verdict(r["edge CPU / delivery"] <= 1),
                     f"p99 {broker['latency_ms']['p99']:.1f} vs {peer['latency_ms']['p99']:.1f}"
                     f" ms; RSS {broker['edge_rss_peak_mb']:.0f} vs "
                     f"{peer['edge_rss_peak_mb']:.0f} MB; Redis CPU {r['Redis CPU']}x"))
    rows += scaling_rows("B7", [c for c in cells if c["impl"] == "broker"], "generations", "G")
    if not rows:
        rows.append(("B7", f"{len(cells)} cells, no Nchan cell to compare with", "n/a", ""))
    return rows


def overload_rows(results: Path) -> list[Row]:
    data = load(results, "overload")
    cells = [c for c in (data or {}).get("cells", []) if c["worker"] == "this branch"]
    if not cells:
        return [("overload", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    rows: list[Row] = []
    for c in cells:
        ok = c["exact"] and c["worker_lost"] == 0 and c["completed"] == c["g"]
        rows.append((
            f"overload G={c['g']} on one worker: every generation completes, zero worker_lost",
            f"{c['completed']}/{c['g']}, {c['worker_lost']} worker_lost", verdict(ok),
            f"queue wait mean {c['queue_wait_s']['mean']} s; token→publish p99 "
            f"{c['latency_ms']['p99']} ms"))
    c200 = next((c for c in cells if c["g"] == 200), None)
    if c200 is not None and c200["latency_ms"]["p99"] is not None:
        p99 = c200["latency_ms"]["p99"]
        rows.append(("one worker, G=200 realistic answers: token→publish p99 ≤ 100 ms",
                     f"{p99:.1f} ms", verdict(p99 <= 100),
                     f"p50 {c200['latency_ms']['p50']} ms, {c200['worker_cpu_us_per_token']} "
                     "µs/token"))
    return rows


def create_rows(results: Path) -> list[Row]:
    data = load(results, "create")
    c = cell(data, cell="broker")
    if c is None:
        return [("create", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    sdk = next((x for x in data["cells"] if x["cell"].startswith("sdk")), None)
    return [("create: ≤ 2 ms CPU per generation (edge + worker)",
             f"{c['cpu_ms_per_generation']:.2f} ms", verdict(c["cpu_ms_per_generation"] <= 2),
             f"edge {c['edge_cpu_ms_per_generation']:.2f}, worker "
             f"{c['worker_cpu_ms_per_generation']:.2f} ms"
             + (f"; the SDK alone {sdk['cpu_ms_per_generation']:.2f} ms" if sdk else ""))]


def producers_rows(results: Path) -> list[Row]:
    data = load(results, "producers")
    if not data or "side_by_side" not in data:
        return [("producers", "not run", "n/a", (data or {}).get("failure", "")[:80])]
    rows: list[Row] = [
        (f"producers: HTTP appends of {c['batch_size']} event(s) (no target)",
         f"{c['events_per_edge_cpu_s']:,.0f} events per edge CPU-s", "",
         f"{c['events_per_s']:,.0f} events/s from {c['producers']} producers, "
         f"{c['edge_cpu_us_per_append']:.0f} µs edge CPU per append")
        for c in data["http"]]
    side = data["side_by_side"]
    rows.append(("producers: Python direct producer vs the worker, same answers (no target)",
                 f"{side['direct producer']['cpu_us_per_event']:.0f} vs "
                 f"{side['worker']['cpu_us_per_event']:.0f} µs CPU per event", "",
                 f"{side['ratio']['direct_over_worker_cpu']}x the worker's CPU; per token "
                 f"{side['direct producer']['cpu_us_per_token']:.0f} vs "
                 f"{side['worker']['cpu_us_per_token']:.0f} µs"))
    return rows


SUMMARIES: dict[str, Callable[[Path], list[Row]]] = {
    "b1": b1_rows, "b2": b2_rows, "b3": b3_rows, "b4": b4_rows, "b5": b5_rows,
    "direct": direct_rows, "b6": b6_rows, "b7": b7_rows, "b8": b8_rows,
    "producers": producers_rows, "overload": overload_rows, "create": create_rows,
}


def summary(results: Path) -> str:
    rows = [row for rows_of in SUMMARIES.values() for row in rows_of(results)]
    return "# Benchmark summary\n\n" + markdown_table(
        ["target", "measured", "verdict", "note"], [list(r) for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summary_only:
        for name in args.names:
            if not run_scenario(name, args):
                failed.append(name)
    text = summary(args.results)
    (args.results / "summary.md").write_text(text)
    print("\n" + text)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
