"""Checks on what clients send: create bodies and ``Last-Event-ID``. Pure, so unit-tested alone."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from broker.core import protocol
from broker.core.protocol import SDK_CALL_OPTIONS
from broker.edge.errors import ApiError

# A usable model name has a non-space character (the same rule as the OpenAPI `pattern`).
_NOT_BLANK = re.compile(r"\S")
# Longer than any model name in use; it is logged and stored with every generation.
MAX_MODEL_CHARS = 256
# Deeper than any request needs (a tool's JSON schema nests a dozen levels), shallow enough
# that no step after the parse (encoding the job, the worker's SDK) meets Python's recursion
# limit.
MAX_JSON_DEPTH = 64

# Fields the broker owns: it always streams, with usage, one choice.
_BROKER_FIELDS = ("stream", "stream_options")



class _NotJson(ValueError):
    """What ``json.loads`` accepts but JSON (RFC 8259) or the LLM request cannot carry."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:32]} is out of range")
    return value


def load_json(body: bytes) -> Any:
    """A request body's JSON (400 ``invalid_json`` if it is not JSON, RFC 8259)."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e
    except _NotJson as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "invalid_json",
                       f"request body nests deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:  # int(): more digits than sys.get_int_max_str_digits()
        raise ApiError(400, "invalid_json", "request body has an integer with too many "
                       "digits") from e


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has an object or array more than ``limit`` levels deep (the value
    itself is level 1). Level by level, without recursion."""
    level = [value]
    for _ in range(limit):
        level = [child for item in level if isinstance(item, dict | list)
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return any(isinstance(item, dict | list) for item in level)


def parse_create_body(
    body: bytes, default_model: str, *, max_messages: int = 256,
    max_content_chars: int = 200_000,
) -> dict[str, Any]:
    """The chat-completions request to run: validated messages, a model, other fields as given."""
    return check_create_request(load_json(body), default_model, max_messages=max_messages,
                                max_content_chars=max_content_chars)


def check_create_request(
    value: Any, default_model: str, *, max_messages: int = 256,
    max_content_chars: int = 200_000,
) -> dict[str, Any]:
    """``parse_create_body`` once the body is JSON: what the AI SDK's chat endpoint checks
    the request it converts with too."""
    request = _json_object(value)
    _check_messages(request.get("messages"), max_messages, max_content_chars)
    model = request.get("model", default_model)
    if model is None:
        model = default_model
    if not isinstance(model, str) or not _NOT_BLANK.search(model):
        raise ApiError(422, "invalid_request", "'model' must be a non-empty string")
    if len(model) > MAX_MODEL_CHARS:
        raise ApiError(422, "invalid_request",
                       f"'model' is longer than {MAX_MODEL_CHARS} characters")
    n = request.get("n", 1)
    if type(n) is not int or n != 1:  # (not True, not 1.0: equal to 1 in Python, not in JSON)
        raise ApiError(422, "invalid_request", "'n' must be 1: one answer per generation")
    options = sorted(SDK_CALL_OPTIONS & request.keys())
    if options:
        raise ApiError(422, "invalid_request",
                       f"{', '.join(map(repr, options))}: options of the worker's LLM call, "
                       "not fields of the request; not accepted")
    for name in _BROKER_FIELDS:
        request.pop(name, None)
    request["model"] = model
    return request


def _check_messages(messages: Any, max_messages: int, max_content_chars: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "invalid_request", "'messages' must be a non-empty list")
    if len(messages) > max_messages:
        raise ApiError(422, "too_many_messages", f"at most {max_messages} messages per request")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(422, "invalid_request", f"messages[{i}] must be an object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ApiError(422, "invalid_request", f"messages[{i}].{key} must be a string")
        if len(message["content"]) > max_content_chars:
            raise ApiError(
                422, "content_too_long",
                f"messages[{i}].content is longer than {max_content_chars} characters",
            )


def parse_last_event_id(header: str | None, query: str | None) -> int:
    """The cursor to resume after (0: from the start). The header wins: ``EventSource`` keeps
    the query string of its first URL on every reconnect but updates the header."""
    value = header if header else query
    if not value:
        return 0
    try:
        return protocol.parse_event_id(value)
    except protocol.ProtocolError as e:
        raise ApiError(400, "invalid_last_event_id", f"malformed Last-Event-ID: {e}") from e


def take_conversation_id(request: dict[str, Any]) -> str | None:
    """The create body's ``conversation_id`` (taken out: it is the broker's, not the LLM's),
    or None; 422 unless 1-128 characters of ``[A-Za-z0-9_.:-]``."""
    cid = request.pop("conversation_id", None)
    if cid is None:
        return None
    if not protocol.is_conversation_id(cid):
        raise ApiError(422, "invalid_conversation_id",
                       "'conversation_id' must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    return str(cid)


STREAM_STARTS = ("all", "active")


def parse_conversation_last_event_id(
    header: str | None, query: str | None
) -> tuple[int, int] | None:
    """Where a conversation stream resumes: after (turn, seq) of its last event id; None: from
    the start (see ``parse_stream_start``). The header wins, as for a generation stream."""
    value = header if header else query
    if not value:
        return None
    try:
        return protocol.parse_conversation_event_id(value)
    except protocol.ProtocolError as e:
        raise ApiError(400, "invalid_last_event_id", f"malformed Last-Event-ID: {e}") from e


def parse_stream_start(value: str | None) -> str | None:
    """``?from=`` of a conversation stream: ``all`` (the default: every turn) or ``active``
    (the oldest turn not ended, else the next one)."""
    if value is None or value == "all":
        return None
    if value not in STREAM_STARTS:
        raise ApiError(400, "invalid_request", "'from' must be 'all' or 'active'")
    return value


# -- external producers (``{"producer": "external"}``) ---------------------------------------

MAX_APPEND_EVENTS = protocol.MAX_APPEND_EVENTS  # (the producer library cuts its appends to it)
PRODUCER_EXTERNAL = "external"
_CREATE_FIELDS = frozenset({"producer", "model", "metadata", "messages"})
# A producer's own error codes look like ours; absent, the error is ``producer_error``.
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
PRODUCER_ERROR = "producer_error"


def _object(body: bytes) -> dict[str, Any]:
    return _json_object(load_json(body))


def _json_object(value: Any) -> dict[str, Any]:
    """A request body's JSON value if it is an object that is not too deep and holds no
    unpaired surrogate (every body that must be an object is checked by this)."""
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_request", "request body must be a JSON object")
    if _nests_deeper_than(value, MAX_JSON_DEPTH):
        raise ApiError(400, "invalid_json",
                       f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no UTF-8 text (the job,
        # the LLM request) can carry: refuse it here rather than fail later (the fuzz found it).
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ApiError(400, "invalid_json", "request body has an unpaired UTF-16 surrogate "
                       f"escape at {e.start}") from e
    return value


def parse_external_create(
    body: bytes, default_model: str
) -> tuple[str, dict[str, Any], str | None] | None:
    """``(model, metadata, conversation id)`` of an external producer's create; None for any
    other create body (the worker's: ``parse_create_body`` checks it). ``messages`` may be
    sent and is ignored: the producer runs its own loop."""
    if b'"producer"' not in body and b"\\u" not in body:
        # The worker's creates are parsed once, by parse_create_body (unless a key may be
        # spelled with escapes: "\u0070roducer" is "producer" too).
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # parse_create_body says what is wrong with it
    if not isinstance(value, dict) or "producer" not in value:
        return None
    request = _object(body)
    if request["producer"] != PRODUCER_EXTERNAL:
        raise ApiError(422, "invalid_request", "'producer' must be \"external\"")
    conversation = take_conversation_id(request)
    unknown = sorted(request.keys() - _CREATE_FIELDS)
    if unknown:
        raise ApiError(422, "invalid_request",
                       f"unknown field(s) for an external producer: {', '.join(unknown)}")
    model = request.get("model")
    if model is None:
        model = default_model
    if not isinstance(model, str) or not _NOT_BLANK.search(model) or len(model) > MAX_MODEL_CHARS:
        raise ApiError(422, "invalid_request",
                       f"'model' must be a non-empty string of at most {MAX_MODEL_CHARS} "
                       "characters")
    metadata = request.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ApiError(422, "invalid_request", "'metadata' must be an object")
    return model, metadata, conversation


def _field(event: dict[str, Any], where: str, name: str, kind: type | tuple[type, ...],
           non_empty: bool = False) -> Any:
    if name not in event:
        raise ApiError(422, "invalid_event", f"{where}.{name} is missing")
    value = event[name]
    if kind is not object and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        shown = {"str": "a string", "int": "an integer"}.get(names, names)
        raise ApiError(422, "invalid_event", f"{where}.{name} must be {shown}")
    if non_empty and not value:
        raise ApiError(422, "invalid_event", f"{where}.{name} must not be empty")
    return value


# Each type's fields: (name, type, must be non-empty). ``object``: any JSON value.
_EVENT_FIELDS: dict[str, tuple[tuple[str, type, bool], ...]] = {
    "text": (("text", str, True),),
    "reasoning": (("text", str, True),),
    "tool_call": (("index", int, False), ("id", str, False), ("name", str, True),
                  ("arguments", str, False)),
    "tool_result": (("id", str, False), ("result", object, False)),
    "data": (("name", str, True), ("value", object, False)),
}


def parse_event(event: Any, where: str) -> protocol.NewEvent:
    """One event of an append, as the log will hold it."""
    if not isinstance(event, dict):
        raise ApiError(422, "invalid_event", f"{where} must be an object")
    kind = event.get("type")
    fields = _EVENT_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ApiError(422, "invalid_event", f"{where}.type must be one of "
                       f"{', '.join(_EVENT_FIELDS)}")
    values = [_field(event, where, name, typ, non_empty) for name, typ, non_empty in fields]
    unknown = sorted(event.keys() - {"type", *(name for name, _, _ in fields)})
    if unknown:
        raise ApiError(422, "invalid_event",
                       f"{where} has unknown field(s) for {kind}: {', '.join(unknown)}")
    if kind == "tool_call" and not 0 <= values[0] <= protocol.MAX_TOOL_CALL_INDEX:
        raise ApiError(422, "invalid_event",
                       f"{where}.index must be >= 0 and <= {protocol.MAX_TOOL_CALL_INDEX}")
    if kind == "text":
        return protocol.new_message(values[0])
    if kind == "reasoning":
        return protocol.new_reasoning(values[0])
    if kind == "tool_call":
        return protocol.new_tool_call(*values)
    if kind == "tool_result":
        return protocol.new_tool_result(*values)
    return protocol.new_data(*values)


def parse_append_body(body: bytes) -> tuple[int, list[protocol.NewEvent]]:
    """``(after, events)`` of an append; every event checked before any is applied."""
    request = _object(body)
    unknown = sorted(request.keys() - {"after", "events"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s): {', '.join(unknown)}")
    after = request.get("after")
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ApiError(422, "invalid_request", "'after' must be an integer >= 0: how many "
                       "events you appended before this batch")
    events = request.get("events")
    if not isinstance(events, list) or not events:
        raise ApiError(422, "invalid_request", "'events' must be a non-empty list")
    if len(events) > MAX_APPEND_EVENTS:
        raise ApiError(413, "batch_too_large",
                       f"at most {MAX_APPEND_EVENTS} events per append; send several")
    return after, [parse_event(event, f"events[{i}]") for i, event in enumerate(events)]


def parse_finish_body(body: bytes) -> protocol.NewEvent:
    """The terminal event of ``{"finish_reason", "usage"}`` or ``{"error": {"code",
    "message"}}`` (an empty body: ``finish_reason`` "stop", no usage)."""
    request = _object(body) if body.strip() else {}
    if "error" in request:
        unknown = sorted(request.keys() - {"error"})
        error = request["error"]
        if unknown or not isinstance(error, dict) or not error.keys() <= {"code", "message"}:
            raise ApiError(422, "invalid_request", "'error' must come alone, an object of "
                           "'code' and 'message'")
        code = error.get("code", PRODUCER_ERROR)
        message = error.get("message", "")
        if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
            raise ApiError(422, "invalid_request", "error.code must match "
                           f"{_ERROR_CODE.pattern} (absent: {PRODUCER_ERROR})")
        if not isinstance(message, str):
            raise ApiError(422, "invalid_request", "error.message must be a string")
        return protocol.new_error(code, message)
    unknown = sorted(request.keys() - {"finish_reason", "usage"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s): {', '.join(unknown)}")
    reason = request.get("finish_reason", "stop")
    if not isinstance(reason, str) or not _NOT_BLANK.search(reason) or len(reason) > 128:
        raise ApiError(422, "invalid_request", "'finish_reason' must be a non-empty string "
                       "of at most 128 characters")
    usage = request.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise ApiError(422, "invalid_request", "'usage' must be an object or null")
    return protocol.new_end(reason, usage)
