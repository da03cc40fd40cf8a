"""``broker cluster`` end to end: the whole topology as local processes, driven through its
load balancer like a deployment would be.

One ``python -m broker cluster`` (Redis with AOF, the mock LLM, 3 edges, 2 workers, HAProxy)
serves 60 viewers of 3 generations, spread over the edges by round-robin, and resumes that
land on another edge than the one that served the start of the stream; then SIGINT stops it
and every process it started. ``broker cluster --tls`` serves HTTPS, HTTP/2 by ALPN, on the
self-signed certificate it made and names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from broker.client import Created, Follower, Message, create
from tests.integration.test_cli import Done, cli_env, finish
from tests.support.haproxy import SERVED_BY
from tests.support.procs import free_port
from tests.support.sse import Received, read_events

pytestmark = pytest.mark.timeout(150)

START_DEADLINE = 60.0  # seconds for the cluster to print its URL
STOP_DEADLINE = 30.0  # seconds for it to stop everything after SIGINT
GENERATIONS = 3
VIEWERS_PER_GENERATION = 20

READY_LINE = re.compile(
    r"^broker cluster: (?P<url>https?://\S+/) \(edges: (?P<edges>[^,]+), "
    r"workers: (?P<workers>\d+), redis: (?P<redis>\S+), mock LLM: (?P<mock>\S+/v1)\)$")
PIDS_LINE = re.compile(r"^broker cluster: pids (?P<pids>.+); Ctrl-C stops them all$")
LOGS_LINE = re.compile(r"logs in (?P<dir>\S+)$")
CERTIFICATE_LINE = re.compile(
    r"^broker cluster: HTTPS with HTTP/2 on a self-signed certificate for localhost: "
    r"(?P<cert>\S+) \(browsers warn once; curl --cacert (?P=cert); broker ask/tail and "
    r"Python: SSL_CERT_FILE=(?P=cert)\)$")


@dataclass
class Cluster:
    proc: subprocess.Popen[str]
    port: int
    url: str
    edges: list[str]
    pids: dict[str, int]
    log_dir: Path
    start_seconds: float
    lines: queue.Queue[str | None]
    stderr: Path
    certificate: Path | None = None  # with --tls: the certificate it printed


def _read_lines(stream: Iterator[str], into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


def _next_line(lines: queue.Queue[str | None], deadline: float, stderr: Path) -> str:
    try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError(f"broker cluster printed nothing in time; stderr:\n"
                             f"{stderr.read_text(errors='replace')[-3000:]}") from None
    if line is None:
        raise AssertionError(f"broker cluster exited before it was ready; stderr:\n"
                             f"{stderr.read_text(errors='replace')[-3000:]}")
    return line


@contextlib.contextmanager
def running_cluster(*options: str) -> Iterator[Cluster]:
    """``python -m broker cluster --port <free> *options`` until its start-up lines are out;
    on the way out, whatever it started is gone (killed if the test did not stop it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BROKER_", "OPENAI_")) and k != "REDIS_URL"}
    fd, name = tempfile.mkstemp(prefix="broker-cluster-test-", suffix=".err")
    os.close(fd)
    stderr = Path(name)
    started = time.monotonic()
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "cluster", "--port", str(port), *options],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + START_DEADLINE
        first = _next_line(lines, deadline, stderr)
        logs = LOGS_LINE.search(first)
        assert logs is not None, first
        log_dir = Path(logs["dir"])
        ready = READY_LINE.match(_next_line(lines, deadline, stderr))
        assert ready is not None
        assert httpx.get(ready["mock"] + "/models", timeout=5).status_code == 200
        start_seconds = time.monotonic() - started
        line = _next_line(lines, deadline, stderr)
        certificate = None
        if (tls := CERTIFICATE_LINE.match(line)) is not None:
            certificate = Path(tls["cert"])
            line = _next_line(lines, deadline, stderr)
        listed = PIDS_LINE.match(line)
        assert listed is not None, line
        pids = {name: int(pid) for name, pid in
                (item.split("=") for item in listed["pids"].split())}
        yield Cluster(proc, port, ready["url"], ready["edges"].split(), pids, log_dir,
                      start_seconds, lines, stderr, certificate)
    finally:
        if proc.poll() is None:  # the test failed before its own SIGINT
            proc.terminate()
            try:
                proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in pids.values():  # nothing it started may outlive a failed test either
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        reader.join(5)
        proc.stdout.close()
        stderr.unlink(missing_ok=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with running_cluster() as started:
        yield started


@dataclass
class Viewed:
    gen: str
    messages: list[Message]
    finish_reason: str | None
    reconnects: int
    served_by: list[str] = field(default_factory=list)


async def view(url: str, gen: Created) -> Viewed:
    """One viewer through the load balancer, noting which edge served each connection."""
    served_by: list[str] = []

    async def note(response: httpx.Response) -> None:
        served_by.append(response.headers.get(SERVED_BY, "?"))

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(20.0),
                                 event_hooks={"response": [note]}) as client:
        follower = Follower(client, gen.events_url)
        messages = [m async for m in follower]
    reason = follower.result.finish_reason if follower.result else None
    return Viewed(gen.id, messages, reason, follower.reconnects, served_by)


@dataclass
class Resumed:
    first: Received
    rest: Received
    first_edge: str
    resumed_edge: str
    attempts: int


async def resume_elsewhere(url: str, gen: Created, max_attempts: int = 20) -> Resumed:
    """Read the first 3 events, hang up, and resume with ``Last-Event-ID`` through the load
    balancer until a resume is served by another edge; read that one to the end."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(20.0)) as client:
        first = await read_events(client, gen.events_url, stop_after=3)
        assert first.status == 200 and len(first.messages) == 3, first
        first_edge = first.headers[SERVED_BY]
        for attempt in range(1, max_attempts + 1):
            headers = {"last-event-id": first.ids[-1]}
            async with aconnect_sse(client, "GET", gen.events_url, headers=headers) as source:
                edge = source.response.headers[SERVED_BY]
                if edge == first_edge:
                    continue  # hang up at once and try again
                rest = Received(source.response.status_code, source.response.headers)
                assert rest.status == 200, rest
                async for event in source.aiter_sse():
                    if event.data == "":
                        continue
                    rest.events.append(event)
                    if event.event in ("end", "error"):
                        break
                return Resumed(first, rest, first_edge, edge, attempt)
    raise AssertionError(f"{max_attempts} resumes all landed on {first_edge}")


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_viewers_spread_over_edges_and_resume_on_another(cluster: Cluster) -> None:
    assert len(cluster.edges) == 3
    assert set(cluster.pids) == {"redis", "mock-llm", "edge0", "edge1", "edge2",
                                 "worker0", "worker1", "haproxy"}
    assert all(pid_alive(pid) for pid in cluster.pids.values()), cluster.pids
    assert (cluster.log_dir / "pids").read_text().split() == [
        str(x) for name, pid in cluster.pids.items() for x in (name, pid)]

    async with httpx.AsyncClient(base_url=cluster.url, timeout=httpx.Timeout(20.0)) as http:
        gens = [await create(http, [{"role": "user", "content": f"Question {i}: why?"}])
                for i in range(GENERATIONS)]

        began = time.monotonic()
        viewers = [view(cluster.url, gen) for gen in gens for _ in range(VIEWERS_PER_GENERATION)]
        resumers = [resume_elsewhere(cluster.url, gen) for gen in gens]
        results = await asyncio.gather(*viewers, *resumers)
        viewed = [r for r in results if isinstance(r, Viewed)]
        resumed = [r for r in results if isinstance(r, Resumed)]
        viewers_seconds = time.monotonic() - began

        final = {gen.id: (await http.get(f"/v1/generations/{gen.id}")).json() for gen in gens}

    # Every viewer, whichever edge served it, got exactly the generation's text, in order.
    for gen_id, status in final.items():
        assert status["status"] == "completed", status
        assert status["text"], status
        mine = [v for v in viewed if v.gen == gen_id]
        assert len(mine) == VIEWERS_PER_GENERATION
        for v in mine:
            assert v.finish_reason == "stop", v
            assert "".join(m.text for m in v.messages) == status["text"]
            ids = [m.id for m in v.messages]
            assert ids == sorted(set(ids)), ids  # no id repeated, none out of order
        assert len({tuple(m.id for m in v.messages) for v in mine}) == 1

    # Round-robin spread the viewers' connections over all three edges.
    first_edges = Counter(v.served_by[0] for v in viewed)
    assert set(first_edges) == {"edge0", "edge1", "edge2"}, first_edges
    assert min(first_edges.values()) >= VIEWERS_PER_GENERATION // 2, first_edges

    # A resume on another edge carries exactly the rest: nothing lost, nothing repeated.
    for gen, r in zip(gens, resumed, strict=True):
        whole = next(v for v in viewed if v.gen == gen.id)
        assert r.resumed_edge != r.first_edge
        assert [e.id for e in r.first.messages] == [m.id for m in whole.messages[:3]]
        assert [e.id for e in r.rest.messages] == [m.id for m in whole.messages[3:]]
        assert r.rest.terminal is not None and r.rest.terminal.event == "end"
        assert r.first.text + r.rest.text == final[gen.id]["text"]

    reconnects = sum(v.reconnects for v in viewed)
    resume_attempts = sum(r.attempts for r in resumed)
    print(f"\nbroker cluster: started in {cluster.start_seconds:.2f} s; "
          f"{len(viewed)} viewers over {len(first_edges)} edges {dict(sorted(first_edges.items()))}"
          f", all finished in {viewers_seconds:.2f} s, {reconnects} viewer reconnects; "
          f"{len(resumed)} resumes on another edge after {resume_attempts} attempts "
          f"({[f'{r.first_edge}->{r.resumed_edge}' for r in resumed]})")

    # Ctrl-C stops everything it started, and frees the port.
    stopping = time.monotonic()
    cluster.proc.send_signal(signal.SIGINT)
    try:
        code = cluster.proc.wait(STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"broker cluster still running {STOP_DEADLINE} s after SIGINT") from None
    stop_seconds = time.monotonic() - stopping
    assert code == 0, cluster.stderr.read_text(errors="replace")[-3000:]
    left = {name: pid for name, pid in cluster.pids.items() if pid_alive(pid)}
    assert not left, f"still running after broker cluster exited: {left}"
    assert port_free(cluster.port)
    print(f"stopped in {stop_seconds:.2f} s after SIGINT; no process left; port free")
    shutil.rmtree(cluster.log_dir, ignore_errors=True)


def test_a_process_that_dies_stops_the_whole_cluster() -> None:
    with running_cluster("--edges", "1", "--workers", "1") as cluster:
        assert set(cluster.pids) == {"redis", "mock-llm", "edge0", "worker0", "haproxy"}
        os.kill(cluster.pids["edge0"], signal.SIGKILL)
        try:
            code = cluster.proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError("broker cluster outlived its edge") from None
        err = cluster.stderr.read_text(errors="replace")
        assert code == 1, err
        assert f"edge0 (pid {cluster.pids['edge0']}) was killed by SIGKILL" in err, err
        left = {name: pid for name, pid in cluster.pids.items() if pid_alive(pid)}
        assert not left, f"still running after broker cluster exited: {left}"
        assert port_free(cluster.port)
    shutil.rmtree(cluster.log_dir, ignore_errors=True)


async def test_tls_serves_https_with_http2_on_the_certificate_it_names() -> None:
    """``--tls``: the URL is https, the printed certificate verifies it (names localhost and
    127.0.0.1), ALPN offers HTTP/2 first and HTTP/1.1 still, and an answer streams exactly
    through it; plain HTTP is not served on that port."""
    with running_cluster("--tls", "--edges", "1", "--workers", "1") as cluster:
        assert cluster.url == f"https://127.0.0.1:{cluster.port}/"
        assert cluster.certificate is not None and cluster.certificate.parent.parent == (
            cluster.log_dir)
        trust = ssl.create_default_context(cafile=str(cluster.certificate))

        def negotiated(host: str, offered: list[str]) -> str | None:
            context = ssl.create_default_context(cafile=str(cluster.certificate))
            context.set_alpn_protocols(offered)
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.selected_alpn_protocol()

        assert negotiated("localhost", ["h2", "http/1.1"]) == "h2"
        assert negotiated("127.0.0.1", ["http/1.1"]) == "http/1.1"
        async with httpx.AsyncClient(base_url=cluster.url, verify=trust,
                                     timeout=httpx.Timeout(20.0)) as http:
            gen = await create(http, [{"role": "user", "content": "Over TLS, please."}])
            follower = Follower(http, gen.events_url)
            text = "".join([m.text async for m in follower])
            status = (await http.get(f"/v1/generations/{gen.id}")).json()
        assert follower.result is not None and follower.result.finish_reason == "stop"
        assert status["status"] == "completed" and text == status["text"] != ""
        # The terminal commands: refused with what to do, then trusting the certificate.
        async def ask(**env: str) -> Done:
            return await finish(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", "ask", "--url", cluster.url, "Over TLS?",
                env=cli_env() | env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
        untrusted = await ask()
        assert untrusted.code == 3, untrusted.stderr
        assert untrusted.stderr.strip().endswith(
            "(the edge's certificate is not trusted here: set SSL_CERT_FILE to it, or to its "
            "CA's, in PEM; `broker cluster --tls` prints its cert.pem)"), untrusted.stderr
        trusted = await ask(SSL_CERT_FILE=str(cluster.certificate))
        assert trusted.code == 0 and trusted.stdout.strip(), trusted.stderr
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{cluster.port}/readyz")
        cluster.proc.send_signal(signal.SIGINT)
        assert cluster.proc.wait(STOP_DEADLINE) == 0
    shutil.rmtree(cluster.log_dir, ignore_errors=True)


def test_tls_without_openssl_says_what_to_install(tmp_path: Path) -> None:
    """The certificate is made with the ``openssl`` command: without it, ``--tls`` stops
    before starting anything, with one line naming the package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for binary in ("redis-server", "haproxy"):
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        assert found is not None, f"{binary} is not installed (scripts/test installs it)"
        (bin_dir / binary).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "cluster", "--tls", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=STOP_DEADLINE, check=False)
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        "broker cluster: openssl not found (it runs redis-server and haproxy as local "
        "processes, and openssl makes the certificate); install it: "
        "sudo apt-get install openssl"], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
