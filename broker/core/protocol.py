"""The wire contract between edge and worker: the one place that knows Redis names and formats.

Every key and channel of one generation carries the hash tag ``{gen:<id>}`` so they share one
Redis Cluster slot (and sharded pub/sub can take over). Nothing outside this module builds a
key, a channel name or an event payload by hand.

Per generation:
  ``{gen:<id>}:meta``  hash    status, seq (last published), owner, lease, lease_ttl,
                               finish_reason, producer (the creating API key's id), ...
                               (leases: see the scripts below)
  ``{gen:<id>}:log``   stream  the truth: one entry per event, explicit ids ``0-<seq>``
  ``{gen:<id>}:text``  string  the answer so far (for the status endpoint)
  ``{gen:<id>}:live``  channel the fast path: the same events (``decode_payload`` reads them)

Shared:
  ``{broker:jobs:<n>}`` streams the job queue, spread over ``BROKER_JOB_SHARDS`` streams (each
                       its own hash tag, so a Redis Cluster spreads them over its nodes), all
                       read by the ``workers`` consumer group
  ``broker:cancel``    channel generation ids whose cancel was requested while running
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, cast, get_args

# -- names ----------------------------------------------------------------------------------

WORKER_GROUP = "workers"
CANCEL_CHANNEL = "broker:cancel"

_GEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")


def new_generation_id() -> str:
    """128 random bits, URL-safe: unguessable, so an id alone is hard to stumble upon.

    Never starting with ``-``: on a command line (``broker tail <id>``) such an id would be
    taken for an option (it was, for one id in 64)."""
    while True:
        gen_id = secrets.token_urlsafe(16)
        if not gen_id.startswith("-"):
            return gen_id


def is_generation_id(value: str) -> bool:
    return bool(_GEN_ID_RE.fullmatch(value))


def _tag(gen_id: str) -> str:
    return "{gen:" + gen_id + "}"


def meta_key(gen_id: str) -> str:
    return _tag(gen_id) + ":meta"


def log_key(gen_id: str) -> str:
    return _tag(gen_id) + ":log"


def text_key(gen_id: str) -> str:
    return _tag(gen_id) + ":text"


def live_channel(gen_id: str) -> str:
    return _tag(gen_id) + ":live"


def gen_id_of_channel(channel: str) -> str:
    """Inverse of ``live_channel``."""
    return channel[len("{gen:") : -len("}:live")]


# -- status and events ----------------------------------------------------------------------

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

EventKind = Literal["message", "end", "error"]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
TERMINAL_KINDS: frozenset[str] = frozenset({"end", "error"})


class ProtocolError(ValueError):
    """A payload or id on the wire does not have the shape this module writes."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a generation's stream, as stored in the log and published live."""

    seq: int
    kind: EventKind
    data: str  # a JSON object, already encoded: it is what the SSE ``data:`` line carries
    published_ms: int

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


def now_ms() -> int:
    return int(time.time() * 1000)


_COMPACT = (",", ":")


def message_data(text: str) -> str:
    return json.dumps({"text": text}, ensure_ascii=False, separators=_COMPACT)


def end_data(finish_reason: str, usage: dict[str, Any] | None) -> str:
    return json.dumps(
        {"finish_reason": finish_reason, "usage": usage}, ensure_ascii=False, separators=_COMPACT
    )


def error_data(code: str, message: str) -> str:
    return json.dumps({"code": code, "message": message}, ensure_ascii=False, separators=_COMPACT)


# The SSE id is the sequence number, zero-padded so that ids also sort as strings.
_EVENT_ID_WIDTH = 10
_EVENT_ID_RE = re.compile(r"[0-9]{1,18}")


def event_id(seq: int) -> str:
    return f"{seq:0{_EVENT_ID_WIDTH}d}"


def parse_event_id(value: str) -> int:
    """The sequence number of an SSE id; ``ProtocolError`` if it is not one of ours."""
    if not _EVENT_ID_RE.fullmatch(value):
        raise ProtocolError(f"not an event id: {value[:40]!r}")
    return int(value)


def stream_id(seq: int) -> str:
    """Explicit log entry id: Redis refuses an id not above the last, so a retry is harmless."""
    return f"0-{seq}"


def decode_payload(payload: bytes | str) -> Event:
    """A live payload as the publish scripts send it (``_APPEND_AND_PUBLISH``, in Lua):
    ``<seq> <kind> <published_ms> <data>``, data last, spaces and all."""
    try:
        seq, kind, published, data = as_text(payload).split(" ", 3)
        return Event(int(seq), _event_kind(kind), data, int(published))
    except ValueError as e:  # UnicodeDecodeError included
        raise ProtocolError(f"bad live payload: {payload[:80]!r}") from e


def decode_log_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    """One ``XRANGE`` entry of a generation log."""
    eid = as_text(entry_id)
    get = _field_getter(fields)
    try:
        return Event(int(eid.split("-", 1)[1]), _event_kind(get("k")), get("d"), int(get("t")))
    except (ValueError, KeyError, IndexError) as e:
        raise ProtocolError(f"bad log entry {eid!r}") from e


def _event_kind(text: str) -> EventKind:
    if text not in EVENT_KINDS:
        raise ValueError(text)
    return cast(EventKind, text)  # (checked on the line above)


def as_text(value: bytes | str | int | float) -> str:
    """A Redis reply value as text: clients without ``decode_responses`` answer bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _field_getter(fields: dict[Any, Any]) -> Callable[[str], str]:
    def get(name: str) -> str:
        return as_text(fields[name] if name in fields else fields[name.encode()])

    return get


# -- jobs ----------------------------------------------------------------------------------


def jobs_stream(shard: int) -> str:
    return "{broker:jobs:" + str(shard) + "}"


def jobs_shard(gen_id: str, shards: int) -> int:
    """The shard a generation's job goes to: stable for an id, even over ids."""
    digest = hashlib.blake2b(gen_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % shards


@dataclass(frozen=True, slots=True)
class JobEntry:
    """Where a job sits: its shard's stream and its entry id there (to touch and ack it)."""

    stream: str
    entry_id: str



class Job(TypedDict):
    """A jobs-stream entry: which generation to run and the chat-completions request for it;
    ``producer`` is the id of the API key that created it (its queue quota), if any."""

    gen: str
    request: dict[str, Any]
    producer: NotRequired[str]


# Parameters of the openai SDK's ``chat.completions.create`` that are not fields of the request
# body but options of the call: headers, query and extra body of the upstream request, and its
# timeout. They are the worker's, not a producer's (the edge refuses them in a create body,
# worker/llm.py drops them from a job).
SDK_CALL_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})


def entry_time_ms(entry_id: str) -> int:
    """When an auto-id stream entry (``<ms>-<n>``) was added: a job's enqueueing time."""
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return now_ms()


def encode_job(job: Job) -> dict[str, str]:
    fields = {"gen": job["gen"], "request": json.dumps(job["request"], ensure_ascii=False)}
    if job.get("producer"):
        fields["producer"] = job["producer"]
    return fields


def decode_job(fields: dict[Any, Any]) -> Job:
    get = _field_getter(fields)
    try:
        job = Job(gen=get("gen"), request=json.loads(get("request")))
    except (KeyError, ValueError) as e:
        raise ProtocolError("bad job entry") from e
    with contextlib.suppress(KeyError):
        job["producer"] = get("producer")
    return job


def queued_key(producer: str) -> str:
    """The generations of one API key that wait for a worker (its queue quota)."""
    return f"{{broker:queued:{producer}}}"


# -- meta ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    status: Status
    seq: int  # last published event (0: none yet)
    finish_reason: str | None
    model: str
    created_ms: int

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


def new_meta(model: str, producer: str | None = None) -> dict[str, str]:
    """A queued generation's meta; ``producer``: the id of the API key that created it (whose
    queue quota it counts against, until a worker takes it or it is cancelled)."""
    meta = {"status": "queued", "seq": "0", "model": model, "created": str(now_ms())}
    if producer:
        meta["producer"] = producer
    return meta


def decode_meta(raw: dict[Any, Any]) -> Meta | None:
    """``None`` for an empty hash: the generation is unknown or expired."""
    if not raw:
        return None
    get = _field_getter(raw)

    def opt(name: str) -> str | None:
        try:
            return get(name) or None
        except KeyError:
            return None

    try:
        return Meta(
            status=cast(Status, get("status")),  # as written by this module's scripts
            seq=int(opt("seq") or 0),
            finish_reason=opt("finish_reason"),
            model=opt("model") or "",
            created_ms=int(opt("created") or 0),
        )
    except (KeyError, ValueError) as e:
        raise ProtocolError("bad meta hash") from e


# -- scripts -------------------------------------------------------------------------------
# Each state change of a generation is ONE atomic script call, so a reader never sees the log
# and the meta disagree, and a retried call (same seq) is a no-op instead of a duplicate.

# Appends event ``seq`` to the log and publishes it. Expects locals meta, log, text, seq, kind,
# data, ts, body, maxlen, ttl, channel, publish_cmd.
_APPEND_AND_PUBLISH = """
redis.call('XADD', log, 'MAXLEN', maxlen, '0-' .. seq, 'k', kind, 'd', data, 't', ts)
redis.call('HSET', meta, 'seq', seq, 'updated', ts)
if kind == 'message' then
  redis.call('APPEND', text, body)
end
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', log, ttl)
if redis.call('EXISTS', text) == 1 then redis.call('PEXPIRE', text, ttl) end
redis.call(publish_cmd, channel, seq .. ' ' .. kind .. ' ' .. ts .. ' ' .. data)
"""

# KEYS: meta, log, text. ARGV: owner, seq, kind, data, ts, body, maxlen, ttl_ms, channel,
# publish_cmd, final_status, finish_reason.
# Returns 1 published, 0 already published (a retry), -1 generation gone, -2 not the owner.
PUBLISH_SCRIPT = (
    """
local meta, log, text = KEYS[1], KEYS[2], KEYS[3]
local owner, seq, kind, data = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ts, body = ARGV[5], ARGV[6]
local maxlen, ttl, channel, publish_cmd = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local status = redis.call('HGET', meta, 'status')
if not status then return -1 end
if (redis.call('HGET', meta, 'owner') or '') ~= owner then return -2 end
local last = tonumber(redis.call('HGET', meta, 'seq') or '0')
if seq <= last then return 0 end
if status ~= 'running' or seq ~= last + 1 then return -2 end
"""
    + _APPEND_AND_PUBLISH
    + """
if ARGV[11] ~= '' then
  redis.call('HSET', meta, 'status', ARGV[11], 'finish_reason', ARGV[12])
end
return 1
"""
)

# KEYS: a producer's queued set. ARGV: gen_id, now_ms, limit, stale_before_ms, ttl_ms.
# Reserves a place in the producer's queue quota: 1, or 0 when ``limit`` already wait.
# Entries older than ``stale_before_ms`` are forgotten (their release was lost with a worker).
QUEUE_QUOTA_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# -- leases --------------------------------------------------------------------------------
# A running generation's meta holds ``owner``, ``lease`` (when the lease runs out, in ms of
# Redis's own clock) and ``lease_ttl`` (ms: how long the owner's renewals last). Redis alone
# tells the time of a lease: the scripts read ``TIME`` to set it and to judge it, so a
# worker's or an edge's clock being off never reaps a live worker nor keeps a dead one.
# (``TIME`` inside a script is fine: scripts replicate by their effects since Redis 5, the
# only way since 7, so a replica gets the value written, not the call; it names no key, so a
# script calling it still touches one cluster slot.)

# Sets the local ``now``: Redis's clock, in ms.
_REDIS_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: meta. ARGV: owner, lease_ttl_ms.
# Returns 'ok' (now running under owner, its lease running out lease_ttl_ms from now by Redis's
# clock) or the status that prevents it ('' when gone).
CLAIM_SCRIPT = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status ~= 'queued' then return status end
"""
    + _REDIS_NOW_MS
    + """
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1],
           'lease', now + tonumber(ARGV[2]), 'lease_ttl', ARGV[2])
return 'ok'
"""
)

# KEYS: meta. ARGV: owner, lease_ttl_ms.
# Renews the lease to lease_ttl_ms from now (Redis's clock).
# Returns 'run', 'cancel' (cancel requested: stop) or 'lost' (someone else owns it now).
HEARTBEAT_SCRIPT = (
    """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 'lost' end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 'lost' end
"""
    + _REDIS_NOW_MS
    + """
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]), 'lease_ttl', ARGV[2])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
return 'run'
"""
)

# KEYS: meta, log, text. ARGV: reaper, healthy_ms, data (the error event), maxlen, ttl_ms,
# channel, publish_cmd.
# Checks a generation's lease and, if it ran out (its worker is gone), ends the generation with
# the error event, in one atomic step: however many edges and workers call it at once, one
# reaps and the others see the status it left. ``healthy_ms``: how long the caller has seen
# Redis answer without failing; it reaps only once that covers the generation's ``lease_ttl``,
# so after an outage a live owner gets a whole lease to renew before anyone judges it dead.
# The event's publish time is Redis's clock. Returns {outcome, wait_ms, lease_ttl_ms}:
#   {'reaped', 0, ttl}           ended here and now
#   {'running', wait_ms, ttl}    the lease holds (or the caller must stay healthy longer):
#                                nothing can be reaped for wait_ms
#   {status, 0, 0}               'queued' (no lease yet) or an ended status; '' when gone
REAP_SCRIPT = (
    """
local meta, log, text = KEYS[1], KEYS[2], KEYS[3]
local status = redis.call('HGET', meta, 'status')
if not status then return {'', 0, 0} end
if status ~= 'running' then return {status, 0, 0} end
"""
    + _REDIS_NOW_MS
    + """
local lease_ttl = tonumber(redis.call('HGET', meta, 'lease_ttl') or '0')
local left = tonumber(redis.call('HGET', meta, 'lease') or '0') - now
if left > 0 then return {'running', left, lease_ttl} end
local healthy = tonumber(ARGV[2])
if healthy < lease_ttl then return {'running', lease_ttl - healthy, lease_ttl} end
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0') + 1
local kind, data, ts, body = 'error', ARGV[3], string.format('%d', now), ''
local maxlen, ttl, channel, publish_cmd = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
"""
    + _APPEND_AND_PUBLISH
    + """
redis.call('HSET', meta, 'status', 'failed', 'finish_reason', 'error', 'owner', ARGV[1])
return {'reaped', 0, lease_ttl}
"""
)


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    """What ``REAP_SCRIPT`` found: ``outcome`` is 'reaped', 'running' (then nothing can be
    reaped for ``wait`` seconds), 'queued', an ended status, or '' (gone). ``lease_ttl``:
    seconds the owner's renewals last (0 when not running)."""

    outcome: str
    wait: float
    lease_ttl: float

    @property
    def reaped(self) -> bool:
        return self.outcome == "reaped"


def decode_lease_check(reply: Any) -> LeaseCheck:
    try:
        outcome, wait_ms, lease_ttl_ms = reply
        return LeaseCheck(as_text(outcome), int(wait_ms) / 1000, int(lease_ttl_ms) / 1000)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad lease check reply: {reply!r}") from e


# KEYS: meta, log, text. ARGV: gen_id, data (the end event), ts, maxlen, ttl_ms, channel,
# publish_cmd, cancel_channel.
# A queued generation ends here and now; a running one is flagged and its worker told.
# Returns the status before the call ('' when gone).
CANCEL_SCRIPT = (
    """
local meta, log, text = KEYS[1], KEYS[2], KEYS[3]
local status = redis.call('HGET', meta, 'status')
if not status then return '' end
if status == 'running' then
  redis.call('HSET', meta, 'cancel', '1')
  redis.call('PUBLISH', ARGV[8], ARGV[1])
  return status
end
if status ~= 'queued' then return status end
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0') + 1
local kind, data, ts, body = 'end', ARGV[2], ARGV[3], ''
local maxlen, ttl, channel, publish_cmd = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
"""
    + _APPEND_AND_PUBLISH
    + """
redis.call('HSET', meta, 'status', 'cancelled', 'finish_reason', 'cancelled', 'cancel', '1')
return status
"""
)
