"""``broker edge --edge-workers N``: N edge processes serving one port, so one host uses all its
cores.

An edge is one Python process: one event loop, at most one core. This supervisor binds the
port first (a port in use is one clear line, as for one process; ``--port 0`` picks it
here), with ``SO_REUSEPORT``, and keeps it bound without listening, then starts N ordinary
``broker edge`` processes that each listen on that port with ``SO_REUSEPORT`` too: the
kernel spreads new connections evenly among the listening processes (one socket shared by
all would let whichever process wakes first take nearly every connection). Each process is
a whole edge: its own Redis pool, its own hub with one subscription per generation that its
viewers watch (so a generation watched through two holds two subscriptions, as on two
edges), its own ``/readyz`` and ``/metrics``.

The supervisor itself serves nothing. SIGTERM or SIGINT goes to every process (each ends its
streams at once, see ``EdgeServer``), and it exits when they have. A process that dies on its
own is started again, unless it died within ``STARTUP_SECONDS`` of its start (a setting that
cannot work, Redis's URL wrong): then every process is stopped and the supervisor exits with
that process's status.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from broker.core.settings import Settings
from broker.edge.uvicorn_extensions import GRACEFUL_SHUTDOWN_SECONDS, listen

log = logging.getLogger(__name__)

REUSE_PORT_ENV = "BROKER_EDGE_REUSE_PORT"
"""Set for a process this supervisor starts: listen with ``SO_REUSEPORT`` beside the others."""
STARTUP_SECONDS = 5.0
POLL_SECONDS = 0.2
STOP_SECONDS = GRACEFUL_SHUTDOWN_SECONDS + 5


def child_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment of one edge process: every edge setting as its env var (so flags given
    to the supervisor hold for the processes too), one process each, the port it bound."""
    env = dict(os.environ)
    for f in dataclasses.fields(Settings):
        if "edge" not in f.metadata["roles"]:
            continue
        value = getattr(settings, f.name)
        if value is None:
            env.pop(f.metadata["env"], None)
        elif isinstance(value, bool):
            env[f.metadata["env"]] = "1" if value else "0"
        else:
            env[f.metadata["env"]] = str(value)
    env["BROKER_EDGE_WORKERS"] = "1"
    env["BROKER_PORT"] = str(port)
    env[REUSE_PORT_ENV] = "1"
    return env


class EdgeProcesses:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started: list[float] = []

    def _start(self, port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "broker", "edge"],
                                env=child_env(self.settings, port))

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        settings = self.settings
        # Bound, never listening (connections go to listening sockets only): it holds the port
        # for processes started again. ListenError: one line, nothing started.
        sock = listen(settings.host, settings.port, reuse_port=True)
        port = sock.getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        self.procs = [self._start(port) for _ in range(settings.edge_workers)]
        self.started = [time.monotonic()] * settings.edge_workers
        log.warning("edge: %d processes on %s:%d (pids %s)", settings.edge_workers, settings.host,
                    port, " ".join(str(p.pid) for p in self.procs))
        status = 0
        try:
            while not self.stopping:
                time.sleep(POLL_SECONDS)
                for i, proc in enumerate(self.procs):
                    code = proc.poll()
                    if code is None or self.stopping:
                        continue
                    if time.monotonic() - self.started[i] < STARTUP_SECONDS:
                        log.error("edge process %d exited with %d at startup; stopping",
                                  proc.pid, code)
                        self.stopping = True
                        status = code or 1
                        break
                    log.error("edge process %d exited with %d; starting another", proc.pid, code)
                    self.procs[i] = self._start(port)
                    self.started[i] = time.monotonic()
        finally:
            self._stop_all()
            sock.close()
        return status

    def _stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
