"""This edge's Redis pub/sub connections, and nothing about what the channels mean.

One connection to a single Redis (``SUBSCRIBE``); on a Redis Cluster one per master, where a
channel is subscribed with ``SSUBSCRIBE`` on the master that serves its slot. They route each
channel to its connection, follow slot moves and failovers, prove their own delivery with
probes (readiness), and report upward to a ``Listener`` (the hub: ``broker.edge.hub``) what
arrives: a message on a channel, a subscription confirmed. They know no topic and no viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from broker.core.backoff import Backoff
from broker.core.cluster import Master, SlotMap
from broker.core.metrics import Metrics
from broker.core.pubsub import Push, PushConnection, subscribe_forever
from broker.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Listener(Protocol):
    """What the connections report to (the hub)."""

    def on_message(self, channel: str, data: bytes | str) -> None:
        """A message published on a subscribed ``channel``."""

    def on_confirmed(self, channel: str) -> None:
        """Redis confirmed a subscription to ``channel``: the first one, or one made again
        after a reconnect or a slot move (messages published meanwhile were missed)."""


class PubSubConnection:
    """One pub/sub connection and the reader that owns it: to the single Redis, or to one
    cluster master, where the channels of the slots it serves are subscribed with SSUBSCRIBE.

    Each connection proves its own delivery: it publishes probes on a channel of its own (on a
    cluster, one whose slot this master serves) and must see them come back. A connection that
    is up but silently stopped delivering shows as probes published and never seen.
    """

    def __init__(self, owner: Subscriptions, name: str, client: aioredis.Redis, *,
                 sharded: bool, probe_channel: str) -> None:
        self.owner = owner
        self.name = name
        self.client = client
        self.sharded = sharded
        self.probe_channel = probe_channel
        self.channels: set[str] = set()  # the channels routed to this connection
        # SUBSCRIBE commands sent per channel and not yet confirmed: a confirmation nobody
        # waits for is a resubscription after a reconnect (see ``_dispatch``).
        self._unconfirmed: dict[str, int] = {}
        self._pubsub: PushConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._probe_seen_at: float | None = None
        self._unseen_since: float | None = None  # first probe published after the last seen
        # The first probe seen back after the last failure (None: failing, or none seen yet).
        self._healthy_since: float | None = None
        self.retired = False  # no longer a master: its channels went elsewhere

    @property
    def live(self) -> PushConnection | None:
        """The connection of the current session (None between sessions)."""
        return self._pubsub

    def ready(self) -> bool:
        """A probe came back within a probe timeout, and nothing failed since: a connection
        or probe that fails (a master killed, Redis restarted) makes the edge unready at once,
        not a probe timeout later (which outlasts a cluster's failover)."""
        seen = self._probe_seen_at
        return (seen is not None and self._healthy_since is not None
                and time.monotonic() - seen <= self.owner.probe_timeout)

    def healthy_for(self, now: float) -> float:
        """Seconds this connection has delivered its probes without a failure (0 while
        failing)."""
        return 0.0 if self._healthy_since is None else now - self._healthy_since

    def failed(self) -> None:
        """A call or the connection to this Redis failed: healthy again from the next probe
        seen back (the lease watch waits a lease from then before it reaps)."""
        self._healthy_since = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name=f"pubsub-{self.name}")

    async def stop(self) -> None:
        if self._reader is asyncio.current_task():
            return  # retired from its own reader (see ``Subscriptions.rebalance``): it ends itself
        if self._reader is not None:
            # Its failure, if any, was logged where it happened. Cancelled for sure: a cancel
            # landing as a Redis call completes can be lost (see broker.core.tasks).
            await cancel_and_wait(self._reader)
            self._reader = None

    async def restart(self) -> None:
        """Drop a stalled subscription: a new reader subscribes everything again and every
        listener catches up (see ``Listener.on_confirmed``)."""
        await self.stop()
        self.start()

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        pubsub = self._pubsub
        if pubsub is None:
            return  # between connections: the reader subscribes every channel when it reconnects
        self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        try:
            self._subscribe(pubsub, channel)
        except (RedisError, OSError):
            # The reader reconnects and subscribes it then (and may have cleared the count).
            self._unconfirmed[channel] = max(0, self._unconfirmed.get(channel, 0) - 1)

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                # A failed unsubscribe is harmless: stray messages for unknown topics are ignored.
                self._pubsub.send(b"SUNSUBSCRIBE" if self.sharded else b"UNSUBSCRIBE", channel)

    def forget(self, channel: str) -> None:
        """Stop routing ``channel`` here without telling Redis: its slot moved away, and the
        master already unsubscribed us (an unasked ``sunsubscribe``) or is gone. Telling it
        again would be answered ``MOVED``, which fails the whole connection, and every other
        channel on it would be subscribed again and resynced from the log."""
        self.channels.discard(channel)
        self._unconfirmed.pop(channel, None)

    def _subscribe(self, pubsub: PushConnection, *channels: str) -> None:
        """Written at once; Redis confirms each channel with a push (see ``_dispatch``)."""
        if not self.sharded:
            pubsub.send(b"SUBSCRIBE", *channels)
            return
        # One SSUBSCRIBE may only name channels of one slot (else CROSSSLOT).
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
        for same_slot in by_slot.values():
            pubsub.send(b"SSUBSCRIBE", *same_slot)

    async def publish_probe(self, now: float) -> None:
        try:
            if self.sharded:
                await self.client.spublish(self.probe_channel, str(now))
            else:
                await self.client.publish(self.probe_channel, str(now))
            if self._unseen_since is None:
                self._unseen_since = now
        except (RedisError, OSError):
            self.owner.metrics.redis_errors.labels("probe").inc()
            self.failed()

    async def restart_if_stalled(self, now: float) -> None:
        """Probes published and none seen back for a probe timeout: the connection is up but
        silently stopped delivering. Replace it."""
        if self._unseen_since is not None and now - self._unseen_since > self.owner.probe_timeout:
            log.warning("pub/sub connection to %s stopped delivering; resubscribing", self.name)
            self.owner.metrics.pubsub_stalls.inc()
            self.failed()
            self._unseen_since = None
            await self.restart()

    async def _read_forever(self) -> None:
        """Own the pub/sub connection. After any failure it starts over on a new connection
        and subscribes every channel again; their confirmations then tell the listener to
        catch up (see ``_dispatch``)."""
        await subscribe_forever(
            lambda: PushConnection(self.client, calls=not self.sharded), self._session,
            self._connection_failed,
            stopped=lambda: self.retired,
            after_failure=self._follow_failover if self.sharded else None,
        )

    async def _session(self, pubsub: PushConnection, connected: Callable[[], None]) -> None:
        try:
            await pubsub.connect()
            self._unconfirmed.clear()
            # Every channel at once, and the connection published (for direct subscribes) in
            # the same step: none added meanwhile can be missed.
            self._subscribe(pubsub, self.probe_channel, *self.channels)
            self._pubsub = pubsub
            connected()
            dispatch = self._dispatch
            while True:
                for push in await pubsub.read():
                    dispatch(push)
        finally:
            self._pubsub = None

    def _connection_failed(self, error: Exception, retry_in: float) -> None:
        metrics = self.owner.metrics
        metrics.redis_errors.labels("subscribe").inc()
        metrics.pubsub_reconnects.inc()
        self.failed()
        log.warning("pub/sub connection to %s failed (%s); retrying in %.2fs",
                    self.name, error, retry_in)

    async def _follow_failover(self) -> None:
        """The master may be gone (failed over): find out who serves these slots now."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.owner.rebalance()

    def _dispatch(self, push: Push) -> None:
        kind, raw_channel, data = push
        channel = raw_channel.decode()
        if channel == self.probe_channel:
            if kind in (b"message", b"smessage"):
                self._probe_seen_at = time.monotonic()
                self._unseen_since = None
                if self._healthy_since is None:
                    self._healthy_since = self._probe_seen_at
            return
        if kind == b"message" or kind == b"smessage":
            self.owner.listener.on_message(channel, data)
        elif kind in (b"subscribe", b"ssubscribe"):
            waiting = self._unconfirmed.get(channel, 0)
            if waiting > 1:
                self._unconfirmed[channel] = waiting - 1
                return
            self._unconfirmed.pop(channel, None)
            self.owner.listener.on_confirmed(channel)
        elif kind == b"sunsubscribe" and channel in self.channels:
            # Unasked: the master no longer serves this channel's slot (it moved, or the node
            # became a replica). Find the new owner and subscribe there.
            self.owner.channel_dropped(channel)


class Subscriptions:
    """The channels this edge listens to, each on the connection that can deliver it."""

    def __init__(self, redis: aioredis.Redis | aioredis.RedisCluster, metrics: Metrics,
                 listener: Listener, *, probe_interval: float) -> None:
        self.redis = redis
        self.metrics = metrics
        self.listener = listener
        self.probe_interval = probe_interval
        self.probe_timeout = 3 * probe_interval
        self.connections: dict[str, PubSubConnection] = {}
        self._connection_of: dict[str, PubSubConnection] = {}  # channel -> its connection
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._rebalancing = asyncio.Lock()
        # Channels a master unsubscribed us from (slot moved), and since when (monotonic).
        self._dropped: dict[str, float] = {}
        self._rebalance_again = False
        self._id = uuid.uuid4().hex
        self.slot_map = SlotMap(redis) if isinstance(redis, aioredis.RedisCluster) else None

    def ready(self) -> bool:
        """True while probes make the round trip on every connection: Redis is reachable AND
        delivering to us (on a cluster: every master)."""
        connections = list(self.connections.values())
        return bool(connections) and all(c.ready() for c in connections)

    async def start(self) -> None:
        redis = self.redis
        if not isinstance(redis, aioredis.RedisCluster):
            self._add_connection("redis", redis, sharded=False,
                                 probe_channel=f"broker:edge:{self._id}")
        else:
            await redis.initialize()  # (the slot map, read once)
            await self.rebalance()
        self._tasks = [asyncio.create_task(self._probe_forever(), name="pubsub-probe")]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._background)
        for connection in list(self.connections.values()):
            await self._drop_connection(connection)

    def caller(self) -> PushConnection | None:
        """The single Redis's pub/sub connection while it is up and takes short reads
        (``PushConnection.call``: RESP3, the lean reader, few in flight), for reads that would
        cost more through redis-py; None on a cluster (a reply there may be ``MOVED``, and a
        slot move pushes unasked ``sunsubscribe``s) or between connections."""
        if self.slot_map is not None:
            return None
        connection = self.connections.get("redis")
        pubsub = None if connection is None else connection.live
        return pubsub if pubsub is not None and pubsub.takes_calls else None

    def healthy_for(self, channel: str) -> float:
        """Seconds the connection that serves ``channel`` (on a cluster: its master's) has
        delivered its probes without a failure; 0 while it fails."""
        connection = self._connection_of.get(channel)
        if connection is None:
            if self.slot_map is None:
                connection = self.connections.get("redis")
            else:
                name = self.slot_map.master_of(channel)
                connection = None if name is None else self.connections.get(name)
        return 0.0 if connection is None else connection.healthy_for(time.monotonic())

    async def subscribe(self, channel: str) -> None:
        """Listen to ``channel``; the listener hears ``on_confirmed`` once Redis confirms."""
        try:
            connection = self._route(channel)
        except (RedisError, OSError) as e:
            raise RedisConnectionError(f"no master serves {channel}") from e
        self._connection_of[channel] = connection
        await connection.subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        connection = self._connection_of.pop(channel, None)
        if connection is not None:
            await connection.unsubscribe(channel)

    # -- connections -----------------------------------------------------------------------

    def _add_connection(self, name: str, client: aioredis.Redis, *, sharded: bool,
                        probe_channel: str) -> PubSubConnection:
        connection = PubSubConnection(self, name, client, sharded=sharded,
                                      probe_channel=probe_channel)
        self.connections[name] = connection
        connection.start()
        return connection

    async def _drop_connection(self, connection: PubSubConnection) -> None:
        connection.retired = True
        self.connections.pop(connection.name, None)
        await connection.stop()
        if connection.sharded:
            with contextlib.suppress(RedisError, OSError):
                await connection.client.aclose()

    def _route(self, channel: str) -> PubSubConnection:
        """The connection a channel belongs on: on a cluster, the master that serves its slot."""
        cluster = self.slot_map
        if cluster is None:
            return self.connections["redis"]
        name = cluster.master_of(channel)
        if name is None:  # the slot is not covered (mid-failover)
            raise RedisConnectionError(f"no master serves {channel} now")
        connection = self.connections.get(name)
        if connection is None:
            master = cluster.masters().get(name)
            if master is None:
                raise RedisConnectionError(f"{name} serves {channel} but is no master now")
            connection = self._add_master_connection(cluster, master)
        return connection

    def _add_master_connection(self, cluster: SlotMap, master: Master) -> PubSubConnection:
        # Two connections: the subscription, and the probes published to it.
        client = aioredis.Redis.from_pool(cluster.own_connection_pool(master, 2))  # owns it
        probe = self._probe_channel_on(cluster, master.name)
        return self._add_connection(master.name, client, sharded=True, probe_channel=probe)

    def _probe_channel_on(self, cluster: SlotMap, master: str) -> str:
        """A probe channel whose slot ``master`` serves, so its probes test that master."""
        for i in range(100_000):
            channel = f"broker:edge:{{{self._id}:{i}}}"
            if cluster.master_of(channel) == master:
                return channel
        raise RuntimeError(f"no slot of {master} found for a probe channel")

    # -- following the cluster -------------------------------------------------------------

    def channel_dropped(self, channel: str) -> None:
        self._dropped.setdefault(channel, time.monotonic())
        self._in_background(self._rebalance_until_done())

    async def _rebalance_until_done(self) -> None:
        """A slot moved away from a connection: keep trying until we follow the new map (an
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
        confirmation tells the listener to catch up."""
        cluster = self.slot_map
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
                    # Retried: by the failing connection's reader, or by channel_dropped.
                    log.warning("could not follow the cluster's slot map (%s)", e)
                    raise

    async def _follow_slot_map(self, cluster: SlotMap) -> None:
        serving = cluster.masters()
        for connection in list(self.connections.values()):
            if (connection.name not in serving
                    or cluster.master_of(connection.probe_channel) != connection.name):
                # Not a master with slots any more, or its probe slot moved: start over.
                await self._drop_connection(connection)
        for name, master in serving.items():
            if name not in self.connections:
                self._add_master_connection(cluster, master)
        dropped, self._dropped = self._dropped, {}
        behind = False
        for channel, connection in list(self._connection_of.items()):
            if self._connection_of.get(channel) is not connection:
                continue  # its last listener left (or it moved) during an await of this loop
            target = self._route(channel)
            if (channel in dropped and target is connection and not connection.retired
                    and time.monotonic() - dropped[channel] < self.probe_timeout):
                # The master dropped it, yet the map we read still names that master: the
                # node we asked has not heard of the move yet (a resharding tells the nodes
                # one by one). Subscribing there again would be answered MOVED; read the map
                # again shortly (for a probe timeout at most, then trust it).
                self._dropped[channel] = dropped[channel]
                behind = True
                continue
            if target is not connection or connection.retired or channel in dropped:
                # Moved, or dropped by the server even if the map still names the same node:
                # subscribe it (again) where it belongs; the confirmation resyncs its listener.
                # Not unsubscribed where it was (see ``forget``).
                self._connection_of[channel] = target
                connection.forget(channel)
                await target.subscribe(channel)
        if behind:
            raise RedisConnectionError("the slot map is behind a slot move; reading it again")

    # -- probes ----------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            now = time.monotonic()
            # All at once and bounded: a blackholed master must not delay the others' probes.
            await asyncio.gather(*(self._probe(c, now) for c in list(self.connections.values())))
            self.metrics.readiness.set(1 if self.ready() else 0)
            await asyncio.sleep(self.probe_interval)

    async def _probe(self, connection: PubSubConnection, now: float) -> None:
        try:
            async with asyncio.timeout(self.probe_interval):
                await connection.publish_probe(now)
        except TimeoutError:
            self.metrics.redis_errors.labels("probe").inc()
            connection.failed()
        await connection.restart_if_stalled(now)

    def _in_background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
