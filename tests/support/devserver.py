"""``broker dev`` as a newcomer runs it: a real process, on the port it picks itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from .procs import wait_until

BANNER = re.compile(r"^broker dev: open (http://\S+)/$", re.MULTILINE)
START_TIMEOUT = 15.0


class DevServer:
    """``python -m broker dev --port 0 *args``; its URL comes from the line it prints once it
    listens (so no port is guessed, and none raced for)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OPENAI_"))}
        self.dir = Path(tempfile.mkdtemp(prefix="broker-dev-"))
        self.stdout, self.stderr = self.dir / "stdout", self.dir / "stderr"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "dev", "--port", "0", *args],
                env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        self.url = ""

    def start(self) -> DevServer:
        def banner() -> str | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker dev exited:\n{self.log()}")
            found = BANNER.search(self.stdout.read_text())
            return found.group(1) if found else None

        self.url = wait_until(banner, START_TIMEOUT, "broker dev's URL")
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200,
                   START_TIMEOUT, "broker dev's /healthz")
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def log_lines(self, logger: str) -> list[str]:
        """The messages ``logger`` logged (text format: ``<time> <LEVEL> <logger>: <msg>``)."""
        marker = f" {logger}: "
        return [line.split(marker, 1)[1] for line in self.log().splitlines() if marker in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
