"""What every benchmark cell does the same way: start load generators, wait until the edges
count the viewers, take cost snapshots (process CPU, Redis CPU and commands), and collect the
viewers' verdicts and latencies (any loss, duplicate or reordering fails the cell)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from bench import cpubudget
from bench.procs import BenchError, Proc, ProcessGroup, child_env
from bench.support import (
    calls_delta,
    child_pids,
    command_calls,
    cpu_seconds,
    established_by_pid,
    percentile,
    redis_cpu,
    status_kb,
)

VIEWERS_PER_LOADGEN = 500
RESULTS = Path(__file__).resolve().parent / "results"


def loadgen_split(viewers: int, requested: int = 0) -> list[int]:
    """Viewers per load generator: one per ``VIEWERS_PER_LOADGEN``, at most 2 (2 cores)."""
    count = requested or min(2, math.ceil(viewers / VIEWERS_PER_LOADGEN))
    count = max(1, min(count, viewers))
    return [viewers // count + (1 if i < viewers % count else 0) for i in range(count)]


async def start_loadgens(
    group: ProcessGroup, ports: list[int], viewers: int, loadgen_args: list[str], *,
    requested: int = 0,
) -> list[Proc]:
    """Start the load generators (``bench.loadgen``); ``loadgen_args`` say what to watch
    (``--gen-id=...`` or ``--gen-ids-file``), how many messages, timeouts. Their results go
    to ``loadgen<i>.json`` in the group's log directory."""
    loadgens: list[Proc] = []
    first = 0
    for i, n in enumerate(loadgen_split(viewers, requested)):
        loadgens.append(await group.start(Proc(f"loadgen{i}", [
            sys.executable, "-m", "bench.loadgen", "--port", ",".join(map(str, ports)),
            "--viewers", str(n), "--first-index", str(first),
            "--out", str(group.log_dir / f"loadgen{i}.json"), *loadgen_args,
        ], env=child_env(), lines=True, log_dir=group.log_dir)))
        first += n
    return loadgens


async def edge_children(pid: int, procs: int, redis: aioredis.Redis,
                        within: float = 30) -> list[int]:
    """The ``procs`` serving processes of a broker edge started with ``--edge-workers procs`` (none
    for one process: it serves itself), once each has started its app (its pub/sub connection,
    named ``broker-edge-<pid>``, is subscribed) and so listens: viewers that connect before
    the last one listens would all go to the others."""
    if procs == 1:
        return []
    deadline = time.monotonic() + within
    while True:
        children = child_pids(pid)
        started = {c.get("name", "") for c in await redis.client_list() if int(c.get("sub", 0))}
        if len(children) == procs and all(f"broker-edge-{c}" in started for c in children):
            return children
        if time.monotonic() > deadline:
            raise BenchError(f"the edge runs {len(children)} processes, expected {procs} "
                             "with their apps started")
        await asyncio.sleep(0.1)


async def serving_processes(
    edge: Proc, procs: int, redis: aioredis.Redis, budget: cpubudget.CpuBudget | None,
) -> tuple[list[int], list[int], list[cpubudget.Cgroup]]:
    """A started edge's processes: all of them (with ``--edge-workers N`` the supervisor and
    its N children, measured together), those that serve viewers (the children, or the one
    edge process itself), and, with a ``budget``, each serving one placed in a cgroup of it
    (the supervisor only waits: no budget)."""
    children = await edge_children(edge.pid, procs, redis)
    serving = children or [edge.pid]
    cgroups = [budget.place(pid) for pid in serving] if budget is not None else []
    return [edge.pid, *children], serving, cgroups


async def edge_viewers(http: httpx.AsyncClient) -> float:
    """The edge's ``broker_viewers`` gauge (-1 when absent)."""
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith("broker_viewers "):
            return float(line.split()[1])
    return -1.0


async def wait_viewers(edge_urls: list[str], expected: list[int], within: float = 30) -> None:
    """Until each edge's ``broker_viewers`` equals its expected count."""
    deadline = time.monotonic() + within
    for url, want in zip(edge_urls, expected, strict=True):
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            while (seen := await edge_viewers(http)) != want:
                if time.monotonic() > deadline:
                    raise BenchError(f"edge {url} reports {seen} viewers, expected {want}")
                await asyncio.sleep(0.1)


@dataclass
class Costs:
    """A snapshot of what the cell's processes and Redis have used so far."""

    cpu: dict[str, float]
    redis_cpu: float
    calls: dict[str, int]

    @classmethod
    async def take(cls, redis: aioredis.Redis, procs: dict[str, list[Proc]]) -> Costs:
        cpu = {name: sum(_cpu_of(name, p) for p in ps) for name, ps in procs.items()}
        return cls(cpu, redis_cpu(await redis.info("cpu")),
                   command_calls(await redis.info("commandstats")))

    def since(self, earlier: Costs) -> CostDelta:
        return CostDelta(
            {name: round(self.cpu[name] - earlier.cpu.get(name, 0.0), 3) for name in self.cpu},
            round(self.redis_cpu - earlier.redis_cpu, 3),
            calls_delta(earlier.calls, self.calls),
        )


def _cpu_of(name: str, proc: Proc) -> float:
    try:
        return cpu_seconds(proc.pid)
    except FileNotFoundError:
        # A process of the cell died: the cell fails saying which, not with a traceback (an
        # edge process the supervisor starts again would be a new one, unmeasured).
        raise BenchError(f"{name} (pid {proc.pid}) exited during the cell") from None


@dataclass
class CostDelta:
    cpu: dict[str, float]  # CPU seconds per process kind
    redis_cpu: float
    calls: dict[str, int] = field(default_factory=dict)  # Redis calls, ``info`` excluded

    @property
    def commands(self) -> int:
        return sum(self.calls.values())


@dataclass
class Verdict:
    """The load generators' results, merged."""

    results: list[dict[str, Any]]
    latencies: array[float]  # sorted, ms

    @property
    def deliveries(self) -> int:
        return len(self.latencies)

    def latency_ms(self) -> dict[str, float]:
        ordered = self.latencies
        if not ordered:
            return {"p50": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
        return {
            "p50": round(percentile(ordered, 50), 3),
            "p99": round(percentile(ordered, 99), 3),
            "max": round(ordered[-1], 3),
            "mean": round(sum(ordered) / len(ordered), 3),
        }

    def max_of(self, key: str) -> int:
        return max(r[key] for r in self.results)

    def min_of(self, key: str) -> int:
        return min(r[key] for r in self.results)


def collect(group: ProcessGroup, loadgens: list[Proc], what: str, expected_deliveries: int,
            tail: str = "") -> Verdict:
    """Read the load generators' results; a viewer that did not get exactly the expected
    events, in order, or a delivery count off the expectation fails the cell."""
    results = [json.loads((group.log_dir / f"loadgen{i}.json").read_text())
               for i in range(len(loadgens))]
    error_count = sum(r["error_count"] for r in results)
    if error_count:
        shown = "\n  ".join(e for r in results for e in r["errors"])
        raise BenchError(f"{what}: {error_count} viewer(s) did not get exactly the expected "
                         f"events, in order:\n  {shown}{tail}")
    latencies = array("d")
    for r in results:
        latencies.frombytes(Path(r["latencies_file"]).read_bytes())
    verdict = Verdict(results, array("d", sorted(latencies)))
    if verdict.deliveries != expected_deliveries:
        raise BenchError(f"{what}: {verdict.deliveries} deliveries, "
                         f"expected {expected_deliveries}{tail}")
    return verdict


class Sampler:
    """Calls ``sample`` every ``every`` seconds from ``start`` to ``stop`` (until the processes
    sampled are gone)."""

    every = 1.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.sample()
                await asyncio.sleep(self.every)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class RssSampler(Sampler):
    """The edge's peak resident memory, sampled every 50 ms while the cell runs; of several
    processes (an edge's ``--edge-workers``), their sum."""

    every = 0.05

    def __init__(self, *pids: int) -> None:
        super().__init__()
        self.pids = pids
        self.peak_kb = 0

    def sample(self) -> None:
        self.peak_kb = max(self.peak_kb, sum(status_kb(pid, "VmRSS") for pid in self.pids))

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(OSError):
            self.sample()


class ConnectionSampler(Sampler):
    """How the viewers' connections spread over an edge's serving processes while the cell
    runs (SO_REUSEPORT: the kernel picks the process per connection): each process's
    established connections to the edge's port, summed over samples once a second."""

    def __init__(self, pids: list[int], port: int, every: float = 1.0) -> None:
        super().__init__()
        self.pids = pids
        self.port = port
        self.every = every
        self.totals = dict.fromkeys(pids, 0)
        self.samples = 0

    def sample(self) -> None:
        for pid, held in established_by_pid(self.pids, self.port).items():
            self.totals[pid] += held
        self.samples += 1

    def mean(self) -> list[float]:
        """Each process's mean number of connections, in ``pids`` order."""
        return [round(self.totals[p] / max(1, self.samples), 1) for p in self.pids]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


Column = tuple[str, Callable[[dict[str, Any]], str]]  # header, how a cell shows in it


def columns_table(columns: list[Column], cells: list[dict[str, Any]]) -> str:
    """One row per cell, one column per (header, formatter)."""
    return markdown_table([h for h, _ in columns], [[f(c) for _, f in columns] for c in cells])


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    with open("/proc/loadavg", encoding="ascii") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
    }


def per_process(values: list[float] | list[int] | None, fmt: str = "{:.2f}") -> str:
    """A per-process figure of the edge's serving processes, "a / b"; "-" when not taken."""
    return " / ".join(fmt.format(v) for v in values) if values else "-"


def figure(*args: Any, **kwargs: Any) -> Any:
    """``pyplot.subplots`` on the file backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
