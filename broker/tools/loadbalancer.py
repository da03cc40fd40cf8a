"""HAProxy in front of broker edges: the one configuration for Server-Sent Events.

``broker cluster`` runs HAProxy with it and the fault suite runs behind it
(``tests/support/haproxy.py``); ``deploy/haproxy.cfg`` carries the same settings with Docker
DNS discovery instead of a fixed server list, and ``deploy/haproxy-tls.cfg`` adds the HTTPS
listener (``tests/unit/test_deploy.py`` checks they agree).

Browsers get HTTP/2 from the HTTPS listener: over HTTP/1.1 a browser opens at most six
connections to one host, so a seventh ``EventSource`` (a seventh tab, or a page with many
streams) waits until one of the six ends; over HTTP/2 every stream shares one connection.
HAProxy speaks HTTP/1.1 to the edges either way.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx

_TEMPLATE = """\
global
    log stderr format raw local0 notice
    fd-hard-limit {fd_hard_limit}

defaults
    mode http
    log global
    option httplog
    option http-no-delay
    option redispatch 1
    retries 3
    retry-on conn-failure empty-response
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    timeout check 2s

frontend fe
{binds}
    default_backend edges

backend edges
    balance roundrobin
    http-reuse never
    option httpchk GET {check_path}
    http-check expect status 200
    default-server inter 300ms fastinter 300ms downinter 300ms fall 1 rise 1
    http-request disable-l7-retry unless METH_GET
    http-response set-header X-Served-By %[srv_name]
{servers}
"""


def server_names(backends: Sequence[str]) -> dict[str, str]:
    """HAProxy server name (what ``X-Served-By`` carries) -> backend URL: ``edge0``,
    ``edge1``, ... in the order of ``backends``."""
    return {f"edge{i}": url for i, url in enumerate(backends)}


FD_HARD_LIMIT = 40100
"""Open files HAProxy takes at most; it derives ``maxconn`` from what it gets (~20000 here)."""

ALPN = "h2,http/1.1"
"""The protocols the HTTPS listener offers, preferred first: browsers take HTTP/2, and a
client without it (curl --http1.1, most SSE libraries) still gets HTTP/1.1 on the same port."""


def tls_bind_options(certificate: str | Path) -> str:
    """What follows ``bind <address>`` for HTTPS: the PEM file (certificate chain, then the
    private key) and ALPN. ``deploy/haproxy-tls.cfg`` has the same, with its own path."""
    path = str(certificate)
    if not path or any(c.isspace() or c in "\"'#" for c in path):
        raise ValueError(f"certificate path must be plain (no spaces, quotes or #): {path!r}")
    return f"ssl crt {path} alpn {ALPN}"


def haproxy_config(
    backends: Sequence[str], *, port: int | None, host: str = "127.0.0.1",
    tls_port: int | None = None, certificate: str | Path | None = None,
    check_path: str = "/readyz", fd_hard_limit: int = FD_HARD_LIMIT,
) -> str:
    """An HAProxy configuration that balances SSE streams over ``backends``
    (``http://host:port`` edge URLs) and listens on ``host:port`` (plain HTTP/1.1; None for
    none) and on ``host:tls_port`` (HTTPS with ``certificate``, HTTP/2 or HTTP/1.1 by ALPN).

    The settings that matter for Server-Sent Events:

    - ``mode http``, ``balance roundrobin``: any edge can serve any generation, so there is
      no stickiness; a reconnect may land on any edge and resumes from the log with
      ``Last-Event-ID``.
    - ``option http-no-delay``: without it HAProxy sends with ``MSG_MORE`` and the kernel may
      hold a small event up to 200 ms (measured: median +58 ms, max +211 ms per event, and
      200 ms before a stream's headers).
    - No ``compression`` and no request buffering: HAProxy streams a response as it comes
      unless told to buffer it.
    - ``timeout client/server/tunnel 1h``: a stream is one long response; the edge's
      keep-alive comments (``BROKER_KEEPALIVE_INTERVAL``) keep it from looking idle, and a
      stream that outlives the hour is cut and resumed by the viewer.
    - ``option httpchk GET /readyz`` (``check_path``), ``http-check expect status 200``, and
      fast checks (every 300 ms, out after 1 failure, back after 1 success): an edge that
      lost Redis, or whose subscription stopped delivering, leaves rotation at once.
    - ``option redispatch 1``, ``retries 3``, ``retry-on conn-failure empty-response``,
      ``timeout connect 1s``: a request sent to an edge that just died (refused, no answer to
      the connect within 1 s, or closed without a response byte) is retried on another, so
      reconnecting viewers find a live edge at once. A stream that has started is never
      retried (the viewer resumes it with ``Last-Event-ID``), and ``http-request
      disable-l7-retry unless METH_GET`` leaves a create (POST) that may have reached an edge
      alone: retrying it could create the generation twice.
    - No ``on-marked-down shutdown-sessions``: a Redis restart fails every edge's check at
      once, and cutting every stream then would send every viewer into a load balancer with
      no edge up (a browser's EventSource gives up on the 503); the edges keep their streams
      and resync them from the log instead. A killed edge's connections are closed by its
      kernel anyway.
    - ``http-reuse never``: no server connection is shared between viewers.
    - ``X-Served-By`` on every response: the server name (``edge0``, ``edge1``, ... in the
      order of ``backends``, see ``server_names``) of the edge that answered.
    - HTTPS (``tls_port``): ``ssl crt <certificate> alpn h2,http/1.1``. HTTP/2 lifts the
      browser's six-connections-per-host limit; each HTTP/2 stream still gets its own
      HTTP/1.1 connection to an edge, and HAProxy forwards each chunk of the edge's response
      as a DATA frame as it comes (``option http-no-delay`` holds for both sides), so events
      and keep-alive comments arrive one by one, as over HTTP/1.1. HAProxy's HTTP/2 defaults
      are kept: 100 concurrent streams per connection (``tune.h2.max-concurrent-streams``),
      and its 64 kB receive window only paces uploads, which SSE has none of.

    No ``maxconn``: HAProxy derives it from the open files it may have (the hard limit,
    capped at ``fd_hard_limit``), about half of them since each viewer holds a client and a
    server connection. So it starts whatever the limit (a fixed ``maxconn`` needing more files
    than allowed stops it), and takes ~20000 connections where 40100 files are allowed. With
    no ``backends`` the backend has no servers (HAProxy answers 503).
    """
    servers = []
    for name, url in server_names(backends).items():
        address = httpx.URL(url)
        if address.scheme != "http" or address.port is None:
            raise ValueError(f"backend must be http://host:port, not {url!r}")
        servers.append(f"    server {name} {address.host}:{address.port} check")
    binds = []
    if port is not None:
        binds.append(f"    bind {host}:{port}")
    if tls_port is not None:
        if certificate is None:
            raise ValueError("an HTTPS listener (tls_port) needs a certificate")
        binds.append(f"    bind {host}:{tls_port} {tls_bind_options(certificate)}")
    if not binds:
        raise ValueError("HAProxy needs a port to listen on (port, tls_port or both)")
    return _TEMPLATE.format(binds="\n".join(binds), check_path=check_path,
                            fd_hard_limit=fd_hard_limit, servers="\n".join(servers))


CERTIFICATE_DAYS = 30
"""How long ``self_signed_certificate`` certificates are valid: local use, made anew by every
``broker cluster --tls``."""


class CertificateError(Exception):
    """The self-signed certificate could not be made; the message says why."""


def self_signed_certificate(directory: Path) -> Path:
    """Make a self-signed certificate for ``localhost``, ``127.0.0.1`` and ``::1`` with the
    ``openssl`` command (no Python dependency for a local convenience) and return the PEM
    HAProxy wants: the certificate, then its private key, readable by the owner only. The
    certificate alone is beside it as ``cert.pem``, for clients to trust (``curl --cacert``).

    A P-256 key (fast to make and to handshake); the certificate is an end-entity one
    (``CA:FALSE``, ``serverAuth``) with the names in ``subjectAltName``, which browsers and
    strict verifiers (Python 3.13's ``VERIFY_X509_STRICT``) require.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError(
            "openssl not found (it makes the self-signed certificate); install it: "
            "sudo apt-get install openssl")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key, pem = directory / "cert.pem", directory / "key.pem", directory / "haproxy.pem"
    made = subprocess.run([
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", str(CERTIFICATE_DAYS), "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth",
        "-keyout", str(key), "-out", str(cert),
    ], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        raise CertificateError(f"openssl could not make a certificate: {made.stderr.strip()}")
    pem.touch(mode=0o600)
    pem.write_text(cert.read_text() + key.read_text())
    key.unlink()  # the key lives in the PEM only
    return pem
