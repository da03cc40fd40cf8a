"""Redis operations on generations and jobs, shared by the edge and the worker.

Names and formats come from ``broker.core.protocol``; this module only sequences the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT, FieldT, StreamIdT

from broker.core import protocol
from broker.core.protocol import Event, Job, JobEntry, Meta, NewEvent, as_text
from broker.core.settings import Settings

POOL_WAIT_TIMEOUT = 5.0
IGNORED_BLOCK_PAUSE = 0.05
CLUSTER_SCHEME = "redis+cluster://"

log = logging.getLogger(__name__)

# One Redis, or a Redis Cluster (``REDIS_URL=redis+cluster://host:port[,host:port...]``: any
# node seeds the slot map; several seeds, so a process starts while one of them is down).
RedisClient = aioredis.Redis | aioredis.RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.startswith((CLUSTER_SCHEME, "rediss+cluster://"))


def connect(settings: Settings, client_name: str) -> RedisClient:
    """A client whose pool is bounded, so a burst of viewers (late joins, resumes) never opens a
    connection each; on one Redis a command waits for a free connection. Pub/sub connections
    come on top of the pool. ``client_name`` shows in ``CLIENT LIST``."""
    options: dict[str, Any] = dict(
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        health_check_interval=15,
        client_name=client_name,
        # A pooled connection goes stale when Redis restarts: reconnect and retry instead of
        # failing the first command on each (our writes are idempotent by seq).
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    if is_cluster_url(settings.redis_url):
        # The cluster client keeps a pool per node and follows MOVED/ASK and failovers itself.
        # Headroom over the in-flight bound: pipelines and the worker's subscription take
        # connections of their own.
        url, more_seeds = cluster_seeds(settings.redis_url)
        return WaitingRedisCluster.from_url(
            url, startup_nodes=[ClusterNode(host, port) for host, port in more_seeds],
            max_connections=settings.redis_pool_size + 4,
            max_in_flight=settings.redis_pool_size,
            # Follow each MOVED by patching that slot: the periodic full re-initialization
            # closes every connection of the client, blocking reads of other tasks included.
            reinitialize_steps=0,
            # Maintenance push notifications are a Redis Enterprise feature; their handshake is
            # one more round trip on every new connection.
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            **options,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_pool_size, timeout=POOL_WAIT_TIMEOUT,
        **options,
    )
    return aioredis.Redis(connection_pool=pool)


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster ``REDIS_URL`` (``redis+cluster://[user:password@]host:port[,host:port...]
    [/db][?options]``) as redis-py takes it: the URL of the first seed (``redis://`` or
    ``rediss://``, credentials and options kept), and the other seeds as (host, port). The
    client tries the seeds in turn until one answers the slot map, so one seed being down
    does not stop a process from starting."""
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = [seed for seed in hosts.split(",") if seed]
    if not seeds:
        raise ValueError(f"no host in REDIS_URL {url!r}")
    others = []
    for seed in seeds[1:]:
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster seed is host:port, not {seed!r}")
        others.append((host.strip("[]"), int(port)))
    first = f"{scheme.replace('+cluster', '', 1)}://{userinfo}{at}{seeds[0]}{tail}"
    return first, others


class WaitingRedisCluster(aioredis.RedisCluster):
    """A cluster client under which a burst of commands waits for a free connection, as it
    does on one Redis (``BlockingConnectionPool``): redis-py's per-node pools raise
    ``MaxConnectionsError`` when full instead."""

    def __init__(self, *args: Any, max_in_flight: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(max_in_flight)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(POOL_WAIT_TIMEOUT):
                await self._in_flight.acquire()
        except TimeoutError as e:
            raise RedisConnectionError("no Redis connection became free") from e
        try:
            return await super().execute_command(*args, **kwargs)
        except (RuntimeError, AttributeError) as e:
            if not closed_under_the_command(e):
                raise  # a bug, not an outage
            raise RedisConnectionError(f"the connection closed under the command: {e!r}") from e
        except (ClusterDownError, TryAgainError) as e:
            # A failover (CLUSTERDOWN) or a slot migration (TRYAGAIN) under way, past redis-py's
            # own retries: an outage that passes, retried by the callers like a lost connection.
            raise ClusterInTransition(str(e)) from e
        except RedisClusterException as e:
            # Not a RedisError: no node reachable, a slot not covered. For the callers this is
            # Redis being unavailable (a JSON 503 at the edge, a retry in the worker).
            raise RedisConnectionError(f"the cluster is unavailable: {e}") from e
        finally:
            self._in_flight.release()


class ClusterInTransition(RedisConnectionError):
    """A Redis Cluster answered CLUSTERDOWN or TRYAGAIN: retry as after a lost connection."""


def closed_under_the_command(error: RuntimeError | AttributeError) -> bool:
    """Did a command fail because its connection was closed under it? redis-py closes every
    connection of a cluster client on some cluster errors (CLUSTERDOWN during a failover), and
    a command in flight on another task then meets the reader and writer the disconnect set
    to None (``AttributeError`` on ``None``) or uvloop's closed transport (``RuntimeError:
    unable to perform operation on <TCPTransport closed=True ...>; the handler is closed``).
    Anything else is a bug, and must not pass for an outage."""
    if isinstance(error, AttributeError):
        return error.obj is None
    return str(error).endswith("the handler is closed")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A generation's meta and what its events add up to so far."""

    meta: Meta
    text: str  # the messages' texts, joined
    reasoning: str  # the reasoning events' texts, joined
    tool_calls: list[dict[str, Any]]  # the tool_call events' data, in order


class Caller(Protocol):
    """A connection that sends one command and returns its raw reply (a pub/sub connection,
    ``broker.core.pubsub.PushConnection``: the edge's, the worker's cancel listener): a
    viewer's meta reads and the worker's publishes go there when they may, as redis-py's call
    costs several times their own work. Only short replies: they share the pub/sub
    connection's output buffer limit with the messages."""

    async def call(self, command: bytes, *args: str | bytes | int) -> Any: ...


_UNANSWERED = object()
# The most log events a read may ask a ``Caller`` for (it answers only shorter tails).
SHORT_LOG_READ = 16


async def _answer_via(
    via: Caller | None, command: bytes, *args: str | bytes | int, writes: bool = False,
) -> Any:
    """``via``'s reply to ``command``, or ``_UNANSWERED`` (no ``via``, or it failed: the
    caller asks through redis-py, whose retries and errors are the store's). ``writes``: the
    command writes, so an error reply is its answer, raised as redis-py would (made again it
    would run again), but for ``NOSCRIPT`` (it did not run; redis-py loads the script)."""
    if via is None:
        return _UNANSWERED
    try:
        return await via.call(command, *args)
    except ResponseError as e:
        if writes and not str(e).startswith("NOSCRIPT"):
            raise
        log.debug("%s on the pub/sub connection was refused (%r); through redis-py",
                  command.decode(), e)
        return _UNANSWERED
    except RedisError as e:
        log.debug("%s on the pub/sub connection failed (%r); through redis-py",
                  command.decode(), e)
        return _UNANSWERED


class Store:
    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.ttl_ms = str(int(settings.retention_ttl * 1000))
        self.maxlen = str(settings.max_log_length)
        # On a cluster, a generation's events travel on sharded pub/sub: only the node that owns
        # the generation's slot carries them, instead of every node of the cluster.
        self.cluster = isinstance(redis, aioredis.RedisCluster)
        self.publish_cmd = "SPUBLISH" if self.cluster else "PUBLISH"
        self.job_streams = [protocol.jobs_stream(i) for i in range(settings.job_shards)]
        self._publish = redis.register_script(protocol.PUBLISH_SCRIPT)
        self._claim = redis.register_script(protocol.CLAIM_SCRIPT)
        self._heartbeat = redis.register_script(protocol.HEARTBEAT_SCRIPT)
        self._cancel = redis.register_script(protocol.CANCEL_SCRIPT)
        self._reap = redis.register_script(protocol.REAP_SCRIPT)
        self._stream_meta = redis.register_script(protocol.STREAM_META_SCRIPT)
        self._queue_quota = redis.register_script(protocol.QUEUE_QUOTA_SCRIPT)
        self._add_turn = redis.register_script(protocol.ADD_TURN_SCRIPT)
        self._forget_consumers = redis.register_script(protocol.FORGET_CONSUMERS_SCRIPT)

    # -- generations -----------------------------------------------------------------------

    async def reserve_queue_slot(self, producer: str, gen_id: str, limit: int) -> bool:
        """Count ``gen_id`` against ``producer``'s queue quota: False if it is full."""
        now = protocol.now_ms()
        stale_before = now - int(self.ttl_ms)
        result = await self._queue_quota(
            keys=[protocol.queued_key(producer)],
            args=[gen_id, now, limit, stale_before, self.ttl_ms],
        )
        return bool(result)

    async def release_queue_slot(self, producer: str, gen_id: str) -> None:
        """A worker took the job (or it will never run): it no longer waits."""
        await self.redis.zrem(protocol.queued_key(producer), gen_id)

    async def create(
        self, gen_id: str, request: dict[str, Any], model: str, producer: str | None = None,
        conversation: str | None = None,
    ) -> int | None:
        """Meta first, then the job, so a worker never sees a job without meta. On one Redis,
        with no conversation, both go in one transaction (one round trip). On a cluster they
        live in different slots, so no transaction spans them: if the job cannot be queued,
        the meta is taken back (and expires anyway) and the caller gets the error.

        A turn of ``conversation`` is indexed between the two (``add_turn``), before any
        worker can publish an event of it; returns its turn number (None: no conversation)."""
        meta = protocol.meta_key(gen_id)
        job_fields = protocol.Job(gen=gen_id, request=request)
        if producer:
            job_fields["producer"] = producer
        job = protocol.encode_job(job_fields)
        meta_fields = _fields(protocol.new_meta(model, producer, conversation))
        if not self.cluster and not conversation:
            # Meta and job in one MULTI: applied in order, one round trip (should the XADD
            # fail, the meta is taken back as below).
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(meta, mapping=meta_fields)
                    pipe.pexpire(meta, int(self.ttl_ms))
                    pipe.xadd(self.job_stream_of(gen_id), _fields(job))
                    await pipe.execute()
            except BaseException:
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.delete(meta)
                raise
            return None
        async with self.redis.pipeline(transaction=not self.cluster) as pipe:
            pipe.hset(meta, mapping=meta_fields)
            pipe.pexpire(meta, int(self.ttl_ms))
            await pipe.execute()
        turn = None
        try:
            if conversation:
                turn = await self.add_turn(conversation, gen_id)
            await self.redis.xadd(self.job_stream_of(gen_id), _fields(job))
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(meta)
            raise
        return turn

    async def meta(self, gen_id: str, via: Caller | None = None) -> Meta | None:
        """``via``: asked there first (see ``Caller``)."""
        key = protocol.meta_key(gen_id)
        raw = await _answer_via(via, b"HGETALL", key)
        if raw is _UNANSWERED:
            raw = await self.redis.hgetall(key)
        return protocol.decode_meta(protocol.field_pairs(raw))

    async def snapshot(self, gen_id: str) -> Snapshot | None:
        """The generation as ``GET /v1/generations/{id}`` shows it: meta and aggregates read
        in one round trip (one MULTI on one Redis: a consistent view; on a cluster the keys
        share a slot, so one node answers them together). None when unknown or expired."""
        async with self.redis.pipeline(transaction=not self.cluster) as pipe:
            pipe.hgetall(protocol.meta_key(gen_id))
            pipe.get(protocol.text_key(gen_id))
            pipe.get(protocol.reasoning_key(gen_id))
            pipe.lrange(protocol.tools_key(gen_id), 0, -1)
            raw_meta, text, reasoning, tools = await pipe.execute()
        meta = protocol.decode_meta(raw_meta)
        if meta is None:
            return None
        return Snapshot(
            meta=meta,
            text=as_text(text) if text else "",
            reasoning=as_text(reasoning) if reasoning else "",
            tool_calls=[protocol.decode_tool_call(call) for call in tools or []],
        )

    async def read_log(
        self, gen_id: str, after_seq: int, count: int, via: Caller | None = None
    ) -> list[Event]:
        """Up to ``count`` events after ``after_seq``. ``via`` (see ``Caller``) is asked for
        fewer than ``SHORT_LOG_READ`` only (a viewer nearly caught up: the usual first read of
        a new topic), so that its reply stays short; when there are more, redis-py reads."""
        key, start = protocol.log_key(gen_id), f"({protocol.stream_id(after_seq)}"
        short = min(count, SHORT_LOG_READ)
        raw = await _answer_via(via, b"XRANGE", key, start, "+", "COUNT", short)
        if raw is not _UNANSWERED and (len(raw) < short or short == count):
            return [protocol.decode_log_entry(eid, protocol.field_pairs(fields))
                    for eid, fields in raw]
        entries: Any = await self.redis.xrange(  # (redis-py types entries with None parts)
            key, min=start, count=count
        )
        return [protocol.decode_log_entry(eid, fields) for eid, fields in entries or []]

    async def cancel(self, gen_id: str) -> str:
        """Status before the cancel ('' if unknown): a queued generation ends at once, and
        leaves its producer's queue quota."""
        data = protocol.end_data("cancelled", None)
        result = await self._cancel(
            keys=protocol.generation_keys(gen_id),
            args=[gen_id, data, protocol.now_ms(), self.maxlen, self.ttl_ms,
                  protocol.live_channel(gen_id), self.publish_cmd, protocol.CANCEL_CHANNEL],
        )
        before = as_text(result)
        if before == "queued":
            await self._leave_queue_quota(gen_id)
        if before in ("queued", "running"):
            # Ended now (queued, or an external producer's running one), or soon (a worker's):
            # either way its conversation's index may live from now on.
            await self._turn_ended(gen_id)
        return before

    async def _leave_queue_quota(self, gen_id: str) -> None:
        """A second call, not part of the cancel script: on a Redis Cluster the quota set and
        the meta live in different slots. Idempotent (so is the worker's own release when it
        reads the job); if it fails, the entry leaves when a worker reads the cancelled job,
        or ages out of the quota."""
        with contextlib.suppress(RedisError, OSError):
            producer = await self.redis.hget(protocol.meta_key(gen_id), "producer")
            if producer:
                await self.release_queue_slot(as_text(producer), gen_id)

    # -- conversations ---------------------------------------------------------------------

    async def add_turn(self, cid: str, gen_id: str) -> int:
        """Index ``gen_id`` as the next turn of ``cid`` and publish the notice (one script: the
        index and the channel share a slot); the turn's number. Its meta must exist already,
        naming the conversation: a viewer who reads the index finds the generation."""
        return int(await self._add_turn(
            keys=[protocol.conversation_turns_key(cid)],
            args=[gen_id, self.ttl_ms, protocol.conversation_channel(cid), self.publish_cmd],
        ))

    async def _turn_ended(self, gen_id: str) -> None:
        """A generation ended, and its keys now live ``ttl`` from now: if it is a turn, so does
        its conversation's index (it lives as long as its newest turn; an older turn ending
        only makes it live longer). A second call, not part of the script that ended it: the
        index is in another slot. Best effort: if it fails, the index still lives ``ttl`` from
        its newest turn's creation."""
        with contextlib.suppress(RedisError, OSError):
            cid = await self.redis.hget(protocol.meta_key(gen_id), "conversation")
            if cid:
                await self._conversation_turn_ended(as_text(cid))

    async def _conversation_turn_ended(self, cid: str) -> None:
        """``_turn_ended`` for a turn of ``cid`` (known: the publish script named it)."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.pexpire(protocol.conversation_turns_key(cid), int(self.ttl_ms))

    async def conversation_turns(self, cid: str, after: int = 0) -> list[protocol.Turn]:
        """The turns of ``cid`` after turn number ``after``, in order ([] when unknown)."""
        entries: Any = await self.redis.xrange(  # (redis-py types entries with None parts)
            protocol.conversation_turns_key(cid), min=f"({protocol.stream_id(after)}"
        )
        return [protocol.decode_turn(eid, fields) for eid, fields in entries or []]

    async def conversation_turn(self, cid: str, number: int) -> protocol.Turn | None:
        """Turn ``number`` of ``cid`` (None: no such turn, or the conversation is unknown)."""
        entry_id = protocol.stream_id(number)
        entries: Any = await self.redis.xrange(protocol.conversation_turns_key(cid),
                                               min=entry_id, max=entry_id)
        return protocol.decode_turn(*entries[0]) if entries else None

    async def turn_statuses(self, turns: Sequence[protocol.Turn]) -> list[str | None]:
        """The status of each turn's generation (None: expired), in one round trip per node."""
        if not turns:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for turn in turns:
                pipe.hget(protocol.meta_key(turn.gen_id), "status")
            replies = await pipe.execute()
        return [as_text(reply) if reply else None for reply in replies]

    async def active_turn(self, cid: str) -> str | None:
        """The generation of the oldest turn of ``cid`` that has not ended (queued or
        running), or None. (Turns may end out of order: two workers run them at once.)"""
        turns = await self.conversation_turns(cid)
        active = oldest_unended(turns, await self.turn_statuses(turns))
        return None if active is None else active.gen_id

    # -- worker side -----------------------------------------------------------------------

    async def claim(self, gen_id: str, owner: str, lease_ttl: float, job: str = "") -> str:
        """'ok' when this owner now runs the generation, its lease running out ``lease_ttl``
        seconds from now by Redis's clock; else the status that prevents it. ``job`` names the
        job entry it was read from: the same claim repeated (a retry after a lost reply) is
        'ok' again."""
        keys = [protocol.meta_key(gen_id)]
        return as_text(await self._claim(keys=keys, args=[owner, _ms(lease_ttl), job]))

    async def heartbeat(self, gen_id: str, owner: str, lease_ttl: float) -> str:
        """Renew the lease for ``lease_ttl`` seconds (Redis's clock): 'run', 'cancel' (cancel
        was requested) or 'lost' (no longer ours)."""
        keys = [protocol.meta_key(gen_id)]
        return as_text(await self._heartbeat(keys=keys, args=[owner, _ms(lease_ttl)]))

    async def renew_leases(
        self, owner: str, leases: Sequence[tuple[str, JobEntry]], lease_ttl: float
    ) -> list[str]:
        """``heartbeat`` for each generation and ``touch_job`` for each job, in one round trip
        on one Redis (a pipeline; every reply is checked); on a cluster, where each generation
        lives on its own slot, as concurrent calls. One state per lease, in order."""
        if not leases:
            return []
        ttl_ms = _ms(lease_ttl)
        jobs: dict[str, list[StreamIdT]] = {}
        for _gen_id, job in leases:
            jobs.setdefault(job.stream, []).append(job.entry_id)
        if self.cluster:
            states = await asyncio.gather(
                *(self.heartbeat(gen_id, owner, lease_ttl) for gen_id, _ in leases))
            await asyncio.gather(*(self.redis.xclaim(
                stream, protocol.WORKER_GROUP, owner, 0, ids, justid=True)
                for stream, ids in jobs.items()))
            return list(states)
        async with self.redis.pipeline(transaction=False) as pipe:
            for gen_id, _ in leases:
                await self._heartbeat(  # (redis-py types no pipeline here, but takes one)
                    keys=[protocol.meta_key(gen_id)], args=[owner, ttl_ms],
                    client=pipe)  # type: ignore[arg-type]
            for stream, ids in jobs.items():
                pipe.xclaim(stream, protocol.WORKER_GROUP, owner, 0, ids, justid=True)
            replies = await pipe.execute()
        return [as_text(reply) for reply in replies[: len(leases)]]

    async def publish(
        self, gen_id: str, owner: str, seq: int, events: Sequence[NewEvent],
        published_ms: int | None = None, via: Caller | None = None,
    ) -> int:
        """Append ``events`` to the log as ``seq``, ``seq + 1``, ... and publish them, all in
        one atomic call, all or nothing (see PUBLISH_SCRIPT): 1 published, 0 already published
        (a retry), -1 gone, -2 not ours. A terminal event may only come last; it sets the
        generation's final status. ``via``: sent there first (see ``Caller``; the worker's
        cancel-listening connection): if it fails, the call is made again through redis-py,
        which the explicit seq makes safe (a repeat of a call that did run answers 0)."""
        args = protocol.publish_args(
            owner, seq, events, protocol.now_ms() if published_ms is None else published_ms,
            maxlen=self.maxlen, ttl_ms=self.ttl_ms, channel=protocol.live_channel(gen_id),
            publish_cmd=self.publish_cmd,
        )
        keys = protocol.generation_keys(gen_id)
        # By its SHA: a Redis that lost its scripts answers NOSCRIPT, and redis-py's call
        # below loads it again.
        reply = await _answer_via(via, b"EVALSHA", self._publish.sha, len(keys), *keys, *args,
                                  writes=True)
        if reply is _UNANSWERED:
            reply = await self._publish(keys=keys, args=args)
        result, conversation = protocol.decode_publish_reply(reply)
        if conversation:
            await self._conversation_turn_ended(conversation)
        return result

    async def publish_many(self, batches: Sequence[PublishCall]) -> list[int | Exception]:
        """``publish`` for several generations at once: one pipeline, one round trip on one
        Redis (each script call still atomic by itself); concurrent calls on a cluster, where
        the generations live on different slots. One result per call, in order: what
        ``publish`` returns, or the exception it would raise (a lost connection fails them
        all: each caller retries its own, the explicit seq making a repeat harmless)."""
        if len(batches) == 1:
            try:  # (alone: no task of its own, as gather would make)
                return [await self.publish(*batches[0])]
            except Exception as e:
                return [e]
        if self.cluster:
            outcomes = await asyncio.gather(
                *(self.publish(*call) for call in batches), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome  # (a cancellation)
            return [o for o in outcomes if isinstance(o, int | Exception)]
        sha = self._publish.sha
        async with self.redis.pipeline(transaction=False) as pipe:
            for gen_id, owner, seq, events, published_ms in batches:
                args = protocol.publish_args(
                    owner, seq, events, published_ms, maxlen=self.maxlen, ttl_ms=self.ttl_ms,
                    channel=protocol.live_channel(gen_id), publish_cmd=self.publish_cmd,
                )
                keys = protocol.generation_keys(gen_id)
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        results: list[int | Exception] = []
        for call, reply in zip(batches, replies, strict=True):
            if isinstance(reply, NoScriptError):
                try:  # (Redis lost its scripts: the Script object loads it again)
                    results.append(await self.publish(*call))
                except (RedisError, OSError) as e:
                    results.append(e)
            elif isinstance(reply, Exception):
                results.append(reply)
            else:
                result, conversation = protocol.decode_publish_reply(reply)
                if conversation:
                    await self._conversation_turn_ended(conversation)
                results.append(result)
        return results

    async def reap(self, gen_id: str, reaper: str, healthy_for: float) -> protocol.LeaseCheck:
        """End ``gen_id`` with ``worker_lost`` (``producer_lost`` for an external producer's)
        if its lease ran out (see REAP_SCRIPT); ``healthy_for``: seconds the caller has seen
        Redis answer without failing."""
        reply = await self._reap(keys=protocol.generation_keys(gen_id),
                                 args=self._reap_args(gen_id, reaper, healthy_for))
        check = protocol.decode_lease_check(reply)
        if check.reaped:
            await self._turn_ended(gen_id)
        return check

    async def stream_meta(
        self, gen_id: str, reaper: str, healthy_for: float, via: Caller | None = None
    ) -> tuple[Meta | None, protocol.LeaseCheck]:
        """``meta`` and ``reap`` in one round trip (STREAM_META_SCRIPT): the lease checked
        (and reaped if it ran out), then the meta as that left it. ``via``: as ``meta``; the
        script goes there by ``EVAL`` (Redis keeps it compiled by its digest: no ``NOSCRIPT``
        to answer there)."""
        keys = protocol.generation_keys(gen_id)
        args = self._reap_args(gen_id, reaper, healthy_for)
        reply = await _answer_via(via, b"EVAL", protocol.STREAM_META_SCRIPT, len(keys), *keys,
                                  *args)
        if reply is _UNANSWERED:
            reply = await self._stream_meta(keys=keys, args=args)
        meta, check = protocol.decode_stream_meta(reply)
        if check.reaped:
            await self._turn_ended(gen_id)
        return meta, check

    def _reap_args(self, gen_id: str, reaper: str, healthy_for: float) -> list[str | int]:
        """REAP_SCRIPT's (and STREAM_META_SCRIPT's) ARGV."""
        return [reaper, _ms(healthy_for), *_lost_events(), self.maxlen, self.ttl_ms,
                protocol.live_channel(gen_id), self.publish_cmd]

    # -- jobs ------------------------------------------------------------------------------

    def job_stream_of(self, gen_id: str) -> str:
        return self.job_streams[protocol.jobs_shard(gen_id, len(self.job_streams))]

    async def ensure_job_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, protocol.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read_jobs(
        self, stream: str, consumer: str, count: int, block_ms: int
    ) -> list[tuple[JobEntry, Job]]:
        started = time.monotonic()
        reply: Any = await self.redis.xreadgroup(  # (redis-py types this reply loosely)
            protocol.WORKER_GROUP, consumer, {stream: ">"}, count=count, block=block_ms,
        )
        jobs = [(JobEntry(stream, as_text(entry_id)), protocol.decode_job(fields))
                for _stream, entries in reply or [] for entry_id, fields in entries]
        if not jobs and time.monotonic() - started < block_ms / 2000:
            # Empty before the block ran out: a store that ignores BLOCK (fakeredis, under
            # `broker dev`) would otherwise make the caller's read loop spin a core.
            await asyncio.sleep(IGNORED_BLOCK_PAUSE)
        return jobs

    async def touch_job(self, consumer: str, job: JobEntry) -> None:
        """Reset the job's idle time in the group: a job idle past the lease has a dead worker."""
        await self.redis.xclaim(
            job.stream, protocol.WORKER_GROUP, consumer, 0, [job.entry_id], justid=True
        )

    async def reclaim_jobs(
        self, stream: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[tuple[JobEntry, Job]]]:
        """Take over jobs nobody touched for ``min_idle_ms`` (their worker died or stalled).
        Scans the pending list from ``cursor``; returns the next cursor ('0-0': wrapped)."""
        reply: Any = await self.redis.xautoclaim(  # (likewise)
            stream, protocol.WORKER_GROUP, consumer, min_idle_ms, start_id=cursor, count=count,
        )
        entries = reply[1] if reply else []
        jobs = [(JobEntry(stream, as_text(eid)), protocol.decode_job(fields))
                for eid, fields in entries if fields]
        return (as_text(reply[0]) if reply else "0-0"), jobs

    async def forget_consumers(self, stream: str, idle_ms: int, name: str = "") -> int:
        """Delete the job group's consumers holding no job and idle ``idle_ms`` or more (only
        ``name``, if given): gone workers' entries. How many were deleted."""
        deleted: Any = await self._forget_consumers(
            keys=[stream], args=[protocol.WORKER_GROUP, idle_ms, name]
        )
        return int(deleted or 0)

    async def queue_stats(self) -> tuple[int, float]:
        """(jobs not yet taken by any worker, age in seconds of the oldest taken-unfinished)."""
        depth, oldest_ms = 0, None
        for stream in self.job_streams:
            for group in await self.redis.xinfo_groups(stream):
                if as_text(group.get("name", b"")) == protocol.WORKER_GROUP:
                    depth += int(group.get("lag") or 0)
            pending = await self.redis.xpending(stream, protocol.WORKER_GROUP)
            if pending and pending.get("min"):
                ms = protocol.entry_time_ms(as_text(pending["min"]))
                oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        age = (protocol.now_ms() - oldest_ms) / 1000 if oldest_ms is not None else 0.0
        return depth, max(0.0, age)

    async def ack_job(self, job: JobEntry) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(job.stream, protocol.WORKER_GROUP, job.entry_id)
            pipe.xdel(job.stream, job.entry_id)
            await pipe.execute()


@functools.cache
def _lost_events() -> tuple[str, str]:
    """The error events a reap may publish (REAP_SCRIPT picks one by the generation's
    source): ``worker_lost`` and ``producer_lost``'s data, encoded once."""
    worker_lost = protocol.error_data(
        "worker_lost", "the worker running this generation stopped responding"
    )
    producer_lost = protocol.error_data(
        "producer_lost", "the producer of this generation stopped appending or heartbeating"
    )
    return worker_lost, producer_lost


# One ``Store.publish`` call's arguments: gen_id, owner, seq, events, published_ms.
PublishCall = tuple[str, str, int, Sequence[NewEvent], int]


def _fields(values: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    """``values`` as redis-py types a hash's or a stream entry's fields (its ``Mapping`` is
    invariant in the key type, so a ``dict[str, str]`` does not pass as it is)."""
    return dict(values.items())


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def oldest_unended(
    turns: Sequence[protocol.Turn], statuses: Sequence[str | None]
) -> protocol.Turn | None:
    """The first of ``turns`` whose status (``turn_statuses``) is queued or running: the
    conversation's active turn; None when every turn ended or expired."""
    for turn, status in zip(turns, statuses, strict=True):
        if status is not None and status not in protocol.TERMINAL_STATUSES:
            return turn
    return None
