"""A pub/sub subscription that survives its connection: the one reconnect loop of the edge's
subscriptions and the worker's cancel listener."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from redis.asyncio.client import PubSub
from redis.exceptions import RedisClusterException, RedisError

from broker.core.backoff import Backoff


async def subscribe_forever(
    connect: Callable[[], PubSub],
    session: Callable[[PubSub, Callable[[], None]], Awaitable[None]],
    failed: Callable[[Exception, float], None],
    *,
    stopped: Callable[[], bool] = lambda: False,
    after_failure: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``session`` on a new pub/sub connection from ``connect``, and again on a new one
    after each failure of Redis, until ``stopped()``. ``session(pubsub, connected)`` subscribes,
    calls ``connected()`` (the next failure then waits from the shortest delay again) and reads
    until it fails; ``failed(error, delay)`` hears of each failure and how long until the next
    attempt, ``after_failure`` runs after that wait (a cluster re-reads its slot map)."""
    backoff = Backoff()
    while not stopped():
        pubsub = connect()
        try:
            await session(pubsub, backoff.reset)
        except (RedisError, RedisClusterException, OSError) as e:
            failed(e, backoff.delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await close(pubsub)
        await backoff.sleep()
        if after_failure is not None:
            await after_failure()


async def close(pubsub: PubSub) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py 8.1
