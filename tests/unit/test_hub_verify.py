"""Hub._verify: telling a diverged history from events that simply arrived during the check."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis

from broker.core import protocol
from broker.core.metrics import Metrics
from broker.core.protocol import Meta
from broker.edge.hub import Hub
from broker.edge.topic import Frame, Topic


class MetaDuringLiveTraffic:
    """A store whose meta read answers ``seq`` while live events up to ``arriving`` reach the
    topic before the answer does (the race of a real read against the subscription)."""

    def __init__(self, topic: Topic, seq: int, arriving: int) -> None:
        self.redis = fakeredis.FakeAsyncRedis()
        self.topic, self.seq, self.arriving = topic, seq, arriving

    async def meta(self, gen_id: str) -> Meta:
        for s in range(self.topic.head + 1, self.arriving + 1):
            self.topic.offer(Frame(s, f"frame {s}".encode(), False, 0))
        await asyncio.sleep(0)
        return Meta("running", self.seq, None, "m", 0)


def hub_with(store: Any) -> Hub:
    return Hub(store, Metrics(), window=64, audit_interval=1, probe_interval=1)


def topic_at(head: int) -> Topic:
    topic = Topic(protocol.new_generation_id(), 64)
    for s in range(1, head + 1):
        topic.offer(Frame(s, f"frame {s}".encode(), False, 0))
    return topic


async def test_events_arriving_during_the_check_are_not_a_lost_history() -> None:
    topic = topic_at(5)
    # The meta says 6, but by the time it is read, events up to 9 came live: all is well.
    await hub_with(MetaDuringLiveTraffic(topic, seq=6, arriving=9))._verify(topic)
    assert not topic.lost


async def test_a_log_behind_what_was_delivered_is_a_lost_history() -> None:
    topic = topic_at(5)
    # Redis says 3 events exist, but this edge delivered 5 (a failover lost 4 and 5).
    await hub_with(MetaDuringLiveTraffic(topic, seq=3, arriving=5))._verify(topic)
    assert topic.lost
