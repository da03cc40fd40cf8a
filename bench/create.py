"""create: the CPU one generation costs to create and start, edge + worker, beside the bare
``openai`` SDK making the same upstream request.

One run, on fresh processes: a redis-server, the fake LLM (``bench.fastllm``, a two-token
answer, so the generation is mostly its creation: ``POST``, job, claim, the upstream request,
one message, ``end``), one edge (``python -m broker edge``, ``BROKER_INSECURE=1``) and one
worker (``python -m worker``). Cells:

- **broker**: N ``POST /v1/generations`` (C in flight), every one followed to its terminal
  event by the monitor (``bench.livemon``); edge and worker CPU (``/proc/<pid>/stat``) over
  the window, per generation.
- **sdk**: a client process (this module, ``--sdk-client``) making the same N streaming
  requests to the same fake LLM with ``AsyncOpenAI`` (C at a time) and reading each to its
  end: what the SDK alone costs per request, the floor under the worker's share.
- with ``--baseline-repo``: the broker cell again on another checkout's edge and worker
  (e.g. the main branch), same run.

    .venv/bin/python -m bench.create --generations 400 --concurrency 8

Prints a markdown table, writes ``bench/results/create.json``. Exits 1 if a generation did
not end with ``end`` (stop).
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

from bench.cell import RESULTS, columns_table, machine
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
from bench.support import cpu_seconds, free_port

TOKENS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.create", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--generations", type=int, default=400, help="generations per cell")
    parser.add_argument("--concurrency", type=int, default=8, help="creations in flight")
    parser.add_argument("--warmup", type=int, default=20,
                        help="generations per cell run first and not counted")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="also run the broker cell on this checkout (e.g. the main branch)")
    parser.add_argument("--sdk-client", default=None, metavar="LLM_URL",
                        help=argparse.SUPPRESS)  # the sdk cell's child process
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    if args.generations < 1 or args.concurrency < 1:
        parser.error("--generations and --concurrency must be >= 1")
    return args


def request_body(key: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": key}]}


# -- the sdk cell's client (a child process) ---------------------------------------------------


async def sdk_client(args: argparse.Namespace) -> None:
    """Wait for ``go N`` on stdin, make N streaming calls (C at a time), print ``done``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="bench", base_url=args.sdk_client, max_retries=0)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def one(i: int) -> None:
        call = client.chat.completions.with_streaming_response.create(
            model="fastllm", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"sdk {i}"}])
        async with call as response:
            async for _ in response.http_response.aiter_bytes():
                pass

    print("ready", flush=True)
    while line := await reader.readline():
        n = int(line.split()[1])
        async def lane(queue: list[int]) -> None:
            while queue:
                await one(queue.pop())

        queue = list(range(n))
        await asyncio.gather(*(lane(queue) for _ in range(args.concurrency)))
        print("done", flush=True)
    await client.close()


# -- cells ---------------------------------------------------------------------------------------


async def broker_cell(args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    group = ProcessGroup()
    try:
        _, redis, redis_url = await start_redis(group)
        _, llm_url = await start_fastllm(group, rate=1000, tokens=TOKENS,
                                         sentence_tokens=f"{TOKENS}-{TOKENS}")
        port = free_port()
        pythonpath = {"PYTHONPATH": str(repo)} if repo != REPO else {}
        edge = await group.start(Proc("edge", [sys.executable, "-m", "broker", "edge"],
                                      env=child_env(**{
                                          "REDIS_URL": redis_url, "BROKER_PORT": str(port),
                                          "BROKER_HOST": "127.0.0.1", "BROKER_INSECURE": "1",
                                          "BROKER_LOG_LEVEL": "warning", **pythonpath}),
                                      log_dir=group.log_dir, cwd=repo))
        worker = await start_worker(group, redis, redis_url, llm_url, concurrency=64, repo=repo)
        base = f"http://127.0.0.1:{port}"
        redis_port = redis_url.rsplit(":", 1)[1].split("/")[0]
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for _ in range(300):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise BenchError(f"edge not ready{edge.tail()}")

            async def create_and_follow(n: int, label: str) -> tuple[float, float, float]:
                out = group.log_dir / f"livemon-{label}.json"
                monitor = await group.start(Proc(f"livemon-{label}", [
                    sys.executable, "-m", "bench.livemon", "--redis-port", redis_port,
                    "--generations", str(n), "--out", str(out),
                ], env=child_env(), lines=True, log_dir=group.log_dir))
                await monitor.expect("ready", 30)
                queue = list(range(n))

                async def lane() -> None:
                    while queue:
                        i = queue.pop()
                        r = await http.post("/v1/generations", json=request_body(f"c{label}{i}"))
                        if r.status_code != 201:
                            raise BenchError(f"POST answered {r.status_code}: {r.text}")

                cpu_0 = cpu_seconds(edge.pid), cpu_seconds(worker.pid)
                t0 = time.monotonic()
                await asyncio.gather(*(lane() for _ in range(args.concurrency)))
                await monitor.expect("done", 60 + n / 10)
                window = time.monotonic() - t0
                cpu_1 = cpu_seconds(edge.pid), cpu_seconds(worker.pid)
                summary = json.loads(out.read_text())
                bad = {k: v for k, v in summary["terminals"].items() if v != "end:stop"}
                if bad or summary["errors"]:
                    raise BenchError(f"{len(bad)} generations did not end with stop: "
                                     f"{list(bad.items())[:3]} {summary['errors'][:3]}")
                monitor.close_stdin()
                await monitor.stop()
                return cpu_1[0] - cpu_0[0], cpu_1[1] - cpu_0[1], window

            await create_and_follow(args.warmup, "warmup")
            edge_cpu, worker_cpu, window = await create_and_follow(args.generations, "run")
        n = args.generations
        return {
            "cell": "broker" if repo == REPO else f"broker @ {repo}",
            "generations": n,
            "window_s": round(window, 2),
            "edge_cpu_ms_per_generation": round(edge_cpu / n * 1000, 3),
            "worker_cpu_ms_per_generation": round(worker_cpu / n * 1000, 3),
            "cpu_ms_per_generation": round((edge_cpu + worker_cpu) / n * 1000, 3),
        }
    finally:
        await group.close()


async def sdk_cell(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    try:
        await start_redis(group)  # (not used: the same processes around, for fairness)
        _, llm_url = await start_fastllm(group, rate=1000, tokens=TOKENS,
                                         sentence_tokens=f"{TOKENS}-{TOKENS}")
        client = await group.start(Proc("sdk-client", [
            sys.executable, "-m", "bench.create", "--sdk-client", llm_url,
            "--concurrency", str(args.concurrency),
        ], env=child_env(), lines=True, log_dir=group.log_dir))
        await client.expect("ready", 30)
        await client.send(f"go {args.warmup}")
        await client.expect("done", 60)
        cpu_0 = cpu_seconds(client.pid)
        t0 = time.monotonic()
        await client.send(f"go {args.generations}")
        await client.expect("done", 60 + args.generations / 10)
        window = time.monotonic() - t0
        cpu = cpu_seconds(client.pid) - cpu_0
        n = args.generations
        return {
            "cell": "sdk (the upstream request alone)",
            "generations": n,
            "window_s": round(window, 2),
            "edge_cpu_ms_per_generation": None,
            "worker_cpu_ms_per_generation": round(cpu / n * 1000, 3),
            "cpu_ms_per_generation": round(cpu / n * 1000, 3),
        }
    finally:
        await group.close()


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


COLUMNS = [
    ("cell", lambda c: c["cell"]),
    ("generations", lambda c: str(c["generations"])),
    ("window s", lambda c: f"{c['window_s']:.1f}"),
    ("edge CPU ms / gen", lambda c: fmt(c["edge_cpu_ms_per_generation"])),
    ("worker (or client) CPU ms / gen", lambda c: fmt(c["worker_cpu_ms_per_generation"])),
    ("total CPU ms / gen", lambda c: fmt(c["cpu_ms_per_generation"])),
]


async def main_async(args: argparse.Namespace) -> int:
    if args.sdk_client:
        await sdk_client(args)
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "create",
        "params": {"generations": args.generations, "concurrency": args.concurrency,
                   "tokens": TOKENS, "warmup": args.warmup,
                   "baseline_repo": str(args.baseline_repo) if args.baseline_repo else None},
        "machine": machine(),
        "cells": [],
    }
    status = 0
    try:
        print("# create: broker ...", file=sys.stderr, flush=True)
        out["cells"].append(await broker_cell(args, REPO))
        print("# create: sdk ...", file=sys.stderr, flush=True)
        out["cells"].append(await sdk_cell(args))
        if args.baseline_repo:
            print(f"# create: broker @ {args.baseline_repo} ...", file=sys.stderr, flush=True)
            out["cells"].append(await broker_cell(args, args.baseline_repo.resolve()))
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\nCREATE FAILED: {e}", file=sys.stderr)
        status = 1
    (args.results / "create.json").write_text(json.dumps(out, indent=2) + "\n")
    if out["cells"]:
        print(columns_table(COLUMNS, out["cells"]))
    return status


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
