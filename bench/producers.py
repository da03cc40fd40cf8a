"""producers: what an external producer costs, in one run.

1. **HTTP append throughput**: one edge (``python -m broker edge``), P external generations
   created over HTTP, each appending B batches of K text events (``POST .../append``), for
   each K of ``--batch-sizes``, from ``bench.producer_load http`` (its own process). Figures:
   events/s, and events per edge CPU-second (the edge's CPU over the append window: parsing,
   validation, one ``PRODUCER_APPEND_SCRIPT`` call per append), and Redis's CPU per event.
2. **The Python direct producer beside the built-in worker**: the same G answers of T tokens
   from the fast fake LLM (``bench.fastllm``, same seeds, so the same sentences), once run by
   the worker (``python -m worker``: its raw stream reader, sentence buffer,
   ``PUBLISH_SCRIPT``) and once piped by G ``broker.producer.direct`` producers in one
   process (``bench.producer_load direct``: the ``openai`` SDK's stream, ``pipe()``, the
   sentence buffer, ``PRODUCER_APPEND_SCRIPT``). Figures: CPU µs per token and per event of
   each, and their ratio.

Every generation is checked: the HTTP ones hold exactly the appended events and text; the
worker's and the producer's texts are exactly what the fake LLM sent (SHA-256 of its
records). Anything else fails the run (exit 1).

    .venv/bin/python -m bench.producers
    .venv/bin/python -m bench.producers --generations 8 --batches 50 --tokens 100

Prints a markdown table and writes ``bench/results/producers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from bench.b5 import check_one
from bench.cell import RESULTS, machine, markdown_table
from bench.procs import (
    BenchError,
    Proc,
    ProcessGroup,
    child_env,
    poll,
    start_edge,
    start_fastllm,
    start_redis,
    start_worker,
)
from bench.support import cpu_seconds, redis_cpu
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store, connect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.producers", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--producers", type=int, default=8,
                        help="HTTP: generations appending at once")
    parser.add_argument("--batches", type=int, default=250, help="HTTP: appends per generation")
    parser.add_argument("--batch-sizes", default="1,10", help="HTTP: events per append")
    parser.add_argument("--generations", type=int, default=32,
                        help="worker vs direct producer: answers run at once")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per answer")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per answer")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    args.sizes = [int(k) for k in args.batch_sizes.split(",") if k.strip()]
    return args


async def start_load(group: ProcessGroup, *argv: str) -> Proc:
    proc = await group.start(Proc(f"producer-load-{argv[0]}", [
        sys.executable, "-m", "bench.producer_load", *argv,
    ], env=child_env(), lines=True, log_dir=group.log_dir))
    await proc.expect("ready", 60)
    return proc


async def finished(proc: Proc, within: float) -> dict[str, Any]:
    (payload,) = [" ".join(await proc.expect("done", within))]
    result: dict[str, Any] = json.loads(payload)
    return result


# -- 1. HTTP append throughput ---------------------------------------------------------------


async def http_cell(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    group = ProcessGroup()
    redis = None
    try:
        _, redis, redis_url = await start_redis(group)
        edge, edge_url = await start_edge(group, "broker", redis_url)
        load = await start_load(group, "http", "--edge", edge_url,
                                "--generations", str(args.producers),
                                "--batches", str(args.batches),
                                "--batch-size", str(batch_size))
        edge_cpu_0, redis_cpu_0 = cpu_seconds(edge.pid), redis_cpu(await redis.info("cpu"))
        load_cpu_0 = cpu_seconds(load.pid)
        await load.send("go")
        result = await finished(load, 300)
        edge_cpu = cpu_seconds(edge.pid) - edge_cpu_0
        redis_s = redis_cpu(await redis.info("cpu")) - redis_cpu_0
        load_cpu = cpu_seconds(load.pid) - load_cpu_0
        errors = await check_http(redis, result["ids"], args.batches * batch_size)
        if errors:
            raise BenchError("HTTP appends: " + "; ".join(errors[:5]))
        events = result["events"]
        return {
            "batch_size": batch_size, "producers": args.producers, "events": events,
            "appends": args.producers * args.batches, "seconds": round(result["seconds"], 3),
            "events_per_s": round(events / result["seconds"], 1),
            "appends_per_s": round(args.producers * args.batches / result["seconds"], 1),
            "edge_cpu_s": round(edge_cpu, 3),
            "events_per_edge_cpu_s": round(events / edge_cpu, 1),
            "edge_cpu_us_per_append": round(edge_cpu / (args.producers * args.batches) * 1e6,
                                            1),
            "redis_cpu_us_per_event": round(redis_s / events * 1e6, 2),
            "client_cpu_s": round(load_cpu, 3),
        }
    finally:
        await group.close(redis)


async def check_http(redis: Any, ids: list[str], per_generation: int) -> list[str]:
    errors = []
    for gen_id in ids:
        entries = await redis.xrange(protocol.log_key(gen_id))
        kinds = [fields[b"k"] for _, fields in entries]
        if kinds != [b"message"] * per_generation + [b"end"]:
            errors.append(f"{gen_id}: {len(kinds)} events, not {per_generation} + end")
            continue
        joined = "".join(json.loads(fields[b"d"])["text"] for _, fields in entries[:-1])
        if (await redis.get(protocol.text_key(gen_id)) or b"").decode() != joined:
            errors.append(f"{gen_id}: the text differs from the log")
    return errors


# -- 2. the direct producer beside the worker -----------------------------------------------


async def llm_records(llm_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as http:
        records: dict[str, Any] = (await http.get(
            llm_url.removesuffix("/v1") + "/stats")).json()["records"]
        return records


async def check_answers(store: Store, pairs: list[tuple[str, str]], records: dict[str, Any],
                        tokens: int) -> tuple[list[str], int]:
    """Each generation's log against what the fake LLM sent it; (errors, events)."""
    errors, events = [], 0
    for gen_id, key in pairs:
        entries = await store.redis.xrange(protocol.log_key(gen_id))
        text = await store.redis.get(protocol.text_key(gen_id))
        meta = await store.redis.hgetall(protocol.meta_key(gen_id))
        problem = check_one(gen_id, entries, text, meta, records.get(key), tokens)
        if problem:
            errors.append(f"{gen_id}: {problem}")
        events += len(entries)
    return errors, events


async def worker_vs_direct(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    redis = store = None
    try:
        _, redis, redis_url = await start_redis(group)
        _, llm_url = await start_fastllm(group, rate=args.rate, tokens=args.tokens)
        worker = await start_worker(group, redis, redis_url, llm_url,
                                    concurrency=max(64, args.generations))
        settings = Settings(redis_url=redis_url)
        client = connect(settings, "bench-orchestrator-store")
        store = Store(client, settings)
        tokens_total = args.generations * args.tokens
        cells: dict[str, dict[str, Any]] = {}

        # The worker's run: G generations created as the edge would, the worker takes them.
        pairs = [(protocol.new_generation_id(), f"pw {i}") for i in range(args.generations)]
        cpu_0 = cpu_seconds(worker.pid)
        await asyncio.gather(*(store.create(gen_id, {
            "model": "fastllm", "seed": i, "messages": [{"role": "user", "content": key}]},
            "fastllm") for i, (gen_id, key) in enumerate(pairs)))

        async def all_ended() -> bool:
            metas = [await store.meta(gen_id) for gen_id, _ in pairs]
            return all(m is not None and m.finished for m in metas)

        await poll(all_ended, 60 + 4 * args.tokens / args.rate, "the worker's answers", worker)
        worker_cpu = cpu_seconds(worker.pid) - cpu_0
        errors, events = await check_answers(store, pairs, await llm_records(llm_url),
                                             args.tokens)
        if errors:
            raise BenchError("worker: " + "; ".join(errors[:5]))
        cells["worker"] = {"cpu_s": worker_cpu, "events": events}

        # The direct producers' run: the same answers (same seeds), piped.
        load = await start_load(group, "direct", "--redis-url", redis_url, "--llm", llm_url,
                                "--generations", str(args.generations), "--key", "pd")
        cpu_0 = cpu_seconds(load.pid)
        await load.send("go")
        result = await finished(load, 60 + 4 * args.tokens / args.rate)
        load_cpu = cpu_seconds(load.pid) - cpu_0
        errors, events = await check_answers(
            store, [(gen_id, key) for gen_id, key in result["ids"]],
            await llm_records(llm_url), args.tokens)
        if errors:
            raise BenchError("direct producer: " + "; ".join(errors[:5]))
        cells["direct producer"] = {"cpu_s": load_cpu, "events": events}
        rows = {}
        for name, c in cells.items():
            rows[name] = {
                "generations": args.generations, "tokens": tokens_total, "events": c["events"],
                "cpu_s": round(c["cpu_s"], 3),
                "cpu_us_per_token": round(c["cpu_s"] / tokens_total * 1e6, 1),
                "cpu_us_per_event": round(c["cpu_s"] / c["events"] * 1e6, 1),
            }
        rows["ratio"] = {"direct_over_worker_cpu": round(
            cells["direct producer"]["cpu_s"] / cells["worker"]["cpu_s"], 2)}
        return rows
    finally:
        if store is not None:
            await store.redis.aclose()
        await group.close(redis)


def report(out: dict[str, Any]) -> str:
    http_rows = [[str(c["batch_size"]), str(c["producers"]), f"{c['events']}",
                  f"{c['events_per_s']:,.0f}", f"{c['appends_per_s']:,.0f}",
                  f"{c['events_per_edge_cpu_s']:,.0f}", f"{c['edge_cpu_us_per_append']:.0f}",
                  f"{c['redis_cpu_us_per_event']:.1f}"] for c in out["http"]]
    parts = ["### Producer appends over HTTP (one edge)", "", markdown_table(
        ["events/append", "producers", "events", "events/s", "appends/s",
         "events per edge CPU-s", "edge CPU µs/append", "Redis CPU µs/event"], http_rows)]
    side = out["side_by_side"]
    rows = [[name, str(side[name]["tokens"]), str(side[name]["events"]),
             f"{side[name]['cpu_s']:.2f}", f"{side[name]['cpu_us_per_token']:.1f}",
             f"{side[name]['cpu_us_per_event']:.1f}"] for name in ("worker", "direct producer")]
    parts += ["", "### The same answers: built-in worker vs Python direct producer", "",
              markdown_table(["who", "tokens", "events", "CPU s", "CPU µs/token",
                              "CPU µs/event"], rows), "",
              f"direct producer / worker CPU: {side['ratio']['direct_over_worker_cpu']}x"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "producers.json"
    out: dict[str, Any] = {"machine": machine(), "args": {
        k: v for k, v in vars(args).items() if k not in ("results",)}}
    try:
        out["http"] = [asyncio.run(http_cell(args, k)) for k in args.sizes]
        out["side_by_side"] = asyncio.run(worker_vs_direct(args))
    except BenchError as e:
        out["failure"] = str(e)
        json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"producers FAILED: {e}")
        sys.exit(1)
    json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(report(out))
    print(f"\nresults: {json_path}")


if __name__ == "__main__":
    main()
