"""The ``broker`` command: the servers ``edge``, ``worker``, ``dev`` and ``mock-llm``, the local
topology ``cluster``, and the terminal clients ``ask`` and ``tail`` (built on
``broker.client``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import uvicorn

from broker.client.terminal import (
    CLIENT_COMMANDS,
    CLIENT_EPILOG,
    EXIT_INTERRUPTED,
    add_client_arguments,
    run_client,
)
from broker.core import logs
from broker.core.settings import Settings, add_arguments, from_args
from broker.edge.uvicorn_extensions import ListenError, listen, serve


def run_edge(settings: Settings) -> None:
    from broker.edge.app import create_app
    from broker.tools.edgeprocesses import REUSE_PORT_ENV, EdgeProcesses

    one_of_many = os.environ.pop(REUSE_PORT_ENV, None) is not None
    if not one_of_many and settings.edge_workers > 1:
        raise SystemExit(EdgeProcesses(settings).run())
    # One of the processes of ``--edge-workers N`` listens beside the others (SO_REUSEPORT).
    sock = listen(settings.host, settings.port, reuse_port=one_of_many)
    serve(create_app(settings), settings, sock)


# What `broker dev` needs on top of the edge and the worker: its in-memory store.
DEV_EXTRA_MODULES = ("fakeredis", "lupa")
DEV_EXTRA_MISSING = ("broker dev: its in-memory store (fakeredis) is not installed: "
                     "pip install 'sse-broker[dev]' (bash scripts/dev does)")


def run_dev(settings: Settings) -> None:
    try:
        for module in DEV_EXTRA_MODULES:
            importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in DEV_EXTRA_MODULES:
            raise
        raise SystemExit(DEV_EXTRA_MISSING) from None
    from broker.tools.dev import create_dev_app, local_url

    sock = listen(settings.host, settings.port)  # first: a port in use stops nothing started
    settings = dataclasses.replace(settings, port=sock.getsockname()[1])  # --port 0: the one chosen
    print(f"broker dev: open {local_url(settings)}/", flush=True)
    serve(create_dev_app(settings), settings, sock)


def run_worker(settings: Settings) -> None:
    from broker.core.metrics import Metrics
    from broker.core.store import Store, connect
    from worker.leases import blocking_client
    from worker.llm import LLM
    from worker.loop import Worker
    from worker.metrics_server import serve_metrics

    worker_name = settings.worker_name()
    metrics = Metrics()
    serve_metrics(settings, metrics.registry)  # first: a port it cannot have stops it here

    async def main() -> None:
        redis = connect(settings, "broker-worker-" + worker_name)
        llm = LLM(settings)
        worker = Worker(
            Store(redis, settings), llm, settings, metrics, name=worker_name,
            # The lease renewals' own connection, used from their own thread (worker.leases).
            lease_redis=lambda: blocking_client(settings, "broker-worker-leases-" + worker_name),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        try:
            await worker.run()
        finally:
            await llm.aclose()
            await redis.aclose()

    _run(main())


def run_mock_llm(settings: Settings) -> None:
    from broker.tools.mockllm import create_mock_llm_app

    sock = listen(settings.host, settings.port)
    config = uvicorn.Config(
        create_mock_llm_app(), host=settings.host, port=settings.port,
        log_level=settings.log_level, access_log=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


def run_cluster(settings: Settings, edges: int = 3, workers: int = 2, tls: bool = False) -> None:
    from broker.tools.localcluster import LocalCluster

    raise SystemExit(LocalCluster(settings, edges=edges, workers=workers, tls=tls).run())


def _at_least_one(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``broker cluster`` alone (flags only, not settings: no env var)."""
    parser.add_argument("--edges", type=_at_least_one, default=3,
                        help="broker edges to start behind HAProxy [default 3]")
    # (Not a setting's name: setting names are not passed on as options.)
    parser.add_argument("--workers", type=_at_least_one, default=2,
                        help="broker workers to start [default 2]")
    parser.add_argument("--tls", action="store_true",
                        help="serve HTTPS with HTTP/2 (browsers then open any number of streams "
                        "to it) on a self-signed certificate made with openssl for localhost; "
                        "default: plain HTTP/1.1")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


COMMANDS = {
    "edge": (run_edge, "the stateless SSE edge (Starlette on uvicorn)"),
    "worker": (run_worker, "a worker: takes jobs, calls the LLM, publishes"),
    "dev": (run_dev, "edge + worker in one process, embedded store, mock LLM, demo page"),
    "mock-llm": (run_mock_llm, "an OpenAI-compatible mock LLM server"),
    "cluster": (run_cluster, "Redis, HAProxy, edges, workers and the mock LLM as local "
                "processes; --host/--port are HAProxy's, the LLM settings go to the workers "
                "(without an API key they use the mock); Ctrl-C stops them all"),
}
ROLES = {"edge": "edge", "worker": "worker", "dev": "dev", "mock-llm": "mock",
         "cluster": "cluster"}
COMMAND_OPTIONS = {"cluster": add_cluster_options}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="Fan-out broker for streaming LLM answers over Server-Sent Events. "
        "Every flag falls back to the env var named in its help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, ROLES[name])
        if name in COMMAND_OPTIONS:
            COMMAND_OPTIONS[name](p)
    for name, (_, help_text) in CLIENT_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=CLIENT_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_client_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.command in CLIENT_COMMANDS:
            raise SystemExit(run_client(CLIENT_COMMANDS[args.command][0], args))
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    settings = from_args(args)
    logs.configure(settings.log_level, settings.log_format)
    setting_names = {f.name for f in dataclasses.fields(Settings)}
    options = {k: v for k, v in vars(args).items() if k != "command" and k not in setting_names}
    try:
        COMMANDS[args.command][0](settings, **options)
    except ListenError as e:
        raise SystemExit(f"broker {args.command}: {e}") from None
