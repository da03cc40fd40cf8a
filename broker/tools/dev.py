"""``broker dev``: edge and worker in one process on an embedded store, with a mock LLM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import AsyncIterator

import fakeredis
from starlette.applications import Starlette
from starlette.routing import Mount

from broker.core.metrics import Metrics
from broker.core.settings import Settings
from broker.core.store import Store
from broker.edge.app import create_app
from broker.edge.auth import parse_keys
from broker.tools.mockllm import create_mock_llm_app
from worker.llm import LLM
from worker.loop import Worker

log = logging.getLogger(__name__)

MOCK_PREFIX = "/mock-llm"
_EVERY_INTERFACE = ("", "0.0.0.0", "::")


def create_dev_app(settings: Settings) -> Starlette:
    """The whole product in one app, with the LLM ``choose_llm`` picks: the mock LLM is
    mounted on this same server and streamed from through the real ``openai`` SDK over HTTP."""
    settings, llm_line, use_mock = choose_llm(settings)
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def run_worker(app: Starlette) -> AsyncIterator[None]:
        llm = LLM(settings)
        worker = Worker(Store(redis, settings), llm, settings, metrics)
        task = asyncio.create_task(worker.run(), name="dev-worker")
        try:
            yield
        finally:
            worker.stop()
            await task
            await llm.aclose()

    app = create_app(settings, redis=redis, metrics=metrics, extra_lifespan=run_worker, dev=True)
    if use_mock:
        app.router.routes.append(Mount(MOCK_PREFIX, app=create_mock_llm_app()))
    log.info("dev mode: an in-memory store (nothing survives a restart); %s", llm_line)
    for line in access_lines(settings, producer_keys=app.state.edge.api_keys.enabled):
        log.warning("dev mode: %s", line)
    return app


def choose_llm(settings: Settings) -> tuple[Settings, str, bool]:
    """The settings the worker calls its LLM with, a line saying which LLM that is, and
    whether it is the mock:
    with ``OPENAI_API_KEY``, that provider (at ``OPENAI_BASE_URL`` if set); with
    ``OPENAI_BASE_URL`` alone, a local server that needs no key (Ollama, llama.cpp's server);
    with neither, the mock LLM this server mounts."""
    if settings.openai_api_key:
        where = settings.openai_base_url or "OpenAI"
        return settings, f"LLM at {where} (OPENAI_API_KEY set)", False
    if settings.openai_base_url:
        # The worker's SDK sends a placeholder key, which such servers ignore.
        return settings, (f"LLM at {settings.openai_base_url} without an API key "
                          "(OPENAI_BASE_URL alone: a local server such as Ollama or "
                          "llama.cpp)"), False
    mock = dataclasses.replace(settings, openai_base_url=mock_base_url(settings),
                               openai_api_key="mock")
    return mock, ("LLM: the built-in mock (set OPENAI_BASE_URL for a local server, "
                  "OPENAI_API_KEY for a provider)"), True


def local_url(settings: Settings) -> str:
    """This server's base URL as seen from this machine."""
    host = settings.host
    if host in _EVERY_INTERFACE:
        host = "127.0.0.1"  # reachable through any wildcard bind
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def mock_base_url(settings: Settings) -> str:
    """Where the worker reaches the mock LLM mounted on this server."""
    return f"{local_url(settings)}{MOCK_PREFIX}/v1"


def access_lines(settings: Settings, *, producer_keys: bool) -> list[str]:
    """What a dev server leaves open, in words: who may create, read and cancel; who may watch
    a stream; who can reach the port at all."""
    host, port = settings.host, settings.port
    if host in _EVERY_INTERFACE:
        reach = (f"it listens on every interface ({host or '0.0.0.0'}): other machines can "
                 f"reach port {port}")
    elif _is_loopback(host):
        reach = (f"it listens on {host} only: other machines cannot reach it "
                 "(--host / BROKER_HOST changes that)")
    else:
        reach = f"it listens on {host}: machines that can route to {host}:{port} reach it"
    if producer_keys:
        who = "creating, reading and cancelling generations needs an API key (BROKER_API_KEYS)"
    else:
        who = ("no API keys: whoever reaches the port may create generations, read their text "
               "and cancel them")
    if parse_keys(settings.viewer_token_keys):
        tokens = "viewer tokens are on, signed with BROKER_VIEWER_TOKEN_KEYS"
    else:
        tokens = ("viewer tokens are on, signed with a key made at startup: a stream needs the "
                  "token of its events_url, and no token outlives this process")
    return [f"{who}; {reach}", tokens]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: where it resolves is not ours to assume
