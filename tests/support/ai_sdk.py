"""The Vercel AI SDK's real client in Node, driven from a test: ``tests/frontends/node``
(``chat_driver.mjs``: the ``Chat`` class with ``DefaultChatTransport``), and the esbuild
bundle of a ``useChat`` page for Chromium (``page.jsx``).

    async with NodeChats() as node:
        await node.call(op="chat", name="a", api=..., id=chat_id, apiKey=key)
        await node.call(op="send", name="a", text="Hello?")
        state = await node.call(op="wait", name="a", until="done")
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

NODE_DIR = Path(__file__).resolve().parents[1] / "frontends" / "node"
# Every answer of the driver comes within this (its waits are for a turn of a few hundred
# fake-LLM tokens at most).
CALL_TIMEOUT = 20.0


def ensure_node_modules() -> None:
    """``npm ci`` when ``node_modules`` is missing or older than the lock file (``scripts/test``
    does the same before pytest starts)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are not installed (.ci/run installs them: scripts/test)")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"  # npm writes it last
    lock = NODE_DIR / "package-lock.json"
    if installed.is_file() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"npm ci in {NODE_DIR} failed:\n{done.stdout}{done.stderr}")


class DriverError(AssertionError):
    """The driver's command threw (its stack), or the driver died."""


class NodeChats:
    """One ``node chat_driver.mjs`` process; ``call`` sends a command and returns its answer."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._seq = itertools.count(1)
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stderr = b""

    async def __aenter__(self) -> NodeChats:
        ensure_node_modules()
        self._proc = await asyncio.create_subprocess_exec(
            "node", "chat_driver.mjs", cwd=NODE_DIR, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=16 * 1024 * 1024,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if self._reader is not None:
            self._reader.cancel()

    async def call(self, **command: Any) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        seq = next(self._seq)
        answer = self._answers[seq] = asyncio.get_running_loop().create_future()
        proc.stdin.write(json.dumps({"seq": seq, **command}).encode() + b"\n")
        await proc.stdin.drain()
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                result = await answer
        except TimeoutError:
            raise DriverError(f"no answer to {command} within {CALL_TIMEOUT}s") from None
        if "thrown" in result:
            raise DriverError(f"{command['op']} threw: {result['thrown']}")
        return result

    async def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        async for line in proc.stdout:
            answer = json.loads(line)
            future = self._answers.pop(answer["seq"], None)
            if future is not None and not future.done():
                future.set_result(answer)
        stderr = await proc.stderr.read()
        for future in self._answers.values():
            if not future.done():
                future.set_exception(DriverError(f"the driver ended: {stderr.decode()[-2000:]}"))
