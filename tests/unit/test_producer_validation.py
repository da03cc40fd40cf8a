"""What an external producer sends the edge (``broker.edge.validation``), and that the
Python producer's HTTP transport sends exactly what the edge reads back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.core import protocol
from broker.edge.errors import ApiError
from broker.edge.validation import (
    MAX_APPEND_EVENTS,
    parse_append_body,
    parse_event,
    parse_external_create,
    parse_finish_body,
)
from broker.producer.transports import _wire_event
from tests.support.hostile import HOSTILE_VALUES

EVERY_KIND = [
    protocol.new_message("Hello\u2028 \"world\" 😀. "),
    protocol.new_reasoning("Thinking…\n"),
    protocol.new_tool_call(3, "call_1", "get_weather", '{"city": "Z\\u00fcrich"'),
    protocol.new_tool_result("call_1", {"a": [1, 2.5, None, True, "ü"]}),
    protocol.new_tool_result("call_2", None),
    protocol.new_data("sources", [{"url": "https://example.com/?q=1&r=2"}]),
    protocol.new_data("progress", 0.25),
]


@pytest.mark.parametrize("event", EVERY_KIND, ids=lambda e: e.kind)
def test_the_library_sends_what_the_edge_reads_back(event: protocol.NewEvent) -> None:
    assert parse_event(json.loads(json.dumps(_wire_event(event))), "events[0]") == event


def error_of(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value


@pytest.mark.parametrize("label", sorted(HOSTILE_VALUES))
def test_hostile_json_in_an_append_is_a_400(label: str) -> None:
    value = HOSTILE_VALUES[label]
    body = f'{{"after": 0, "events": [{{"type": "data", "name": "x", "value": {value}}}]}}'
    assert error_of(parse_append_body, body.encode()).status == 400


def test_a_batch_is_checked_whole_before_anything() -> None:
    good = {"type": "text", "text": "fine. "}
    body = {"after": 0, "events": [good] * 5 + [{"type": "text", "text": None}]}
    error = error_of(parse_append_body, json.dumps(body).encode())
    assert (error.status, error.code) == (422, "invalid_event")
    assert "events[5].text" in error.message
    too_many = {"after": 0, "events": [good] * (MAX_APPEND_EVENTS + 1)}
    assert error_of(parse_append_body, json.dumps(too_many).encode()).code == "batch_too_large"
    after, events = parse_append_body(json.dumps({"after": 7, "events": [good]}).encode())
    assert (after, events) == (7, [protocol.new_message("fine. ")])


def test_only_a_producer_body_is_an_external_create() -> None:
    worker = {"messages": [{"role": "user", "content": 'say "producer": "external"'}]}
    assert parse_external_create(json.dumps(worker).encode(), "m") is None
    assert parse_external_create(b"not json", "m") is None
    assert parse_external_create(b'{"producer": "external"}', "m") == ("m", {}, None)
    assert parse_external_create(
        b'{"producer": "external", "model": "agent", "metadata": {"a": 1}, '
        b'"conversation_id": "chat:1"}', "m") == ("agent", {"a": 1}, "chat:1")
    bad = b'{"producer": "external", "conversation_id": "no spaces"}'
    assert error_of(parse_external_create, bad, "m").code == "invalid_conversation_id"


@pytest.mark.parametrize(("body", "event"), [
    (b"", protocol.new_end("stop", None)),
    (b'{"finish_reason": "length", "usage": {"total_tokens": 3}}',
     protocol.new_end("length", {"total_tokens": 3})),
    (b'{"error": {"message": "it broke"}}', protocol.new_error("producer_error", "it broke")),
    (b'{"error": {"code": "tool_failed", "message": ""}}',
     protocol.new_error("tool_failed", "")),
])
def test_finish_bodies(body: bytes, event: protocol.NewEvent) -> None:
    assert parse_finish_body(body) == event


async def test_the_library_refuses_what_the_edge_would_whatever_the_transport() -> None:
    from broker import producer

    gen = producer.Producer(producer.HttpTransport("http://127.0.0.1:9"))
    for call in (gen.tool_call(1, "f", "{}"), gen.tool_call("c", "f", {"a": 1}),  # type: ignore[arg-type]
                 gen.tool_result(None, 1), gen.data(3, "x"),  # type: ignore[arg-type]
                 gen.text(b"bytes")):  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await call
    for call in (gen.tool_call("c", "", "{}"), gen.tool_call("c", "f", "{}", index=-1),
                 gen.tool_call("c", "f", "{}", index=2**53),
                 gen.data("", 1)):
        with pytest.raises(ValueError):
            await call
    await gen.aclose()
