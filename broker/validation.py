"""Checks on what clients send: create bodies and ``Last-Event-ID``. Pure, so unit-tested alone."""

from __future__ import annotations

import json
import re
from typing import Any

from broker import protocol
from broker.errors import ApiError

# A usable model name has a non-space character (the same rule as the OpenAPI `pattern`).
_NOT_BLANK = re.compile(r"\S")

# Fields the broker owns: it always streams, with usage, one choice.
_BROKER_FIELDS = ("stream", "stream_options")


def parse_create_body(
    body: bytes, default_model: str, *, max_messages: int = 256,
    max_content_chars: int = 200_000,
) -> dict[str, Any]:
    """The chat-completions request to run: validated messages, a model, other fields as given."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e
    if not isinstance(request, dict):
        raise ApiError(422, "invalid_request", "request body must be a JSON object")
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
    n = request.get("n", 1)
    if n != 1:
        raise ApiError(422, "invalid_request", "'n' must be 1: one answer per generation")
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
