"""One chaos run: start the topology, warm it up, take the baseline, run the load and the fault
schedule together for the run's length, heal everything, let every viewer finish, wait out the
retention, check, report. ``python -m tests.chaos --help``."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.chaos import faults, report
from tests.chaos.checker import Bounds, Checker
from tests.chaos.load import Load
from tests.chaos.topology import TOPOLOGIES, Topology
from tests.support.api import metric

RESULTS = Path(__file__).parent / "results"

# The broker's settings for the run: defaults, but for the bounds a run must see pass in a
# minute (keepalive, drain, the LLM's idle bound, retention) and a quick EventSource retry.
SETTINGS = {
    "BROKER_KEEPALIVE_INTERVAL": "3",
    "BROKER_RETRY_MS": "500",
    "BROKER_LEASE_TTL": "5",
    "BROKER_DRAIN_TIMEOUT": "2",
    "BROKER_LLM_IDLE_TIMEOUT": "2",
    "BROKER_LLM_MAX_RETRIES": "1",
    "BROKER_SEND_TIMEOUT": "5",
    "BROKER_FLUSH_INTERVAL": "1.0",
    "BROKER_PRODUCER_LEASE": "5",
}
# Bytes of data (used_memory_dataset) Redis may keep over its baseline once every generation
# expired: the job streams' and consumer groups' bookkeeping, the scripts' cache.
REDIS_GROWTH_BOUND = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0,
                        help="length of the fault period (load and faults) [1]")
    parser.add_argument("--topology", choices=TOPOLOGIES, default="small")
    parser.add_argument("--seed", type=int, default=None, help="[random, printed]")
    parser.add_argument("--rate", type=float, default=1.5, help="generations per second [1.5]")
    parser.add_argument("--mean-gap", type=float, default=4.0,
                        help="mean seconds between fault starts [4]")
    parser.add_argument("--retention", type=float, default=60.0,
                        help="BROKER_RETENTION_TTL for the run, seconds [60]: longer than any "
                             "generation may wait queued through the faults (a worker down, "
                             "then the reaper's lease), else its keys expire first")
    parser.add_argument("--margin", type=float, default=2.0,
                        help="seconds added to every timing bound (a shared machine) [2]")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory [tests/chaos/results/<topology>-s<seed>-<time>]")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    if args.out is None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = RESULTS / f"{args.topology}-s{args.seed}-{stamp}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"chaos: topology {args.topology}, seed {args.seed}, {args.minutes} min; "
          f"results in {args.out}", flush=True)
    result = asyncio.run(run(args))
    print(report.summary(result), flush=True)
    return 1 if result["violations"] else 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = {**SETTINGS, "BROKER_RETENTION_TTL": str(args.retention)}
    bounds = Bounds(keepalive=float(settings["BROKER_KEEPALIVE_INTERVAL"]),
                    lease=float(settings["BROKER_LEASE_TTL"]),
                    retry=int(settings["BROKER_RETRY_MS"]) / 1000,
                    drain=float(settings["BROKER_DRAIN_TIMEOUT"]),
                    llm_idle=float(settings["BROKER_LLM_IDLE_TIMEOUT"]), margin=args.margin)
    duration = args.minutes * 60
    schedule = faults.plan(args.seed, args.topology, duration, args.mean_gap)
    (args.out / "schedule.json").write_text(json.dumps(
        [{"at": p.at, "kind": p.kind, **p.params} for p in schedule], indent=1))
    topo = await asyncio.to_thread(Topology(args.topology, args.out, settings).start)
    admin = topo.admin()
    try:
        baseline = await measure(topo)
        load = Load(args.seed, topo.entry_url, admin, retry_s=bounds.retry, rate=args.rate)
        scheduler = faults.Scheduler(topo, load, bounds.lease, bounds.drain)
        t0 = time.monotonic()
        until = t0 + duration
        await asyncio.gather(load.run(until), scheduler.run(schedule, t0, until))
        faults_over = time.monotonic()
        await scheduler.heal_all()
        healed_at = time.monotonic()
        # Every generation ends within a lease (its worker lost), the drain, the LLM's idle
        # bound, a late joiner's delay and the margins; viewers are given that long.
        settle = bounds.lease * 2 + bounds.drain + bounds.llm_idle + 8 + 10 * args.margin
        await load.drain(settle)
        drained_at = time.monotonic()
        gone_after = await wait_keys_gone(admin, args.retention + 10 + args.margin)
        after = await measure(topo)
        checker = Checker(load.generations, scheduler.timeline, bounds, t0)
        violations = checker.check()
        memory_violations = memory_checks(baseline, after, gone_after)
        result: dict[str, Any] = {
            "topology": args.topology, "seed": args.seed, "minutes": args.minutes,
            "rate": args.rate, "mean_gap": args.mean_gap, "settings": settings,
            "bounds": {"quiet_s": bounds.quiet, "after_fault_s": bounds.after_fault,
                       "margin_s": args.margin},
            "command": f"bash scripts/chaos --topology {args.topology} --seed {args.seed} "
                       f"--minutes {args.minutes}",
            "phases_s": {"faults": round(faults_over - t0, 1),
                         "heal": round(healed_at - faults_over, 1),
                         "drain": round(drained_at - healed_at, 1),
                         "retention_wait": None if gone_after is None else round(gone_after, 1)},
            "faults": [f.to_json(t0) for f in scheduler.timeline],
            "faults_skipped": scheduler.skipped,
            "generations": len(load.generations),
            "created": sum(1 for g in load.generations if g.gen_id),
            "create_failed": [{"generation": g.label, "error": g.create_error}
                              for g in load.generations if not g.gen_id],
            "viewers": sum(len(g.viewers) for g in load.generations),
            "reconnects": sum(max(0, v.connects - 1) for g in load.generations
                              for v in g.viewers),
            "deliveries": checker.deliveries,
            "outcomes": checker.outcomes,
            "viewer_outcomes": checker.viewer_outcomes,
            "max_quiet_s": round(checker.max_quiet, 3),
            "recovery": report.recovery(load.generations, scheduler.timeline),
            "memory": {"before": baseline, "after": after},
            "violations": [v.to_json() for v in violations] + memory_violations,
        }
        result["recovery_s"] = report.percentiles(result["recovery"])
        report.write(args.out, result)
        (args.out / "generations.json").write_text(json.dumps(
            [g.to_json(t0) for g in load.generations], indent=1))
        return result
    finally:
        await admin.aclose()
        await asyncio.to_thread(topo.stop)


async def measure(topo: Topology) -> dict[str, Any]:
    """Redis memory and keys, each edge's and worker's RSS, the edges' live subscriptions."""
    out: dict[str, Any] = await asyncio.to_thread(topo.redis_memory)
    out["rss_kb"] = {s.name: s.rss_kb() for s in [*topo.edges, *topo.workers]}
    out["starts"] = {s.name: s.starts for s in [*topo.edges, *topo.workers]}
    subscriptions = 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        for edge in topo.edges:
            try:
                text = (await http.get(edge.url + "/metrics")).text
                subscriptions += metric(text, "broker_live_subscriptions")
            except httpx.HTTPError:
                pass
    out["live_subscriptions"] = subscriptions
    return out


async def wait_keys_gone(admin: Any, within: float) -> float | None:
    """Seconds until no generation key is left in Redis (retention), or None."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            left = [k async for k in admin.scan_iter(match="{gen:*", count=1000)]
            if not left:
                return time.monotonic() - started
        except Exception:  # a node may still be coming back: try again
            pass
        await asyncio.sleep(0.5)
    return None


def memory_checks(before: dict[str, Any], after: dict[str, Any],
                  gone_after: float | None) -> list[dict[str, Any]]:
    out = []

    def fail(kind: str, detail: str) -> None:
        out.append({"kind": kind, "generation": "", "viewer": "", "detail": detail,
                    "timeline": []})

    if gone_after is None:
        fail("retention", "generation keys were still in Redis after the retention")
    if after["live_subscriptions"]:
        fail("subscriptions", f"{after['live_subscriptions']:.0f} live subscriptions left "
             "on the edges with no viewer")
    growth = after["used_memory_dataset"] - before["used_memory_dataset"]
    if growth > REDIS_GROWTH_BOUND:
        fail("redis_memory", f"Redis used_memory_dataset {before['used_memory_dataset']} -> "
             f"{after['used_memory_dataset']} bytes after retention")
    return out


if __name__ == "__main__":
    sys.exit(main())
