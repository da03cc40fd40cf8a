"""Node viewers (the ``eventsource`` npm package) as a subprocess: ``tests/faults/node/viewer.mjs``.

    viewers = NodeViewers(url, count=3).start()   # returns once every EventSource is open
    viewers.progress()                            # messages received so far, per viewer
    viewers.poll()                                # the report if all have finished, else None
    results = viewers.result(timeout=30)          # one dict per viewer, when all have finished
    viewers.stop()
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).resolve().parents[1] / "faults" / "node"


def ensure_node_modules() -> None:
    """``npm ci`` in the viewer's directory when its ``node_modules`` is missing or stale."""
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


class NodeViewers:
    """``node viewer.mjs <url> <count>``: ``count`` EventSources in one Node process."""

    def __init__(self, url: str, count: int = 1) -> None:
        self.url = url
        self.count = count
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._errors: list[str] = []
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []
        self._eof = False

    def start(self, timeout: float = 15.0) -> NodeViewers:
        """Start the viewers and wait until every EventSource has opened (``READY``)."""
        ensure_node_modules()
        self.proc = subprocess.Popen(
            ["node", "viewer.mjs", self.url, str(self.count)], cwd=NODE_DIR,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        self._wait_for(lambda: "READY" in self._lines, timeout, "READY")
        return self

    def progress(self) -> list[int]:
        """Messages each viewer has received so far (zeros before the first one)."""
        with self._changed:
            lines = [line for line in self._lines if line.startswith("PROGRESS ")]
        counts: list[int] = json.loads(lines[-1].removeprefix("PROGRESS ")) if lines else []
        return counts or [0] * self.count

    def poll(self) -> list[dict[str, Any]] | None:
        """The report if every viewer has finished; raises if the process died without one."""
        with self._changed:
            line = self._report_line()
            if line is None and self._eof:
                self._fail("exited without a report")
        if line is None:
            return None
        report: list[dict[str, Any]] = json.loads(line)
        return report

    def result(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The parsed JSON report, once every viewer has finished; fails after ``timeout``."""
        self._wait_for(lambda: self._report_line() is not None, timeout, "the JSON report")
        report = self.poll()
        assert report is not None
        return report

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stderr(self) -> str:
        with self._changed:
            return "".join(self._errors)[-4000:]

    def _report_line(self) -> str | None:
        return next((line for line in self._lines if line.startswith("[")), None)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self._lines.append(raw.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self._errors.append(raw)

    def _wait_for(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                remaining = deadline - time.monotonic()
                if self._eof:
                    self._fail(f"exited while waiting for {what}")
                if remaining <= 0:
                    self._fail(f"no {what} after {timeout}s")
                self._changed.wait(remaining)

    def _fail(self, why: str) -> None:
        code = self.proc.poll() if self.proc else None
        raise RuntimeError(f"node viewers (exit code {code}): {why}; "
                           f"stdout: {self._lines[-5:]!r}; stderr:\n{self.stderr()}")
