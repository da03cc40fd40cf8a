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
    request: Any, default_model: str, *, max_messages: int = 256,
    max_content_chars: int = 200_000,
) -> dict[str, Any]:
    """``parse_create_body`` once the body is JSON: what the AI SDK's chat endpoint checks
    the request it converts with too."""
    if not isinstance(request, dict):
        raise ApiError(422, "invalid_request", "request body must be a JSON object")
    if _nests_deeper_than(request, MAX_JSON_DEPTH):
        raise ApiError(400, "invalid_json",
                       f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no UTF-8 text (the job,
        # the LLM request) can carry: refuse it here rather than fail later (the fuzz found it).
        json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ApiError(400, "invalid_json", "request body has an unpaired UTF-16 surrogate "
                       f"escape at {e.start}") from e
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
    if n != 1:
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
