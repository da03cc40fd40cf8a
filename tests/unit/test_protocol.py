"""The wire contract: Redis names, ids, live payloads, log entries, jobs and meta hashes."""

from __future__ import annotations

import json

import fakeredis
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

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
    meta, log, text = protocol.meta_key(gen_id), protocol.log_key(gen_id), protocol.text_key(gen_id)
    redis.hset(meta, mapping={"status": "running", "owner": "w", "seq": str(event.seq - 1)})
    channel = protocol.live_channel(gen_id)
    subscriber = redis.pubsub()
    subscriber.subscribe(channel)
    confirmation = subscriber.get_message(timeout=1)
    assert confirmation is not None and confirmation["type"] == "subscribe"
    published = redis.register_script(protocol.PUBLISH_SCRIPT)(
        keys=[meta, log, text],
        args=["w", event.seq, event.kind, event.data, event.published_ms, "", 100, 60_000,
              channel, "PUBLISH", "", ""],
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
    kind=st.sampled_from(["message", "end", "error"]),
    data=st.text(st.characters(exclude_categories=("Cs",))),
    published_ms=st.integers(min_value=0, max_value=2**53),
)


@given(SCRIPT_EVENTS)
@example(Event(1, "message", '{"text":"a b  c "}', 5))
@example(Event(2, "message", " leading and trailing ", 5))
@example(Event(3, "end", "", 5))
@example(Event(4, "error", "ünïcødé 🎉 \n two lines \u2028", 5))
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
