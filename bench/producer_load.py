"""The producers' side of ``bench.producers``, as its own process (the orchestrator only
measures). Two roles; each prints ``ready``, waits for ``go`` on stdin, runs, then prints
``done <JSON>``.

- ``http``: P external generations created over an edge's HTTP API, then each appends B
  batches of K text events (``POST .../append``, raw ``httpx``: the edge's cost per append,
  not the Python library's) and finishes.
- ``direct``: G ``broker.producer.direct`` producers at once, each piping a real ``openai``
  SDK stream from the fake LLM into its generation (the sentence buffer, Redis scripts, no
  edge), as the built-in worker runs the same answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx
from openai import AsyncOpenAI

from broker import producer
from broker.core.settings import Settings
from broker.core.store import connect

TEXT = "Producers append their own events at the pace they like, sentence by sentence. "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.producer_load")
    parser.add_argument("role", choices=["http", "direct"])
    parser.add_argument("--edge", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--llm", default="")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--key", default="pd", help="the user messages' prefix (direct)")
    return parser.parse_args(argv)


async def go() -> None:
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected go, got {line!r}")


async def run_http(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.generations)
    async with httpx.AsyncClient(base_url=args.edge, timeout=30, limits=limits) as http:
        created = [(await http.post("/v1/generations", json={"producer": "external"})).json()
                   for _ in range(args.generations)]
        await go()
        started = time.monotonic()

        async def produce(gen: dict[str, Any]) -> None:
            count = 0
            for b in range(args.batches):
                events = [{"type": "text", "text": f"{b}.{i} {TEXT}"}
                          for i in range(args.batch_size)]
                response = await http.post(gen["append_url"],
                                           json={"after": count, "events": events})
                if response.status_code != 200:
                    raise SystemExit(f"append refused: {response.text}")
                count = response.json()["count"]
            finished = await http.post(gen["finish_url"], json={"finish_reason": "stop"})
            if finished.status_code != 200:
                raise SystemExit(f"finish refused: {finished.text}")

        await asyncio.gather(*(produce(gen) for gen in created))
        seconds = time.monotonic() - started
    return {"ids": [gen["id"] for gen in created], "seconds": seconds,
            "events": args.generations * args.batches * args.batch_size}


async def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(redis_url=args.redis_url, redis_pool_size=max(16, args.generations))
    ids: list[tuple[str, str]] = []  # (generation id, its LLM request's user message)
    redis = connect(settings, "bench-direct-producer")  # one pool for all the producers
    async with AsyncOpenAI(base_url=args.llm, api_key="bench", max_retries=0) as llm:
        await go()
        started = time.monotonic()
        cpu_started = time.process_time()

        async def produce(i: int) -> None:
            key = f"{args.key} {i}"
            gen = producer.Producer(producer.RedisTransport(redis=redis, settings=settings),
                                    settings=settings)
            async with gen:
                ids.append((gen.id, key))
                await gen.pipe(await llm.chat.completions.create(
                    model="fastllm", stream=True, seed=i,
                    messages=[{"role": "user", "content": key}]))

        await asyncio.gather(*(produce(i) for i in range(args.generations)))
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    await redis.aclose()
    return {"ids": ids, "seconds": seconds, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runner = run_http if args.role == "http" else run_direct
    result = asyncio.run(runner(args))
    print("done " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
