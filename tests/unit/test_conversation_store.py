"""A conversation's turns index (``ADD_TURN_SCRIPT`` on fakeredis[lua]): turn numbers, the
meta's ``conversation``, the active turn, the notice, the expiry; and the create body's
``conversation_id``."""

from __future__ import annotations

import json

import fakeredis
import pytest

from broker.core import protocol, sse
from broker.core.settings import Settings
from broker.core.store import Store
from broker.edge.conversation_stream import conversation_frame
from broker.edge.errors import ApiError
from broker.edge.topic import to_frame
from broker.edge.validation import take_conversation_id


def new_store() -> Store:
    return Store(fakeredis.FakeAsyncRedis(), Settings())


async def turn_of(store: Store, cid: str) -> str:
    gen_id = protocol.new_generation_id()
    await store.create(gen_id, {"messages": []}, "m", conversation=cid)
    return gen_id


async def test_turns_are_numbered_in_creation_order_and_named_in_the_meta() -> None:
    store = new_store()
    first, second = await turn_of(store, "chat-1"), await turn_of(store, "chat-1")
    other = await turn_of(store, "chat-2")
    assert await store.conversation_turns("chat-1") == [
        protocol.Turn(1, first), protocol.Turn(2, second)]
    assert await store.conversation_turns("chat-1", after=1) == [protocol.Turn(2, second)]
    assert await store.conversation_turns("chat-2") == [protocol.Turn(1, other)]
    assert await store.conversation_turns("nobody") == []
    meta = await store.meta(first)
    assert meta is not None and meta.conversation == "chat-1"
    plain = protocol.new_generation_id()
    assert await store.create(plain, {"messages": []}, "m") is None
    meta = await store.meta(plain)
    assert meta is not None and meta.conversation is None


async def test_the_active_turn_is_the_oldest_that_has_not_ended() -> None:
    store = new_store()
    assert await store.active_turn("c") is None
    first, second = await turn_of(store, "c"), await turn_of(store, "c")
    assert await store.active_turn("c") == first
    # The second ends first (two workers): the first is still the active one.
    await store.cancel(second)
    assert await store.active_turn("c") == first
    await store.cancel(first)
    assert await store.active_turn("c") is None
    assert await store.turn_statuses(await store.conversation_turns("c")) == [
        "cancelled", "cancelled"]
    third = await turn_of(store, "c")
    await store.redis.delete(protocol.meta_key(third))  # expired: not active
    assert await store.active_turn("c") is None


async def test_a_turn_is_announced_on_the_conversation_channel_and_refreshes_the_expiry() -> None:
    store = new_store()
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(protocol.conversation_channel("a:b.c"))
    await pubsub.get_message(timeout=1)  # the confirmation
    gen_id = await turn_of(store, "a:b.c")
    message = await pubsub.get_message(timeout=1)
    assert message is not None
    assert protocol.decode_turn_notice(message["data"]) == protocol.Turn(1, gen_id)
    ttl = await store.redis.pttl(protocol.conversation_turns_key("a:b.c"))
    assert 0 < ttl <= int(store.ttl_ms)
    await pubsub.aclose()


def test_channel_names_round_trip_and_share_the_index_slot() -> None:
    channel = protocol.conversation_channel("x_1")
    assert protocol.is_conversation_channel(channel)
    assert not protocol.is_conversation_channel(protocol.live_channel("A" * 22))
    assert protocol.conversation_of_channel(channel) == "x_1"
    assert channel.split("}")[0] == protocol.conversation_turns_key("x_1").split("}")[0]


@pytest.mark.parametrize("cid", ["a", "A-z_0.9:x", "c" * 128])
def test_a_valid_conversation_id_is_taken_out_of_the_request(cid: str) -> None:
    request = {"messages": [], "conversation_id": cid}
    assert take_conversation_id(request) == cid
    assert request == {"messages": []}
    assert take_conversation_id({"messages": []}) is None


@pytest.mark.parametrize("cid", ["", "c" * 129, "a b", "a/b", "{x}", "é", 7, ["a"], False])
def test_a_bad_conversation_id_is_a_422(cid: object) -> None:
    with pytest.raises(ApiError) as refused:
        take_conversation_id({"conversation_id": cid})
    assert (refused.value.status, refused.value.code) == (422, "invalid_conversation_id")


async def test_the_index_lives_as_long_as_its_newest_turn() -> None:
    """Each turn's end (a worker's terminal event, a cancel, a reap) refreshes the index's
    expiry as its generation's keys get theirs: the index never expires before its turns."""
    store = new_store()
    key = protocol.conversation_turns_key("kept")
    first = await turn_of(store, "kept")
    await store.redis.pexpire(key, 1000)  # (as if created long ago)
    assert await store.claim(first, "w1", 5) == "ok"
    assert await store.publish(first, "w1", 1, [protocol.new_message("Hi.")]) == 1
    assert await store.redis.pttl(key) <= 1000  # not at every event: at the end
    assert await store.publish(first, "w1", 2, [protocol.new_end("stop", None)]) == 1
    assert await store.redis.pttl(key) > 1000
    second = await turn_of(store, "kept")
    await store.redis.pexpire(key, 1000)
    await store.cancel(second)  # queued: it ends here
    assert await store.redis.pttl(key) > 1000
    plain = protocol.new_generation_id()
    await store.create(plain, {"messages": []}, "m")
    await store.cancel(plain)  # no conversation: nothing else to refresh


async def test_a_turns_end_names_its_conversation_without_a_read_of_the_meta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The publish script that ends a generation names its conversation (``{1, cid}``): the
    index's expiry is refreshed with no ``HGET`` of the meta, alone or in a batch, and a
    generation of no conversation costs no second call at all."""
    store = new_store()
    key = protocol.conversation_turns_key("named")
    turns = [await turn_of(store, "named") for _ in range(2)]
    plain = protocol.new_generation_id()
    await store.create(plain, {"messages": []}, "m")
    for gen_id in [*turns, plain]:
        assert await store.claim(gen_id, "w1", 5) == "ok"
    reads: list[object] = []
    hget = store.redis.hget

    async def counted_hget(*args: object) -> object:
        reads.append(args)
        return await hget(*args)  # type: ignore[arg-type]  (hget's own arguments)

    monkeypatch.setattr(store.redis, "hget", counted_hget)
    expiries: list[str] = []
    pexpire = store.redis.pexpire

    async def counted_pexpire(name: str, ms: int) -> object:
        expiries.append(name)
        return await pexpire(name, ms)

    monkeypatch.setattr(store.redis, "pexpire", counted_pexpire)
    end = [protocol.new_end("stop", None)]
    await store.redis.pexpire(key, 1000)
    expiries.clear()
    assert await store.publish(turns[0], "w1", 1, end) == 1
    assert await store.redis.pttl(key) > 1000
    await store.redis.pexpire(key, 1000)
    expiries.clear()
    now = protocol.now_ms()
    assert await store.publish_many([(turns[1], "w1", 1, end, now),
                                     (plain, "w1", 1, end, now)]) == [1, 1]
    assert await store.redis.pttl(key) > 1000
    assert expiries == [key]  # the turn's conversation, nothing for the plain generation
    assert reads == []
    # A repeated end (a retry) is 0, as before, and refreshes nothing.
    expiries.clear()
    assert await store.publish(turns[0], "w1", 1, end) == 0
    assert expiries == []


def test_a_publish_reply_is_decoded_or_refused() -> None:
    assert protocol.decode_publish_reply(1) == (1, None)
    assert protocol.decode_publish_reply(-2) == (-2, None)
    assert protocol.decode_publish_reply([1, b"a:b"]) == (1, "a:b")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_publish_reply([1])


@pytest.mark.parametrize("event", [
    protocol.Event(3, "message", protocol.message_data("Hi.\n\u2028 \"q\""), 1),
    protocol.Event(4, "tool_call", protocol.tool_call_data(0, "c1", "f", '{"a":1}'), 1),
    protocol.Event(5, "end", protocol.end_data("stop", None), 1),
    protocol.Event(6, "data", "{}", 1),
])
def test_a_frame_is_framed_again_for_its_conversation(event: protocol.Event) -> None:
    """Same event name, the turn in the id, ``generation_id`` first in the data, the rest of
    the data as it was (read back by the spec's rules: ``SSEEventDecoder``)."""
    gen_id = "G" * 22
    framed = conversation_frame(to_frame(event), protocol.Turn(12, gen_id))
    [decoded] = sse.SSEEventDecoder().feed(framed)
    assert decoded.event == ("message" if event.kind == "message" else event.kind)
    assert decoded.id == protocol.conversation_event_id(12, event.seq)
    assert decoded.id == f"00000012{event.seq:010d}"
    assert protocol.parse_conversation_event_id(decoded.id) == (12, event.seq)
    data = json.loads(decoded.data)
    assert next(iter(data)) == "generation_id" and data.pop("generation_id") == gen_id
    assert data == json.loads(event.data)


@pytest.mark.parametrize("value", ["", "1", "0000000001", "abc", "1" * 21, "00000001-0000000001"])
def test_what_is_not_a_conversation_event_id(value: str) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_conversation_event_id(value)
