"""The wire contract: Redis names, ids, live payloads, log entries, jobs and meta hashes."""

from __future__ import annotations

import json
from collections.abc import Callable

import fakeredis
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from redis import exceptions as redis_exceptions

from broker.core import protocol
from broker.core.protocol import Event, ProtocolError

# -- Redis Cluster key slots, per the cluster spec: CRC16-XMODEM of the hash tag, mod 16384 ---


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it has a non-empty ``{...}`` tag."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return None
    return key[start + 1 : end]


def key_slot(key: str) -> int:
    tag = hash_tag(key)
    return crc16_xmodem((key if tag is None else tag).encode()) % 16384


def test_slot_helpers_match_the_redis_cluster_spec() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the spec's reference value
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    # The spec's examples of which part is hashed.
    assert hash_tag("foo{}{bar}") is None
    assert hash_tag("foo{{bar}}zap") == "{bar"
    assert hash_tag("foo{bar}{zap}") == "bar"


GEN_IDS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
                  min_size=22, max_size=22)


def all_names(gen_id: str) -> list[str]:
    return [
        protocol.meta_key(gen_id),
        protocol.log_key(gen_id),
        protocol.text_key(gen_id),
        protocol.live_channel(gen_id),
    ]


@given(GEN_IDS)
@example("AAAAAAAAAAAAAAAAAAAAAA")
def test_all_names_of_a_generation_share_one_hash_tag_and_slot(gen_id: str) -> None:
    names = all_names(gen_id)
    assert len(set(names)) == 4  # distinct keys...
    assert {hash_tag(n) for n in names} == {f"gen:{gen_id}"}  # ...one tag
    assert len({key_slot(n) for n in names}) == 1
    for name in names:
        assert name.startswith("{gen:" + gen_id + "}:")


def test_names_have_the_documented_suffixes() -> None:
    gen_id = protocol.new_generation_id()
    assert protocol.meta_key(gen_id) == "{gen:" + gen_id + "}:meta"
    assert protocol.log_key(gen_id) == "{gen:" + gen_id + "}:log"
    assert protocol.text_key(gen_id) == "{gen:" + gen_id + "}:text"
    assert protocol.live_channel(gen_id) == "{gen:" + gen_id + "}:live"


def test_different_generations_have_different_tags() -> None:
    a, b = protocol.new_generation_id(), protocol.new_generation_id()
    assert hash_tag(protocol.meta_key(a)) != hash_tag(protocol.meta_key(b))


@given(GEN_IDS)
def test_gen_id_of_channel_inverts_live_channel(gen_id: str) -> None:
    assert protocol.gen_id_of_channel(protocol.live_channel(gen_id)) == gen_id


# -- generation ids --------------------------------------------------------------------------


def test_new_generation_ids_are_22_url_safe_chars_and_unique() -> None:
    ids = [protocol.new_generation_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for gen_id in ids:
        assert len(gen_id) == 22
        assert protocol.is_generation_id(gen_id)
    # 22 base64url chars carry 132 bits; token_urlsafe(16) fills 128 of them. Every position
    # must actually vary (a constant prefix or suffix would silently cut the entropy).
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # Except that no id starts with "-", which a command line would take for an option.
    assert {gen_id[0] for gen_id in ids} == alphabet - {"-"}
    for position in range(1, 21):  # 21 full positions: 126 bits
        assert {gen_id[position] for gen_id in ids} == alphabet
    assert len({gen_id[21] for gen_id in ids}) >= 4  # the last one carries at least 2 more


@pytest.mark.parametrize(
    "value",
    ["", "short", "A" * 21, "A" * 23, "A" * 21 + "!", "A" * 21 + "/", "A" * 21 + "+",
     "A" * 21 + "=", "\n" + "A" * 22, "{gen:" + "A" * 17, "A" * 21 + "é", "A" * 21 + "}"],
)
def test_is_generation_id_rejects_anything_else(value: str) -> None:
    assert not protocol.is_generation_id(value)


def test_is_generation_id_rejects_a_trailing_newline() -> None:
    assert not protocol.is_generation_id("A" * 22 + "\n")


# -- event ids -------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**18 - 1))
@example(0)
@example(1)
@example(10**10 - 1)
@example(10**10)
def test_event_id_round_trips(seq: int) -> None:
    assert protocol.parse_event_id(protocol.event_id(seq)) == seq


def test_event_ids_are_zero_padded() -> None:
    assert protocol.event_id(1) == "0000000001"
    assert protocol.event_id(1234) == "0000001234"


@given(st.integers(0, 10**10 - 1), st.integers(0, 10**10 - 1))
@example(9, 10)
@example(99, 100)
def test_event_ids_sort_as_strings_in_numeric_order(a: int, b: int) -> None:
    ida, idb = protocol.event_id(a), protocol.event_id(b)
    assert (ida < idb) == (a < b)
    assert (ida == idb) == (a == b)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "1-2", "-1", "+1", " 1", "1 ", "1\n2", "\n1", "1.0", "1e3", "1_000", "0x10",
     "١٢", "1" * 19, "9" * 40],
)
def test_parse_event_id_rejects_garbage(value: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_event_id(value)


def test_parse_event_id_rejects_a_trailing_newline() -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_event_id("1\n")


def test_parse_event_id_accepts_up_to_18_digits() -> None:
    assert protocol.parse_event_id("9" * 18) == 10**18 - 1
    assert protocol.parse_event_id("0000000000") == 0


# -- live payloads ---------------------------------------------------------------------------

def publish_through_the_script(event: Event) -> tuple[bytes, Event]:
    """``event`` published by the real ``PUBLISH_SCRIPT`` (fakeredis runs its Lua): the live
    payload a subscriber receives, and the event read back from the log."""
    redis = fakeredis.FakeRedis()
    gen_id = protocol.new_generation_id()
    meta, log = protocol.meta_key(gen_id), protocol.log_key(gen_id)
    redis.hset(meta, mapping={"status": "running", "owner": "w", "seq": str(event.seq - 1)})
    channel = protocol.live_channel(gen_id)
    subscriber = redis.pubsub()
    subscriber.subscribe(channel)
    confirmation = subscriber.get_message(timeout=1)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    new = protocol.NewEvent(event.kind, event.data, "",
                            "completed" if event.terminal else "", "x" if event.terminal else "")
    published = redis.register_script(protocol.PUBLISH_SCRIPT)(
        keys=protocol.generation_keys(gen_id),
        args=protocol.publish_args("w", event.seq, [new], event.published_ms, maxlen=100,
                                   ttl_ms=60_000, channel=channel, publish_cmd="PUBLISH"),
    )
    assert published == 1
    message = subscriber.get_message(timeout=1)
    assert message is not None
    entry_id, fields = redis.xrange(log)[0]
    return message["data"], protocol.decode_log_entry(entry_id, fields)


SCRIPT_EVENTS = st.builds(
    Event,
    # Lua numbers print in %.14g: a seq is a generation's event count, far below that.
    seq=st.integers(min_value=1, max_value=10**12),
    kind=st.sampled_from(protocol.EVENT_KINDS),
    data=st.text(st.characters(exclude_categories=("Cs",))),
    published_ms=st.integers(min_value=0, max_value=2**53),
)


@given(SCRIPT_EVENTS)
@example(Event(1, "message", '{"text":"a b  c "}', 5))
@example(Event(2, "message", " leading and trailing ", 5))
@example(Event(3, "end", "", 5))
@example(Event(4, "error", "ünïcødé 🎉 \n two lines \u2028", 5))
@example(Event(5, "reasoning", '{"text":"Hmm. "}', 5))
@example(Event(6, "tool_call", '{"index":0,"id":"c","name":"f","arguments":"{\\"a\\":1}"}', 5))
@example(Event(7, "tool_result", '{"id":"c","result":[1,"two"]}', 5))
@example(Event(8, "data", '{"name":"sources","value":null}', 5))
def test_what_the_publish_script_sends_live_and_logs_decodes_to_the_event(event: Event) -> None:
    payload, logged = publish_through_the_script(event)
    assert protocol.decode_payload(payload) == event
    assert protocol.decode_payload(payload.decode()) == event
    assert logged == event


@pytest.mark.parametrize(
    "payload",
    ["", "1", "1 message", "1 message 5", "x message 5 {}", "1 bogus 5 {}", "1 message x {}",
     "1 Message 5 {}", "1  message 5 {}", b"1 end", b"one end 2 {}"],
)
def test_malformed_payloads_are_protocol_errors(payload: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_payload(payload)


def test_non_utf8_payload_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_payload(b"1 message 5 \xff\xfe")


# -- log entries -----------------------------------------------------------------------------


def test_decode_log_entry_with_str_fields() -> None:
    event = protocol.decode_log_entry(
        "0-12", {"k": "message", "d": '{"text":"a b"}', "t": "1700000000000"}
    )
    assert event == Event(12, "message", '{"text":"a b"}', 1700000000000)
    assert not event.terminal


def test_decode_log_entry_with_bytes_fields() -> None:
    data = protocol.end_data("stop", None)
    event = protocol.decode_log_entry(
        b"0-3", {b"k": b"end", b"d": data.encode(), b"t": b"42"}
    )
    assert event == Event(3, "end", data, 42)
    assert event.terminal


def test_decode_log_entry_utf8_data() -> None:
    data = protocol.message_data("héllo 🎉")
    event = protocol.decode_log_entry(b"0-1", {b"k": b"message", b"d": data.encode(), b"t": b"1"})
    assert json.loads(event.data) == {"text": "héllo 🎉"}


def test_log_entry_id_is_stream_id() -> None:
    assert protocol.stream_id(12) == "0-12"
    fields = {"k": "message", "d": "{}", "t": "0"}
    assert protocol.decode_log_entry(protocol.stream_id(12), fields).seq == 12


@pytest.mark.parametrize(
    ("entry_id", "fields"),
    [
        ("0-1", {"d": "{}", "t": "1"}),
        ("0-1", {"k": "message", "t": "1"}),
        ("0-1", {"k": "message", "d": "{}"}),
        ("0-1", {"k": "bogus", "d": "{}", "t": "1"}),
        ("0-1", {"k": "message", "d": "{}", "t": "soon"}),
        ("1", {"k": "message", "d": "{}", "t": "1"}),
        ("0-x", {"k": "message", "d": "{}", "t": "1"}),
        (b"0-1", {b"k": b"\xff", b"d": b"{}", b"t": b"1"}),
    ],
)
def test_malformed_log_entries_are_protocol_errors(entry_id: str, fields: dict) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_log_entry(entry_id, fields)


# -- jobs ------------------------------------------------------------------------------------

REQUESTS = st.dictionaries(
    st.text(),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    ),
    max_size=5,
)


@given(GEN_IDS, REQUESTS)
@example(
    "A" * 22,
    {"model": "m", "messages": [{"role": "user", "content": "héllo\n🎉"}], "temperature": 0.5},
)
def test_job_round_trips_as_str_and_bytes(gen_id: str, request: dict) -> None:
    fields = protocol.encode_job({"gen": gen_id, "request": request})
    assert all(isinstance(v, str) for v in fields.values())
    assert protocol.decode_job(fields) == {"gen": gen_id, "request": request}
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}
    assert protocol.decode_job(as_bytes) == {"gen": gen_id, "request": request}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"request": "{}"},
        {"gen": "A" * 22},
        {"gen": "A" * 22, "request": "not json"},
        {"gen": "A" * 22, "request": ""},
        {b"gen": b"A" * 22, b"request": b"\xff{}"},
    ],
)
def test_malformed_jobs_are_protocol_errors(fields: dict) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_job(fields)


# -- meta ------------------------------------------------------------------------------------


def test_decode_meta_of_an_empty_hash_is_none() -> None:
    assert protocol.decode_meta({}) is None


def test_decode_meta_with_bytes_values() -> None:
    meta = protocol.decode_meta(
        {b"status": b"completed", b"seq": b"17", b"finish_reason": b"stop", b"model": b"m1",
         b"created": b"1700000000000", b"owner": b"w1"}
    )
    assert meta == protocol.Meta("completed", 17, "stop", "m1", 1700000000000)
    assert meta is not None and meta.finished


def test_decode_meta_defaults_missing_and_empty_optionals() -> None:
    meta = protocol.decode_meta({"status": "running", "finish_reason": ""})
    assert meta == protocol.Meta("running", 0, None, "", 0)
    assert meta is not None and not meta.finished


def test_decode_meta_of_new_meta() -> None:
    meta = protocol.decode_meta(protocol.new_meta("gpt-x"))
    assert meta is not None
    assert (meta.status, meta.seq, meta.model, meta.finish_reason) == ("queued", 0, "gpt-x", None)
    assert meta.created_ms > 0


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_terminal_statuses_are_finished(status: str) -> None:
    meta = protocol.decode_meta({"status": status})
    assert meta is not None and meta.finished


@pytest.mark.parametrize(
    "raw", [{"seq": "1"}, {"status": "running", "seq": "x"}, {"status": "queued", "created": "?"}]
)
def test_malformed_meta_is_a_protocol_error(raw: dict) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_meta(raw)


# -- typed events and batches ----------------------------------------------------------------


def test_the_kinds_are_one_list_and_content_kinds_exclude_the_terminal_ones() -> None:
    assert protocol.EVENT_KINDS == (
        "message", "reasoning", "tool_call", "tool_result", "data", "end", "error")
    assert protocol.CONTENT_KINDS == ("message", "reasoning", "tool_call", "tool_result", "data")
    assert {"end", "error"} == protocol.TERMINAL_KINDS


def test_builders_write_compact_json_with_characters_as_themselves() -> None:
    assert protocol.new_message("Hé 🎉\u2028") == protocol.NewEvent(
        "message", '{"text":"Hé 🎉\u2028"}', "Hé 🎉\u2028")
    assert protocol.new_reasoning("Hmm.") == protocol.NewEvent("reasoning", '{"text":"Hmm."}',
                                                               "Hmm.")
    call = protocol.new_tool_call(1, "call_1", "get_weather", '{"city": "Paris"')
    assert call == protocol.NewEvent(
        "tool_call",
        '{"index":1,"id":"call_1","name":"get_weather","arguments":"{\\"city\\": \\"Paris\\""}')
    assert protocol.new_tool_result("call_1", {"temp": 21}).data == (
        '{"id":"call_1","result":{"temp":21}}')
    assert protocol.new_data("sources", ["a", 1]).data == '{"name":"sources","value":["a",1]}'
    end = protocol.new_end("tool_calls", None)
    assert (end.kind, end.final_status, end.finish_reason) == ("end", "completed", "tool_calls")
    cancelled = protocol.new_end("cancelled", None)
    assert (cancelled.final_status, cancelled.finish_reason) == ("cancelled", "cancelled")
    error = protocol.new_error("producer_error", "boom")
    assert (error.kind, error.final_status, error.finish_reason) == ("error", "failed", "error")
    assert json.loads(error.data) == {"code": "producer_error", "message": "boom"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"x": [float("-inf")]}])
def test_builders_refuse_what_json_parse_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        protocol.new_data("x", value)
    with pytest.raises(ValueError):
        protocol.new_tool_result("c", value)


class ScriptedGeneration:
    """One running generation on fakeredis, published to through the real scripts."""

    def __init__(self, source: str | None = None) -> None:
        self.redis = fakeredis.FakeRedis()
        self.gen_id = protocol.new_generation_id()
        self.keys = protocol.generation_keys(self.gen_id)
        meta = {"status": "running", "owner": "w", "seq": "0", "lease": "0", "lease_ttl": "1"}
        if source:
            meta["source"] = source
        self.redis.hset(self.keys[0], mapping=meta)
        self.subscriber = self.redis.pubsub()
        self.subscriber.subscribe(protocol.live_channel(self.gen_id))
        assert self.subscriber.get_message(timeout=1) is not None  # the confirmation
        self.publish_script = self.redis.register_script(protocol.PUBLISH_SCRIPT)

    def publish(self, seq: int, events: list[protocol.NewEvent], ts: int = 7) -> object:
        return self.publish_script(keys=self.keys, args=self.args(seq, events, ts))

    def args(self, seq: int, events: list[protocol.NewEvent], ts: int = 7) -> list[str | int]:
        return protocol.publish_args(
            "w", seq, events, ts, maxlen=1000, ttl_ms=60_000,
            channel=protocol.live_channel(self.gen_id), publish_cmd="PUBLISH")

    def live(self) -> list[Event]:
        events = []
        while (message := self.subscriber.get_message(timeout=0.05)) is not None:
            events.append(protocol.decode_payload(message["data"]))
        return events

    def log(self) -> list[Event]:
        return [protocol.decode_log_entry(i, f) for i, f in self.redis.xrange(self.keys[1])]

    def meta(self) -> protocol.Meta:
        meta = protocol.decode_meta(self.redis.hgetall(self.keys[0]))
        assert meta is not None
        return meta

    def state(self) -> tuple[object, ...]:
        """Everything a publish may write."""
        return (self.redis.hgetall(self.keys[0]), self.log(),
                *(self.redis.dump(k) for k in self.keys[2:]))


MIXED = [
    protocol.new_reasoning("Let me think. "),
    protocol.new_reasoning("The user wants weather."),
    protocol.new_message("Checking. "),
    protocol.new_tool_call(0, "call_a", "get_weather", '{"city":"Zürich"}'),
    protocol.new_tool_call(1, "call_b", "get_time", ""),
    protocol.new_tool_result("call_a", {"temp": 21}),
    protocol.new_data("sources", [{"url": "https://example.com"}]),
    protocol.new_message("It is 21 °C."),
]


def test_a_batch_is_numbered_in_order_logged_published_aggregated_and_counted() -> None:
    gen = ScriptedGeneration()
    assert gen.publish(1, MIXED[:3]) == 1
    assert gen.publish(4, [*MIXED[3:], protocol.new_end("tool_calls", {"total_tokens": 3})]) == 1
    kinds = [e.kind for e in [*MIXED, protocol.new_end("tool_calls", None)]]
    logged = gen.log()
    assert [(e.seq, e.kind) for e in logged] == list(enumerate(kinds, start=1))
    assert [e.data for e in logged[:-1]] == [e.data for e in MIXED]
    assert gen.live() == logged  # the live payloads are the logged events, in order
    meta = gen.meta()
    assert (meta.status, meta.seq, meta.finish_reason) == ("completed", 9, "tool_calls")
    assert meta.event_counts() == {
        "message": 2, "reasoning": 2, "tool_call": 2, "tool_result": 1, "data": 1}
    assert gen.redis.get(protocol.text_key(gen.gen_id)).decode() == "Checking. It is 21 °C."
    reasoning = gen.redis.get(protocol.reasoning_key(gen.gen_id)).decode()
    assert reasoning == "Let me think. The user wants weather."
    tools = gen.redis.lrange(protocol.tools_key(gen.gen_id), 0, -1)
    assert [protocol.decode_tool_call(t) for t in tools] == [
        {"index": 0, "id": "call_a", "name": "get_weather", "arguments": '{"city":"Zürich"}'},
        {"index": 1, "id": "call_b", "name": "get_time", "arguments": ""}]
    for key in gen.keys:
        assert 0 < gen.redis.pttl(key) <= 60_000  # every key keeps the retention


def test_a_retried_batch_is_a_no_op_and_a_gap_is_refused() -> None:
    gen = ScriptedGeneration()
    assert gen.publish(1, MIXED[:2]) == 1
    before = gen.state()
    assert gen.publish(1, MIXED[:2]) == 0  # a retry after a lost reply
    assert gen.publish(4, MIXED[2:3]) == -2  # seq 3 missing
    assert gen.state() == before


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda args: args[: protocol.PUBLISH_FIRST_EVENT_ARG - 1], "triples"),  # no event
        (lambda args: args[:-1], "triples"),  # a partial triple
        (lambda args: [*args[:-3], "bogus", "{}", ""], "unknown event kind"),
        (lambda args: [*args[:-3], "MESSAGE", "{}", ""], "unknown event kind"),
        (lambda args: [*args[:-6], *args[-3:], *args[-6:-3]], "terminal event must be the last"),
        (lambda args: [*args[:7], "", "", *args[9:]], "final status"),  # an end, no status
    ],
)
def test_a_malformed_batch_writes_nothing(mangle: Callable[[list], list], error: str) -> None:
    gen = ScriptedGeneration()
    assert gen.publish(1, MIXED[:1]) == 1
    gen.live()
    before = gen.state()
    args = mangle(gen.args(2, [*MIXED[1:], protocol.new_end("stop", None)]))
    with pytest.raises(redis_exceptions.ResponseError, match=error):
        gen.publish_script(keys=gen.keys, args=args)
    assert gen.state() == before and gen.live() == []


def test_a_final_status_without_a_terminal_event_writes_nothing() -> None:
    gen = ScriptedGeneration()
    before = gen.state()
    args = gen.args(1, MIXED[:2])
    args[7:9] = ["completed", "stop"]
    with pytest.raises(redis_exceptions.ResponseError, match="final status"):
        gen.publish_script(keys=gen.keys, args=args)
    assert gen.state() == before


def test_publish_args_refuse_an_empty_batch_and_an_early_terminal_event() -> None:
    gen = ScriptedGeneration()
    with pytest.raises(ValueError):
        gen.args(1, [])
    with pytest.raises(ValueError):
        gen.args(1, [protocol.new_end("stop", None), MIXED[0]])
    assert gen.args(1, MIXED[:1])[protocol.PUBLISH_FIRST_EVENT_ARG - 1] == "reasoning"


@pytest.mark.parametrize(("source", "code"), [
    (None, "worker_lost"), ("worker", "worker_lost"), ("external", "producer_lost")])
def test_the_reap_script_names_the_lost_party_by_the_source(source: str | None, code: str) -> None:
    gen = ScriptedGeneration(source)
    assert gen.publish(1, MIXED[:1]) == 1
    worker_lost = protocol.error_data("worker_lost", "w")
    producer_lost = protocol.error_data("producer_lost", "p")
    reply = gen.redis.register_script(protocol.REAP_SCRIPT)(
        keys=gen.keys, args=["edge", 10_000, worker_lost, producer_lost, 1000, 60_000,
                             protocol.live_channel(gen.gen_id), "PUBLISH"])
    assert protocol.decode_lease_check(reply).reaped
    reaped = gen.log()[-1]
    assert (reaped.seq, reaped.kind, json.loads(reaped.data)["code"]) == (2, "error", code)
    assert gen.meta().status == "failed"
    assert gen.redis.pttl(protocol.reasoning_key(gen.gen_id)) > 0


def test_decode_meta_reads_the_counts_and_the_source() -> None:
    meta = protocol.decode_meta({"status": "running", "c:message": "3", "c:data": "1",
                                 "c:end": "1", "source": "external"})
    assert meta is not None and meta.source == protocol.SOURCE_EXTERNAL
    assert meta.event_counts() == {
        "message": 3, "reasoning": 0, "tool_call": 0, "tool_result": 0, "data": 1}
    plain = protocol.decode_meta({"status": "queued"})
    assert plain is not None and plain.source == protocol.SOURCE_WORKER
    assert set(plain.event_counts().values()) == {0}


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b"\xff"])
def test_a_malformed_tool_call_entry_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_tool_call(raw)
