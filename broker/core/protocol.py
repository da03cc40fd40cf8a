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
  ``{gen:<id>}:reasoning`` string  the reasoning so far (likewise)
  ``{gen:<id>}:tools`` list    the complete tool calls so far, each its event's data (likewise)
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


def reasoning_key(gen_id: str) -> str:
    return _tag(gen_id) + ":reasoning"


def tools_key(gen_id: str) -> str:
    return _tag(gen_id) + ":tools"


def generation_keys(gen_id: str) -> list[str]:
    """The KEYS of every script that writes events (``PUBLISH_SCRIPT`` and those built on its
    fragments), in this order: meta, log, and the aggregates text, reasoning, tools."""
    return [meta_key(gen_id), log_key(gen_id), text_key(gen_id), reasoning_key(gen_id),
            tools_key(gen_id)]


def live_channel(gen_id: str) -> str:
    return _tag(gen_id) + ":live"


def gen_id_of_channel(channel: str) -> str:
    """Inverse of ``live_channel``."""
    return channel[len("{gen:") : -len("}:live")]


# -- status and events ----------------------------------------------------------------------

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# The one list of event kinds (the SSE ``event:`` name of each but ``message``, which has none
# so that v1 clients' ``onmessage`` sees answer text alone). Everything else derives from it.
EventKind = Literal["message", "reasoning", "tool_call", "tool_result", "data", "end", "error"]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
TERMINAL_KINDS: frozenset[str] = frozenset({"end", "error"})
# What a generation carries before its terminal event; ``GET /v1/generations/{id}`` counts them.
CONTENT_KINDS: tuple[EventKind, ...] = tuple(k for k in EVENT_KINDS if k not in TERMINAL_KINDS)

# Where a generation's events come from (the meta's ``source``; absent: the built-in worker).
# The reap script names a lost producer by it: ``worker_lost`` or ``producer_lost``.
SOURCE_WORKER = "worker"
SOURCE_EXTERNAL = "external"


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


def _json(value: dict[str, Any]) -> str:
    """Compact JSON, characters as themselves (not ``\\u`` escapes); no NaN or Infinity, which
    a browser's ``JSON.parse`` refuses (``ValueError``)."""
    return json.dumps(value, ensure_ascii=False, separators=_COMPACT, allow_nan=False)


def message_data(text: str) -> str:
    return _json({"text": text})


def reasoning_data(text: str) -> str:
    return _json({"text": text})


def tool_call_data(index: int, call_id: str, name: str, arguments: str) -> str:
    """``arguments``: the exact concatenation of the upstream's fragments, never re-serialized
    (it may not even be valid JSON: the model wrote it)."""
    return _json({"index": index, "id": call_id, "name": name, "arguments": arguments})


def tool_result_data(call_id: str, result: Any) -> str:
    return _json({"id": call_id, "result": result})


def app_data(name: str, value: Any) -> str:
    """The data of a ``data`` event: application-defined ``value`` under ``name``."""
    return _json({"name": name, "value": value})


def end_data(finish_reason: str, usage: dict[str, Any] | None) -> str:
    return _json({"finish_reason": finish_reason, "usage": usage})


def error_data(code: str, message: str) -> str:
    return _json({"code": code, "message": message})


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to publish, not yet numbered (``PUBLISH_SCRIPT`` numbers a batch of them).

    ``body``: what the kind's aggregate gets (the text of a message or a reasoning event;
    empty for other kinds). ``final_status``/``finish_reason``: what a terminal event sets in
    the meta. Build them with the ``new_*`` functions below, not by hand."""

    kind: EventKind
    data: str
    body: str = ""
    final_status: str = ""
    finish_reason: str = ""

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


def new_message(text: str) -> NewEvent:
    return NewEvent("message", message_data(text), text)


def new_reasoning(text: str) -> NewEvent:
    return NewEvent("reasoning", reasoning_data(text), text)


# The largest tool call index a producer may send: what a JavaScript client reads exactly
# (Number.MAX_SAFE_INTEGER).
MAX_TOOL_CALL_INDEX = 2**53 - 1


def new_tool_call(index: int, call_id: str, name: str, arguments: str) -> NewEvent:
    return NewEvent("tool_call", tool_call_data(index, call_id, name, arguments))


def new_tool_result(call_id: str, result: Any) -> NewEvent:
    return NewEvent("tool_result", tool_result_data(call_id, result))


def new_data(name: str, value: Any) -> NewEvent:
    return NewEvent("data", app_data(name, value))


def new_end(finish_reason: str, usage: dict[str, Any] | None) -> NewEvent:
    status = "cancelled" if finish_reason == "cancelled" else "completed"
    return NewEvent("end", end_data(finish_reason, usage), "", status, finish_reason)


def new_error(code: str, message: str) -> NewEvent:
    return NewEvent("error", error_data(code, message), "", "failed", "error")


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
    """A live payload as the publish scripts send it (``_APPEND``, in Lua):
    ``<seq> <kind> <published_ms> <data>``, data last, spaces and all."""
    try:
        seq, kind, published, data = as_text(payload).split(" ", 3)
        return Event(int(seq), _event_kind(kind), data, int(published))
    except ValueError as e:  # UnicodeDecodeError included
        raise ProtocolError(f"bad live payload: {payload[:80]!r}") from e


def decode_tool_call(raw: bytes | str) -> dict[str, Any]:
    """One entry of a generation's ``tools`` list (a ``tool_call`` event's data)."""
    try:
        call = json.loads(as_text(raw))
    except ValueError as e:
        raise ProtocolError(f"bad tool call: {raw[:80]!r}") from e
    if not isinstance(call, dict):
        raise ProtocolError(f"bad tool call: {raw[:80]!r}")
    return call


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
    return text  # (a kind: mypy narrows it by the check above)


def as_text(value: bytes | str | int | float) -> str:
    """A Redis reply value as text: clients without ``decode_responses`` answer bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def field_pairs(fields: Any) -> dict[Any, Any]:
    """A raw reply's fields as a dict: a flat list of name, value... (what a script returns,
    and every reply under RESP2), or a dict already (a RESP3 map)."""
    if isinstance(fields, dict):
        return fields
    if not isinstance(fields, list) or len(fields) % 2:
        raise ProtocolError(f"not a list of fields: {fields!r:.80}")
    return dict(zip(fields[::2], fields[1::2], strict=True))


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
    source: str = SOURCE_WORKER  # who publishes its events: the built-in worker or a producer
    counts: dict[str, int] = field(default_factory=dict)  # events published, per content kind
    conversation: str | None = None  # the conversation it is a turn of, if any
    metadata: str | None = None  # an external producer's create ``metadata`` (JSON object)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def event_counts(self) -> dict[str, int]:
        """Every content kind's count, zeros included, in ``CONTENT_KINDS`` order."""
        return {kind: self.counts.get(kind, 0) for kind in CONTENT_KINDS}


# The meta field counting a kind's events (``HINCRBY`` in ``_APPEND``): ``c:<kind>``.
COUNT_FIELD_PREFIX = "c:"


def new_meta(
    model: str, producer: str | None = None, conversation: str | None = None
) -> dict[str, str]:
    """A queued generation's meta; ``producer``: the id of the API key that created it (whose
    queue quota it counts against, until a worker takes it or it is cancelled);
    ``conversation``: the conversation it is a turn of."""
    meta = {"status": "queued", "seq": "0", "model": model, "created": str(now_ms())}
    if producer:
        meta["producer"] = producer
    if conversation:
        meta["conversation"] = conversation
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
            source=opt("source") or SOURCE_WORKER,
            counts=_counts(opt),
            conversation=opt("conversation"),
            metadata=opt("metadata"),
        )
    except (KeyError, ValueError) as e:
        raise ProtocolError("bad meta hash") from e


def _counts(opt: Callable[[str], str | None]) -> dict[str, int]:
    """The meta's event counts (``c:<kind>`` fields), of the kinds that have one."""
    counts: dict[str, int] = {}
    for kind in CONTENT_KINDS:
        count = opt(COUNT_FIELD_PREFIX + kind)
        if count:
            counts[kind] = int(count)
    return counts


# -- scripts -------------------------------------------------------------------------------
# Each state change of a generation is ONE atomic script call, so a reader never sees the log
# and the meta disagree, and a retried call (same seq) is a no-op instead of a duplicate.

def _lua_set(names: tuple[str, ...] | frozenset[str]) -> str:
    """A Lua table literal usable as a set: ``{["end"] = true, ...}`` (bracketed: ``end`` is a
    Lua keyword)."""
    return "{" + ", ".join(f'["{name}"] = true' for name in sorted(names)) + "}"


# Checks a batch of events before anything is written (Lua has no rollback: a batch is applied
# whole or not at all). The events are ARGV's last arguments, three each (kind, data, body),
# from ARGV[first_arg]. Expects the local ``first_arg``; sets ``n`` (how many events) and
# ``last_kind``. A malformed batch (no event, a partial triple, an unknown kind, a terminal
# event that is not the last) is an error reply: a bug of the caller, which validates first.
_CHECK_BATCH = (
    "local KNOWN_KINDS = " + _lua_set(EVENT_KINDS) + "\n"
    + "local TERMINAL_KINDS = " + _lua_set(TERMINAL_KINDS) + "\n"
    + """
local n = (#ARGV - first_arg + 1) / 3
if n < 1 or n ~= math.floor(n) then
  return redis.error_reply('ERR bad batch: expected kind, data, body triples')
end
local last_kind = ARGV[first_arg + 3 * (n - 1)]
for i = 0, n - 1 do
  local kind = ARGV[first_arg + 3 * i]
  if not KNOWN_KINDS[kind] then
    return redis.error_reply('ERR bad batch: unknown event kind ' .. tostring(kind))
  end
  if TERMINAL_KINDS[kind] and i < n - 1 then
    return redis.error_reply('ERR bad batch: a terminal event must be the last')
  end
end
"""
)

# Defines ``append(seq, kind, data, body)`` (log it, feed its kind's aggregate, count it,
# publish it live) and ``appended(last_seq)`` (the meta's ``seq``, every key's retention),
# called once after a batch's appends. Expects the locals meta, log, text, reasoning, tools
# (``generation_keys``), ts, maxlen, ttl, channel, publish_cmd.
# The live payload, ``<seq> <kind> <publish ms> <data>``, is built here alone.
_APPEND = (
    """
local function append(seq, kind, data, body)
  redis.call('XADD', log, 'MAXLEN', maxlen, '0-' .. seq, 'k', kind, 'd', data, 't', ts)
  if kind == 'message' then
    redis.call('APPEND', text, body)
  elseif kind == 'reasoning' then
    redis.call('APPEND', reasoning, body)
  elseif kind == 'tool_call' then
    redis.call('RPUSH', tools, data)
  end
  redis.call('HINCRBY', meta, '"""
    + COUNT_FIELD_PREFIX
    + """' .. kind, 1)
  redis.call(publish_cmd, channel, seq .. ' ' .. kind .. ' ' .. ts .. ' ' .. data)
end
local function appended(last_seq)
  redis.call('HSET', meta, 'seq', last_seq, 'updated', ts)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', log, ttl)
  for _, key in ipairs({text, reasoning, tools}) do
    if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
  end
end
"""
)

# Appends the batch checked by ``_CHECK_BATCH`` as events ``seq`` .. ``seq + n - 1``, in order.
# Expects what ``_CHECK_BATCH`` and ``_APPEND`` expect, and ``seq``.
_APPEND_BATCH = """
for i = 0, n - 1 do
  local at = first_arg + 3 * i
  append(seq + i, ARGV[at], ARGV[at + 1], ARGV[at + 2])
end
appended(seq + n - 1)
"""

# The first ARGV of the events in PUBLISH_SCRIPT's arguments.
PUBLISH_FIRST_EVENT_ARG = 10

# Publishes a batch of events of a running generation, all or nothing, numbered from ``seq``.
# KEYS: ``generation_keys`` (meta, log, text, reasoning, tools).
# ARGV: owner, seq (the first event's), ts (publish ms), maxlen, ttl_ms, channel, publish_cmd,
#       final_status, finish_reason (both '' unless the batch ends with a terminal event: the
#       meta's new status and finish_reason), then per event, in order: kind, data, body
#       (from ARGV[PUBLISH_FIRST_EVENT_ARG]; ``NewEvent``'s fields).
# Per kind: ``message`` APPENDs body to text, ``reasoning`` APPENDs body to reasoning,
# ``tool_call`` RPUSHes data to tools; every event counts in the meta's ``c:<kind>``.
# Returns 1 published, 0 already published (a retry of a batch that was applied), -1 generation
# gone, -2 not the owner (or not running, or ``seq`` is not last + 1); an error reply for a
# malformed batch (nothing written). A terminal batch that ended a conversation's turn returns
# {1, conversation} instead of 1: the caller then extends the conversation's index (another
# slot), without reading the meta again (``decode_publish_reply``).
PUBLISH_SCRIPT = (
    """
local meta, log, text, reasoning, tools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local owner, seq, ts = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local maxlen, ttl, channel, publish_cmd = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local final_status, finish_reason = ARGV[8], ARGV[9]
"""
    + f"local first_arg = {PUBLISH_FIRST_EVENT_ARG}\n"
    + _CHECK_BATCH
    + """
if (final_status ~= '') ~= (TERMINAL_KINDS[last_kind] == true) then
  return redis.error_reply('ERR bad batch: a final status goes with a terminal event')
end
local status = redis.call('HGET', meta, 'status')
if not status then return -1 end
if (redis.call('HGET', meta, 'owner') or '') ~= owner then return -2 end
local last = tonumber(redis.call('HGET', meta, 'seq') or '0')
if seq <= last then return 0 end
if status ~= 'running' or seq ~= last + 1 then return -2 end
"""
    + _APPEND
    + _APPEND_BATCH
    + """
if final_status ~= '' then
  redis.call('HSET', meta, 'status', final_status, 'finish_reason', finish_reason)
  local conversation = redis.call('HGET', meta, 'conversation')
  if conversation then return {1, conversation} end
end
return 1
"""
)


def decode_publish_reply(reply: Any) -> tuple[int, str | None]:
    """PUBLISH_SCRIPT's reply: (1, 0, -1 or -2, the conversation whose turn the batch ended)."""
    if isinstance(reply, list | tuple):
        try:
            result, conversation = reply
            return int(result), as_text(conversation)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"bad publish reply: {reply!r}") from e
    return int(reply), None



def publish_args(
    owner: str, seq: int, events: Sequence[NewEvent], published_ms: int, *,
    maxlen: int | str, ttl_ms: int | str, channel: str, publish_cmd: str,
) -> list[str | int]:
    """PUBLISH_SCRIPT's ARGV for ``events`` numbered from ``seq``. ``ValueError`` for an
    empty batch or a terminal event before its end (the script refuses both too)."""
    if not events:
        raise ValueError("a batch holds at least one event")
    if any(e.terminal for e in events[:-1]):
        raise ValueError("a terminal event must be the last of its batch")
    last = events[-1]
    args: list[str | int] = [owner, seq, published_ms, maxlen, ttl_ms, channel, publish_cmd,
                             last.final_status, last.finish_reason]
    for event in events:
        args += [event.kind, event.data, event.body]
    return args


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

# KEYS: a jobs stream. ARGV: the workers' group, idle_ms, name ('' for any consumer).
# Deletes the group's consumers that hold no job and were idle idle_ms or more: above all those
# of workers that are gone. A live worker's consumer may go too when it was handed no job for
# that long (Redis 7.0 refreshes a consumer's idle time only when it hands it an entry): that
# is harmless, its next read makes it again. One script, so no read can hand such a consumer
# a job between the look and the delete (DELCONSUMER drops the consumer's pending jobs with
# it). Without it every worker that ever ran would stay in every shard's group. Returns how
# many were deleted; 0 if the stream or group is gone.
FORGET_CONSUMERS_SCRIPT = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local deleted = 0
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2])
     and (ARGV[3] == '' or info['name'] == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    deleted = deleted + 1
  end
end
return deleted
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

# KEYS: meta. ARGV: owner, lease_ttl_ms, job (the job entry it was read from).
# Returns 'ok' (now running under owner, its lease running out lease_ttl_ms from now by Redis's
# clock) or the status that prevents it ('' when gone). The same owner claiming from the same
# job again gets 'ok' again: a claim whose reply was lost is retried by the client, and the
# retry must not read as "someone runs it" (the job would be acked and the generation left
# running until reaped as worker_lost, under a live worker).
CLAIM_SCRIPT = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'running' and ARGV[3] ~= ''
   and redis.call('HGET', KEYS[1], 'owner') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'job') == ARGV[3] then
  return 'ok'
end
if status ~= 'queued' then return status end
"""
    + _REDIS_NOW_MS
    + """
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1],
           'lease', now + tonumber(ARGV[2]), 'lease_ttl', ARGV[2], 'job', ARGV[3])
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

# KEYS: ``generation_keys``. ARGV: reaper, healthy_ms, worker_lost (the error event's data for
# a worker's generation), producer_lost (for an external producer's: the meta's ``source`` is
# ``SOURCE_EXTERNAL``), maxlen, ttl_ms, channel, publish_cmd.
# Checks a generation's lease and, if it ran out (its worker or producer is gone), ends the
# generation with the error event, in one atomic step: however many edges and workers call it
# at once, one reaps and the others see the status it left. ``healthy_ms``: how long the caller
# has seen Redis answer without failing; it reaps only once that covers the generation's
# ``lease_ttl``, so after an outage a live owner gets a whole lease to renew before anyone
# judges it dead. The event's publish time is Redis's clock. Returns {outcome, wait_ms,
# lease_ttl_ms}:
#   {'reaped', 0, ttl}           ended here and now
#   {'running', wait_ms, ttl}    the lease holds (or the caller must stay healthy longer):
#                                nothing can be reaped for wait_ms
#   {status, 0, 0}               'queued' (no lease yet) or an ended status; '' when gone
_REAP = (
    """
local meta, log, text, reasoning, tools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
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
local data = ARGV[3]
if redis.call('HGET', meta, 'source') == '"""
    + SOURCE_EXTERNAL
    + """' then data = ARGV[4] end
local ts = string.format('%d', now)
local maxlen, ttl, channel, publish_cmd = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
"""
    + _APPEND
    + """
append(seq, 'error', data, '')
appended(seq)
redis.call('HSET', meta, 'status', 'failed', 'finish_reason', 'error', 'owner', ARGV[1])
return {'reaped', 0, lease_ttl}
"""
)
REAP_SCRIPT = _REAP

# KEYS and ARGV: REAP_SCRIPT's. A stream request's meta read, which is also the first check of
# the generation's lease (``REAP_SCRIPT``, reaping included): one round trip where the edge
# made two, the meta read and its lease watch's first check. Returns REAP_SCRIPT's reply with
# the meta hash after the check (``HGETALL``: a flat list, empty when the generation is gone)
# as a fourth element.
STREAM_META_SCRIPT = (
    "local function check_lease()\n"
    + _REAP
    + """
end
local check = check_lease()
check[4] = redis.call('HGETALL', KEYS[1])
return check
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


def decode_stream_meta(reply: Any) -> tuple[Meta | None, LeaseCheck]:
    """``STREAM_META_SCRIPT``'s reply: the meta (None when the generation is unknown or
    expired) and the lease check made with it."""
    try:
        outcome, wait_ms, lease_ttl_ms, fields = reply
        raw = field_pairs(fields)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad stream meta reply: {reply!r}") from e
    return decode_meta(raw), decode_lease_check([outcome, wait_ms, lease_ttl_ms])


# KEYS: ``generation_keys``. ARGV: gen_id, data (the end event), ts, maxlen, ttl_ms, channel,
# publish_cmd, cancel_channel.
# A queued generation ends here and now, and so does an external producer's running one (no
# worker to stop: the producer learns it from its next append's answer); a worker's running
# one is flagged and its worker told.
# Returns the status before the call ('' when gone).
CANCEL_SCRIPT = (
    """
local meta, log, text, reasoning, tools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local status = redis.call('HGET', meta, 'status')
if not status then return '' end
local external = redis.call('HGET', meta, 'source') == '"""
    + SOURCE_EXTERNAL
    + """'
if status == 'running' and not external then
  redis.call('HSET', meta, 'cancel', '1')
  redis.call('PUBLISH', ARGV[8], ARGV[1])
  return status
end
if status ~= 'queued' and status ~= 'running' then return status end
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0') + 1
local ts, maxlen, ttl, channel, publish_cmd = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
"""
    + _APPEND
    + """
append(seq, 'end', ARGV[2], '')
appended(seq)
redis.call('HSET', meta, 'status', 'cancelled', 'finish_reason', 'cancelled', 'cancel', '1')
return status
"""
)


# -- conversations -------------------------------------------------------------------------
# A conversation is a sequence of turns, each a generation. Its keys share the hash tag
# ``{conv:<cid>}`` (one cluster slot, so one script may touch them together); a generation's
# meta names its conversation (``conversation``), the index names its generations:
#   ``{conv:<cid>}:turns``  stream  one entry per turn, explicit id ``0-<turn>`` (1, 2, ...),
#                                   field ``gen``: the turn's generation id
#   ``{conv:<cid>}:live``   channel ``<turn> <gen_id>`` when a turn is added (a notice: the
#                                   index is the truth, a viewer re-reads it after subscribing)
# The cid alphabet has no ``{``/``}`` (the tag stays whole) and no space (the notice's split).

_CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


# URL dot-segments: every client removes them from a path ("/v1/conversations/../events" is
# fetched as "/v1/events"), so a conversation so named could never be followed.
_DOT_SEGMENTS = frozenset({".", ".."})


def is_conversation_id(value: object) -> bool:
    return (isinstance(value, str) and bool(_CONVERSATION_ID_RE.fullmatch(value))
            and value not in _DOT_SEGMENTS)


def _conversation_tag(cid: str) -> str:
    return "{conv:" + cid + "}"


def conversation_turns_key(cid: str) -> str:
    return _conversation_tag(cid) + ":turns"


def conversation_channel(cid: str) -> str:
    return _conversation_tag(cid) + ":live"


def is_conversation_channel(channel: str) -> bool:
    return channel.startswith("{conv:") and channel.endswith("}:live")


def conversation_of_channel(channel: str) -> str:
    """Inverse of ``conversation_channel``."""
    return channel[len("{conv:") : -len("}:live")]


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation: its number (1, 2, ...: the index entry's seq) and its
    generation."""

    number: int
    gen_id: str


def decode_turn(entry_id: bytes | str, fields: dict[Any, Any]) -> Turn:
    """One ``XRANGE`` entry of a conversation's turns index."""
    eid = as_text(entry_id)
    try:
        return Turn(int(eid.split("-", 1)[1]), _field_getter(fields)("gen"))
    except (ValueError, KeyError, IndexError) as e:
        raise ProtocolError(f"bad turn entry {eid!r}") from e


def decode_turn_notice(payload: bytes | str) -> Turn:
    """A conversation channel's payload (``ADD_TURN_SCRIPT``): ``<turn> <gen_id>``."""
    try:
        number, gen_id = as_text(payload).split(" ", 1)
        return Turn(int(number), gen_id)
    except ValueError as e:
        raise ProtocolError(f"bad turn notice: {payload[:80]!r}") from e


# KEYS: the conversation's turns index. ARGV: gen_id, ttl_ms, channel, publish_cmd.
# Appends the next turn (its number: the last one's + 1, or 1), refreshes the index's expiry
# (a conversation lives as long as its newest turn) and publishes the notice, in one step.
# Returns the turn's number.
ADD_TURN_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local turn = 1
if #last > 0 then turn = tonumber(string.match(last[1][1], '-(%d+)$')) + 1 end
redis.call('XADD', KEYS[1], '0-' .. turn, 'gen', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call(ARGV[4], ARGV[3], turn .. ' ' .. ARGV[1])
return turn
"""


# A conversation stream's SSE id: the turn number, then the event's seq in its generation
# (0: the turn's own ``turn`` event), zero-padded so ids compare as numbers and as strings.
_CONVERSATION_SEQ_WIDTH = 10
_CONVERSATION_EVENT_ID_RE = re.compile(r"[0-9]{11,20}")


def conversation_event_id(turn: int, seq: int) -> str:
    return f"{turn:08d}{seq:0{_CONVERSATION_SEQ_WIDTH}d}"


def parse_conversation_event_id(value: str) -> tuple[int, int]:
    """(turn, seq) of a conversation stream's SSE id; ``ProtocolError`` if not one of ours."""
    if not _CONVERSATION_EVENT_ID_RE.fullmatch(value):
        raise ProtocolError(f"not a conversation event id: {value[:40]!r}")
    turn = int(value[:-_CONVERSATION_SEQ_WIDTH])
    if turn < 1:  # turns count from 1: no stream sent it (and the index has no turn 0)
        raise ProtocolError(f"not a conversation event id (turn 0): {value[:40]!r}")
    return turn, int(value[-_CONVERSATION_SEQ_WIDTH:])


# -- external producers ----------------------------------------------------------------------
# A generation whose events come from an application's own loop (``{"producer": "external"}``)
# instead of the built-in worker. Its meta has ``source`` = ``SOURCE_EXTERNAL``, ``owner`` =
# ``PRODUCER_OWNER``, ``producer`` = the creating API key's id (absent when keys are off: only
# that key may append or finish), ``p_after`` (the ``after`` of the last batch applied: a
# retry of that batch is a no-op) and, like a worker's, ``lease``/``lease_ttl`` on Redis's
# clock: every append and heartbeat renews the lease by the generation's own ``lease_ttl``,
# so edges with different settings agree. ``REAP_SCRIPT`` ends a lapsed one with
# ``producer_lost``.
#
# Nobody may be watching such a generation and no job sits in the worker queue for it, so the
# index ``PRODUCERS_KEY`` (a sorted set: generation id -> when to check its lease next, ms of
# Redis's clock) tells every edge and worker which leases to look at: each takes the due ones
# with ``PRODUCERS_DUE_SCRIPT`` (which pushes them a moment ahead, so that scanners do not
# all check the same ones), checks each with ``REAP_SCRIPT``, then re-schedules a live one for
# when its lease would run out (``PRODUCERS_SCHEDULE_SCRIPT``) or drops an ended one. The
# index is only a schedule, never the truth (the meta's lease is): a lost update at worst
# makes a check early or late by one round, and appends never touch it (it lives in its own
# slot on a cluster).

PRODUCER_OWNER = "producer"
PRODUCERS_KEY = "{broker:producers}"


class ExternalCreate(TypedDict):
    """What an external producer's create stores besides the lease."""

    model: str
    producer: NotRequired[str]  # the creating API key's id (keys on)
    metadata: NotRequired[str]  # the create's ``metadata`` object, JSON
    conversation: NotRequired[str]  # the conversation it is a turn of


def external_meta_fields(create: ExternalCreate) -> dict[str, str]:
    fields = {"model": create["model"], "source": SOURCE_EXTERNAL, "owner": PRODUCER_OWNER,
              "created": str(now_ms())}
    if create.get("producer"):
        fields["producer"] = create["producer"]
    if create.get("metadata"):
        fields["metadata"] = create["metadata"]
    if create.get("conversation"):
        fields["conversation"] = create["conversation"]
    return fields


# KEYS: meta. ARGV: lease_ttl_ms, ttl_ms, then field, value pairs (``external_meta_fields``).
# A running external generation with a fresh lease (Redis's clock). Returns 1.
PRODUCER_CREATE_SCRIPT = (
    _REDIS_NOW_MS
    + """
local meta = KEYS[1]
for i = 3, #ARGV, 2 do
  redis.call('HSET', meta, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', meta, 'status', 'running', 'seq', '0', 'p_after', '-1')
redis.call('HSET', meta, 'lease', now + tonumber(ARGV[1]), 'lease_ttl', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# Sets the locals status, last (the meta's seq) and count (the producer's events: the
# terminal event, once there is one, is not the producer's), or returns {refusal, 0}:
# 'gone', 'forbidden' (another API key created it), 'not_external' (a worker runs it).
# Expects the local meta; the caller's API key id in ARGV[1] ('' when keys are off).
_PRODUCER_GATE = (
    """
local status = redis.call('HGET', meta, 'status')
if not status then return {'gone', 0} end
if (redis.call('HGET', meta, 'producer') or '') ~= ARGV[1] then return {'forbidden', 0} end
if redis.call('HGET', meta, 'source') ~= '"""
    + SOURCE_EXTERNAL
    + """' then return {'not_external', 0} end
local last = tonumber(redis.call('HGET', meta, 'seq') or '0')
local count = last
if status ~= 'running' then count = last - 1 end
"""
    + _REDIS_NOW_MS
    + """
local function renew()
  local lease_ttl = tonumber(redis.call('HGET', meta, 'lease_ttl') or '0')
  redis.call('HSET', meta, 'lease', now + lease_ttl)
end
"""
)

# The first ARGV of the events in PRODUCER_APPEND_SCRIPT's arguments.
PRODUCER_FIRST_EVENT_ARG = 8

# Appends an external producer's batch, all or nothing, and renews its lease.
# KEYS: ``generation_keys``. ARGV: producer (API key id or ''), after (the producer's events
# before this batch), ts (publish ms), maxlen, ttl_ms, channel, publish_cmd, then kind, data,
# body per event (from ARGV[PRODUCER_FIRST_EVENT_ARG]; content kinds only: a terminal event
# goes through PRODUCER_FINISH_SCRIPT).
# Returns {outcome, count} (count: the producer's events now): 'ok' appended; 'duplicate' the
# batch was the last one applied (a retry: nothing written); 'offset_mismatch' ``after`` is
# not ``count`` (a gap or an overlap, a different batch sent with the last one's ``after``
# included); 'cancelled', 'completed', 'failed' the generation ended; or a refusal of
# ``_PRODUCER_GATE``. An error reply for a malformed batch (nothing written).
# A retry is told from another batch by the log: the last batch's events are its newest
# entries, ``0-<seq>``, each with the kind and data it was sent with (those the retention has
# trimmed, from a log kept shorter than one batch, cannot be compared and are not).
PRODUCER_APPEND_SCRIPT = (
    """
local meta, log, text, reasoning, tools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local after, ts = tonumber(ARGV[2]), ARGV[3]
local maxlen, ttl, channel, publish_cmd = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
"""
    + f"local first_arg = {PRODUCER_FIRST_EVENT_ARG}\n"
    + _CHECK_BATCH
    + """
if TERMINAL_KINDS[last_kind] then
  return redis.error_reply('ERR bad batch: a terminal event goes through finish')
end
"""
    + _PRODUCER_GATE
    + """
if status ~= 'running' then return {status, count} end
if after ~= count then
  if after + n == count and redis.call('HGET', meta, 'p_after') == ARGV[2] then
    local entries = redis.call('XRANGE', log, '0-' .. (last - n + 1), '0-' .. last)
    for _, entry in ipairs(entries) do
      local at = first_arg + 3 * (tonumber(string.match(entry[1], '%d+$')) - (last - n + 1))
      local fields = entry[2]
      if fields[2] ~= ARGV[at] or fields[4] ~= ARGV[at + 1] then
        return {'offset_mismatch', count}
      end
    end
    renew()
    return {'duplicate', count}
  end
  return {'offset_mismatch', count}
end
local seq = last + 1
"""
    + _APPEND
    + _APPEND_BATCH
    + """
redis.call('HSET', meta, 'p_after', ARGV[2])
renew()
return {'ok', count + n}
"""
)

# KEYS: meta. ARGV: producer. Renews a running external generation's lease.
# Returns {status, count} ('running' when renewed), or a refusal of ``_PRODUCER_GATE``.
PRODUCER_HEARTBEAT_SCRIPT = (
    "local meta = KEYS[1]\n"
    + _PRODUCER_GATE
    + """
if status == 'running' then renew() end
return {status, count}
"""
)

# Ends an external generation with the producer's terminal event; idempotent.
# KEYS: ``generation_keys``. ARGV: producer, ts, maxlen, ttl_ms, channel, publish_cmd, kind
# ('end' or 'error'), data, final_status, finish_reason.
# Returns {outcome, count}: 'ok' ended here; 'same' it had ended with this very event (a
# retry); else the status it ended with otherwise ('cancelled', 'completed', 'failed'); or a
# refusal of ``_PRODUCER_GATE``.
PRODUCER_FINISH_SCRIPT = (
    """
local meta, log, text, reasoning, tools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ts, maxlen, ttl, channel, publish_cmd = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local kind, data = ARGV[7], ARGV[8]
"""
    + _PRODUCER_GATE
    + """
if status ~= 'running' then
  local entry = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  if entry and entry[2][2] == kind and entry[2][4] == data then return {'same', count} end
  return {status, count}
end
"""
    + _APPEND
    + """
append(last + 1, kind, data, '')
appended(last + 1)
redis.call('HSET', meta, 'status', ARGV[9], 'finish_reason', ARGV[10])
return {'ok', count}
"""
)

# KEYS: PRODUCERS_KEY. ARGV: gen_id, delay_ms. Check gen_id's lease ``delay_ms`` from now
# (Redis's clock). Returns 1.
PRODUCERS_SCHEDULE_SCRIPT = (
    _REDIS_NOW_MS
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: PRODUCERS_KEY. ARGV: limit, hold_ms. The generations whose check is due (at most
# ``limit``), each pushed ``hold_ms`` ahead: the caller checks them now, others need not (if
# the caller dies, they come due again then).
PRODUCERS_DUE_SCRIPT = (
    _REDIS_NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, gen_id in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), gen_id)
end
return due
"""
)


def decode_producer_reply(reply: Any) -> tuple[str, int]:
    """A producer script's ``{outcome, count}``."""
    try:
        outcome, count = reply
        return as_text(outcome), int(count)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad producer reply: {reply!r}") from e


# Events one producer append may carry (the edge refuses more: ``413 batch_too_large``): a
# producer with more sends several appends. Bounds the script's arguments (and the time Redis
# spends in one call) whatever the body size allows.
MAX_APPEND_EVENTS = 1000
