"""The edge's lease watch: a generation whose worker died ends with ``worker_lost`` even when
no other worker is left to reap it.

An edge serving a generation is the natural reaper: it already watches the topic. Each topic
of a generation that has not ended is checked with ``REAP_SCRIPT`` (one call: it reads the
lease by Redis's clock and, if it ran out, ends the generation atomically, so edges and
workers racing for the same lease produce one terminal event). The cost stays bounded:

- a check that finds the lease holding says how long it holds (``LeaseCheck.wait``, from
  Redis), and the next check is scheduled for that moment: a live worker renews every third
  of its lease, so each check finds the lease renewed and the next comes two thirds of a
  lease to a lease later (about one call per quiet running topic per lease);
- a topic whose events keep coming is not checked at all: its worker just published, so
  the check waits until the topic has been quiet for a whole lease (``LeaseCheck.lease_ttl``);
- a queued generation (no lease yet) is checked again with a delay that doubles from the
  edge's check interval up to ``QUEUED_RECHECK_INTERVALS`` of them.

So a dead worker's generation ends at most a lease (plus one call) after the worker's last
renewal, as long as this edge sees Redis healthy (after a failure, reaping waits until it has
seen Redis healthy for a whole lease: the owner may be alive and about to renew). Nothing
here knows ``BROKER_LEASE_TTL``, a worker setting: every delay comes from what Redis
answered, or from the edge's own check interval (``BROKER_PROBE_INTERVAL``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from broker.core.metrics import Metrics
from broker.core.protocol import LeaseCheck, ProtocolError
from broker.core.store import Store
from broker.edge.topic import Topic

log = logging.getLogger(__name__)

# A queued generation is looked at again after one check interval, then two, four... up to
# this many: a worker that claims it after a long wait and dies before its first event is
# found that much later than a lease at most.
QUEUED_RECHECK_INTERVALS = 4
# Checks in flight at once: a burst of due topics must not take the whole Redis pool from the
# viewers' own reads.
MAX_CONCURRENT_CHECKS = 16


@dataclass(slots=True)
class Schedule:
    """When one topic's lease is checked next (monotonic seconds)."""

    at: float = 0.0  # not before this (0: at once)
    quiet: float = 0.0  # nor until the topic has had no live event for this long
    queued_wait: float = 0.0  # the last delay given to a queued generation

    def due(self, last_live: float) -> float:
        return max(self.at, last_live + self.quiet)

    def follow(self, check: LeaseCheck, now: float, interval: float) -> bool:
        """Plan the next check after ``check``; False when there is none to make (the
        generation ended, here or elsewhere, or is gone)."""
        if check.outcome == "running":
            self.at = now + check.wait
            self.quiet = check.lease_ttl
            self.queued_wait = 0.0
            return True
        if check.outcome == "queued":
            self.queued_wait = min(max(interval, 2 * self.queued_wait),
                                   QUEUED_RECHECK_INTERVALS * interval)
            self.at = now + self.queued_wait
            return True
        return False


@dataclass(frozen=True, slots=True)
class FirstCheck:
    """A lease check made before its topic was watched, and when its answer came (monotonic
    seconds)."""

    check: LeaseCheck
    at: float


@dataclass(slots=True)
class _Watched:
    topic: Topic
    schedule: Schedule
    timer: asyncio.TimerHandle | None = None


class LeaseWatch:
    """Checks the leases of the generations this edge serves; reaps those that ran out."""

    def __init__(
        self, store: Store, metrics: Metrics, *, interval: float, name: str,
        healthy_for: Callable[[str], float],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval  # the edge's check interval: retries, queued rechecks
        self.name = name  # written as the owner of what this edge reaps
        # Seconds this edge has seen the Redis serving a generation work without a failure.
        # Reaping waits until that covers a lease: after an outage the owner must get the
        # chance to renew before anyone judges it dead.
        self.healthy_for = healthy_for
        self._watched: dict[str, _Watched] = {}
        self._due: dict[str, Topic] = {}
        self._wakeup = asyncio.Event()

    def watch(self, topic: Topic, first: FirstCheck | None = None) -> None:
        """Start checking ``topic``'s lease: at once (a viewer may arrive after the worker died),
        then as its answers say. ``first``: a check made just before (with the stream
        request's meta read, ``Store.stream_meta``; counted by ``checked``) and when its answer
        came (monotonic): the schedule follows it instead of checking again at once."""
        watched = self._watched[topic.gen_id] = _Watched(topic, Schedule())
        if first is None:
            self._arm(topic.gen_id, 0.0)
        elif watched.schedule.follow(first.check, first.at, self.interval):
            self._arm(topic.gen_id, watched.schedule.at)
        else:
            self._drop(topic.gen_id)  # it ended (or was just reaped): nothing left to check

    def forget(self, topic: Topic) -> None:
        watched = self._watched.get(topic.gen_id)
        if watched is not None and watched.topic is topic:
            self._drop(topic.gen_id)

    async def reaped(self, gen_id: str) -> bool:
        """Check ``gen_id``'s lease now (a status read): True if it ran out and this call
        ended the generation."""
        return (await self.check(gen_id)).reaped

    async def check(self, gen_id: str) -> LeaseCheck:
        """One check of ``gen_id``'s lease, reaping it if it ran out."""
        try:
            check = await self.store.reap(gen_id, self.name, self.healthy_for(gen_id))
        except (RedisError, OSError):
            self.metrics.lease_checks.inc()
            self.metrics.redis_errors.labels("lease").inc()
            raise
        self.checked(gen_id, check)
        return check

    def checked(self, gen_id: str, check: LeaseCheck) -> None:
        """Count a check of ``gen_id``'s lease (here, or with a stream's meta read), and say
        so if it reaped the generation."""
        self.metrics.lease_checks.inc()
        if check.reaped:
            log.warning("generation %s: its worker (or external producer) stopped renewing "
                        "its lease; ended it with worker_lost (producer_lost)", gen_id)
            self.metrics.leases_reaped.inc()
            self.metrics.generations_finished.labels("failed").inc()

    async def run(self) -> None:
        """Check the topics that fall due, a bounded number at a time."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._check_due()

    async def _check_due(self) -> None:
        # A call of its own, not the loop's body: its lists of topics end with it. Left in
        # ``run``'s frame, the last batch checked (each topic with its window and kept log
        # chunks) stayed alive while ``run`` waited, until the next topic fell due: forever
        # on an edge that went idle.
        due, self._due = list(self._due.values()), {}
        for start in range(0, len(due), MAX_CONCURRENT_CHECKS):
            batch = due[start : start + MAX_CONCURRENT_CHECKS]
            await asyncio.gather(*(self._check_topic(topic) for topic in batch))

    def stop(self) -> None:
        for gen_id in list(self._watched):
            self._drop(gen_id)

    # -- scheduling --------------------------------------------------------------------------

    def _arm(self, gen_id: str, at: float) -> None:
        watched = self._watched[gen_id]
        if watched.timer is not None:
            watched.timer.cancel()
        delay = max(0.0, at - time.monotonic())
        watched.timer = asyncio.get_running_loop().call_later(delay, self._fire, gen_id)

    def _fire(self, gen_id: str) -> None:
        watched = self._watched.get(gen_id)
        if watched is None:
            return
        watched.timer = None
        topic = watched.topic
        if topic.terminal_seq is not None or topic.lost:
            self._drop(gen_id)  # it ended: nothing left to check
            return
        due = watched.schedule.due(topic.last_live)
        if due > time.monotonic():
            self._arm(gen_id, due)  # events came meanwhile: its worker lives
            return
        self._due[gen_id] = topic
        self._wakeup.set()

    async def _check_topic(self, topic: Topic) -> None:
        try:
            check = await self.check(topic.gen_id)
        except (RedisError, OSError, ProtocolError) as e:
            log.warning("could not check the lease of generation %s (%r); retrying", topic.gen_id,
                        e)
            check = None
        watched = self._watched.get(topic.gen_id)
        if watched is None or watched.topic is not topic:
            return  # its viewers left meanwhile
        now = time.monotonic()
        if check is None:
            self._arm(topic.gen_id, now + self.interval)
        elif watched.schedule.follow(check, now, self.interval):
            self._arm(topic.gen_id, watched.schedule.at)
        else:
            self._drop(topic.gen_id)

    def _drop(self, gen_id: str) -> None:
        watched = self._watched.pop(gen_id, None)
        self._due.pop(gen_id, None)
        if watched is not None and watched.timer is not None:
            watched.timer.cancel()
