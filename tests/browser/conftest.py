"""Fixtures for the browser tests: a real `broker dev` process and a real Chromium.

The broker runs as a subprocess (edge, worker, in-memory store and mock LLM in one
process), exactly as a person trying the demo would start it. Chromium is Debian's, driven
through Playwright's async API; Playwright objects belong to the event loop that created
them, so the browser fixtures and the tests using them share one module-scoped loop
(the test modules set ``pytest.mark.asyncio(loop_scope="module")``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from broker.tools.mockllm import default_script
from tests.browser.helpers import DEMO_QUESTION, VIEWER_TOKEN_KEY
from tests.conftest import StartBroker
from tests.support.chromium import launch
from tests.support.fakellm import FakeLLM
from tests.support.procs import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 15.0  # seconds for `broker dev` to answer /healthz
POLL_INTERVAL = 0.05
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("broker")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "broker"]
    return [*base, "dev", "--port", str(port)]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `broker dev` on a free port and yield its base URL, e.g. http://127.0.0.1:PORT."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["BROKER_LOG_LEVEL"] = "warning"
    # A known viewer-token key (dev mode makes a random one otherwise), so tests can sign a
    # token for an id the server never issued one for.
    env["BROKER_VIEWER_TOKEN_KEYS"] = VIEWER_TOKEN_KEY
    logs = tmp_path_factory.mktemp("broker-dev")
    stdout_path, stderr_path = logs / "stdout.log", logs / "stderr.log"

    def stderr_text() -> str:
        return stderr_path.read_text(encoding="utf-8", errors="replace")

    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            _broker_command(port), cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        )
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while True:
            code = proc.poll()
            if code is not None:
                pytest.fail(f"`broker dev` exited early with {code}; stderr:\n{stderr_text()}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"`broker dev` did not answer /healthz within {STARTUP_DEADLINE:.0f} s; "
                    f"stderr:\n{stderr_text()}"
                )
            time.sleep(POLL_INTERVAL)
        yield base_url
        code = proc.poll()
        if code is not None:
            pytest.fail(f"`broker dev` died during the tests ({code}); stderr:\n{stderr_text()}")
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def edge_url(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[str]:
    """The demo page on a real deployment: a `broker edge` (no producer keys, so the page may
    create; viewer tokens on, as in dev mode) + a `broker worker` + a redis-server, with the
    fake LLM answering the page's default question as the built-in mock does."""
    mock = default_script({"messages": [{"role": "user", "content": DEMO_QUESTION}]})
    fake_llm.script(DEMO_QUESTION, tokens=mock.tokens, delay=mock.delay, delays=mock.delays)
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_insecure="1",
                        broker_viewer_token_keys=VIEWER_TOKEN_KEY)
    start_broker("worker", redis.url, fake_llm)
    yield edge.url
    redis.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the whole module."""
    async with async_playwright() as pw:
        chromium = await launch(pw)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, broker_url: str) -> AsyncIterator[Page]:
    """A fresh context and page per test, with relative URLs resolved against the broker.

    Uncaught errors in the page's scripts fail the test: the demo must not throw. So does
    anything the page's Content-Security-Policy refused (Chromium reports each refusal on the
    console): the demo must work under it.
    """
    context = await browser.new_context(base_url=broker_url)
    context.set_default_timeout(20_000)
    pg = await context.new_page()
    page_errors: list[str] = []
    pg.on("pageerror", lambda exc: page_errors.append(str(exc)))
    refused: list[str] = []
    pg.on("console", lambda message: refused.append(message.text)
          if "Content Security Policy" in message.text else None)
    try:
        yield pg
    finally:
        await context.close()
    assert not page_errors, f"uncaught errors in the page: {page_errors}"
    assert not refused, f"refused by the page's Content-Security-Policy: {refused}"


@pytest_asyncio.fixture(loop_scope="module")
async def api(broker_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the broker's API, for what the test checks behind the browser."""
    async with httpx.AsyncClient(base_url=broker_url, timeout=10.0) as client:
        yield client
