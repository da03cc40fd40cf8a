"""Edge.stream_meta: stream requests that arrive together share one meta read, but an answer
that would refuse a request is read again for it (the shared read may predate the request)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.core.protocol import Meta
from broker.edge.routes import Edge


class SlowStore:
    """Answers ``meta`` when released, counting the reads."""

    def __init__(self, answers: list[Meta | None]) -> None:
        self.answers = answers
        self.reads = 0
        self.release = asyncio.Event()

    async def meta(self, gen_id: str) -> Meta | None:
        answer = self.answers[min(self.reads, len(self.answers) - 1)]
        self.reads += 1
        await self.release.wait()
        return answer


def meta(seq: int) -> Meta:
    return Meta(status="running", seq=seq, finish_reason=None, model="m", created_ms=0)


def edge_on(store: Any) -> Edge:
    return Edge(None, store, None, None, None, None, None)  # type: ignore[arg-type]


async def test_concurrent_requests_share_one_read() -> None:
    store = SlowStore([meta(2000)])
    edge = edge_on(store)
    waiters = [asyncio.create_task(edge.stream_meta("g", 1000)) for _ in range(50)]
    await asyncio.sleep(0)  # every request is waiting on the one read
    store.release.set()
    answers = await asyncio.gather(*waiters)
    assert store.reads == 1
    assert all(a is not None and a.seq == 2000 for a in answers)
    assert len(edge._meta_reads) == 0  # nothing kept once answered


@pytest.mark.parametrize(("shared", "fresh", "cursor"), [
    (None, meta(5), 0),  # created while the shared read was in flight
    (meta(5), meta(9), 8),  # the viewer saw events (elsewhere) the shared read predates
])
async def test_a_refusing_shared_answer_is_read_again(
    shared: Meta | None, fresh: Meta, cursor: int
) -> None:
    store = SlowStore([shared, fresh])
    edge = edge_on(store)
    first = asyncio.create_task(edge.stream_meta("g", 0))
    await asyncio.sleep(0)
    second = asyncio.create_task(edge.stream_meta("g", cursor))
    await asyncio.sleep(0)
    store.release.set()
    assert await first == shared
    assert await second == fresh
    assert store.reads == 2


async def test_a_failed_read_fails_its_waiters_and_is_forgotten() -> None:
    class FailingStore:
        async def meta(self, gen_id: str) -> Meta | None:
            raise ConnectionError("redis went away")

    edge = edge_on(FailingStore())
    with pytest.raises(ConnectionError):
        await edge.stream_meta("g", 0)
    await asyncio.sleep(0)
    assert len(edge._meta_reads) == 0
