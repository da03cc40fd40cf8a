"""B5 worker: ONE worker process, G concurrent generations from a fast fake LLM at 50 tokens/s
each; the largest G whose token→publish latency p99 stays within 50 ms, and CPU per token.

For each G (a "cell"), on fresh processes: a redis-server, the fake LLM (``bench.fastllm``),
one worker (``python -m worker``, ``BROKER_MAX_CONCURRENCY`` >= G, everything else default)
and the monitor (``bench.livemon``: PSUBSCRIBE to every live channel, times each message).
The orchestrator creates the G generations at once with ``Store.create`` (what the edge's
``POST /v1/generations`` does, without the HTTP: B5 measures the worker, not the edge), waits
for every terminal event, then checks each generation's log and text in Redis against what the
fake LLM sent. The sweep doubles G from ``--start-g`` and stops after the first G whose p99
passes ``--target-ms`` (or at ``--max-g``).

    .venv/bin/python -m bench.b5                 # G = 25, 50, 100, ... until p99 > 50 ms
    .venv/bin/python -m bench.b5 --g 100,200     # just these

Prints a markdown table, writes ``bench/results/b5.json`` and ``bench/results/b5_latency.png``.
Exits 1 if any generation's published text differs from what the LLM sent (a loss, a
duplicate), or any generation did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import httpx

from bench.cell import (
    RESULTS,
    RssSampler,
    columns_table,
    figure,
    machine,
    save_figure,
)
from bench.procs import (
    REPO,
    WORKER_CLIENT_PREFIX,
    BenchError,
    Proc,
    ProcessGroup,
    child_env,
    start_fastllm,
    start_redis,
    start_worker,
)
from bench.support import calls_delta, command_calls, cpu_seconds, percentile, redis_cpu
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect

SCRIPTS = (protocol.PUBLISH_SCRIPT, protocol.CLAIM_SCRIPT, protocol.HEARTBEAT_SCRIPT,
           protocol.CANCEL_SCRIPT, protocol.REAP_SCRIPT, protocol.QUEUE_QUOTA_SCRIPT)
# What Store.create sends per generation (a MULTI/EXEC of HSET + PEXPIRE, then XADD): the
# orchestrator's own commands, taken out of the window's counts.
CREATE_COMMANDS = ("multi", "hset", "pexpire", "exec", "xadd")
CHECK_BATCH = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.b5", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--g", default="",
                        help="comma-separated G to run (instead of the doubling sweep)")
    parser.add_argument("--start-g", type=int, default=25, help="first G of the sweep")
    parser.add_argument("--max-g", type=int, default=1600, help="last G the sweep may reach")
    parser.add_argument("--target-ms", type=float, default=50.0,
                        help="the sweep stops after the first G whose p99 passes this")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per generation")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--sentence-tokens", default="6-10",
                        help="tokens per sentence, LO-HI")
    parser.add_argument("--run-timeout", type=float, default=0.0,
                        help="seconds for all G generations to finish (0: 60 + 4 x the "
                             "answer's duration)")
    parser.add_argument("--refine", type=int, default=2,
                        help="after the sweep, bisect this many times between the last G "
                             "within the target and the first past it")
    parser.add_argument("--roundtrip-g", type=int, default=4,
                        help="G of the calibration cell run first under Redis MONITOR, to "
                             "count the worker's round trips per message (0: skip it)")
    parser.add_argument("--worker-repo", type=Path, default=REPO,
                        help="the checkout whose worker runs (another one: a baseline, e.g. "
                             "the main branch, to compare with in the same session)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    args.worker_repo = args.worker_repo.resolve()
    if args.g:
        try:
            args.g_list = [int(g) for g in args.g.split(",") if g.strip()]
        except ValueError:
            parser.error("--g takes integers, e.g. 100,200")
        args.sweep = False
    else:
        args.g_list, g = [], args.start_g
        while g <= args.max_g:
            args.g_list.append(g)
            g *= 2
        args.sweep = True
    if not args.g_list or min(args.g_list) < 1:
        parser.error("need at least one G >= 1")
    return args


# -- one cell ------------------------------------------------------------------------------


def key_of(gen_id: str) -> str:
    """The user message of a generation: the fake LLM keys its records by it."""
    return f"b5 {gen_id}"


async def create_all(store: Store, ids: list[str]) -> None:
    async def create(gen_id: str) -> None:
        request = {"model": "fastllm", "messages": [{"role": "user", "content": key_of(gen_id)}]}
        await store.create(gen_id, request, "fastllm")

    await asyncio.gather(*(create(gen_id) for gen_id in ids))


async def check_generations(
    store: Store, ids: list[str], records: dict[str, Any], tokens: int
) -> tuple[list[str], int, int]:
    """Each generation's log and text against the fake LLM's record of what it sent.
    Returns (errors, messages in the logs, events in the logs)."""
    errors: list[str] = []
    messages = events = 0
    for start in range(0, len(ids), CHECK_BATCH):
        batch = ids[start : start + CHECK_BATCH]
        async with store.redis.pipeline(transaction=False) as pipe:
            for gen_id in batch:
                pipe.xrange(protocol.log_key(gen_id))
                pipe.get(protocol.text_key(gen_id))
                pipe.hgetall(protocol.meta_key(gen_id))
            replies = await pipe.execute()
        for i, gen_id in enumerate(batch):
            entries, text_raw, meta_raw = replies[3 * i : 3 * i + 3]
            problem = check_one(gen_id, entries, text_raw, meta_raw,
                                records.get(key_of(gen_id)), tokens)
            if problem:
                errors.append(f"{gen_id}: {problem}")
            messages += max(0, len(entries) - 1)
            events += len(entries)
    return errors, messages, events


def check_one(gen_id: str, entries: list[Any], text_raw: bytes | None, meta_raw: dict[Any, Any],
              record: dict[str, Any] | None, tokens: int) -> str | None:
    if record is None:
        return "the fake LLM never got its request"
    if record.get("requests") != 1 or record.get("completed") != 1:
        return f"the fake LLM served it {record.get('requests')}x, completed {record}"
    if record.get("tokens") != tokens:
        return f"the fake LLM sent {record.get('tokens')} tokens, not {tokens}"
    events = [protocol.decode_log_entry(eid, fields) for eid, fields in entries]
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(events) + 1)):
        return f"log ids are not 1..n: {seqs[:10]}..."
    if not events or events[-1].kind != "end" or any(e.kind != "message" for e in events[:-1]):
        return f"log is not messages + end: {[e.kind for e in events][-5:]}"
    finish = json.loads(events[-1].data).get("finish_reason")
    if finish != "stop":
        return f"ended with finish_reason {finish!r}"
    joined = "".join(json.loads(e.data)["text"] for e in events[:-1])
    digest = hashlib.sha256(joined.encode()).hexdigest()
    if digest != record["sha256"] or len(joined) != record["chars"]:
        return (f"the log's text ({len(joined)} chars) differs from what the LLM sent "
                f"({record['chars']} chars): lost, repeated or altered text")
    if (text_raw or b"").decode() != joined:
        return "the text key differs from the log's messages"
    meta = protocol.decode_meta(meta_raw)
    if meta is None or meta.status != "completed" or meta.seq != len(events):
        return f"meta is {meta}"
    return None


MONITOR_LINE = re.compile(rb'^\+[0-9.]+ \[\d+ ([^\]]+)\] "([^"]+)"(?: "([^"]*)")?')


class CommandLog:
    """Redis ``MONITOR``: every command as (client address or ``lua``, command, first arg).
    Commands run by a script show as ``lua``: top-level round trips are the others."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self, port: int) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer.write(b"MONITOR\r\n")
        if (await reader.readline()).strip() != b"+OK":
            raise BenchError("MONITOR was refused")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            if m := MONITOR_LINE.match(line):
                who, cmd, arg = (x.decode(errors="replace") if x else "" for x in m.groups())
                self.commands.append((who, cmd.upper(), arg))

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(5):
                    await self._task


def round_trips(log: CommandLog, worker_addrs: set[str], g: int) -> dict[str, Any]:
    """The worker's top-level commands (its round trips, pipelines aside) per published event
    and per generation, from a MONITOR of the whole run."""
    publish_sha = hashlib.sha1(protocol.PUBLISH_SCRIPT.encode()).hexdigest()
    published = sum(1 for who, cmd, _ in log.commands if who == "lua" and cmd == "PUBLISH")
    mine = [(cmd, arg) for who, cmd, arg in log.commands if who in worker_addrs]
    by_command: dict[str, int] = {}
    for cmd, arg in mine:
        name = "EVALSHA publish" if cmd == "EVALSHA" and arg == publish_sha else cmd
        by_command[name] = by_command.get(name, 0) + 1
    publish_calls = by_command.pop("EVALSHA publish", 0)
    return {
        "generations": g,
        "published_events": published,
        "worker_commands": len(mine),
        "publish_evalsha_per_event": round(publish_calls / published, 3) if published else None,
        "other_commands_per_event": round(
            sum(by_command.values()) / published, 3) if published else None,
        # Everything else the worker sent, per generation: job reads, claims, cancel checks,
        # heartbeats, acks, the reaper's scans (every second, whatever the load).
        "other_commands_per_generation": {k: round(v / g, 2) for k, v in sorted(
            by_command.items())},
    }


def steady_rate(recv_ns: array[int], tokens: array[int]) -> float:
    """Tokens/s published over the middle half of the publishing window (ramp-up and the
    staggered ends left out)."""
    if len(recv_ns) < 2:
        return 0.0
    first, last = min(recv_ns), max(recv_ns)
    lo, hi = first + (last - first) // 4, last - (last - first) // 4
    total = sum(t for r, t in zip(recv_ns, tokens, strict=True) if lo <= r < hi)
    return total / ((hi - lo) / 1e9) if hi > lo else 0.0


def read_monitor(out: Path) -> tuple[dict[str, Any], array[float], array[int], array[int]]:
    summary = json.loads(out.read_text())
    latencies = array("d")
    latencies.frombytes(Path(str(out) + ".lat").read_bytes())
    raw = Path(str(out) + ".msgs").read_bytes()
    n = summary["messages"]
    recv_ns, tokens = array("q"), array("i")
    recv_ns.frombytes(raw[: 8 * n])
    tokens.frombytes(raw[8 * n :])
    return summary, latencies, recv_ns, tokens


async def run_cell(g: int, args: argparse.Namespace, monitor_commands: bool = False
                   ) -> dict[str, Any]:
    """One G on fresh processes. With ``monitor_commands``, Redis MONITOR records every
    command too (a calibration: it slows Redis, so its latencies are not reported)."""
    group = ProcessGroup()
    command_log = CommandLog() if monitor_commands else None
    rss: RssSampler | None = None
    redis = store_redis = None
    try:
        _, redis, redis_url = await start_redis(group)
        llm, llm_url = await start_fastllm(
            group, rate=args.rate, tokens=args.tokens, sentence_tokens=args.sentence_tokens)
        worker = await start_worker(group, redis, redis_url, llm_url, concurrency=max(64, g),
                                    repo=args.worker_repo)
        rss = RssSampler(worker.pid)
        rss.start()
        for script in SCRIPTS:  # no NOSCRIPT round trip in the window
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
        budget = args.run_timeout or 60 + 4 * args.tokens / args.rate

        procs = {"worker": worker, "fastllm": llm, "monitor": monitor}
        cpu_0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        redis_cpu_0 = redis_cpu(await redis.info("cpu"))
        calls_0 = command_calls(await redis.info("commandstats"))
        if command_log is not None:
            await command_log.start(int(port))
        t_create = time.time_ns()
        await create_all(store, ids)
        created_s = (time.time_ns() - t_create) / 1e9
        try:
            await monitor.expect("done", budget)
        except BenchError:
            await monitor.send("dump")  # what did arrive, for the error message
            with contextlib.suppress(BenchError):
                await monitor.expect("done", 10)
            partial = json.loads(out.read_text()) if out.exists() else {}
            raise BenchError(
                f"G={g}: not every generation ended within {budget:.0f}s: "
                f"{len(partial.get('terminals', {}))} of {g} did{worker.tail()}") from None
        cpu_1 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        redis_cpu_1 = redis_cpu(await redis.info("cpu"))
        calls_1 = command_calls(await redis.info("commandstats"))
        await rss.stop()
        roundtrips = None
        if command_log is not None:
            await command_log.stop()
            worker_addrs = {c["addr"] for c in await redis.client_list()
                            if c.get("name", "").startswith(WORKER_CLIENT_PREFIX)}
            roundtrips = round_trips(command_log, worker_addrs, g)

        summary, latencies, recv_ns, msg_tokens = read_monitor(out)
        async with httpx.AsyncClient(timeout=30) as http:
            llm_stats = (await http.get(llm_url.removesuffix("/v1") + "/stats")).json()
        errors, log_messages, log_events = await check_generations(
            store, ids, llm_stats["records"], args.tokens)
        errors += [f"live: {e}" for e in summary["errors"]]
        if summary["messages"] != log_messages:
            errors.append(f"the monitor saw {summary['messages']} messages live, the logs hold "
                          f"{log_messages}")
        not_stop = {gen: t for gen, t in summary["terminals"].items() if t != "end:stop"}
        if not_stop:
            errors.append(f"{len(not_stop)} generation(s) did not end with stop: "
                          f"{list(not_stop.items())[:3]}")
        if errors:
            shown = "\n  ".join(errors[:10])
            raise BenchError(f"G={g}: {len(errors)} problem(s):\n  {shown}{worker.tail()}")

        ordered = sorted(latencies)
        window_s = (summary["last_recv_ns"] - t_create) / 1e9
        total_tokens = g * args.tokens
        cpu = {name: cpu_1[name] - cpu_0[name] for name in procs}
        calls = calls_delta(calls_0, calls_1)
        worker_calls = dict(calls)
        for name in CREATE_COMMANDS:  # the orchestrator's creates are not the worker's
            worker_calls[name] = worker_calls.get(name, 0) - g
        worker_calls = {k: v for k, v in worker_calls.items() if v}
        published = calls.get("publish", 0)  # one PUBLISH per script-published event
        if published != log_events:
            raise BenchError(f"G={g}: {published} PUBLISH calls for {log_events} logged events")
        # EVALSHA calls are the publish script's, the claims' and the lease renewals' (all
        # the worker's leases in one pipeline per tick, one XCLAIM for all its jobs); the
        # last two read Redis's clock once each (TIME), the publish script never does.
        publish_evalsha = calls.get("evalsha", 0) - calls.get("time", 0)
        return {
            "g": g,
            "offered_tokens_per_s": round(args.rate * g, 1),
            "tokens": total_tokens,
            "window_s": round(window_s, 3),
            "answer_s": round(args.tokens / args.rate, 3),
            "create_s": round(created_s, 3),
            "tokens_per_s": round(total_tokens / window_s, 1),
            "steady_tokens_per_s": round(steady_rate(recv_ns, msg_tokens), 1),
            "messages": summary["messages"],
            "timed_messages": len(ordered),
            "unstamped_messages": summary["unstamped"],
            "latency_ms": {
                "p50": round(percentile(ordered, 50), 3),
                "p90": round(percentile(ordered, 90), 3),
                "p99": round(percentile(ordered, 99), 3),
                "max": round(ordered[-1], 3) if ordered else None,
                "mean": round(sum(ordered) / len(ordered), 3) if ordered else None,
            },
            "worker_cpu_s": round(cpu["worker"], 3),
            "worker_cpu_us_per_token": round(cpu["worker"] / total_tokens * 1e6, 2),
            "worker_cores": round(cpu["worker"] / window_s, 3),
            "worker_rss_peak_mb": round(rss.peak_kb / 1024, 1),
            "fastllm_cpu_s": round(cpu["fastllm"], 3),
            "fastllm_max_tick_lag_ms": llm_stats["max_tick_lag_ms"],
            "fastllm_late_ticks": llm_stats["late_ticks"],
            "monitor_cpu_s": round(cpu["monitor"], 3),
            "redis_cpu_s": round(redis_cpu_1 - redis_cpu_0, 3),
            "published_events": log_events,
            "redis_commands_per_event": round(sum(worker_calls.values()) / log_events, 2),
            "evalsha_per_event": round(publish_evalsha / log_events, 3),
            "redis_commandstats": calls,
            "verified": True,
            **({"round_trips": roundtrips} if roundtrips is not None else {}),
        }
    finally:
        if rss is not None:
            await rss.stop()
        await group.close(store_redis, redis)


# -- report --------------------------------------------------------------------------------

COLUMNS = [
    ("G", lambda c: str(c["g"])),
    ("offered tok/s", lambda c: f"{c['offered_tokens_per_s']:.0f}"),
    ("steady tok/s", lambda c: f"{c['steady_tokens_per_s']:.0f}"),
    ("window s", lambda c: f"{c['window_s']:.1f}"),
    ("p50 ms", lambda c: f"{c['latency_ms']['p50']:.2f}"),
    ("p99 ms", lambda c: f"{c['latency_ms']['p99']:.2f}"),
    ("max ms", lambda c: f"{c['latency_ms']['max']:.2f}"),
    ("msgs (untimed)", lambda c: f"{c['messages']} ({c['unstamped_messages']})"),
    ("worker CPU s", lambda c: f"{c['worker_cpu_s']:.2f}"),
    ("worker µs/token", lambda c: f"{c['worker_cpu_us_per_token']:.1f}"),
    ("worker cores", lambda c: f"{c['worker_cores']:.2f}"),
    ("fake LLM CPU s", lambda c: f"{c['fastllm_cpu_s']:.2f}"),
    ("Redis CPU s", lambda c: f"{c['redis_cpu_s']:.2f}"),
    ("Redis cmds/event", lambda c: f"{c['redis_commands_per_event']:.2f}"),
    ("EVALSHA/event", lambda c: f"{c['evalsha_per_event']:.3f}"),
    ("text exact", lambda c: "yes" if c["verified"] else "NO"),
]


def plot(cells: list[dict[str, Any]], target_ms: float, path: Path) -> None:
    fig, ax = figure(figsize=(7, 4.5))
    xs = [c["g"] for c in cells]
    for q, style in (("p50", "-o"), ("p99", "--s")):
        ax.plot(xs, [c["latency_ms"][q] for c in cells], style, label=q)
    ax.axhline(target_ms, color="tab:red", linewidth=1, label=f"{target_ms:g} ms target")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent generations on one worker (G)")
    ax.set_ylabel("token → publish latency (ms)")
    ax.set_title("B5 worker: G generations at 50 tokens/s each (2 shared cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


async def main_async(args: argparse.Namespace) -> int:
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "B5 worker",
        "params": {"g": args.g_list, "sweep": args.sweep, "refine": args.refine,
                   "worker_repo": str(args.worker_repo),
                   "target_ms": args.target_ms,
                   "rate": args.rate, "tokens": args.tokens,
                   "sentence_tokens": args.sentence_tokens},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        if args.roundtrip_g > 0:
            print(f"# round-trip check: G={args.roundtrip_g} under MONITOR ...", file=sys.stderr,
                  flush=True)
            check = await run_cell(args.roundtrip_g, args, monitor_commands=True)
            out["round_trip_check"] = check["round_trips"]
        async def run_g(g: int) -> bool:
            """Run one G; True if its p99 is within the target."""
            print(f"# running G={g} ...", file=sys.stderr, flush=True)
            cell = await run_cell(g, args)
            out["cells"].append(cell)
            p99 = cell["latency_ms"]["p99"]
            print(f"#   {cell['steady_tokens_per_s']:.0f} of {cell['offered_tokens_per_s']:.0f} "
                  f"tokens/s, p99 {p99:.2f} ms, worker {cell['worker_cpu_us_per_token']:.1f} "
                  "µs/token", file=sys.stderr, flush=True)
            return p99 <= args.target_ms

        passed, failed = 0, 0
        for g in args.g_list:
            if await run_g(g):
                passed = g
            elif args.sweep:
                failed = g
                break
        # Doubling is coarse: halve the interval between the last G within the target and
        # the first past it, --refine times.
        for _ in range(args.refine if failed else 0):
            g = (passed + failed) // 2
            if g in (passed, failed):
                break
            if await run_g(g):
                passed = g
            else:
                failed = g
        out["cells"].sort(key=lambda c: c["g"])
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nB5 FAILED: {e}", file=sys.stderr)
        status = 1
    within = [c["g"] for c in out["cells"] if c["latency_ms"]["p99"] <= args.target_ms]
    out["largest_g_within_target"] = max(within) if within else None
    json_path = args.results / "b5.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        png_path = args.results / "b5_latency.png"
        plot(out["cells"], args.target_ms, png_path)
        print(columns_table(COLUMNS, out["cells"]))
        largest = out["largest_g_within_target"]
        print(f"\nlargest G with p99 <= {args.target_ms:g} ms: "
              f"{largest if largest is not None else 'none'}")
    if "round_trip_check" in out:
        rt = out["round_trip_check"]
        others = ", ".join(f"{k} {v:g}" for k, v in rt["other_commands_per_generation"].items())
        print(f"\nworker round trips (Redis MONITOR, G={rt['generations']}, "
              f"{rt['published_events']} events): {rt['publish_evalsha_per_event']:g} EVALSHA "
              f"of the publish script per published event, plus "
              f"{rt['other_commands_per_event']:g} other commands per event, which are per "
              f"generation: {others}")
        print(f"\nresults: {json_path}, {png_path}")
    return status


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
