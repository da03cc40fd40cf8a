"""A server command pointed at a port that is taken says so in one line and exits non-zero:
no traceback, no half-started process (``broker edge``, ``dev``, ``mock-llm``, ``cluster``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.procs import RedisServer


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess[str], command: str,
                          port: int) -> None:
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.stdout == "", done.stdout  # `broker dev` prints its URL only once it listens
    last = done.stderr.splitlines()[-1]
    assert last == (f"broker {command}: cannot listen on 127.0.0.1:{port} (address already in "
                    "use); choose another port with --port (BROKER_PORT)"), done.stderr


@pytest.mark.parametrize("command", ["dev", "mock-llm", "cluster"])
def test_a_taken_port_is_one_line_and_a_failure(command: str, taken_port: int) -> None:
    done = run_broker(command, "--port", str(taken_port))
    assert_one_clear_line(done, command, taken_port)
    assert len(done.stderr.splitlines()) == 1, done.stderr  # nothing started, nothing to say


def test_a_taken_port_stops_the_edge_in_one_line(taken_port: int) -> None:
    redis = RedisServer().start()
    try:
        done = run_broker("edge", env={
            "REDIS_URL": redis.url, "BROKER_PORT": str(taken_port),
            "BROKER_API_KEYS": "k" * 32, "BROKER_VIEWER_TOKEN_KEYS": "v" * 32,
        })
    finally:
        redis.stop()
    assert_one_clear_line(done, "edge", taken_port)
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.parametrize("missing", ["fakeredis", "lupa"])
def test_dev_without_its_extra_says_in_one_line_how_to_install_it(missing: str) -> None:
    """``pip install .`` brings the edge and the worker; ``broker dev``'s in-memory store is
    the ``dev`` extra. Without it: one line saying how to install it, nothing started."""
    hide = f"import sys; sys.modules[{missing!r}] = None; import runpy; " \
           "runpy.run_module('broker', run_name='__main__')"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
    done = subprocess.run(
        [sys.executable, "-c", hide, "dev", "--port", "0"], env=clean, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1, done
    assert done.stdout == "", done.stdout
    assert done.stderr.splitlines() == [
        "broker dev: its in-memory store (fakeredis) is not installed: "
        "pip install 'sse-broker[dev]' (bash scripts/dev does)"
    ], done.stderr
