"""HAProxy in front of broker edges: the one configuration for Server-Sent Events.

``broker cluster`` runs HAProxy with it and the fault suite runs behind it
(``tests/support/haproxy.py``); ``deploy/haproxy.cfg`` carries the same settings with Docker
DNS discovery instead of a fixed server list (``tests/unit/test_deploy.py`` checks they agree).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    bind {host}:{port}
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


def haproxy_config(
    backends: Sequence[str], *, port: int, host: str = "127.0.0.1",
    check_path: str = "/readyz", fd_hard_limit: int = FD_HARD_LIMIT,
) -> str:
    """An HAProxy configuration that balances SSE streams over ``backends``
    (``http://host:port`` edge URLs) and listens on ``host:port``.

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
    return _TEMPLATE.format(host=host, port=port, check_path=check_path,
                            fd_hard_limit=fd_hard_limit, servers="\n".join(servers))
