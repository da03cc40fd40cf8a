"""Overload: G realistic answers offered at once to ONE worker allowed to run all G; every
generation must complete (the ones it left queued later), none may end ``worker_lost``.

The answers have the realistic shape of issue 17: 30 sentence messages at 5 per second each
(10 tokens per sentence at 50 tokens/s, 6 s per answer). For each G (a cell), on fresh
processes: a redis-server, the fake LLM (``bench.fastllm``), one worker (``python -m worker``
with ``BROKER_MAX_CONCURRENCY=G``: admission by ``max_concurrency`` alone would take them
all), and the monitor (``bench.livemon``, every live channel: token→publish latency of each
message and each generation's terminal event). The orchestrator creates the G generations at
once (``Store.create``, what ``POST /v1/generations`` does), waits for every terminal event
(or the budget), and reads the worker's own ``/metrics``: queue wait, admission waits, the
lease renewal interval.

    .venv/bin/python -m bench.overload                       # G = 200, 1000
    .venv/bin/python -m bench.overload --g 1000 --baseline-repo /work/main
                                                             # + the same cell on another
                                                             #   checkout's worker, same run

Prints a markdown table, writes ``bench/results/overload.json``. Exits 1 if a generation of
this checkout's worker did not complete exactly (a ``worker_lost``, a loss, a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.b5 import check_generations, create_all, key_of, read_monitor
from bench.cell import RESULTS, RssSampler, columns_table, machine
from bench.procs import (
    REPO,
    BenchError,
    Proc,
    ProcessGroup,
    child_env,
    start_fastllm,
    start_redis,
    start_worker,
)
from bench.support import cpu_seconds, free_port, percentile
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect

SCRIPTS = (protocol.PUBLISH_SCRIPT, protocol.CLAIM_SCRIPT, protocol.HEARTBEAT_SCRIPT,
           protocol.REAP_SCRIPT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--g", default="200,1000", help="comma-separated G")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per generation")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--sentence-tokens", default="10-10", help="tokens per sentence, LO-HI")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds for all G to end (0: 60 + G x answer seconds / 25)")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="also run each G on this checkout's worker (e.g. the main "
                             "branch), in the same run; its failures are reported, not fatal")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    args.g_list = [int(g) for g in args.g.split(",") if g.strip()]
    return args


def scrape(text: str) -> dict[str, float]:
    """The worker's /metrics as ``name{labels}`` -> value (histogram buckets by ``le``)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def bucket_quantile(metrics: dict[str, float], name: str, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` (None: no data)."""
    buckets = sorted(
        (float(key.split("le=")[1].rstrip("}")), count) for key, count in metrics.items()
        if key.startswith(f"{name}_bucket{{"))
    if not buckets or not buckets[-1][1]:
        return None
    wanted = q * buckets[-1][1]
    return next(le for le, count in buckets if count >= wanted)


async def run_cell(g: int, args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    group = ProcessGroup()
    rss: RssSampler | None = None
    redis = store_redis = None
    answer_s = args.tokens / args.rate
    budget = args.budget or 60 + g * answer_s / 25
    try:
        _, redis, redis_url = await start_redis(group)
        _llm, llm_url = await start_fastllm(
            group, rate=args.rate, tokens=args.tokens, sentence_tokens=args.sentence_tokens)
        metrics_port = free_port()
        worker = await start_worker(group, redis, redis_url, llm_url, concurrency=g, repo=repo,
                                    BROKER_WORKER_METRICS_PORT=str(metrics_port))
        rss = RssSampler(worker.pid)
        rss.start()
        for script in SCRIPTS:
            await redis.script_load(script)
        port = redis_url.rsplit(":", 1)[1].split("/")[0]
        out = group.log_dir / "livemon.json"
        monitor = await group.start(Proc("livemon", [
            sys.executable, "-m", "bench.livemon", "--redis-port", port,
            "--generations", str(g), "--out", str(out),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        await monitor.expect("ready", 30)

        settings = Settings(redis_url=redis_url)
        store_redis = connect(settings, "bench-orchestrator-store")
        store = Store(store_redis, settings)
        ids = [protocol.new_generation_id() for _ in range(g)]
        cpu_0 = cpu_seconds(worker.pid)
        t_create = time.time_ns()
        await create_all(store, ids)
        timed_out = False
        try:
            await monitor.expect("done", budget)
        except BenchError:
            timed_out = True
            await monitor.send("dump")
            with contextlib.suppress(BenchError):
                await monitor.expect("done", 10)
        window_s = (time.time_ns() - t_create) / 1e9
        cpu = cpu_seconds(worker.pid) - cpu_0
        await rss.stop()
        async with httpx.AsyncClient(timeout=30) as http:
            metrics = scrape((await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text)
            llm_stats = (await http.get(llm_url.removesuffix("/v1") + "/stats")).json()

        summary, latencies, _recv_ns, _tokens = read_monitor(out)
        terminals: dict[str, str] = summary["terminals"]
        completed = sum(1 for t in terminals.values() if t == "end:stop")
        lost = sum(1 for t in terminals.values() if t == "error:worker_lost")
        other = {t for t in terminals.values() if t not in ("end:stop", "error:worker_lost")}
        requested = sum(1 for k in (key_of(i) for i in ids) if k in llm_stats["records"])
        errors: list[str] = []
        if completed == g:
            errors, _, _ = await check_generations(store, ids, llm_stats["records"], args.tokens)
        errors += [f"live: {e}" for e in summary["errors"]]
        ordered = sorted(latencies)
        wait_count = metrics.get("broker_queue_wait_seconds_count", 0.0)
        return {
            "g": g,
            "worker": "this branch" if repo == REPO else str(repo),
            "completed": completed,
            "worker_lost": lost,
            "other_terminals": sorted(other),
            "not_ended": g - len(terminals),
            "timed_out": timed_out,
            "llm_requests": requested,
            "exact": completed == g and not errors,
            "errors": errors[:10],
            "window_s": round(window_s, 2),
            "latency_ms": {
                "p50": round(percentile(ordered, 50), 2) if ordered else None,
                "p99": round(percentile(ordered, 99), 2) if ordered else None,
                "max": round(ordered[-1], 2) if ordered else None,
            },
            "timed_messages": len(ordered),
            "worker_cpu_s": round(cpu, 2),
            "worker_cpu_us_per_token": round(cpu / (g * args.tokens) * 1e6, 1),
            "worker_rss_peak_mb": round(rss.peak_kb / 1024, 1),
            "queue_wait_s": {
                "count": int(wait_count),
                "mean": round(metrics["broker_queue_wait_seconds_sum"] / wait_count, 2)
                if wait_count else None,
                "p99_bucket": bucket_quantile(metrics, "broker_queue_wait_seconds", 0.99),
            },
            "admission_waits": int(metrics.get("broker_admission_waits_total", 0)),
            "lease_renewal_interval_s": {
                "count": int(metrics.get("broker_lease_renewal_interval_seconds_count", 0)),
                "max_bucket": bucket_quantile(
                    metrics, "broker_lease_renewal_interval_seconds", 1.0),
            },
            "workers_lost_metric": int(metrics.get("broker_workers_lost_total", 0)),
        }
    finally:
        if rss is not None:
            await rss.stop()
        await group.close(store_redis, redis)


def fmt(value: Any, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


COLUMNS = [
    ("G", lambda c: str(c["g"])),
    ("worker", lambda c: c["worker"]),
    ("completed", lambda c: f"{c['completed']} / {c['g']}"),
    ("worker_lost", lambda c: str(c["worker_lost"])),
    ("not ended", lambda c: str(c["not_ended"])),
    ("text exact", lambda c: "yes" if c["exact"] else "NO"),
    ("window s", lambda c: f"{c['window_s']:.1f}"),
    ("token→publish p50 ms", lambda c: fmt(c["latency_ms"]["p50"], ".1f")),
    ("p99 ms", lambda c: fmt(c["latency_ms"]["p99"], ".1f")),
    ("queue wait mean s", lambda c: fmt(c["queue_wait_s"]["mean"], ".2f")),
    ("queue wait p99 ≤ s", lambda c: fmt(c["queue_wait_s"]["p99_bucket"], "g")),
    ("admission waits", lambda c: str(c["admission_waits"])),
    ("renewal interval max ≤ s", lambda c: fmt(c["lease_renewal_interval_s"]["max_bucket"],
                                               "g")),
    ("worker µs/token", lambda c: f"{c['worker_cpu_us_per_token']:.1f}"),
]


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "overload",
        "params": {"g": args.g_list, "rate": args.rate, "tokens": args.tokens,
                   "sentence_tokens": args.sentence_tokens,
                   "baseline_repo": str(args.baseline_repo) if args.baseline_repo else None},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    repos = [REPO] + ([args.baseline_repo.resolve()] if args.baseline_repo else [])
    try:
        for g in args.g_list:
            for repo in repos:
                print(f"# overload G={g} on {repo} ...", file=sys.stderr, flush=True)
                cell = await run_cell(g, args, repo)
                out["cells"].append(cell)
                print(f"#   {cell['completed']}/{g} completed, {cell['worker_lost']} "
                      f"worker_lost, p99 {cell['latency_ms']['p99']} ms", file=sys.stderr,
                      flush=True)
                if repo == REPO and not cell["exact"]:
                    status = 1
                    out["failure"] = (f"G={g}: {cell['completed']}/{g} completed exactly, "
                                      f"{cell['worker_lost']} worker_lost: {cell['errors'][:3]}")
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nOVERLOAD FAILED: {e}", file=sys.stderr)
        status = 1
    (args.results / "overload.json").write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        print(columns_table(COLUMNS, out["cells"]))
    if "failure" in out:
        print(f"\nOVERLOAD FAILED: {out['failure']}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
