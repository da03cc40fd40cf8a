"""HAProxy in front of broker edges, as a load balancer of the test's own.

The configuration is the product's (``broker.tools.loadbalancer.haproxy_config``, whose docstring
explains each setting for Server-Sent Events), so the fault suite runs behind exactly what
``broker cluster`` runs. Every response carries ``X-Served-By: <server name>`` (``edge0``,
``edge1``, ... in the order of ``backends``), so a test can tell which edge answered. With
``tls=True`` it also listens for HTTPS (HTTP/2 or HTTP/1.1 by ALPN, what ``broker cluster
--tls`` serves) on a second port, with a self-signed certificate made for it.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import httpx

from broker.tools import loadbalancer

from .procs import free_port, wait_until

SERVED_BY = "x-served-by"
BIND_ATTEMPTS = 3  # ports tried when another listener took the free port first


class HAProxy:
    """``haproxy -f <cfg> -db`` on a free 127.0.0.1 port, balancing over ``backends``."""

    def __init__(self, backends: list[str], *, check_path: str = "/readyz",
                 tls: bool = False) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("haproxy is not installed (.ci/run installs it via scripts/test)")
        if not backends:
            raise ValueError("HAProxy needs at least one backend")
        self.binary = binary
        self.backends = list(backends)
        self.check_path = check_path
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="haproxy-test-"))
        self.config = self.dir / "haproxy.cfg"
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls_port: int | None = None
        self.certificate: Path | None = None  # the PEM HAProxy serves (certificate + key)
        if tls:
            self.tls_port = free_port()
            self.certificate = loadbalancer.self_signed_certificate(self.dir / "tls")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """The HTTPS listener (``tls=True``): HTTP/2 for clients that offer it."""
        assert self.tls_port is not None, "started without tls=True"
        return f"https://127.0.0.1:{self.tls_port}"

    def trust(self) -> ssl.SSLContext:
        """A client TLS context that trusts this load balancer's certificate (and only it)."""
        assert self.certificate is not None, "started without tls=True"
        return ssl.create_default_context(cafile=str(self.certificate.with_name("cert.pem")))

    def server_names(self) -> dict[str, str]:
        """Server name (as in ``X-Served-By``) -> backend URL."""
        return loadbalancer.server_names(self.backends)

    def render_config(self) -> str:
        return loadbalancer.haproxy_config(self.backends, port=self.port,
                                           tls_port=self.tls_port, certificate=self.certificate,
                                           check_path=self.check_path)

    def start(self, timeout: float = 10.0) -> HAProxy:
        for attempt in range(BIND_ATTEMPTS):
            if attempt:  # another listener took a port between free_port() and the bind
                self.port = free_port()
                self.tls_port = free_port() if self.tls_port is not None else None
            proc = self._launch()
            exited = self._wait_ready(proc, timeout)
            if exited and "cannot bind socket" in self.output() and attempt + 1 < BIND_ATTEMPTS:
                continue
            if exited:
                output = self.output()
                self.stop()
                raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{output}")
            return self
        raise AssertionError("unreachable")

    def _launch(self) -> subprocess.Popen[bytes]:
        self.config.write_text(self.render_config())
        check = subprocess.run([self.binary, "-c", "-f", str(self.config)],
                               capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected its config:\n{check.stdout}{check.stderr}")
        # -dR (noreuseport): HAProxy binds with SO_REUSEPORT otherwise, so a port that another
        # HAProxy holds (a test running beside this one picked the same free port) would be
        # shared without a word, the two splitting the connections between them. Without it
        # the bind fails, and start() tries other ports.
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-f", str(self.config), "-db", "-dR"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        return self.proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        """Until HAProxy answers the check path on each listener; True if it exited."""

        def ready() -> bool:
            if proc.poll() is not None:
                return True  # exited: stop waiting, the caller reports it
            if httpx.get(self.url + self.check_path, timeout=1).status_code != 200:
                return False
            return self.tls_port is None or httpx.get(
                self.tls_url + self.check_path, timeout=1, verify=self.trust()).status_code == 200

        try:
            wait_until(ready, timeout, f"haproxy on {self.port} to answer {self.check_path}")
        except TimeoutError as e:
            output = self.output()
            self.stop()
            raise RuntimeError(f"{e}; haproxy's output:\n{output}") from e
        return proc.poll() is not None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
