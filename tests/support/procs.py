"""Real processes for tests: redis-server and broker edges/workers on free ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import redis

# uvloop (libuv), the event loop the edge and the worker run on, keeps its clock and timers in
# whole milliseconds: a timeout may fire up to this much before the float delay it was given.
TIMER_RESOLUTION = 0.001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # the thing may not be up yet
            last_error = e
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last_error!r})")


async def eventually(
    check: Callable[[], Awaitable[Any]], within: float = 10.0, what: str = "condition"
) -> Any:
    """``wait_until`` for async checks (an HTTP call, a viewer's progress)."""
    try:
        async with asyncio.timeout(within):
            while True:
                result = await check()
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError as e:
        raise TimeoutError(f"timed out after {within}s waiting for {what}") from e


class RedisServer:
    """A redis-server of the test's own, on a free port, that the test may kill and restart."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.binary = binary
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--appendonly", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.client().ping(), 10, f"redis-server on {self.port}")
        return self

    def restart(self) -> None:
        """Start again on the same port and directory (an AOF there is replayed)."""
        self.kill()
        self.start()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class BrokerProcess:
    """``python -m broker <command>`` as a subprocess; logs go to a file for failure reports."""

    def __init__(
        self, command: str, env: dict[str, str], port: int | None = None, *,
        own_metrics_port: bool = True,
    ) -> None:
        self.command = command
        self.port = port
        self.log = Path(tempfile.mkstemp(prefix=f"broker-{command}-", suffix=".log")[1])
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
        full_env.update(env)
        full_env.setdefault("BROKER_LOG_LEVEL", "info")
        if port is not None:
            full_env["BROKER_PORT"] = str(port)
        if command == "edge":
            # The suites hold the contract open; tests/integration/test_security.py runs edges
            # with API keys and viewer tokens.
            full_env.setdefault("BROKER_INSECURE", "1")
        if command == "worker" and own_metrics_port:
            # A free port of its own, so tests never depend on what holds 9100-9199. Without
            # one (own_metrics_port=False) the worker picks as a user's would, and logs it.
            full_env.setdefault("BROKER_WORKER_METRICS_PORT", str(free_port()))
        self.metrics_port = int(full_env.get("BROKER_WORKER_METRICS_PORT", 0))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", command], env=full_env,
                stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 15.0, path: str = "/healthz") -> BrokerProcess:
        """Until ``path`` answers 200: ``/healthz`` (listening) or, for an edge, ``/readyz``
        (its Redis probes come back: its count of Redis's healthy time has started)."""
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker {self.command} exited:\n{self.output()}")
            return httpx.get(self.url + path, timeout=1).status_code == 200

        wait_until(ready, timeout, f"broker {self.command} on {self.port} ({path})")
        return self

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        """Until the process's log matches ``pattern`` (e.g. a worker's "taking jobs"); fails at
        once if the process exited."""
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker {self.command} exited:\n{self.output()}")
            return re.search(pattern, self.log.read_text(errors="replace"))

        what = f"{pattern!r} in the {self.command}'s log"
        match: re.Match[str] = wait_until(found, timeout, what)
        return match

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.unlink(missing_ok=True)
