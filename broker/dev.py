"""``broker dev``: edge and worker in one process on an embedded store, with a mock LLM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import fakeredis
from starlette.applications import Starlette
from starlette.routing import Mount

from broker.app import create_app
from broker.metrics import Metrics
from broker.mockllm import create_mock_llm_app
from broker.settings import Settings
from broker.store import Store
from worker.llm import LLM
from worker.loop import Worker

log = logging.getLogger(__name__)

MOCK_PREFIX = "/mock-llm"


def create_dev_app(settings: Settings) -> Starlette:
    """The whole product in one app. Without an API key the worker streams from the mock LLM,
    mounted on this same server, through the real ``openai`` SDK over HTTP."""
    use_mock = not settings.openai_api_key
    if use_mock:
        settings = dataclasses.replace(
            settings,
            openai_base_url=f"http://127.0.0.1:{settings.port}{MOCK_PREFIX}/v1",
            openai_api_key="mock",
        )
    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def run_worker(app: Starlette) -> AsyncIterator[None]:
        llm = LLM(settings)
        worker = Worker(Store(redis, settings), llm, settings, metrics)
        task = asyncio.create_task(worker.run(), name="dev-worker")
        log.info("dev mode: embedded store, LLM at %s", settings.openai_base_url or "OpenAI")
        try:
            yield
        finally:
            worker.stop()
            await task
            await llm.aclose()

    app = create_app(settings, redis=redis, metrics=metrics, extra_lifespan=run_worker, dev=True)
    if use_mock:
        app.router.routes.append(Mount(MOCK_PREFIX, app=create_mock_llm_app()))
    return app
