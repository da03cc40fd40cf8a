"""The naive baseline edge: every viewer opens its own Redis pub/sub subscription.

What a first implementation of "stream a generation over SSE" usually looks like, kept as
small as possible and on the same server stack as the broker's edge (Starlette on uvicorn),
so the comparison is about the architecture, not the HTTP server:

- ``GET /v1/generations/{id}/events``: a new pub/sub connection SUBSCRIBEs to the generation's
  live channel (``broker.core.protocol.live_channel``); once Redis confirms, the response starts
  and each payload is decoded (``broker.core.protocol.decode_payload``), framed
  (``broker.core.sse.encode_event``) and written to this viewer alone, until the terminal event.
- No shared subscription, no log replay, no gap detection: a viewer that joins late or misses
  a message just does not get it (the benchmark connects every viewer before publishing).
- ``GET /metrics`` exposes ``broker_viewers`` (viewers whose subscription is confirmed), the
  one gauge the benchmark waits on; ``GET /healthz`` answers ok.

Run: ``python -m bench.naive_edge --redis-url redis://127.0.0.1:6379/0 --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvicorn
from redis.asyncio.client import PubSub
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.core import protocol, sse

CLIENT_NAME = "bench-naive-edge"
SUBSCRIBE_TIMEOUT = 5.0
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def create_app(redis_url: str) -> Starlette:
    # Unbounded on purpose: one connection per viewer is the point of this baseline.
    pool = aioredis.ConnectionPool.from_url(
        redis_url, max_connections=1_000_000, client_name=CLIENT_NAME
    )
    redis = aioredis.Redis(connection_pool=pool)
    viewers = 0

    async def events(request: Request) -> Response:
        nonlocal viewers
        channel = protocol.live_channel(request.path_params["gen_id"])
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                while True:
                    message = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
                    if message is not None and message["type"] == "subscribe":
                        break
        except BaseException:
            await pubsub.aclose()
            raise
        viewers += 1
        return StreamingResponse(
            relay(pubsub), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def relay(pubsub: PubSub) -> AsyncIterator[bytes]:
        nonlocal viewers
        try:
            yield sse.retry(1000)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None or message["type"] != "message":
                    continue
                event = protocol.decode_payload(message["data"])
                yield sse.encode_event(event)
                if event.terminal:
                    return
        finally:
            viewers -= 1
            await pubsub.aclose()

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(f"broker_viewers {viewers}\n")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return Starlette(routes=[
        Route("/v1/generations/{gen_id}/events", events, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.redis_url), host=args.host, port=args.port, log_level=args.log_level,
        access_log=False, timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
