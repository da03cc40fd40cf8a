"""SSE framing: the exact bytes, and that a spec-following parser reads back what was framed."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from broker.core import protocol, sse
from broker.core.protocol import Event

# -- a small parser following the WHATWG "event stream interpretation" rules -----------------

_SSE_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # only these three: not \x85, \u2028, ...


@dataclass
class Parsed:
    type: str
    data: str
    last_event_id: str


@dataclass
class Stream:
    events: list[Parsed]
    retry: int | None


def parse_sse(body: bytes) -> Stream:
    text = body.decode("utf-8", "replace")  # the spec's "UTF-8 decode": U+FFFD for bad bytes
    text = text.removeprefix("\ufeff")
    *lines, _unterminated = _SSE_LINE_BREAK.split(text)  # an unfinished last line is dropped
    events: list[Parsed] = []
    data, event_type, last_id, retry = "", "", "", None
    for line in lines:
        if line == "":
            if data:
                events.append(Parsed(event_type or "message", data.removesuffix("\n"), last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
    return Stream(events, retry)


def normalise_breaks(text: str) -> str:
    return _SSE_LINE_BREAK.sub("\n", text)


def test_parser_self_check_follows_the_spec_examples() -> None:
    # The examples of the WHATWG spec: the parser the properties rely on must get them right.
    stream = parse_sse(b"data: YHOO\ndata: +2\ndata: 10\n\n")
    assert [e.data for e in stream.events] == ["YHOO\n+2\n10"]
    stream = parse_sse(b"data\n\ndata\ndata\n\ndata:")
    assert [e.data for e in stream.events] == ["", "\n"]
    stream = parse_sse(b"data:test\n\ndata: test\n\n")
    assert [e.data for e in stream.events] == ["test", "test"]


# -- frame() ---------------------------------------------------------------------------------


def test_frame_with_id_event_and_data_is_three_lines_and_a_blank_line() -> None:
    assert sse.frame("hello", id="7", event="end") == b"id: 7\nevent: end\ndata: hello\n\n"


def test_frame_without_id_or_event_has_only_data() -> None:
    assert sse.frame("{}") == b"data: {}\n\n"


def test_frame_keeps_spaces_and_colons_in_data() -> None:
    assert sse.frame("  a: b ") == b"data:   a: b \n\n"
    assert parse_sse(sse.frame("  a: b ")).events[0].data == "  a: b "


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\n\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\r\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),  # \n then \r is two breaks, not one
        ("a\n", b"data: a\ndata: \n\n"),
        ("\nb", b"data: \ndata: b\n\n"),
    ],
)
def test_frame_splits_data_on_every_kind_of_line_break(data: str, expected: bytes) -> None:
    assert sse.frame(data) == expected


def test_frame_does_not_split_on_non_sse_line_separators() -> None:
    # NEL and LINE SEPARATOR are line breaks for str.splitlines(), not for SSE.
    assert sse.frame("a\x85b\u2028c") == "data: a\x85b\u2028c\n\n".encode()


def test_frame_of_empty_data_is_one_empty_data_line() -> None:
    body = sse.frame("")
    assert body == b"data: \n\n"
    # ...which a client still dispatches, as an event with empty data.
    assert parse_sse(body).events == [Parsed("message", "", "")]


def test_frame_encodes_as_utf8() -> None:
    assert sse.frame("héllo ✓ 🎉") == "data: héllo ✓ 🎉\n\n".encode()


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\n", "\n", "a\0b"])
@pytest.mark.parametrize("field", ["id", "event"])
def test_frame_rejects_line_breaks_and_nul_in_id_and_event(field: str, bad: str) -> None:
    with pytest.raises(sse.FieldError, match=field):
        sse.frame("x", **{field: bad})


def test_field_error_is_a_value_error() -> None:
    assert issubclass(sse.FieldError, ValueError)


def test_data_may_contain_nul() -> None:
    # Only id/event are checked: NUL in data is legal SSE.
    assert sse.frame("a\0b") == b"data: a\0b\n\n"


# -- comment() and retry() -------------------------------------------------------------------


def test_comment_lines() -> None:
    assert sse.comment() == b": \n\n"
    assert sse.comment("keepalive") == b": keepalive\n\n"
    assert sse.comment("a\nb\r\nc\rd") == b": a\n: b\n: c\n: d\n\n"


@pytest.mark.parametrize("text", ["", "keepalive", "a\nb", "data: not really\nid: 9"])
def test_comment_dispatches_no_event_and_sets_no_id(text: str) -> None:
    # A comment after an event must not change what the client saw or its last event id.
    body = sse.frame("x", id="1") + sse.comment(text)
    assert parse_sse(body).events == [Parsed("message", "x", "1")]


def test_retry_line() -> None:
    assert sse.retry(1500) == b"retry: 1500\n\n"
    assert sse.retry(0) == b"retry: 0\n\n"
    stream = parse_sse(sse.retry(2500) + sse.frame("x"))
    assert stream.retry == 2500
    assert [e.data for e in stream.events] == ["x"]


# -- encode_event() --------------------------------------------------------------------------


def test_message_event_has_no_event_line() -> None:
    data = protocol.message_data("Hello there. ")
    body = sse.encode_event(Event(7, "message", data, 123))
    assert body == b'id: 0000000007\ndata: {"text":"Hello there. "}\n\n'
    assert b"event:" not in body
    assert parse_sse(body).events == [Parsed("message", data, "0000000007")]


def test_end_event_has_event_line() -> None:
    data = protocol.end_data("stop", {"completion_tokens": 3})
    body = sse.encode_event(Event(12, "end", data, 1))
    assert body == f"id: 0000000012\nevent: end\ndata: {data}\n\n".encode()
    assert parse_sse(body).events == [Parsed("end", data, "0000000012")]


def test_error_event_has_event_line() -> None:
    data = protocol.error_data("worker_lost", "the worker stopped")
    body = sse.encode_event(Event(3, "error", data, 1))
    assert body == f"id: 0000000003\nevent: error\ndata: {data}\n\n".encode()


@pytest.mark.parametrize("new", [
    protocol.new_reasoning("Hmm,\nlet me think. "),
    protocol.new_tool_call(0, "call_1", "f", '{"a":"\\n"}'),
    protocol.new_tool_result("call_1", {"ok": True}),
    protocol.new_data("sources", ["x"]),
])
def test_every_kind_but_message_is_named_in_an_event_line(new: protocol.NewEvent) -> None:
    """A v1 client's ``onmessage`` sees none of these: only unnamed events reach it."""
    body = sse.encode_event(Event(5, new.kind, new.data, 1))
    assert body == f"id: 0000000005\nevent: {new.kind}\ndata: {new.data}\n\n".encode()
    assert parse_sse(body).events == [Parsed(new.kind, new.data, "0000000005")]


@pytest.mark.parametrize("seq", [1, 42, 9_999_999_999])
def test_encode_event_id_is_protocol_event_id(seq: int) -> None:
    body = sse.encode_event(Event(seq, "message", "{}", 0))
    assert parse_sse(body).events[0].last_event_id == protocol.event_id(seq)


def test_stream_of_events_parses_in_order_with_ids() -> None:
    texts = ["One. ", "Two\nlines. ", ""]
    events = [Event(i, "message", protocol.message_data(t), 0) for i, t in enumerate(texts, 1)]
    events.append(Event(4, "end", protocol.end_data("stop", None), 0))
    body = sse.retry(1000) + b"".join(sse.encode_event(e) for e in events) + sse.comment("k")
    parsed = parse_sse(body).events
    assert [p.type for p in parsed] == ["message", "message", "message", "end"]
    assert [p.last_event_id for p in parsed] == [protocol.event_id(i) for i in range(1, 5)]
    assert "".join(json.loads(p.data)["text"] for p in parsed[:3]) == "".join(texts)


# -- properties ------------------------------------------------------------------------------

LINE_BREAKY_TEXT = st.lists(
    st.one_of(st.sampled_from(["\n", "\r", "\r\n", " ", ":", "a", "é"]), st.characters())
).map("".join)


@given(st.one_of(st.text(), LINE_BREAKY_TEXT))
@example("")
@example("\r\n\r\n")
@example("\n\r")
@example("a\r")
@example("\ufeffdata")
def test_any_data_round_trips_through_a_spec_parser(data: str) -> None:
    body = sse.frame(data, id="5")
    assert body.endswith(b"\n\n")
    assert parse_sse(body).events == [Parsed("message", normalise_breaks(data), "5")]


@given(st.one_of(st.text(), LINE_BREAKY_TEXT), st.sampled_from(protocol.EVENT_KINDS),
       st.integers(min_value=0, max_value=10**12))
@example("one line \u2028 \x85 \x00", "message", 1)
@example("two\nlines", "reasoning", 2)
def test_encode_event_writes_what_frame_writes(
    data: str, kind: protocol.EventKind, seq: int
) -> None:
    """``encode_event``'s one-line shortcut and ``frame`` agree on every data and kind."""
    name = None if kind == "message" else kind
    assert sse.encode_event(Event(seq, kind, data, 0)) == sse.frame(
        data, id=protocol.event_id(seq), event=name)


@given(
    st.text().filter(lambda s: not any(c in s for c in "\r\n\0")),
    st.text(min_size=1).filter(lambda s: not any(c in s for c in "\r\n\0")),
)
def test_any_legal_id_and_event_round_trip(id: str, event: str) -> None:
    parsed = parse_sse(sse.frame("x", id=id, event=event)).events
    assert parsed == [Parsed(event, "x", id)]


@given(st.text())
@example("line one\nline two\r\nthree\rfour")
@example('quote " backslash \\ \u2028 \x00')
def test_message_data_frame_round_trips_exactly_via_json(text: str) -> None:
    body = sse.frame(protocol.message_data(text), id=protocol.event_id(1))
    # JSON escapes every line break: id line, one data line, blank line.
    assert b"\r" not in body
    assert body.count(b"\n") == 3
    (parsed,) = parse_sse(body).events
    assert json.loads(parsed.data) == {"text": text}


# -- SSEDecoder: the worker's reader of its LLM's stream ---------------------------------------

# Characters that end a line for ``str.splitlines`` but not for SSE, then CR and LF themselves,
# and characters whose UTF-8 is 2, 3 or 4 bytes (a piece may end inside any of them).
NOT_LINE_ENDS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
TRICKY_CHARS = st.sampled_from([*NOT_LINE_ENDS, "\r", "\n", "é", "汉", "😀", "\ufeff", ":", " "])
LINE_VALUES = st.text(st.one_of(TRICKY_CHARS, st.characters(exclude_characters="\r\n")))
FIELDS = st.sampled_from(["data", "data", "data", "event", "id", "retry", "", "dat", "data "])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """An SSE stream: lines of (mostly) data fields, comments and blank lines, each ended by
    LF, CR or CRLF, values full of characters ``str.splitlines`` breaks at, maybe a BOM."""
    parts = ["\ufeff"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["field", "field", "blank", "comment", "bare"]))
        value = draw(LINE_VALUES).replace("\r", "").replace("\n", "")
        if kind == "field":
            line = f"{draw(FIELDS)}:{draw(st.sampled_from(['', ' ']))}{value}"
        else:
            line = {"blank": "", "comment": f":{value}", "bare": draw(FIELDS)}[kind]
        parts.append(line + draw(st.sampled_from(["\n", "\r", "\r\n"])))
    return "".join(parts).encode()


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(body) + 1) for c in cuts}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def decode_pieces(pieces: list[bytes]) -> tuple[list[str], list[str]]:
    """What the decoder dispatches while fed ``pieces``, and what ``end()`` adds."""
    decoder = sse.SSEDecoder()
    fed = [data for piece in pieces for data in decoder.feed(piece)]
    return fed, decoder.end()


@given(sse_streams(), st.lists(st.integers(min_value=0), max_size=30))
@example(b"data: a\r\n\r\n", [8])  # CR | LF: one line end, then the blank line
@example(b"data: a\r\r", [8])  # CR | CR: two line ends (the second is the blank line)
@example("data: \u2028x\u0085\n\n".encode(), [7, 8, 11])  # inside U+2028 and U+0085
@example("\ufeffdata: x\n\n".encode(), [1, 2])  # inside the BOM
def test_decoder_dispatches_what_the_spec_does_for_any_split(body: bytes, cuts: list[int]):
    fed, _ = decode_pieces(split_at(body, cuts))
    assert fed == [e.data for e in parse_sse(body).events]


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=30))
def test_decoder_reads_any_bytes_as_the_spec_does_for_any_split(body: bytes, cuts: list[int]):
    fed, _ = decode_pieces(split_at(body, cuts))
    assert fed == [e.data for e in parse_sse(body).events]


def test_decoder_keeps_every_character_splitlines_would_break_at():
    text = f"a{NOT_LINE_ENDS}b é 汉字 😀 e\u0301"
    body = b"data: " + json.dumps({"t": text}, ensure_ascii=False).encode() + b"\r\n\r\n"
    one_byte_pieces = [body[i : i + 1] for i in range(len(body))]
    for pieces in ([body], one_byte_pieces):
        fed, rest = decode_pieces(pieces)
        assert [json.loads(d) for d in fed] == [{"t": text}] and rest == []


def test_decoder_joins_data_lines_and_skips_comments_and_other_fields():
    body = (b": a comment\nevent: chunk\ndata: {\"a\":1}\n\n\nretry: 5\n\n"
            b"data:first\rdata:  second\r\nid: 7\n\ndata\n\n")
    assert decode_pieces([body]) == (['{"a":1}', "first\n second", ""], [])


def test_decoder_drops_only_a_bom_that_opens_the_stream():
    fed, _ = decode_pieces([b"\xef", b"\xbb", b"\xbfdata: x\n\ndata: \xef\xbb\xbfy\n\n"])
    assert fed == ["x", "\ufeffy"]
    fed, _ = decode_pieces([b"data: x\n\n\xef\xbb\xbfdata: y\n\n"])
    assert fed == ["x"]  # a BOM later on is part of a line, whose field is then not "data"


def test_decoder_end_hands_on_what_the_stream_was_cut_in():
    # The spec drops an event the stream ends in; the worker wants to see it (see end()).
    assert decode_pieces([b"data: a\n\ndata: [DONE]"]) == (["a"], ["[DONE]"])
    assert decode_pieces([b'data: {"cut', b'": 1\n']) == ([], ['{"cut": 1'])
    assert decode_pieces([b"data: a\n\n"]) == (["a"], [])


# -- SSEEventDecoder: broker.client's reader of an edge's stream ---------------------------------


def decode_events(pieces: list[bytes]) -> tuple[list[Parsed], int | None]:
    decoder = sse.SSEEventDecoder()
    events = [Parsed(e.event, e.data, e.id) for piece in pieces for e in decoder.feed(piece)]
    return events, decoder.retry


@given(sse_streams(), st.lists(st.integers(min_value=0), max_size=30))
@example(b"retry: 5\r\nid: 1\r\nevent: end\r\ndata: a\r\n\r\n", [9, 10])
@example("id: \u2028\ndata: x\u2028y\n\ndata: z\n\n".encode(), [5, 12])  # id kept for z
@example(b"id: 1\ndata: a\n\nid: 2\x00\ndata: b\n\n", [])  # an id with NUL is ignored
def test_event_decoder_dispatches_what_the_spec_does_for_any_split(body: bytes, cuts: list[int]):
    expected = parse_sse(body)
    assert decode_events(split_at(body, cuts)) == (expected.events, expected.retry)


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=30))
def test_event_decoder_reads_any_bytes_as_the_spec_does(body: bytes, cuts: list[int]):
    expected = parse_sse(body)
    assert decode_events(split_at(body, cuts)) == (expected.events, expected.retry)


def test_event_decoder_reads_back_what_the_edge_frames():
    text = f"a{NOT_LINE_ENDS}b\r\nc 汉字 😀"
    events = [Event(1, "message", protocol.message_data(text), 0),
              Event(2, "end", protocol.end_data("stop", None), 0)]
    body = sse.retry(1500) + sse.comment("keepalive") + b"".join(map(sse.encode_event, events))
    one_byte_pieces = [body[i : i + 1] for i in range(len(body))]
    for pieces in ([body], one_byte_pieces):
        parsed, retry = decode_events(pieces)
        assert retry == 1500
        assert [(p.type, p.last_event_id) for p in parsed] == [("message", "0000000001"),
                                                               ("end", "0000000002")]
        assert json.loads(parsed[0].data) == {"text": text}


def test_event_decoder_drops_an_event_the_stream_ends_in():
    assert decode_events([b"data: a\n\ndata: cut short"]) == ([Parsed("message", "a", "")], None)
