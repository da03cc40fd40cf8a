"""direct: what the broker adds to time-to-first-text and per-message latency, against a
client that streams the same fake LLM itself.

One run starts a redis-server, the fake LLM (``bench.fastllm``), one worker
(``python -m worker``) and one edge (``python -m broker edge``, ``BROKER_INSECURE=1``), then
runs N generations per mode, C at a time, alternating batches of the two modes:

- **direct**: the ``openai`` SDK (``AsyncOpenAI``, ``stream=True``, as the worker calls it)
  straight to the fake LLM. Time-to-first-text: request sent → first content delta. Per
  sentence: arrival of its last token minus that token's ``t=`` stamp (the send time).
- **broker**: ``POST /v1/generations`` to the edge, then the SSE stream of its ``events_url``.
  Time-to-first-text: POST sent → first message event (queue, worker pickup, LLM request and
  the first text's wait included). Per message: arrival minus the ``t=`` stamp of
  the message's last token.

Both modes must receive exactly the text the fake LLM sent (SHA-256 against its records);
anything else fails the run.

    .venv/bin/python -m bench.direct --generations 20 --concurrency 4

Prints a markdown table and writes ``bench/results/direct.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from bench.cell import RESULTS, figure, machine, markdown_table, save_figure
from bench.livemon import stamp_of
from bench.procs import (
    BenchError,
    ProcessGroup,
    start_edge,
    start_fastllm,
    start_redis,
    start_worker,
)
from bench.support import cpu_seconds, percentile

MODES = ("direct", "broker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.direct", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--generations", type=int, default=20, help="generations per mode")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="generations of one mode running at once")
    parser.add_argument("--warmup", type=int, default=2,
                        help="generations per mode run first and not counted")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per generation")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    parser.add_argument("--sentence-tokens", default="6-10", help="tokens per sentence, LO-HI")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds one generation may take (0: 30 + 3 x the answer's)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    if args.generations < 1 or args.concurrency < 1:
        parser.error("--generations and --concurrency must be >= 1")
    return args


class Result:
    """What one client saw of one generation (times in ns, latencies in ms)."""

    def __init__(self, mode: str, key: str) -> None:
        self.mode = mode
        self.key = key
        self.sent_ns = 0
        self.answered_ns = 0  # broker: the POST's 201 arrived
        self.first_text_ns = 0
        self.first_sentence_ns = 0
        self.latencies_ms: list[float] = []
        self.messages = 0
        self.received: list[tuple[int, str]] = []  # (arrival ns, text) of each delta/message
        self.text = ""
        self.finish: str | None = None

    def on_text(self, text: str, now: int) -> None:
        """A content delta (direct) or a message (broker) arrived at ``now``."""
        if not self.first_text_ns:
            self.first_text_ns = now
        self.text += text
        self.messages += 1
        self.received.append((now, text))
        stamp = stamp_of(text)
        if stamp is not None:
            self.latencies_ms.append((now - stamp) / 1e6)
            if not self.first_sentence_ns:
                self.first_sentence_ns = now

    @property
    def ttft_ms(self) -> float:
        return (self.first_text_ns - self.sent_ns) / 1e6

    @property
    def first_sentence_ms(self) -> float:
        return (self.first_sentence_ns - self.sent_ns) / 1e6


async def run_direct(llm: AsyncOpenAI, key: str, seed: int, first_only: bool = False) -> Result:
    """Stream the answer with the SDK; ``first_only``: stop (close the stream) at the first
    text, for its time-to-first-text alone."""
    result = Result("direct", key)
    result.sent_ns = time.time_ns()
    stream = await llm.chat.completions.create(
        model="fastllm", messages=[{"role": "user", "content": key}], stream=True,
        stream_options={"include_usage": True}, seed=seed,
    )
    async with stream:
        async for chunk in stream:
            now = time.time_ns()
            for choice in chunk.choices[:1]:
                if choice.delta is not None and choice.delta.content:
                    result.on_text(choice.delta.content, now)
                if choice.finish_reason:
                    result.finish = choice.finish_reason
            if first_only and result.first_text_ns:
                break
    return result


async def run_broker(edge: httpx.AsyncClient, key: str, seed: int) -> Result:
    result = Result("broker", key)
    result.sent_ns = time.time_ns()
    created = await edge.post(
        "/v1/generations", json={"messages": [{"role": "user", "content": key}], "seed": seed})
    result.answered_ns = time.time_ns()
    if created.status_code != 201:
        raise BenchError(f"POST /v1/generations answered {created.status_code}: {created.text}")
    last_id = 0
    async with edge.stream("GET", created.json()["events_url"]) as response:
        if response.status_code != 200:
            raise BenchError(f"the events stream answered {response.status_code}")
        buf = b""
        async for data in response.aiter_raw():
            now = time.time_ns()
            buf += data
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                fields: dict[str, str] = {}
                for line in block.decode().split("\n"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                if "data" not in fields:
                    continue  # retry: or a comment
                seq = int(fields["id"])
                if seq != last_id + 1:
                    raise BenchError(f"{key}: event id {seq} after {last_id}")
                last_id = seq
                kind = fields.get("event", "message")
                payload = json.loads(fields["data"])
                if kind == "message":
                    result.on_text(payload["text"], now)
                elif kind == "end":
                    result.finish = payload.get("finish_reason")
                else:
                    raise BenchError(f"{key}: {kind} event {payload}")
    return result


def check(result: Result, records: dict[str, Any], tokens: int) -> str | None:
    record = records.get(result.key)
    if record is None:
        return "the fake LLM has no record of it"
    if record.get("completed") != 1 or record.get("tokens") != tokens:
        return f"the fake LLM's record is {record}"
    if result.finish != "stop":
        return f"finished with {result.finish!r}"
    digest = hashlib.sha256(result.text.encode()).hexdigest()
    if digest != record["sha256"]:
        return (f"received {len(result.text)} chars, not the {record['chars']} the LLM sent "
                "(lost, repeated or altered text)")
    if not result.latencies_ms or not result.first_text_ns:
        return "no timed text"
    return None


def reached_llm_ms(result: Result, records: dict[str, Any]) -> float:
    """Request sent (direct) or POST sent (broker) → the fake LLM has read the request."""
    return (records[result.key]["arrived_ns"] - result.sent_ns) / 1e6


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
        "n": len(ordered),
    }


def summarize(mode: str, results: list[Result], records: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": mode,
        "generations": len(results),
        "reached_llm_ms": stats([reached_llm_ms(r, records) for r in results]),
        **({"post_ms": stats([(r.answered_ns - r.sent_ns) / 1e6 for r in results])}
           if mode == "broker" else {}),
        "ttft_ms": stats([r.ttft_ms for r in results]),
        "first_sentence_ms": stats([r.first_sentence_ms for r in results]),
        "message_latency_ms": stats([lat for r in results for lat in r.latencies_ms]),
        "deliveries_per_generation": round(sum(r.messages for r in results) / len(results), 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    redis = None
    try:
        _, redis, redis_url = await start_redis(group)
        llm_proc, llm_url = await start_fastllm(
            group, rate=args.rate, tokens=args.tokens, sentence_tokens=args.sentence_tokens)
        worker = await start_worker(group, redis, redis_url, llm_url, concurrency=64)
        edge_proc, edge_url = await start_edge(group, "broker", redis_url)
        run_id = uuid.uuid4().hex[:8]
        timeout = args.timeout or 30 + 3 * args.tokens / args.rate
        results: dict[str, list[Result]] = {mode: [] for mode in MODES}
        procs = {"worker": worker, "edge": edge_proc, "fastllm": llm_proc}
        cpu_0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        async with (
            AsyncOpenAI(base_url=llm_url, api_key="bench", max_retries=0) as llm,
            httpx.AsyncClient(base_url=edge_url, timeout=timeout) as edge,
        ):
            # Generation i of both modes has the same seed: the same answer, sentence by
            # sentence (only the stamps differ).
            clients = {"direct": lambda key, i: run_direct(llm, key, i),
                       "broker": lambda key, i: run_broker(edge, key, i)}

            async def batch(mode: str, first: int, count: int) -> list[Result]:
                seeds = range(first + args.warmup, first + args.warmup + count)
                try:
                    async with asyncio.timeout(timeout):
                        return list(await asyncio.gather(
                            *(clients[mode](f"{mode} {run_id} {i}", i) for i in seeds)))
                except TimeoutError:
                    raise BenchError(f"{mode}: a generation took over {timeout:.0f}s"
                                     f"{worker.tail()}") from None

            for mode in MODES:  # warm-up: connections, imports, the worker's first job
                await batch(mode, -args.warmup, args.warmup)
            done = 0
            while done < args.generations:
                count = min(args.concurrency, args.generations - done)
                for mode in MODES:  # alternate, so both modes see the same conditions
                    print(f"# {mode} {done + 1}..{done + count}", file=sys.stderr, flush=True)
                    results[mode] += await batch(mode, done, count)
                done += count
        cpu_1 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        async with httpx.AsyncClient(timeout=30) as http:
            records = (await http.get(llm_url.removesuffix("/v1") + "/stats")).json()["records"]
        errors = [f"{r.mode} {r.key}: {problem}" for mode in MODES for r in results[mode]
                  if (problem := check(r, records, args.tokens))]
        if errors:
            raise BenchError(f"{len(errors)} generation(s) wrong:\n  " + "\n  ".join(errors[:10]))
        out = {mode: summarize(mode, results[mode], records) for mode in MODES}
        out["cpu_s"] = {name: round(cpu_1[name] - cpu_0[name], 3) for name in procs}
        return out
    finally:
        await group.close(redis)


METRICS = [
    ("request reaches the LLM", "reached_llm_ms"),
    ("time-to-first-text", "ttft_ms"),
    ("time-to-first-sentence", "first_sentence_ms"),
    ("per-message latency", "message_latency_ms"),
]


def comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    direct, broker = summary["direct"], summary["broker"]
    for name, key in METRICS:
        for q in ("p50", "p99"):
            d, b = direct[key][q], broker[key][q]
            rows.append({"metric": name, "q": q, "direct_ms": d, "broker_ms": b,
                         "broker_minus_direct_ms": round(b - d, 3),
                         "broker_over_direct": round(b / d, 2) if d else None})
    return rows


def report(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    per_mode = markdown_table(
        ["mode", "generations", "to LLM p50 ms", "to LLM p99 ms", "TTFT p50 ms", "TTFT p99 ms",
         "first sentence p50 ms",
         "first sentence p99 ms", "per-message p50 ms", "per-message p99 ms",
         "per-message max ms", "timed messages", "deliveries/gen"],
        [[m, str(s["generations"]), f"{s['reached_llm_ms']['p50']:.2f}",
          f"{s['reached_llm_ms']['p99']:.2f}",
          f"{s['ttft_ms']['p50']:.2f}", f"{s['ttft_ms']['p99']:.2f}",
          f"{s['first_sentence_ms']['p50']:.2f}", f"{s['first_sentence_ms']['p99']:.2f}",
          f"{s['message_latency_ms']['p50']:.2f}", f"{s['message_latency_ms']['p99']:.2f}",
          f"{s['message_latency_ms']['max']:.2f}", str(s["message_latency_ms"]["n"]),
          f"{s['deliveries_per_generation']:.1f}"]
         for m, s in ((m, summary[m]) for m in MODES)],
    )
    diffs = markdown_table(
        ["metric", "", "direct ms", "broker ms", "broker - direct ms", "broker / direct"],
        [[r["metric"], r["q"], f"{r['direct_ms']:.2f}", f"{r['broker_ms']:.2f}",
          f"{r['broker_minus_direct_ms']:+.2f}",
          "n/a" if r["broker_over_direct"] is None else f"{r['broker_over_direct']:.2f}x"]
         for r in rows],
    )
    return f"{per_mode}\n\n{diffs}"


def plot(summary: dict[str, Any], path: Path) -> None:
    fig, ax = figure(figsize=(8, 4))
    names = [name for name, _ in METRICS]
    width = 0.2
    for i, (mode, q) in enumerate([(m, q) for m in MODES for q in ("p50", "p99")]):
        xs = [x + (i - 1.5) * width for x in range(len(METRICS))]
        ax.bar(xs, [summary[mode][key][q] for _, key in METRICS], width,
               label=f"{mode} {q}", color=("tab:gray" if mode == "direct" else "tab:blue"),
               alpha=1.0 if q == "p50" else 0.55)
    ax.set_xticks(range(len(METRICS)), names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("direct: the fake LLM streamed straight to the client vs through the broker")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "scenario": "direct baseline",
        "params": {"generations": args.generations, "concurrency": args.concurrency,
                   "warmup": args.warmup, "rate": args.rate, "tokens": args.tokens,
                   "sentence_tokens": args.sentence_tokens},
        "machine": machine(),
    }
    status = 0
    try:
        summary = asyncio.run(run(args))
        out.update(summary)
        out["comparison"] = comparison(summary)
    except BenchError as e:
        out["failure"] = str(e)
        print(f"\ndirect FAILED: {e}", file=sys.stderr)
        status = 1
    json_path = args.results / "direct.json"
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if "comparison" in out:
        png_path = args.results / "direct_latency.png"
        plot(out, png_path)
        print(report(out, out["comparison"]))
        print(f"\nresults: {json_path}, {png_path}")
    raise SystemExit(status)


if __name__ == "__main__":
    main()
