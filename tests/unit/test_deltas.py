"""From chat-completion chunks to typed events (``broker.core.deltas``): what the worker and the
producer library's ``pipe()`` both read LLM streams with."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

from broker.core import protocol
from broker.core.deltas import (
    DeltaReader,
    Piece,
    Refusal,
    Text,
    TextChannels,
    ToolCall,
    chunk_dict,
    joined,
)
from broker.core.sentences import SentenceBuffer
from broker.tools.mockllm import ScriptedCall, text_deltas, tool_call_deltas


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def over_the_wire(value: dict[str, Any], ascii_json: bool) -> dict[str, Any]:
    """``value`` as a server writes it and the worker decodes it."""
    decoded: dict[str, Any] = json.loads(json.dumps(value, ensure_ascii=ascii_json))
    return decoded


def read(deltas: list[dict[str, Any]], finish_reason: str | None = "stop",
         ascii_json: bool = True) -> list[Piece]:
    reader = DeltaReader()
    pieces: list[Piece] = []
    for delta in deltas:
        pieces += reader.feed(over_the_wire(chunk(delta), ascii_json))
    if finish_reason:
        pieces += reader.feed(chunk({}, finish_reason))
        assert reader.finish_reason == finish_reason
    return pieces + reader.finish()


def utf16_units(text: str) -> list[str]:
    """``text`` cut into UTF-16 code units: an astral character becomes its two surrogates,
    each a (lone-surrogate) string, as a ``\\u``-escaping server may cut it."""
    raw = text.encode("utf-16-le", "surrogatepass")
    return [raw[i:i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(raw), 2)]


def cut(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at ``cuts`` (positions in UTF-16 code units: inside surrogate pairs too)."""
    units = utf16_units(text)
    bounds = sorted({0, len(units), *(c % (len(units) + 1) for c in cuts)})
    return ["".join(units[a:b]) for a, b in itertools.pairwise(bounds)]


# Arguments as LLMs write them, and worse: JSON escapes, astral characters, combining marks,
# line separators, and text that is not JSON at all (the model wrote it; the broker passes it).
AWKWARD_ARGUMENTS = [
    '{"city": "Z\\u00fcrich", "q": "say \\"hi\\"\\n", "emoji": "😀🎉", "cjk": "東京"}',
    '{"path": "C:\\\\temp\\\\x", "mark": "e\u0301", "sep": "\u2028\u2029\u0085"}',
    '{"unterminated": "yes',
    "",
]


@given(
    calls=st.lists(st.tuples(st.text(), st.lists(st.integers(0, 400), max_size=12)),
                   min_size=1, max_size=3),
    interleave=st.booleans(),
)
@example(calls=[(AWKWARD_ARGUMENTS[0], list(range(0, 90, 1)))], interleave=False)
@example(calls=[(a, [3, 7, 8, 9, 30, 31, 57, 58, 59]) for a in AWKWARD_ARGUMENTS[:3]],
         interleave=True)
def test_any_fragmentation_of_any_arguments_gives_the_exact_arguments(
    calls: list[tuple[str, list[int]]], interleave: bool
) -> None:
    scripted = [ScriptedCall(i, f"call_{i}", f"tool_{i}", cut(arguments, cuts))
                for i, (arguments, cuts) in enumerate(calls)]
    pieces = read([{"content": "Let me check. "}, *tool_call_deltas(scripted, interleave)],
                  finish_reason="tool_calls")
    assert pieces == [Text("message", "Let me check. "), *(
        ToolCall(i, f"call_{i}", f"tool_{i}", arguments)
        for i, (arguments, _) in enumerate(calls))]


def test_tool_calls_are_handed_over_once_at_the_finish_reason_in_index_order() -> None:
    reader = DeltaReader()
    # Index 1 starts first: the calls still come out by index.
    deltas = tool_call_deltas([ScriptedCall(1, "b", "g", ['{"y"', ":2}"]),
                               ScriptedCall(0, "a", "f", ['{"x":1}'])])
    assert all(reader.feed(chunk(d)) == [] for d in deltas)  # nothing before they complete
    assert reader.feed(chunk({}, "tool_calls")) == [
        ToolCall(0, "a", "f", '{"x":1}'), ToolCall(1, "b", "g", '{"y":2}')]
    usage = {"choices": [], "usage": {"total_tokens": 3}}
    assert reader.feed(usage) == [] and reader.finish() == []  # once only


def test_a_stream_ending_without_a_finish_reason_hands_its_calls_over_at_the_end() -> None:
    pieces = read(tool_call_deltas([ScriptedCall(0, "a", "f", ["{}"])]), finish_reason=None)
    assert pieces == [ToolCall(0, "a", "f", "{}")]


def test_calls_sent_whole_without_an_index_are_told_apart_by_their_ids() -> None:
    deltas = [{"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": '{"x":1}'}},
                              {"id": "b", "function": {"name": "g", "arguments": "{}"}}]},
              {"tool_calls": [{"function": {"arguments": " "}}]}]  # no id: the last call's
    assert read(deltas) == [ToolCall(0, "a", "f", '{"x":1}'), ToolCall(1, "b", "g", "{} ")]


def test_a_name_repeated_on_every_fragment_counts_once_and_a_name_in_pieces_is_joined() -> None:
    repeated = [{"tool_calls": [{"index": 0, "id": "a", "function": {"name": "get_weather",
                                                                      "arguments": part}}]}
                for part in ['{"c"', ':1}']]
    assert read(repeated) == [ToolCall(0, "a", "get_weather", '{"c":1}')]
    pieces = [{"tool_calls": [{"index": 0, "function": {"name": part}}]} for part in ["get_", "x"]]
    assert read(pieces) == [ToolCall(0, "", "get_x", "")]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_under_either_name_is_reasoning_text(field: str) -> None:
    deltas = [*text_deltas("Hmm, let me see. ", field), *text_deltas("Hello. ")]
    pieces = read(deltas)
    assert "".join(p.text for p in pieces if p == Text("reasoning", p.text)) == (
        "Hmm, let me see. ")
    assert "".join(p.text for p in pieces if p == Text("message", p.text)) == "Hello. "


def test_a_delta_with_both_reasoning_names_counts_once_reasoning_before_content() -> None:
    both = {"reasoning_content": "Think. ", "reasoning": "Think. ", "content": "Say."}
    assert read([both]) == [Text("reasoning", "Think. "), Text("message", "Say.")]


def test_a_refusal_is_one_piece_at_the_end_and_no_answer_text() -> None:
    pieces = read(text_deltas("I can't help with that, sorry.", "refusal"))
    assert pieces == [Refusal("I can't help with that, sorry.")]
    assert Refusal("x").event() == protocol.new_data("refusal", "x")


def test_other_choices_and_junk_are_ignored() -> None:
    reader = DeltaReader()
    two = {"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]}
    assert reader.feed(two) == [Text("message", "a")]
    for junk in [{}, {"choices": None}, {"choices": ["x"]}, {"choices": [{"delta": "x"}]},
                 chunk({"content": 5, "reasoning": None, "tool_calls": "x", "refusal": 1}),
                 chunk({"tool_calls": ["x", {"index": 0, "function": "x"}]})]:
        assert reader.feed(junk) == []
    assert reader.finish() == [ToolCall(0, "", "", "")]


def test_joined_rejoins_a_split_surrogate_pair_and_replaces_a_lone_one() -> None:
    high, low = utf16_units("😀")
    assert joined(["a" + high, low + "b"]) == "a😀b"
    assert joined(["a" + high]) == "a\ufffd"
    assert joined(["plain", " text"]) == "plain text"


def test_an_sdk_chunk_reads_like_its_json_reasoning_fields_included() -> None:
    """The producer's ``pipe()`` gets the SDK's ``ChatCompletionChunk`` objects: the fields the
    SDK does not declare (``reasoning_content``, ``reasoning``) must not be lost."""
    deltas = [{"role": "assistant", "reasoning_content": "Why? "}, {"reasoning": "Because. "},
              {"content": "Hi."}, {"refusal": "No."},
              *tool_call_deltas([ScriptedCall(0, "a", "f", ['{"é":', '"😀"}'])])]
    raw = [chunk(d) for d in deltas] + [chunk({}, "tool_calls")]
    from_dicts, from_sdk = DeltaReader(), DeltaReader()
    expected = [p for c in raw for p in from_dicts.feed(c)]
    got = [p for c in raw for p in from_sdk.feed(chunk_dict(ChatCompletionChunk.model_validate(c)))]
    assert got == expected and len(got) == 5
    assert from_sdk.finish_reason == "tool_calls"
    assert chunk_dict(object()) == {}


# -- TextChannels ----------------------------------------------------------------------------

TEXT_PIECES = st.lists(
    st.tuples(st.sampled_from(["message", "reasoning"]),
              st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)),
    max_size=40,
)


@given(TEXT_PIECES, st.lists(st.floats(0, 3), max_size=40))
@example([("reasoning", "I think. So"), ("message", "Yes. "), ("reasoning", "more. ")], [])
def test_channels_keep_the_upstream_order_and_never_mix_kinds(
    pieces: list[tuple[Any, str]], flush_times: list[float]
) -> None:
    """Whatever the interleaving and whenever the flusher runs: the events of each kind joined
    equal that kind's input; no run of events switches kind more often than the input did
    (the order across kinds is the upstream's); an event holds one kind only (a NewEvent
    has one kind, and its body is that kind's text)."""
    channels = TextChannels(lambda: SentenceBuffer(40, first_wait=0.01, max_wait=1.0))
    events: list[protocol.NewEvent] = []
    now = 0.0
    for i, (kind, text) in enumerate(pieces):
        now += flush_times[i] if i < len(flush_times) else 0.05
        events += channels.flush_due(now)
        events += channels.feed(kind, text, now)
    events += channels.flush()
    for kind in ("message", "reasoning"):
        assert "".join(e.body for e in events if e.kind == kind) == "".join(
            t for k, t in pieces if k == kind)
    assert all(json.loads(e.data) == {"text": e.body} for e in events)
    assert all(e.body for e in events)

    def runs(kinds: list[str]) -> list[str]:
        return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]

    assert runs([e.kind for e in events]) == runs([k for k, _ in pieces])
    assert channels.pending_since is None and channels.deadline() is None


def test_switching_kind_hands_the_other_kinds_pending_text_over_first() -> None:
    channels = TextChannels(lambda: SentenceBuffer(400, first_wait=10.0, max_wait=10.0))
    assert channels.feed("reasoning", "The user wants", 0.0) == []
    assert channels.pending_since == 0.0 and channels.deadline() == 10.0
    events = channels.feed("message", "Hi", 0.5)
    assert events == [protocol.new_reasoning("The user wants")]
    assert channels.flush() == [protocol.new_message("Hi")]
