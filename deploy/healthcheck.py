"""Container health check: GET a local URL, exit 0 on a 2xx answer, 1 otherwise.

The image has no curl, so its HEALTHCHECK (and the compose file's overrides) run this with
the image's Python, standard library only:

    python /app/healthcheck.py                          # GET /healthz on $BROKER_PORT
    python /app/healthcheck.py --path /metrics --port-env BROKER_WORKER_METRICS_PORT \
        --default-port 9100
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/healthz", help="path to GET (default /healthz)")
    parser.add_argument("--port-env", default="BROKER_PORT",
                        help="env var holding the port (default BROKER_PORT)")
    parser.add_argument("--default-port", type=int, default=8000,
                        help="port when the env var is unset (default 8000)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    port = int(os.environ.get(args.port_env) or args.default_port)
    url = f"http://127.0.0.1:{port}{args.path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
