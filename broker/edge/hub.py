"""One Redis subscription per generation per edge, fanned out to local viewers in memory.

The hub owns this edge's pub/sub connections and its topics (``broker.edge.topic``): one connection
on a single Redis, one per master on a Redis Cluster (a ``Shard`` each), where a generation's
channel is subscribed with SSUBSCRIBE on the master serving its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from broker.core import protocol
from broker.core.backoff import Backoff
from broker.core.cluster import Master, SlotMap
from broker.core.metrics import Metrics
from broker.core.pubsub import subscribe_forever
from broker.core.store import Store
from broker.core.tasks import cancel_and_wait
from broker.edge.conversations import ConversationTopic
from broker.edge.leases import LeaseWatch
from broker.edge.topic import Topic, to_frame

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
SEND_WATCH_INTERVAL = 0.5


class Shard:
    """One pub/sub connection and the reader that owns it: to the single Redis, or to one
    cluster master, where the channels of the slots it serves are subscribed with SSUBSCRIBE.

    Each shard proves its own delivery: it publishes probes on a channel of its own (on a
    cluster, one whose slot this master serves) and must see them come back. A connection that
    is up but silently stopped delivering shows as probes published and never seen.
    """

    def __init__(self, hub: Hub, name: str, client: aioredis.Redis, *, sharded: bool,
                 probe_channel: str) -> None:
        self.hub = hub
        self.name = name
        self.client = client
        self.sharded = sharded
        self.probe_channel = probe_channel
        self.channels: set[str] = set()  # the live channels routed to this shard
        # SUBSCRIBE commands sent per channel and not yet confirmed: a confirmation nobody
        # waits for is a resubscription after a reconnect (see ``_dispatch``).
        self._unconfirmed: dict[str, int] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._probe_seen_at: float | None = None
        self._unseen_since: float | None = None  # first probe published after the last seen
        # The first probe seen back after the last failure (None: failing, or none seen yet).
        self._healthy_since: float | None = None
        self.retired = False  # no longer a master: its channels went elsewhere

    def ready(self) -> bool:
        seen = self._probe_seen_at
        return seen is not None and time.monotonic() - seen <= self.hub.probe_timeout

    def healthy_for(self, now: float) -> float:
        """Seconds this shard has delivered its probes without a failure (0 while failing)."""
        return 0.0 if self._healthy_since is None else now - self._healthy_since

    def failed(self) -> None:
        """A call or the connection to this Redis failed: healthy again from the next probe
        seen back (the lease watch waits a lease from then before it reaps)."""
        self._healthy_since = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name=f"hub-reader-{self.name}")

    async def stop(self) -> None:
        if self._reader is asyncio.current_task():
            return  # retired from its own reader (see ``Hub.rebalance``): the loop ends itself
        if self._reader is not None:
            # Its failure, if any, was logged where it happened. Cancelled for sure: a cancel
            # landing as a Redis call completes can be lost (see broker.core.tasks).
            await cancel_and_wait(self._reader)
            self._reader = None

    async def restart(self) -> None:
        """Drop a stalled subscription: a new reader subscribes everything again and every
        topic catches up from the log."""
        await self.stop()
        self.start()

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        pubsub = self._pubsub
        if pubsub is None:
            return  # between connections: the reader subscribes every channel when it reconnects
        self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        try:
            await self._subscribe(pubsub, channel)
        except (RedisError, OSError):
            # The reader reconnects and subscribes it then (and may have cleared the count).
            self._unconfirmed[channel] = max(0, self._unconfirmed.get(channel, 0) - 1)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                # A failed unsubscribe is harmless: stray messages for unknown topics are ignored.
                if self.sharded:
                    await self._pubsub.sunsubscribe(channel)
                else:
                    await self._pubsub.unsubscribe(channel)

    async def _subscribe(self, pubsub: PubSub, *channels: str) -> None:
        if not self.sharded:
            await pubsub.subscribe(*channels)
            return
        # One SSUBSCRIBE may only name channels of one slot (else CROSSSLOT).
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        for same_slot in by_slot.values():
            await pubsub.ssubscribe(*same_slot)

    async def publish_probe(self, now: float) -> None:
        try:
            if self.sharded:
                await self.client.spublish(self.probe_channel, str(now))
            else:
                await self.client.publish(self.probe_channel, str(now))
            if self._unseen_since is None:
                self._unseen_since = now
        except (RedisError, OSError):
            self.hub.metrics.redis_errors.labels("probe").inc()
            self.failed()

    async def restart_if_stalled(self, now: float) -> None:
        """Probes published and none seen back for a probe timeout: the connection is up but
        silently stopped delivering. Replace it."""
        if self._unseen_since is not None and now - self._unseen_since > self.hub.probe_timeout:
            log.warning("pub/sub connection to %s stopped delivering; resubscribing", self.name)
            self.hub.metrics.pubsub_stalls.inc()
            self.failed()
            self._unseen_since = None
            await self.restart()

    async def _read_forever(self) -> None:
        """Own the pub/sub connection. After any failure it starts over on a new connection
        and subscribes every channel again; their confirmations then make each topic check its
        generation and resync from the log (see ``_dispatch``)."""
        await subscribe_forever(
            self.client.pubsub, self._session, self._connection_failed,
            stopped=lambda: self.retired,
            after_failure=self._follow_failover if self.sharded else None,
        )

    async def _session(self, pubsub: PubSub, connected: Callable[[], None]) -> None:
        try:
            self._unconfirmed.clear()
            # Channels added while subscribing were not in the list: take them too, and
            # publish the connection (for direct subscribes) with no await in between.
            done: set[str] = set()
            todo = {self.probe_channel, *self.channels}
            while todo:
                await self._subscribe(pubsub, *todo)
                done |= todo
                todo = self.channels - done
            self._pubsub = pubsub
            connected()
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._dispatch(message)
        finally:
            self._pubsub = None

    def _connection_failed(self, error: Exception, retry_in: float) -> None:
        self.hub.metrics.redis_errors.labels("subscribe").inc()
        self.hub.metrics.pubsub_reconnects.inc()
        self.failed()
        log.warning("pub/sub connection to %s failed (%s); retrying in %.2fs",
                    self.name, error, retry_in)

    async def _follow_failover(self) -> None:
        """The master may be gone (failed over): find out who serves these slots now."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.hub.rebalance()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        if channel == self.probe_channel:
            if kind in ("message", "smessage"):
                self._probe_seen_at = time.monotonic()
                self._unseen_since = None
                if self._healthy_since is None:
                    self._healthy_since = self._probe_seen_at
            return
        hub = self.hub
        if protocol.is_conversation_channel(channel):
            self._dispatch_conversation(kind, channel)
            return
        topic = hub.topics.get(protocol.gen_id_of_channel(channel))
        if kind in ("message", "smessage"):
            if topic is None:
                return
            try:
                event = protocol.decode_payload(message["data"])
            except protocol.ProtocolError:
                log.exception("dropping a malformed live payload on %s", channel)
                return
            if not topic.offer(to_frame(event)):
                hub.metrics.gaps.inc()
        elif kind in ("subscribe", "ssubscribe"):
            waiting = self._unconfirmed.get(channel, 0)
            if waiting > 1:
                self._unconfirmed[channel] = waiting - 1
                return
            self._unconfirmed.pop(channel, None)
            if topic is None:
                return
            if topic.subscribed.is_set():
                # A resubscription after a reconnect or a slot move: anything published
                # meanwhile was missed, and if Redis restarted empty, the history is gone.
                hub.metrics.resubscribes.inc()
                hub.verify_soon(topic)
            topic.subscribed.set()
        elif kind == "sunsubscribe" and channel in self.channels:
            # Unasked: the master no longer serves this channel's slot (it moved, or the node
            # became a replica). Find the new owner and subscribe there.
            hub.channel_dropped(channel)

    def _dispatch_conversation(self, kind: str, channel: str) -> None:
        """A conversation's notice, or its subscription's confirmation: its viewers look at
        its turns index again (after a resubscription: notices may have been missed)."""
        conversation = self.hub.conversations.get(protocol.conversation_of_channel(channel))
        if kind in ("subscribe", "ssubscribe"):
            waiting = self._unconfirmed.get(channel, 0)
            if waiting > 1:
                self._unconfirmed[channel] = waiting - 1
                return
            self._unconfirmed.pop(channel, None)
            if conversation is not None:
                if conversation.subscribed.is_set():
                    self.hub.metrics.resubscribes.inc()
                conversation.subscribed.set()
                conversation.wake()
        elif kind in ("message", "smessage"):
            if conversation is not None:
                conversation.wake()
        elif kind == "sunsubscribe" and channel in self.channels:
            self.hub.channel_dropped(channel)


class Hub:
    """Owns this edge's topics and the pub/sub shards they are subscribed on."""

    def __init__(
        self, store: Store, metrics: Metrics, *, window: int, audit_interval: float,
        probe_interval: float, name: str = "edge",
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.window = window
        self.audit_interval = audit_interval
        self.topics: dict[str, Topic] = {}
        self.conversations: dict[str, ConversationTopic] = {}  # by conversation id
        # Open SSE responses on this edge (``BROKER_MAX_VIEWERS`` bounds them); each has a
        # ``close_if_blocked(now)`` that the send watch calls.
        self.open_streams: set[Any] = set()
        self.shards: dict[str, Shard] = {}
        self._shard_of: dict[str, Shard] = {}  # channel -> the shard it is subscribed on
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._rebalancing = asyncio.Lock()
        self._dropped: set[str] = set()  # channels a master unsubscribed us from (slot moved)
        self._rebalance_again = False
        self._id = uuid.uuid4().hex
        self.probe_interval = probe_interval
        self.probe_timeout = 3 * probe_interval
        self.closing = False
        redis = store.redis
        self.slot_map = SlotMap(redis) if isinstance(redis, aioredis.RedisCluster) else None
        # Ends the generations it serves whose worker died (``name``: the reaper it writes).
        self.leases = LeaseWatch(
            store, metrics, interval=probe_interval, name=name, healthy_for=self.healthy_for
        )

    @property
    def cluster(self) -> SlotMap | None:
        return self.slot_map

    def ready(self) -> bool:
        """True while probes make the round trip on every shard: Redis is reachable AND
        delivering to us (on a cluster: every master)."""
        shards = list(self.shards.values())
        return bool(shards) and all(s.ready() for s in shards)

    def close_streams(self) -> None:
        """Shutdown: every stream ends now (without a terminal event), so viewers reconnect."""
        self.closing = True
        for topic in self.topics.values():
            topic.resync()
        for conversation in self.conversations.values():
            conversation.wake()

    async def start(self) -> None:
        redis = self.store.redis
        if not isinstance(redis, aioredis.RedisCluster):
            self._add_shard("redis", redis, sharded=False, probe_channel=f"broker:edge:{self._id}")
        else:
            await redis.initialize()  # (the slot map, read once)
            await self.rebalance()
        self._tasks = [
            asyncio.create_task(self._audit_forever(self.audit_interval), name="hub-audit"),
            asyncio.create_task(self._probe_forever(), name="hub-probe"),
            asyncio.create_task(self._watch_sends_forever(), name="hub-send-watch"),
            asyncio.create_task(self._wake_quiet_topics_forever(), name="hub-wake"),
            asyncio.create_task(self.leases.run(), name="hub-leases"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._background)
        self.leases.stop()
        for shard in list(self.shards.values()):
            await self._drop_shard(shard)

    def healthy_for(self, gen_id: str) -> float:
        """Seconds this edge has seen the Redis (on a cluster: the master) that serves
        ``gen_id`` deliver its probes without a failure; 0 while it fails."""
        channel = protocol.live_channel(gen_id)
        shard = self._shard_of.get(channel)
        cluster = self.cluster
        if shard is None and cluster is None:
            shard = self.shards.get("redis")
        elif shard is None and cluster is not None:
            name = cluster.master_of(channel)
            shard = None if name is None else self.shards.get(name)
        return 0.0 if shard is None else shard.healthy_for(time.monotonic())

    # -- shards ----------------------------------------------------------------------------

    def _add_shard(self, name: str, client: aioredis.Redis, *, sharded: bool,
                   probe_channel: str) -> Shard:
        shard = Shard(self, name, client, sharded=sharded, probe_channel=probe_channel)
        self.shards[name] = shard
        shard.start()
        return shard

    async def _drop_shard(self, shard: Shard) -> None:
        shard.retired = True
        self.shards.pop(shard.name, None)
        await shard.stop()
        if shard.sharded:
            with contextlib.suppress(RedisError, OSError):
                await shard.client.aclose()

    def _route(self, channel: str) -> Shard:
        """The shard a channel belongs on: on a cluster, the master that serves its slot."""
        cluster = self.cluster
        if cluster is None:
            return self.shards["redis"]
        name = cluster.master_of(channel)
        if name is None:  # the slot is not covered (mid-failover)
            raise RedisConnectionError(f"no master serves {channel} now")
        shard = self.shards.get(name)
        if shard is None:
            master = cluster.masters().get(name)
            if master is None:
                raise RedisConnectionError(f"{name} serves {channel} but is no master now")
            shard = self._add_node_shard(cluster, master)
        return shard

    def _add_node_shard(self, cluster: SlotMap, master: Master) -> Shard:
        # Two connections: the subscription, and the probes published to it.
        client = aioredis.Redis.from_pool(cluster.own_connection_pool(master, 2))  # owns it
        probe = self._probe_channel_on(cluster, master.name)
        return self._add_shard(master.name, client, sharded=True, probe_channel=probe)

    def _probe_channel_on(self, cluster: SlotMap, master: str) -> str:
        """A probe channel whose slot ``master`` serves, so its probes test that master."""
        for i in range(100_000):
            channel = f"broker:edge:{{{self._id}:{i}}}"
            if cluster.master_of(channel) == master:
                return channel
        raise RuntimeError(f"no slot of {master} found for a probe channel")

    def channel_dropped(self, channel: str) -> None:
        self._dropped.add(channel)
        self.rebalance_soon()

    def rebalance_soon(self) -> None:
        self._in_background(self._rebalance_until_done())

    async def _rebalance_until_done(self) -> None:
        """A slot moved away from a shard: keep trying until the hub follows the new map (an
        unasked ``sunsubscribe`` comes once; nothing else would ask again)."""
        backoff = Backoff()
        while True:
            try:
                await self.rebalance()
                return
            except (RedisError, RedisClusterException, OSError):
                await backoff.sleep()

    async def rebalance(self) -> None:
        """Cluster only: learn who serves which slot now, and move every channel (and the
        probes) to the master that serves it. A moved channel is subscribed anew, and its
        confirmation makes its topic catch up from the log."""
        cluster = self.cluster
        if cluster is None:
            return
        if self._rebalancing.locked():
            self._rebalance_again = True  # the running one may have read the map too early
            return
        async with self._rebalancing:
            self._rebalance_again = True
            while self._rebalance_again:
                self._rebalance_again = False
                try:
                    await cluster.refresh()
                    await self._follow_slot_map(cluster)
                except (RedisError, RedisClusterException, OSError) as e:
                    # Retried: by the failing shard's reader, or by rebalance_soon.
                    log.warning("could not follow the cluster's slot map (%s)", e)
                    raise

    async def _follow_slot_map(self, cluster: SlotMap) -> None:
        serving = cluster.masters()
        for shard in list(self.shards.values()):
            if shard.name not in serving or cluster.master_of(shard.probe_channel) != shard.name:
                # Not a master with slots any more, or its probe slot moved: start over.
                await self._drop_shard(shard)
        for name, master in serving.items():
            if name not in self.shards:
                self._add_node_shard(cluster, master)
        dropped, self._dropped = self._dropped, set()
        for channel, shard in list(self._shard_of.items()):
            if self._shard_of.get(channel) is not shard:
                continue  # its last viewer left (or it moved) during an await of this loop
            target = self._route(channel)
            if target is not shard or shard.retired or channel in dropped:
                # Moved, or dropped by the server even if the map still names the same node:
                # subscribe it (again) where it belongs; the confirmation resyncs its topic.
                self._shard_of[channel] = target
                await shard.unsubscribe(channel)
                await target.subscribe(channel)

    # -- topics ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, gen_id: str) -> AsyncIterator[Topic]:
        """The topic of ``gen_id``, subscribed; released (and unsubscribed if last) on exit."""
        topic = self.topics.get(gen_id)
        if topic is None:
            topic = Topic(gen_id, self.window, last_change=time.monotonic(), metrics=self.metrics)
            self.topics[gen_id] = topic
            self.metrics.subscriptions.inc()
            self.leases.watch(topic)
        topic.viewers += 1
        try:
            if not topic.subscribed.is_set():
                if topic.viewers == 1:
                    await self._subscribe(gen_id)
                try:
                    async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                        await topic.subscribed.wait()
                except TimeoutError as e:
                    raise RedisConnectionError("the subscription was not confirmed") from e
            yield topic
        finally:
            topic.viewers -= 1
            if topic.viewers == 0 and self.topics.get(gen_id) is topic:
                del self.topics[gen_id]
                self.metrics.subscriptions.dec()
                self.leases.forget(topic)
                await self._unsubscribe(gen_id)

    @contextlib.asynccontextmanager
    async def watch_conversation(self, cid: str) -> AsyncIterator[ConversationTopic]:
        """The turn notices of conversation ``cid``, subscribed (one subscription per
        conversation on this edge); released (and unsubscribed if last) on exit."""
        conversation = self.conversations.get(cid)
        if conversation is None:
            conversation = ConversationTopic(cid)
            self.conversations[cid] = conversation
            self.metrics.conversation_subscriptions.inc()
        conversation.viewers += 1
        channel = protocol.conversation_channel(cid)
        try:
            if not conversation.subscribed.is_set():
                if conversation.viewers == 1:
                    await self._subscribe_channel(channel)
                try:
                    async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                        await conversation.subscribed.wait()
                except TimeoutError as e:
                    raise RedisConnectionError("the subscription was not confirmed") from e
            yield conversation
        finally:
            conversation.viewers -= 1
            if conversation.viewers == 0 and self.conversations.get(cid) is conversation:
                del self.conversations[cid]
                self.metrics.conversation_subscriptions.dec()
                shard = self._shard_of.pop(channel, None)
                if shard is not None:
                    await shard.unsubscribe(channel)

    async def _subscribe_channel(self, channel: str) -> None:
        try:
            shard = self._route(channel)
        except (RedisError, OSError) as e:
            raise RedisConnectionError(f"no master serves {channel}") from e
        self._shard_of[channel] = shard
        await shard.subscribe(channel)

    async def _subscribe(self, gen_id: str) -> None:
        channel = protocol.live_channel(gen_id)
        try:
            shard = self._route(channel)
        except (RedisError, OSError) as e:
            raise RedisConnectionError(f"no master serves {channel}") from e
        self._shard_of[channel] = shard
        await shard.subscribe(channel)

    async def _unsubscribe(self, gen_id: str) -> None:
        shard = self._shard_of.pop(protocol.live_channel(gen_id), None)
        if shard is not None:
            await shard.unsubscribe(protocol.live_channel(gen_id))

    # -- checks ----------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            now = time.monotonic()
            # All at once and bounded: a blackholed master must not delay the others' probes.
            await asyncio.gather(*(self._probe(shard, now) for shard in list(self.shards.values())))
            self.metrics.readiness.set(1 if self.ready() else 0)
            await asyncio.sleep(self.probe_interval)

    @property
    def streams(self) -> int:
        return len(self.open_streams)

    async def _watch_sends_forever(self) -> None:
        """Close viewers whose writes stay blocked past the send timeout (slow readers)."""
        while True:
            await asyncio.sleep(SEND_WATCH_INTERVAL)
            now = time.monotonic()
            for stream in list(self.open_streams):
                stream.close_if_blocked(now)

    async def _probe(self, shard: Shard, now: float) -> None:
        try:
            async with asyncio.timeout(self.probe_interval):
                await shard.publish_probe(now)
        except TimeoutError:
            self.metrics.redis_errors.labels("probe").inc()
            shard.failed()
        await shard.restart_if_stalled(now)

    async def _wake_quiet_topics_forever(self) -> None:
        """Viewers wait on their topic with no timer of their own; quiet topics are woken
        four times per keepalive interval (the audit interval is the edge's keepalive), so a
        keepalive comment is at most 1.25 intervals late."""
        tick = self.audit_interval / 4
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for topic in list(self.topics.values()):
                if now - topic.last_change >= tick:
                    topic.wake()

    async def _audit_forever(self, interval: float) -> None:
        """Resync topics idle for ``interval``: a missed last event must not leave them hanging."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            idle = [
                t for t in self.topics.values()
                if t.terminal_seq is None and now - t.last_change >= interval
            ]
            for topic in idle:
                await self._verify(topic)

    def verify_soon(self, topic: Topic) -> None:
        self._in_background(self._verify(topic))

    def _in_background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _verify(self, topic: Topic) -> None:
        """Does the generation still exist, with the history this edge served? Then viewers
        look in the log; else they end with ``history_lost``."""
        delivered = topic.head  # taken first: live events arriving during the read are newer
        try:
            meta = await self.store.meta(topic.gen_id)
        except (RedisError, OSError) as e:
            self.metrics.redis_errors.labels("verify").inc()
            log.warning("could not check generation %s (%r); the next audit will", topic.gen_id, e)
            return
        except protocol.ProtocolError:
            meta = None
        if meta is None:
            topic.lost = True
        elif meta.seq < delivered:
            topic.diverged()  # Redis forgot events this edge has already delivered
        topic.resync()
