"""The processes a benchmark cell starts: redis-server, an edge, a worker, the fake LLM, the
publisher, load generators.

Every wait has a deadline and every process is stopped by its owner in a ``finally``
(``ProcessGroup.stop_all``): SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from bench.support import free_port

REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """The benchmark could not run, or a scenario's check failed."""


class Proc:
    """A child process; stdout is a pipe of protocol lines (or a log file), stderr a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 lines: bool = False, log_dir: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.cwd = cwd
        self.argv = argv
        self.env = env
        self.lines = lines
        self.log = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Proc:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.cwd, env=self.env,
                stdin=asyncio.subprocess.PIPE if self.lines else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if self.lines else log,
                stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def expect(self, word: str, within: float) -> list[str]:
        """The next stdout line, which must start with ``word``; its remaining fields."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(within):
                line = (await self.proc.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError as e:
            raise BenchError(f"{self.name}: no '{word}' within {within:.0f}s{self.tail()}") from e
        fields = line.split()
        if not fields or fields[0] != word:
            raise BenchError(f"{self.name}: expected '{word}', got {line!r}{self.tail()}")
        return fields[1:]

    async def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()

    def tail(self, chars: int = 2000) -> str:
        try:
            text = self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
        return f"\n--- {self.name} log ---\n{text}" if text.strip() else ""

    async def stop(self, grace: float = 5.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            async with asyncio.timeout(grace):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            async with asyncio.timeout(grace):
                await self.proc.wait()


class ProcessGroup:
    """The processes of one cell, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.procs: list[Proc] = []

    async def start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return await proc.start()

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.close_stdin()
                await proc.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {proc.name}: {e!r}", file=sys.stderr)

    def cleanup(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)

    async def close(self, *clients: aioredis.Redis | None) -> None:
        """The end of a cell: close the orchestrator's Redis clients, stop every process,
        remove the logs."""
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        await self.stop_all()
        self.cleanup()


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without broker/LLM settings that could leak in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


async def start_redis(group: ProcessGroup) -> tuple[Proc, aioredis.Redis, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    data_dir = group.log_dir / "redis"
    data_dir.mkdir()
    proc = await group.start(Proc("redis", [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "no",
    ], log_dir=group.log_dir))
    client = aioredis.Redis(port=port, socket_timeout=10, client_name="bench-orchestrator")
    await poll(client.ping, 10, "redis-server", proc)
    return proc, client, f"redis://127.0.0.1:{port}/0"


async def start_edge(
    group: ProcessGroup, impl: str, redis_url: str, *, repo: Path = REPO, **settings: str
) -> tuple[Proc, str]:
    """The edge under test on a free port, ready; ``settings`` are the broker edge's
    environment variables (``BROKER_SEND_TIMEOUT="6"``). ``repo``: the checkout whose broker
    edge runs (another one: a baseline, e.g. the main branch), on this interpreter, as
    ``start_worker`` runs a baseline: the same dependencies, so only the code differs (another
    virtualenv differs by itself: /work/wt/base's imported the edge in 3.6 MB less)."""
    port = free_port()
    if impl == "broker":
        argv = [sys.executable, "-m", "broker", "edge"]
        env = child_env(REDIS_URL=redis_url, BROKER_PORT=str(port), BROKER_HOST="127.0.0.1",
                        BROKER_LOG_LEVEL="warning", BROKER_INSECURE="1",
                        **({"PYTHONPATH": str(repo)} if repo != REPO else {}), **settings)
        ready_path = "/readyz"  # the hub's subscription delivers its probes
    else:
        argv = [sys.executable, "-m", "bench.naive_edge", "--redis-url", redis_url,
                "--port", str(port), "--log-level", "warning"]
        env = child_env()
        ready_path = "/healthz"
    proc = await group.start(Proc(f"{impl}-edge", argv, env=env, log_dir=group.log_dir,
                                  cwd=repo))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=2) as http:
        async def ready() -> bool:
            return (await http.get(ready_path)).status_code == 200

        await poll(ready, 30, f"{impl} edge", proc)
    return proc, url


async def poll(check: object, within: float, what: str, proc: Proc | None = None) -> None:
    """Call the async ``check`` until it returns something truthy, or fail after ``within``."""
    last: BaseException | None = None
    try:
        async with asyncio.timeout(within):
            while True:
                if proc is not None and not proc.alive():
                    raise BenchError(f"{what} exited{proc.tail()}")
                try:
                    if await check():  # type: ignore[operator]
                        return
                except (OSError, httpx.HTTPError, aioredis.RedisError) as e:
                    last = e
                await asyncio.sleep(0.05)
    except TimeoutError as e:
        tail = proc.tail() if proc is not None else ""
        raise BenchError(f"{what} not ready within {within:.0f}s (last: {last!r}){tail}") from e


async def start_fastllm(
    group: ProcessGroup, *, rate: float, tokens: int = 300, sentence_tokens: str = "6-10",
    script: Path | None = None,
) -> tuple[Proc, str]:
    """``bench.fastllm`` on a free port; returns it and its base URL (``.../v1``).
    ``script``: its scripted answers (``--script``) instead of the stamped word answers."""
    proc = await group.start(Proc("fastllm", [
        sys.executable, "-m", "bench.fastllm", "--port", "0", "--rate", str(rate),
        "--tokens", str(tokens), "--sentence-tokens", sentence_tokens,
        *(["--script", str(script)] if script is not None else []),
    ], env=child_env(), lines=True, log_dir=group.log_dir))
    (port,) = await proc.expect("listening", 30)
    return proc, f"http://127.0.0.1:{port}/v1"


WORKER_CLIENT_PREFIX = "broker-worker-"


async def start_worker(
    group: ProcessGroup, redis: aioredis.Redis, redis_url: str, llm_url: str, *,
    concurrency: int, repo: Path = REPO, **extra: str,
) -> Proc:
    """``python -m worker`` against ``llm_url``; ready once it blocks reading the job queue.
    ``repo``: the checkout whose worker runs (another one: a baseline, e.g. the main branch)."""
    if repo != REPO:
        extra = {"PYTHONPATH": str(repo), **extra}
    env = child_env(**{
        "REDIS_URL": redis_url, "OPENAI_BASE_URL": llm_url, "OPENAI_API_KEY": "bench",
        "BROKER_MODEL": "fastllm", "BROKER_MAX_CONCURRENCY": str(concurrency),
        "BROKER_WORKER_METRICS_PORT": "0", "BROKER_LOG_LEVEL": "warning", **extra,
    })
    proc = await group.start(Proc("worker", [sys.executable, "-m", "worker"], env=env,
                                  log_dir=group.log_dir, cwd=repo))

    async def reading_jobs() -> bool:
        return any(c.get("name", "").startswith(WORKER_CLIENT_PREFIX)
                   and c.get("cmd") == "xreadgroup" for c in await redis.client_list())

    await poll(reading_jobs, 30, "worker", proc)
    return proc
