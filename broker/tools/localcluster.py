"""``broker cluster``: the compose topology as local processes, without Docker.

Starts ``redis-server`` (AOF on, in its own directory), the mock LLM, N ``broker edge``, M
``broker worker`` and HAProxy (``broker.tools.loadbalancer``'s configuration) in front of the
edges, waits until each answers, prints the load balancer's URL, and stops them all on
SIGINT/SIGTERM. If any of them dies on its own, it stops the others and exits non-zero.

Everything but HAProxy listens on 127.0.0.1, on free ports; HAProxy listens on
``--host``/``--port``: plain HTTP by default, HTTPS with HTTP/2 with ``--tls`` (on a
self-signed certificate made for the run). Logs, HAProxy's config, Redis's data, the
certificate and a ``pids`` file go to a temporary directory that is printed and kept after
the cluster stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

import httpx
import redis

from broker.core.settings import Settings
from broker.edge.uvicorn_extensions import ListenError, listen
from broker.tools.loadbalancer import CertificateError, haproxy_config, self_signed_certificate

INSTALL_HINT = "sudo apt-get install"  # + the missing packages (named as their binaries)
READY_TIMEOUT = 30.0  # seconds each stage of the start may take
STOP_TIMEOUT = 10.0  # seconds a stage of the stop may take before SIGKILL
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


class ClusterError(Exception):
    """The cluster could not start or a process of it failed; the message says which."""


@dataclass(eq=False)  # hashed by identity
class Child:
    name: str
    argv: list[str]
    log: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000  # below it: well-known and registered services


def free_port() -> int:
    """A port free now, chosen BELOW the kernel's ephemeral range where there is room: a port
    from that range (what binding port 0 gives) may be taken, between this check and the
    child's own bind, as the local end of any outgoing connection on the host (the cluster's
    own edges connecting to Redis as they start: a child then exits "address already in
    use"). Elsewhere than Linux, a port the kernel picks."""
    try:
        ephemeral_low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    if ephemeral_low - LOWEST_CHOSEN_PORT >= 1000:
        chooser = random.SystemRandom()
        for _ in range(200):
            port = chooser.randrange(LOWEST_CHOSEN_PORT, ephemeral_low)
            with socket.socket() as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Fail clearly if ``host:port`` is taken (HAProxy binds with SO_REUSEPORT, so it could
    otherwise share the port with another listener without a word)."""
    try:
        listen(host, port).close()
    except ListenError as e:
        raise ClusterError(str(e)) from e


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if ``broker cluster`` itself dies (even by
    SIGKILL), so no process outlives it. Linux only; elsewhere a no-op."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


class LocalCluster:
    """The processes of one local cluster; ``run()`` is the whole ``broker cluster``."""

    def __init__(self, settings: Settings, *, edges: int = 3, workers: int = 2,
                 tls: bool = False, out: TextIO | None = None) -> None:
        if edges < 1 or workers < 1:
            raise ValueError("a cluster needs at least one edge and one worker")
        self.settings = settings
        self.n_edges = edges
        self.n_workers = workers
        self.tls = tls
        self.certificate: Path | None = None  # with --tls: what clients may trust
        self.out = out or sys.stdout
        self.dir: Path | None = None
        self.children: list[Child] = []
        self._signal: int | None = None
        self._interruptible = False
        self._stopping = False

    # ------------------------------------------------------------------------------ running

    def run(self) -> int:
        """Start, print the URL, wait for a signal or a death, stop. The exit status."""
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not every readiness poll
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        failed = True
        try:
            try:
                self.start()
                self._say(self.ready_line())
                if self.certificate is not None:
                    self._say(f"broker cluster: HTTPS with HTTP/2 on a self-signed certificate "
                              f"for localhost: {self.certificate} (browsers warn once; curl "
                              f"--cacert {self.certificate}; broker ask/tail and Python: "
                              f"SSL_CERT_FILE={self.certificate})")
                self._say("broker cluster: pids " + " ".join(
                    f"{c.name}={c.pid}" for c in self.children) + "; Ctrl-C stops them all")
                failed = self.wait()
            except ClusterError as e:
                self._say(f"broker cluster: {e}", error=True)
            except _Stop:
                failed = False
            finally:  # whatever happened, nothing outlives the command
                self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.dir is not None:
            self._say(f"broker cluster: stopped; logs in {self.dir}", error=failed)
        return 1 if failed else 0

    def start(self) -> None:
        """Start every process and wait until each is ready (``ClusterError`` if one is not)."""
        needed = ["redis-server", "haproxy"] + (["openssl"] if self.tls else [])
        missing = [b for b in needed if _which(b) is None]
        if missing:
            raise ClusterError(
                f"{' and '.join(missing)} not found (it runs redis-server and haproxy as local "
                f"processes{', and openssl makes the certificate' if self.tls else ''}); "
                f"install {'them' if len(missing) > 1 else 'it'}: "
                f"{INSTALL_HINT} {' '.join(missing)}")
        check_port_free(self.settings.host, self.settings.port)
        self.dir = Path(tempfile.mkdtemp(prefix="broker-cluster-"))
        self._say(f"broker cluster: starting Redis, the mock LLM, {_count(self.n_edges, 'edge')}"
                  f", {_count(self.n_workers, 'worker')} and HAProxy; logs in {self.dir}")

        redis_port = free_port()
        redis_url = f"redis://{LOOPBACK}:{redis_port}/0"
        data = self.dir / "redis"
        data.mkdir()
        rds = self._spawn("redis", [
            _which("redis-server") or "redis-server", "--port", str(redis_port),
            "--bind", LOOPBACK, "--dir", str(data), "--appendonly", "yes",
            "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--logfile", "",
        ], {}, redis_url)
        mock_port = free_port()
        mock = self._spawn("mock-llm", self._broker("mock-llm"), {
            "BROKER_HOST": LOOPBACK, "BROKER_PORT": str(mock_port),
        }, f"http://{LOOPBACK}:{mock_port}/v1")
        self._wait_ready({rds: lambda: _redis_answers(redis_port),
                          mock: lambda: _http_ok(mock.url + "/models")})

        common = {"REDIS_URL": redis_url, "BROKER_HOST": LOOPBACK,
                  "BROKER_MODEL": self.settings.model}
        # A local topology to try the product: its edges run open unless the environment
        # brings keys (BROKER_API_KEYS, BROKER_VIEWER_TOKEN_KEYS) or BROKER_INSECURE=0.
        edge_env = {"BROKER_INSECURE": os.environ.get("BROKER_INSECURE", "1")}
        checks: dict[Child, Callable[[], bool]] = {}
        edges = []
        for i in range(self.n_edges):
            port = free_port()
            edge = self._spawn(f"edge{i}", self._broker("edge"),
                               {**common, **edge_env, "BROKER_PORT": str(port)},
                               f"http://{LOOPBACK}:{port}")
            edges.append(edge)
            checks[edge] = _bind(_http_ok, edge.url + "/readyz")
        llm = self._llm_env(mock.url)
        for i in range(self.n_workers):
            port = free_port()
            worker = self._spawn(f"worker{i}", self._broker("worker"), {
                **common, **llm, "BROKER_WORKER_METRICS_PORT": str(port),
                "BROKER_WORKER_ID": "",  # each its own default name, whatever the env says
            }, f"http://{LOOPBACK}:{port}/metrics")
            checks[worker] = _bind(_http_ok, worker.url)
        self._wait_ready(checks)

        self._start_haproxy([e.url for e in edges])

    def _start_haproxy(self, edges: list[str]) -> None:
        """HAProxy in front of ``edges`` on ``--host``/``--port``: HTTPS with HTTP/2 on a
        certificate made for this run with ``--tls``, plain HTTP otherwise."""
        assert self.dir is not None
        host, port = self.settings.host, self.settings.port
        verify: ssl.SSLContext | bool = True
        if self.tls:
            try:
                pem = self_signed_certificate(self.dir / "tls")
            except CertificateError as e:
                raise ClusterError(str(e)) from e
            self.certificate = pem.with_name("cert.pem")
            verify = ssl.create_default_context(cafile=str(self.certificate))
            # Only this run's own certificate is trusted; its names (localhost, 127.0.0.1,
            # ::1) need not match a --host such as a LAN address for the readiness check.
            verify.check_hostname = False
            text = haproxy_config(edges, host=host, port=None, tls_port=port, certificate=pem)
        else:
            text = haproxy_config(edges, host=host, port=port)
        config = self.dir / "haproxy.cfg"
        config.write_text(text)
        binary = _which("haproxy") or "haproxy"
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise ClusterError(f"haproxy rejected {config}:\n{check.stdout}{check.stderr}")
        lb = self._spawn("haproxy", [binary, "-f", str(config), "-db"], {}, self.url)
        scheme = "https" if self.tls else "http"
        ready = f"{scheme}://{_connectable(host)}:{port}/readyz"
        self._wait_ready({lb: lambda: _http_ok(ready, verify)})

    def wait(self) -> bool:
        """Block until a signal (``_Stop``) or until a process exits (True, after saying
        which)."""
        self._interruptible = True
        try:
            if self._signal is not None:
                raise _Stop
            while True:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # a signal raises
                if info is None:
                    continue
                child = next((c for c in self.children if c.pid == info.si_pid), None)
                if child is None:  # not ours (none should exist): reap it and go on
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(info.si_pid, 0)
                    continue
                assert child.proc is not None
                child.proc.wait()
                self._say(f"broker cluster: {self._death(child, '; stopping everything')}",
                          error=True)
                return True
        finally:
            self._interruptible = False

    def stop(self) -> None:
        """SIGTERM to each stage, in reverse order of dependency (HAProxy, the edges and
        workers, the mock LLM, Redis), SIGKILL to what outlives ``STOP_TIMEOUT``."""
        self._stopping = True
        stages: list[Callable[[str], bool]] = [
            lambda name: name == "haproxy",
            lambda name: name.startswith(("edge", "worker")),
            lambda name: name == "mock-llm",
            lambda name: name == "redis",
        ]
        for in_stage in stages:
            live = [c for c in self.children if in_stage(c.name) and c.alive()]
            for child in live:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for child in live:
                assert child.proc is not None
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._say(f"broker cluster: {child.name} still running after "
                              f"{STOP_TIMEOUT:g} s: killing it", error=True)
                    child.proc.kill()
                    child.proc.wait()
        self._stopping = False

    # ------------------------------------------------------------------------------ helpers

    @property
    def url(self) -> str:
        host = self.settings.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.settings.port}/"

    def ready_line(self) -> str:
        edges = " ".join(c.url for c in self.children if c.name.startswith("edge"))
        redis_url = next(c.url for c in self.children if c.name == "redis")
        # The mock LLM too: your own loop (README, "Bring your own loop") can call it.
        mock_url = next(c.url for c in self.children if c.name == "mock-llm")
        return (f"broker cluster: {self.url} (edges: {edges}, workers: {self.n_workers}, "
                f"redis: {redis_url}, mock LLM: {mock_url})")

    def _llm_env(self, mock_url: str) -> dict[str, str]:
        """Without an API key the workers use the mock LLM, as ``broker dev`` does."""
        if not self.settings.openai_api_key:
            return {"OPENAI_BASE_URL": mock_url, "OPENAI_API_KEY": "mock"}
        env = {"OPENAI_API_KEY": self.settings.openai_api_key}
        if self.settings.openai_base_url:
            env["OPENAI_BASE_URL"] = self.settings.openai_base_url
        return env

    def _broker(self, command: str) -> list[str]:
        return [sys.executable, "-m", "broker", command]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], url: str) -> Child:
        if self._signal is not None:
            raise _Stop
        assert self.dir is not None
        full_env = dict(os.environ)
        full_env.pop("OPENAI_BASE_URL", None)  # the worker gets the resolved value, or none
        full_env.update({"BROKER_LOG_LEVEL": self.settings.log_level,
                         "PYTHONUNBUFFERED": "1", **env})
        child = Child(name, argv, self.dir / f"{name}.log", url)
        with child.log.open("wb") as log:
            child.proc = subprocess.Popen(
                argv, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, process_group=0, preexec_fn=_die_with_parent,
            )
        self.children.append(child)
        with (self.dir / "pids").open("a") as pids:
            pids.write(f"{name} {child.pid}\n")
        return child

    def _wait_ready(self, checks: dict[Child, Callable[[], bool]]) -> None:
        """Poll every check until all pass; fail at once if one of them exits, or after
        ``READY_TIMEOUT``."""
        pending = dict(checks)
        deadline = time.monotonic() + READY_TIMEOUT
        while pending:
            if self._signal is not None:
                raise _Stop
            for child, check in list(pending.items()):
                if not child.alive():
                    raise ClusterError(self._death(child, " while starting"))
                try:
                    if check():
                        del pending[child]
                except (httpx.HTTPError, redis.RedisError, OSError):
                    pass  # not listening yet
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise ClusterError(f"{names} not ready after {READY_TIMEOUT:g} s; see "
                                   + ", ".join(str(c.log) for c in pending))
            if pending:
                time.sleep(0.05)

    def _death(self, child: Child, what: str) -> str:
        """``<name> (pid N) exited with status 1`` + ``what``, then the end of its log."""
        assert child.proc is not None
        code = child.proc.poll()
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        tail = child.log_tail()
        return (f"{child.name} (pid {child.pid}) {how}{what}. The end of {child.log}:"
                + (f"\n{tail}" if tail else " (empty)"))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:  # a second Ctrl-C while stopping: no more waiting
            for child in self.children:
                if child.alive():
                    assert child.proc is not None
                    child.proc.kill()
            return
        self._signal = signum
        if self._interruptible:
            raise _Stop

    def _say(self, line: str, *, error: bool = False) -> None:
        print(line, file=sys.stderr if error else self.out, flush=True)


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _which(binary: str) -> str | None:
    """On PATH, or where Debian installs it (``/usr/sbin`` is not on a user's PATH)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/local/sbin:/usr/sbin:/sbin")


def _bind(check: Callable[[str], bool], arg: str) -> Callable[[], bool]:
    return lambda: check(arg)


def _http_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    return httpx.get(url, timeout=1.0, verify=verify).status_code == 200


def _redis_answers(port: int) -> bool:
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=1.0)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _connectable(host: str) -> str:
    """An address to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
