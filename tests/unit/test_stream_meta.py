"""Edge.stream_meta: stream requests that arrive together share one meta read, but an answer
that would refuse a request is read again for it (the shared read may predate the request)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from broker.core.protocol import LeaseCheck, Meta
from broker.edge.routes import Edge

CHECK = LeaseCheck("running", 2.0, 3.0)


class SlowStore:
    """Answers ``stream_meta`` (the shared read, with its lease check) and ``meta`` (a read
    again) when released, counting the reads."""

    def __init__(self, answers: list[Meta | None]) -> None:
        self.answers = answers
        self.reads = 0
        self.release = asyncio.Event()

    async def meta(self, gen_id: str, via: Any = None) -> Meta | None:
        answer = self.answers[min(self.reads, len(self.answers) - 1)]
        self.reads += 1
        await self.release.wait()
        return answer

    async def stream_meta(self, gen_id: str, reaper: str, healthy_for: float,
                          via: Any = None) -> tuple[Meta | None, LeaseCheck]:
        return await self.meta(gen_id), CHECK


def meta(seq: int) -> Meta:
    return Meta(status="running", seq=seq, finish_reason=None, model="m", created_ms=0)


def edge_on(store: Any) -> tuple[Edge, list[LeaseCheck]]:
    """An edge on ``store``, and the lease checks its stream meta reads counted."""
    counted: list[LeaseCheck] = []
    leases = SimpleNamespace(name="edge", checked=lambda gen_id, check: counted.append(check))
    hub = SimpleNamespace(leases=leases, healthy_for=lambda gen_id: 10.0, topics={},
                          caller=lambda: None)
    return Edge(None, store, hub, None, None, None, None), counted  # type: ignore[arg-type]


async def test_concurrent_requests_share_one_read() -> None:
    store = SlowStore([meta(2000)])
    edge, counted = edge_on(store)
    waiters = [asyncio.create_task(edge.stream_meta("g", 1000)) for _ in range(50)]
    await asyncio.sleep(0)  # every request is waiting on the one read
    store.release.set()
    answers = await asyncio.gather(*waiters)
    assert store.reads == 1
    assert all(a is not None and a.seq == 2000 for a, _ in answers)
    # One lease check, counted once, handed to every request with when it was answered.
    assert counted == [CHECK]
    assert len({id(first) for _, first in answers}) == 1 and answers[0][1].check == CHECK
    assert len(edge._meta_reads) == 0  # nothing kept once answered


@pytest.mark.parametrize(("shared", "fresh", "cursor"), [
    (None, meta(5), 0),  # created while the shared read was in flight
    (meta(5), meta(9), 8),  # the viewer saw events (elsewhere) the shared read predates
])
async def test_a_refusing_shared_answer_is_read_again(
    shared: Meta | None, fresh: Meta, cursor: int
) -> None:
    store = SlowStore([shared, fresh])
    edge, _ = edge_on(store)
    first = asyncio.create_task(edge.stream_meta("g", 0))
    await asyncio.sleep(0)
    second = asyncio.create_task(edge.stream_meta("g", cursor))
    await asyncio.sleep(0)
    store.release.set()
    assert (await first)[0] == shared
    # Read again, and with no check: the shared one judged the lease before that answer (a
    # watch started from it could drop a generation that exists); the watch checks at once.
    assert await second == (fresh, None)
    assert store.reads == 2


async def test_a_failed_read_fails_its_waiters_and_is_forgotten() -> None:
    class FailingStore:
        async def stream_meta(self, gen_id: str, reaper: str, healthy_for: float,
                              via: Any = None) -> tuple[Meta | None, LeaseCheck]:
            raise ConnectionError("redis went away")

    edge, counted = edge_on(FailingStore())
    with pytest.raises(ConnectionError):
        await edge.stream_meta("g", 0)
    await asyncio.sleep(0)
    assert len(edge._meta_reads) == 0
    assert counted == []


async def test_a_generation_whose_lease_this_edge_watches_is_read_without_a_lease_check() -> None:
    store = SlowStore([meta(7)])
    edge, counted = edge_on(store)
    edge.hub.topics["g"] = object()  # a viewer here watches it already
    store.release.set()
    found, check = await edge.stream_meta("g", 0)
    assert found == meta(7) and check is None
    assert counted == [] and store.reads == 1
