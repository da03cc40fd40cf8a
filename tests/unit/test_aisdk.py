"""The AI SDK mapping (broker/edge/aisdk.py): typed events to UI message stream chunks, UI
messages to OpenAI chat messages. What the real `ai` package makes of the chunks is
tests/integration/test_ai_sdk.py's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.core import protocol
from broker.edge.aisdk import (
    DONE,
    ChatTurn,
    UIMessageStream,
    encode,
    parse_chat_body,
    to_chat_messages,
)
from broker.edge.errors import ApiError


def run(events: list[protocol.NewEvent], message_id: str = "gen1") -> list[dict[str, Any]]:
    stream = UIMessageStream(message_id)
    chunks = stream.start()
    for seq, event in enumerate(events, start=1):
        chunks += stream.event(seq, event.kind, json.loads(event.data))
    return chunks


def test_text_turn() -> None:
    chunks = run([protocol.new_message("Hello"), protocol.new_message(" world."),
                  protocol.new_end("stop", None)])
    assert chunks == [
        {"type": "start", "messageId": "gen1"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Hello"},
        {"type": "text-delta", "id": "text-1", "delta": " world."},
        {"type": "text-end", "id": "text-1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


def test_reasoning_then_text_are_two_parts_in_order() -> None:
    chunks = run([protocol.new_reasoning("Hmm."), protocol.new_reasoning(" Yes."),
                  protocol.new_message("Blue."), protocol.new_end("stop", None)])
    assert [c["type"] for c in chunks[2:]] == [
        "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
        "text-start", "text-delta", "text-end", "finish-step", "finish",
    ]
    assert chunks[2]["id"] == "reasoning-1" and chunks[6]["id"] == "text-3"


def test_tool_call_and_result_then_text_is_a_new_step() -> None:
    chunks = run([
        protocol.new_message("Let me look."),
        protocol.new_tool_call(0, "call_1", "get_weather", '{"city":"Paris"}'),
        protocol.new_tool_result("call_1", {"temp": 21}),
        protocol.new_message("It is 21."),
        protocol.new_end("stop", None),
    ])
    assert chunks[2:] == [
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "Let me look."},
        {"type": "text-end", "id": "text-1"},
        {"type": "tool-input-available", "toolCallId": "call_1", "toolName": "get_weather",
         "input": {"city": "Paris"}},
        {"type": "tool-output-available", "toolCallId": "call_1", "output": {"temp": 21}},
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "text-start", "id": "text-4"},
        {"type": "text-delta", "id": "text-4", "delta": "It is 21."},
        {"type": "text-end", "id": "text-4"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


@pytest.mark.parametrize(("arguments", "chunk"), [
    ("", {"type": "tool-input-available", "input": {}}),
    ("[1, 2]", {"type": "tool-input-available", "input": [1, 2]}),
    ('{"city": "Par', {"type": "tool-input-error", "input": '{"city": "Par'}),
])
def test_tool_arguments(arguments: str, chunk: dict[str, Any]) -> None:
    out = run([protocol.new_tool_call(0, "c", "f", arguments)])[2]
    assert {k: out[k] for k in chunk} == chunk
    assert out["toolCallId"] == "c" and out["toolName"] == "f"
    if chunk["type"] == "tool-input-error":
        assert out["errorText"].startswith("the arguments are not JSON")


def test_result_for_an_unknown_call_is_a_data_part() -> None:
    chunks = run([protocol.new_tool_result("nope", "x")])
    assert chunks[2] == {"type": "data-tool-result",
                         "data": {"toolCallId": "nope", "output": "x"}}


def test_data_event() -> None:
    chunks = run([protocol.new_message("a"), protocol.new_data("weather", {"t": 1})])
    assert chunks[4:] == [{"type": "text-end", "id": "text-1"},
                          {"type": "data-weather", "data": {"t": 1}}]


@pytest.mark.parametrize(("reason", "sdk"), [
    ("stop", "stop"), ("length", "length"), ("content_filter", "content-filter"),
    ("tool_calls", "tool-calls"), ("function_call", "tool-calls"), ("weird", "other"),
])
def test_finish_reasons(reason: str, sdk: str) -> None:
    assert run([protocol.new_end(reason, None)])[-1] == {"type": "finish", "finishReason": sdk}


def test_cancelled_is_an_abort() -> None:
    chunks = run([protocol.new_message("a"), protocol.new_end("cancelled", None)])
    assert chunks[-3:] == [{"type": "text-end", "id": "text-1"}, {"type": "finish-step"},
                           {"type": "abort", "reason": "cancelled"}]


def test_error_closes_the_open_part_then_errors() -> None:
    stream = UIMessageStream("g")
    stream.start()
    stream.event(1, "message", {"text": "a"})
    assert not stream.done
    chunks = stream.event(2, "error", json.loads(protocol.error_data("llm_error", "boom")))
    assert chunks == [{"type": "text-end", "id": "text-1"},
                      {"type": "error", "errorText": "llm_error: boom"}]
    assert stream.done


def test_encode_is_one_data_line_per_chunk() -> None:
    body = encode([{"type": "text-delta", "id": "t", "delta": "a\nb\u2028é"}]) + DONE
    assert body == ('data: {"type":"text-delta","id":"t","delta":"a\\nb\u2028é"}\n\n'
                    "data: [DONE]\n\n").encode()


# -- UI messages -> chat messages ------------------------------------------------------------


def test_text_messages() -> None:
    ui = [
        {"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
        {"id": "u", "role": "user", "parts": [{"type": "text", "text": "Hi "},
                                             {"type": "file", "url": "x", "mediaType": "i"},
                                             {"type": "text", "text": "there"}]},
        {"id": "a", "role": "assistant", "parts": [
            {"type": "step-start"}, {"type": "reasoning", "text": "hm"},
            {"type": "text", "text": "Hello.", "state": "done"}]},
    ]
    assert to_chat_messages(ui) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_tool_parts_with_outcomes_become_tool_calls_and_tool_messages() -> None:
    ui = [{"id": "a", "role": "assistant", "parts": [
        {"type": "step-start"},
        {"type": "text", "text": "Looking."},
        {"type": "tool-get_weather", "toolCallId": "c1", "state": "output-available",
         "input": {"city": "Paris"}, "output": {"temp": 21}},
        {"type": "dynamic-tool", "toolName": "lookup", "toolCallId": "c2",
         "state": "output-error", "input": {}, "errorText": "down"},
        {"type": "tool-pending", "toolCallId": "c3", "state": "input-available", "input": {}},
        {"type": "step-start"},
        {"type": "text", "text": "21 degrees."},
    ]}]
    assert to_chat_messages(ui) == [
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp":21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "down"},
        {"role": "assistant", "content": "21 degrees."},
    ]


def test_a_step_with_nothing_for_the_model_is_left_out() -> None:
    ui = [{"id": "a", "role": "assistant", "parts": [
        {"type": "reasoning", "text": "hm"},
        {"type": "tool-x", "toolCallId": "c", "state": "input-available", "input": {}}]}]
    assert to_chat_messages(ui) == []


@pytest.mark.parametrize(("ui", "where"), [
    ({}, "'messages'"),
    ([1], "messages[0] must be an object"),
    ([{"role": "tool", "parts": []}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].parts"),
    ([{"role": "user", "parts": [{"type": "text", "text": 3}]}], "messages[0].parts[0].text"),
    ([{"role": "assistant", "parts": [{"type": "tool-x", "state": "output-available"}]}],
     "toolCallId"),
])
def test_bad_shapes_are_422(ui: Any, where: str) -> None:
    with pytest.raises(ApiError) as e:
        to_chat_messages(ui)
    assert e.value.status == 422 and where in e.value.message


# -- the request body ------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return json.dumps({"id": "chat-1", "trigger": "submit-message", "messageId": None,
                       "messages": [{"id": "u", "role": "user",
                                     "parts": [{"type": "text", "text": "Hi"}]}],
                       **fields}).encode()


def parse(raw: bytes) -> ChatTurn:
    return parse_chat_body(raw, "default-model", max_messages=8, max_content_chars=100)


def test_the_transport_body() -> None:
    turn = parse(body(temperature=0.2, conversation_id="other"))
    assert turn == ChatTurn("chat-1", {"messages": [{"role": "user", "content": "Hi"}],
                                       "temperature": 0.2, "model": "default-model"}, None)


def test_a_body_ending_in_an_assistant_message_continues_it() -> None:
    messages = [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "Hi"}]},
                {"id": "a1", "role": "assistant", "parts": [
                    {"type": "tool-f", "toolCallId": "c", "state": "output-available",
                     "input": {}, "output": 1}]}]
    turn = parse(body(messages=messages))
    assert (turn.continues, turn.continued_calls) == ("a1", frozenset({"c"}))


def test_a_result_for_a_call_of_the_continued_message_is_its_output() -> None:
    stream = UIMessageStream("a1", tool_calls={"c"})
    assert stream.event(1, "tool_result", {"id": "c", "result": 2}) == [
        {"type": "tool-output-available", "toolCallId": "c", "output": 2}]


@pytest.mark.parametrize(("fields", "status", "code"), [
    ({"id": "has space"}, 422, "invalid_conversation_id"),
    ({"id": None}, 422, "invalid_conversation_id"),
    ({"trigger": "resume-stream"}, 422, "invalid_request"),
    ({"messages": []}, 422, "invalid_request"),
    ({"messages": [{"role": "user", "parts": [{"type": "text", "text": "x" * 101}]}]}, 422,
     "content_too_long"),
    ({"n": 2}, 422, "invalid_request"),
])
def test_bad_bodies(fields: dict[str, Any], status: int, code: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(body(**fields))
    assert (e.value.status, e.value.code) == (status, code)


def test_not_json_is_400() -> None:
    with pytest.raises(ApiError) as e:
        parse(b"{")
    assert (e.value.status, e.value.code) == (400, "invalid_json")
