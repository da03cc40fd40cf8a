"""One Redis subscription per generation per edge, fanned out to local viewers in memory.

The hub is this edge's registry of topics (``broker.edge.topic``), one per generation some
viewer here watches: it subscribes a topic's channel when its first viewer comes and drops it
when the last one leaves, hands each live message to its topic, and checks topics against
the log when a message may have been missed (a resubscription, a quiet topic). The pub/sub
connections that carry the channels are ``broker.edge.subscriptions``; they report to the hub
through its ``Listener`` methods (``on_message``, ``on_confirmed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker.core import protocol
from broker.core.metrics import Metrics
from broker.core.store import Caller, Store
from broker.core.tasks import cancel_and_wait
from broker.edge.conversations import ConversationTopic
from broker.edge.leases import FirstCheck, LeaseWatch
from broker.edge.subscriptions import Subscriptions
from broker.edge.topic import Topic, to_frame

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0


class Hub:
    """This edge's topics, subscribed through its pub/sub ``Subscriptions``."""

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
        self.subscriptions = Subscriptions(store.redis, metrics, self,
                                           probe_interval=probe_interval)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.closing = False
        # Ends the generations it serves whose worker died (``name``: the reaper it writes).
        self.leases = LeaseWatch(
            store, metrics, interval=probe_interval, name=name, healthy_for=self.healthy_for
        )

    def ready(self) -> bool:
        """True while Redis is reachable AND delivering to us (see ``Subscriptions.ready``)."""
        return self.subscriptions.ready()

    def close_streams(self) -> None:
        """Shutdown: every stream ends now (without a terminal event), so viewers reconnect."""
        self.closing = True
        for topic in self.topics.values():
            topic.resync()
        for conversation in self.conversations.values():
            conversation.wake()

    async def start(self) -> None:
        await self.subscriptions.start()
        self._tasks = [
            asyncio.create_task(self._audit_forever(self.audit_interval), name="hub-audit"),
            asyncio.create_task(self._wake_quiet_topics_forever(), name="hub-wake"),
            asyncio.create_task(self.leases.run(), name="hub-leases"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, *self._background)
        self.leases.stop()
        await self.subscriptions.stop()

    def caller(self) -> Caller | None:
        """Where a viewer's reads go when they may (``Subscriptions.caller``)."""
        return self.subscriptions.caller()

    def healthy_for(self, gen_id: str) -> float:
        """Seconds this edge has seen the Redis (on a cluster: the master) that serves
        ``gen_id`` deliver its probes without a failure; 0 while it fails."""
        return self.subscriptions.healthy_for(protocol.live_channel(gen_id))

    # -- what the connections report (``subscriptions.Listener``) --------------------------

    def on_message(self, channel: str, data: bytes | str) -> None:
        if protocol.is_conversation_channel(channel):
            # A turn was added: its viewers look at the index again.
            conversation = self.conversations.get(protocol.conversation_of_channel(channel))
            if conversation is not None:
                conversation.wake()
            return
        topic = self.topics.get(protocol.gen_id_of_channel(channel))
        if topic is None:
            return  # its last viewer left while the message was on its way
        try:
            event = protocol.decode_payload(data)
        except protocol.ProtocolError:
            log.exception("dropping a malformed live payload on %s", channel)
            return
        if not topic.offer(to_frame(event)):
            self.metrics.gaps.inc()

    def on_confirmed(self, channel: str) -> None:
        if protocol.is_conversation_channel(channel):
            self._conversation_confirmed(protocol.conversation_of_channel(channel))
            return
        topic = self.topics.get(protocol.gen_id_of_channel(channel))
        if topic is None:
            return
        if topic.subscribed.is_set():
            # A resubscription after a reconnect or a slot move: anything published
            # meanwhile was missed, and if Redis restarted empty, the history is gone.
            self.metrics.resubscribes.inc()
            self.verify_soon(topic)
        topic.subscribed.set()

    # -- topics ----------------------------------------------------------------------------

    def watch(self, gen_id: str, lease_check: FirstCheck | None = None) -> Watch:
        """The topic of ``gen_id``, subscribed; released (and unsubscribed if last) on exit
        (``async with hub.watch(gen_id) as topic``). ``lease_check``: the generation's lease
        was just checked (see ``LeaseWatch.watch``)."""
        return Watch(self, gen_id, lease_check)

    def join(self, gen_id: str, lease_check: FirstCheck | None = None) -> Topic:
        """``watch``'s entry: count a viewer in (the topic made if it is the first). Every
        ``join`` is followed by one ``leave``; ``subscribed`` waits for the subscription."""
        topic = self.topics.get(gen_id)
        if topic is None:
            topic = Topic(gen_id, self.window, last_change=time.monotonic(), metrics=self.metrics)
            self.topics[gen_id] = topic
            self.metrics.subscriptions.inc()
            self.leases.watch(topic, lease_check)
        topic.viewers += 1
        return topic

    async def subscribed(self, topic: Topic) -> None:
        """Subscribe (if this is the topic's first viewer) and wait for the confirmation."""
        if not topic.subscribed.is_set():
            if topic.viewers == 1:
                await self.subscriptions.subscribe(protocol.live_channel(topic.gen_id))
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    await topic.subscribed.wait()
            except TimeoutError as e:
                raise RedisConnectionError("the subscription was not confirmed") from e

    async def leave(self, topic: Topic) -> None:
        topic.viewers -= 1
        if topic.viewers == 0 and self.topics.get(topic.gen_id) is topic:
            del self.topics[topic.gen_id]
            self.metrics.subscriptions.dec()
            self.leases.forget(topic)
            await self.subscriptions.unsubscribe(protocol.live_channel(topic.gen_id))

    # -- conversations ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch_conversation(self, cid: str) -> AsyncIterator[ConversationTopic]:
        """The turn notices of conversation ``cid``, subscribed (one subscription per
        conversation on this edge, however many of its devices are here); released (and
        unsubscribed if last) on exit."""
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
                    await self.subscriptions.subscribe(channel)
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
                await self.subscriptions.unsubscribe(channel)

    def _conversation_confirmed(self, cid: str) -> None:
        conversation = self.conversations.get(cid)
        if conversation is None:
            return
        if conversation.subscribed.is_set():
            # A resubscription: notices may have been missed; the index has every turn.
            self.metrics.resubscribes.inc()
        conversation.subscribed.set()
        conversation.wake()

    # -- checks ----------------------------------------------------------------------------

    async def _wake_quiet_topics_forever(self) -> None:
        """Viewers wait on their topic with no timer of their own; quiet topics are woken
        four times per keepalive interval (the audit interval is the edge's keepalive), so a
        keepalive comment is at most 1.25 intervals late."""
        tick = self.audit_interval / 4
        while True:
            await asyncio.sleep(tick)
            self._wake_quiet_topics(tick)

    def _wake_quiet_topics(self, tick: float) -> None:
        # (Not in the loop's body: a topic left in a local of a waiting loop stays alive,
        # window and all, after its last viewer left; see ``LeaseWatch._check_due``.)
        now = time.monotonic()
        for topic in list(self.topics.values()):
            if now - topic.last_change >= tick:
                topic.wake()

    async def _audit_forever(self, interval: float) -> None:
        """Resync topics idle for ``interval``: a missed last event must not leave them hanging."""
        while True:
            await asyncio.sleep(interval)
            await self._audit(interval)

    async def _audit(self, interval: float) -> None:
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


class Watch:
    """``Hub.watch``'s context: four slots, where a generator-based context manager would
    keep a suspended generator frame per open stream for hours."""

    __slots__ = ("gen_id", "hub", "lease_check", "topic")

    def __init__(self, hub: Hub, gen_id: str, lease_check: FirstCheck | None = None) -> None:
        self.hub = hub
        self.gen_id = gen_id
        self.lease_check = lease_check
        self.topic: Topic | None = None

    async def __aenter__(self) -> Topic:
        lease_check, self.lease_check = self.lease_check, None
        topic = self.topic = self.hub.join(self.gen_id, lease_check)
        try:
            await self.hub.subscribed(topic)
        except BaseException:
            self.topic = None
            await self.hub.leave(topic)
            raise
        return topic

    async def __aexit__(self, *exc_info: object) -> None:
        topic, self.topic = self.topic, None
        if topic is not None:
            await self.hub.leave(topic)
