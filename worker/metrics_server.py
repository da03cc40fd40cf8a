"""The worker's own ``/metrics`` server, and the port it takes.

Many workers may run on one host (systemd instances, ``broker cluster``, ``--scale`` without
container networking), each with its own metrics. So with ``BROKER_WORKER_METRICS_PORT``
unset a worker takes 9100, or the next free port up to 9199 when another process holds it;
with the port set (env or flag) it takes that port or stops with one line saying why; ``0``
serves no metrics. Either way its log says where its metrics are.
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import CollectorRegistry, start_http_server

from broker.core.settings import WORKER_METRICS_PORTS, Settings

log = logging.getLogger(__name__)

THE_SETTING = "--worker-metrics-port / BROKER_WORKER_METRICS_PORT"


def serve_metrics(settings: Settings, registry: CollectorRegistry) -> int | None:
    """Serve ``registry`` at ``/metrics`` from a daemon thread; the port it listens on (None:
    no server). A port that cannot be bound stops the worker with a one-line ``SystemExit``."""
    asked = settings.worker_metrics_port
    if asked == 0:
        log.info("worker metrics: not served (BROKER_WORKER_METRICS_PORT=0)")
        return None
    candidates = [asked] if asked is not None else list(WORKER_METRICS_PORTS)
    for tried, port in enumerate(candidates):
        try:
            start_http_server(port, settings.host, registry)
        except OSError as e:
            if asked is None and e.errno == errno.EADDRINUSE:
                continue  # another worker on this host (or anything else) holds it
            raise SystemExit(cannot_serve(f"{settings.host}:{port}", e)) from None
        where = f"http://{settings.host}:{port}/metrics"
        if tried:
            log.info("worker metrics on %s (%s in use, so the next free one; set %s to "
                     "choose)", where, _ports(candidates[:tried]), THE_SETTING)
        else:
            log.info("worker metrics on %s", where)
        return port
    raise SystemExit(
        f"broker worker: cannot serve metrics on {settings.host}: "
        f"{_ports(candidates)} all in use; set {THE_SETTING} (0: no metrics server)"
    )


def cannot_serve(address: str, error: OSError) -> str:
    """The one line a worker stops with when its metrics port cannot be bound."""
    if error.errno == errno.EADDRINUSE:
        reason = "address in use"
    else:
        reason = (error.strerror or str(error)).lower()
    return (f"broker worker: cannot serve metrics on {address}: {reason}; "
            f"set {THE_SETTING} (0: no metrics server)")


def _ports(ports: list[int]) -> str:
    return f"port {ports[0]}" if len(ports) == 1 else f"ports {ports[0]}-{ports[-1]}"
