"""What clients send: create bodies and the resume cursor."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from openai import AsyncOpenAI
from openai.types.chat import completion_create_params

from broker.core import protocol
from broker.core.protocol import SDK_CALL_OPTIONS
from broker.edge.errors import ApiError
from broker.edge.validation import (
    MAX_JSON_DEPTH,
    MAX_MODEL_CHARS,
    parse_create_body,
    parse_last_event_id,
)
from tests.support.hostile import HOSTILE_BODIES, body_with, hostile_bodies
from tests.support.hostile import SDK_CALL_OPTIONS as HOSTILE_SDK_CALL_OPTIONS

DEFAULT_MODEL = "default-model"
MESSAGES = [{"role": "user", "content": "Hello"}]


def parse(body: Any) -> dict[str, Any]:
    return parse_create_body(json.dumps(body).encode(), DEFAULT_MODEL)


def api_error(body: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_create_body(body, DEFAULT_MODEL)
    return info.value


# -- parse_create_body: accepted -------------------------------------------------------------


def test_minimal_body_gets_the_default_model() -> None:
    assert parse({"messages": MESSAGES}) == {"messages": MESSAGES, "model": DEFAULT_MODEL}


def test_null_model_gets_the_default_model() -> None:
    assert parse({"messages": MESSAGES, "model": None})["model"] == DEFAULT_MODEL


def test_explicit_model_is_kept() -> None:
    assert parse({"messages": MESSAGES, "model": "llama-3"})["model"] == "llama-3"


def test_sampling_and_unknown_fields_pass_through_unchanged() -> None:
    extra = {
        "temperature": 0.7,
        "max_tokens": 64,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": 1234,
        "top_k": 40,
        "metadata": {"nested": [1, {"x": None}]},
    }
    request = parse({"messages": MESSAGES, "model": "m", **extra})
    assert request == {"messages": MESSAGES, "model": "m", **extra}


def test_messages_are_kept_in_order_with_extra_keys() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "héllo\n🎉"},
    ]
    assert parse({"messages": messages})["messages"] == messages


@pytest.mark.parametrize(
    "broker_fields",
    [
        {"stream": False},
        {"stream": True, "stream_options": {"include_usage": False}},
        {"stream_options": None},
    ],
)
def test_stream_fields_are_stripped(broker_fields: dict[str, Any]) -> None:
    request = parse({"messages": MESSAGES, "temperature": 0, **broker_fields})
    assert "stream" not in request
    assert "stream_options" not in request
    assert request["temperature"] == 0


def test_n_of_one_is_accepted() -> None:
    assert parse({"messages": MESSAGES, "n": 1})["n"] == 1


def test_utf8_body_with_unicode_is_accepted() -> None:
    body = '{"messages": [{"role": "user", "content": "ünï 🎉"}]}'.encode()
    assert parse_create_body(body, DEFAULT_MODEL)["messages"][0]["content"] == "ünï 🎉"


# -- parse_create_body: rejected -------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b"{'messages': []}", b"not json", b'{"a": 1,}'])
def test_malformed_json_is_400_invalid_json(body: bytes) -> None:
    error = api_error(body)
    assert (error.status, error.code) == (400, "invalid_json")
    assert error.message


def test_non_utf8_body_is_400() -> None:
    error = api_error(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert (error.status, error.code) == (400, "invalid_json")


@pytest.mark.parametrize("body", [[], [{"messages": MESSAGES}], "hello", None, 1, True])
def test_non_object_body_is_422(body: Any) -> None:
    error = api_error(json.dumps(body).encode())
    assert (error.status, error.code) == (422, "invalid_request")


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(..., id="missing"),
        pytest.param([], id="empty"),
        pytest.param(None, id="null"),
        pytest.param("Hello", id="string"),
        pytest.param({"role": "user", "content": "x"}, id="object"),
        pytest.param(["Hello"], id="item-string"),
        pytest.param([None], id="item-null"),
        pytest.param([["user", "x"]], id="item-list"),
        pytest.param([{"content": "x"}], id="role-missing"),
        pytest.param([{"role": 1, "content": "x"}], id="role-int"),
        pytest.param([{"role": None, "content": "x"}], id="role-null"),
        pytest.param([{"role": "user"}], id="content-missing"),
        pytest.param([{"role": "user", "content": None}], id="content-null"),
        pytest.param([{"role": "user", "content": 5}], id="content-int"),
        pytest.param([{"role": "user", "content": ["x"]}], id="content-list"),
        pytest.param([*MESSAGES, {"role": "user", "content": {}}], id="second-bad"),
    ],
)
def test_bad_messages_are_422(messages: Any) -> None:
    body = {} if messages is ... else {"messages": messages}
    error = api_error(json.dumps(body).encode())
    assert (error.status, error.code) == (422, "invalid_request")
    assert "messages" in error.message


@pytest.mark.parametrize("model", ["", "   ", 5, ["m"], {"name": "m"}, False])
def test_bad_model_is_422(model: Any) -> None:
    error = api_error(json.dumps({"messages": MESSAGES, "model": model}).encode())
    assert (error.status, error.code) == (422, "invalid_request")
    assert "model" in error.message


@pytest.mark.parametrize("n", [2, 0, 10, True, 1.0, "1", None])
def test_n_other_than_one_is_422(n: object) -> None:
    error = api_error(json.dumps({"messages": MESSAGES, "n": n}).encode())
    assert (error.status, error.code) == (422, "invalid_request")
    assert "'n'" in error.message


def test_api_error_carries_status_code_and_message() -> None:
    error = ApiError(418, "teapot", "short and stout")
    assert (error.status, error.code, error.message, str(error)) == (
        418, "teapot", "short and stout", "short and stout"
    )


# -- parse_last_event_id ---------------------------------------------------------------------


def test_no_cursor_means_from_the_start() -> None:
    assert parse_last_event_id(None, None) == 0
    assert parse_last_event_id("", "") == 0
    assert parse_last_event_id("", None) == 0


def test_header_is_parsed() -> None:
    assert parse_last_event_id(protocol.event_id(42), None) == 42


def test_query_is_used_without_a_header() -> None:
    assert parse_last_event_id(None, protocol.event_id(7)) == 7


def test_header_wins_over_query() -> None:
    # EventSource keeps its first URL's query on reconnect but updates the header.
    assert parse_last_event_id(protocol.event_id(9), protocol.event_id(3)) == 9


def test_empty_header_falls_back_to_query() -> None:
    assert parse_last_event_id("", protocol.event_id(3)) == 3


def test_header_wins_even_over_a_malformed_query() -> None:
    assert parse_last_event_id("5", "garbage") == 5


@pytest.mark.parametrize(
    ("header", "query"),
    [("abc", None), (None, "abc"), ("-1", None), ("1-2", None), ("1" * 19, None),
     ("abc", "5"), ("1.5", None)],
)
def test_malformed_cursor_is_400(header: str | None, query: str | None) -> None:
    with pytest.raises(ApiError) as info:
        parse_last_event_id(header, query)
    assert (info.value.status, info.value.code) == (400, "invalid_last_event_id")


OPTIONAL_TEXT = st.none() | st.text() | st.from_regex(r"\A[0-9\s]{0,20}\Z")


@given(OPTIONAL_TEXT, OPTIONAL_TEXT)
def test_last_event_id_either_parses_or_is_a_400(header: str | None, query: str | None) -> None:
    try:
        cursor = parse_last_event_id(header, query)
    except ApiError as e:
        assert (e.status, e.code) == (400, "invalid_last_event_id")
    else:
        assert isinstance(cursor, int)
        assert 0 <= cursor < 10**18


@given(
    st.text(alphabet="0123456789 \t\r\n", min_size=1).filter(lambda s: "\n" in s or "\r" in s)
    | st.text().filter(lambda s: "\n" in s or "\r" in s)
)
@example("1\n")
def test_last_event_id_with_a_line_break_is_never_accepted(value: str) -> None:
    for header, query in ((value, None), (None, value)):
        with pytest.raises(ApiError):
            parse_last_event_id(header, query)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=5),
    max_leaves=20,
)
CREATE_BODIES = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": JSON_VALUES, "content": JSON_VALUES}),
                          max_size=6) | JSON_VALUES},
    optional={"model": JSON_VALUES, "n": JSON_VALUES, "temperature": JSON_VALUES},
)


@given(st.one_of(CREATE_BODIES.map(json.dumps), JSON_VALUES.map(json.dumps),
                 st.text().map(str), st.binary().map(bytes), hostile_bodies))
def test_any_create_body_is_accepted_or_refused_with_a_4xx(body: str | bytes) -> None:
    raw = body.encode() if isinstance(body, str) else body
    try:
        request = parse_create_body(raw, "default-model", max_messages=4, max_content_chars=50)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.code and e.message
        return
    assert isinstance(request["model"], str) and request["model"]
    assert 1 <= len(request["messages"]) <= 4
    assert all(isinstance(m["content"], str) and len(m["content"]) <= 50
               for m in request["messages"])
    assert "stream" not in request and "stream_options" not in request


@pytest.mark.parametrize("escaped", ['"\\ud800"', '"a\\udbf3b"', '"\\udc00\\ud800"'])
@pytest.mark.parametrize("where", ["content", "role", "extra"])
def test_unpaired_surrogates_are_refused_not_crashed_on(escaped: str, where: str) -> None:
    role = escaped if where == "role" else '"user"'
    content = escaped if where == "content" else '"hi"'
    extra = f', "user": {escaped}' if where == "extra" else ""
    body = f'{{"messages": [{{"role": {role}, "content": {content}}}]{extra}}}'.encode()
    with pytest.raises(ApiError) as e:
        parse_create_body(body, DEFAULT_MODEL)
    assert (e.value.status, e.value.code) == (400, "invalid_json")


def test_paired_surrogate_escapes_are_fine() -> None:
    body = b'{"messages": [{"role": "user", "content": "\\ud83c\\udf89 party"}]}'
    assert parse_create_body(body, DEFAULT_MODEL)["messages"][0]["content"] == "\U0001f389 party"


# -- hostile bodies (issue 13): each a 4xx here, never an exception or a late failure ----------


@pytest.mark.parametrize("label", list(HOSTILE_BODIES))
def test_hostile_json_is_400_invalid_json(label: str) -> None:
    error = api_error(HOSTILE_BODIES[label])
    assert (error.status, error.code) == (400, "invalid_json")
    assert "Traceback" not in error.message and "sys." not in error.message


def test_nesting_is_bounded_at_the_documented_depth() -> None:
    # The body is level 1: arrays nested 63 deep in one of its fields reach level 64.
    deepest = MAX_JSON_DEPTH - 1
    assert parse_create_body(body_with("metadata", "[" * deepest + "]" * deepest), "m")
    error = api_error(body_with("metadata", "[" * (deepest + 1) + "]" * (deepest + 1)))
    assert (error.status, error.code) == (400, "invalid_json")


def test_finite_numbers_and_long_integers_within_the_limit_pass() -> None:
    request = parse_create_body(body_with("seed", "7" * 4300), "m")
    assert request["seed"] == int("7" * 4300)
    assert parse_create_body(body_with("temperature", "1e308"), "m")["temperature"] == 1e308


@pytest.mark.parametrize("option", sorted(SDK_CALL_OPTIONS))
def test_sdk_call_options_are_422(option: str) -> None:
    error = api_error(body_with(option, "{}"))
    assert (error.status, error.code) == (422, "invalid_request")
    assert option in error.message


def test_the_refused_options_are_every_call_option_of_the_sdk() -> None:
    """What the openai SDK's ``chat.completions.create`` takes besides the request body's
    fields: a new call option in an SDK upgrade fails here until it is refused too."""
    client = AsyncOpenAI(api_key="unused")
    parameters = set(inspect.signature(client.chat.completions.create).parameters)
    body = completion_create_params.CompletionCreateParamsStreaming
    assert parameters - (body.__required_keys__ | body.__optional_keys__) == SDK_CALL_OPTIONS
    assert set(HOSTILE_SDK_CALL_OPTIONS) == SDK_CALL_OPTIONS


def test_the_model_name_is_bounded() -> None:
    assert parse({"messages": MESSAGES, "model": "m" * MAX_MODEL_CHARS})["model"]
    error = api_error(json.dumps({"messages": MESSAGES, "model": "m" * (MAX_MODEL_CHARS + 1)})
                      .encode())
    assert (error.status, error.code) == (422, "invalid_request")


@given(hostile_bodies)
@example(HOSTILE_BODIES["nested 100k deep"])
def test_any_hostile_body_is_a_4xx(body: bytes) -> None:
    try:
        request = parse_create_body(body, DEFAULT_MODEL)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.code and e.message
        return
    # What passes is what every later step can carry: finite, shallow, no call options.
    assert not SDK_CALL_OPTIONS & request.keys()
    json.dumps(request, allow_nan=False)
