"""The edge's lean pub/sub reader (``broker.core.pubsub.PushParser``): what Redis sends in
subscribe mode, RESP2 and RESP3, arriving in any split, comes out as the same pushes and
replies, in the order they came."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from broker.core.pubsub import Push, PushParser, Reply, encode_command

RESP3 = (
    b">3\r\n$9\r\nsubscribe\r\n$14\r\n{gen:abc}:live\r\n:1\r\n"
    b">3\r\n$7\r\nmessage\r\n$14\r\n{gen:abc}:live\r\n$26\r\n1 message 17 {\"text\":\"\r\n\"}\r\n"
    b"+PONG\r\n"
    b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$0\r\n\r\n"
    b">3\r\n$11\r\nunsubscribe\r\n$14\r\n{gen:abc}:live\r\n:0\r\n"
)
EXPECTED: list[Any] = [
    (b"subscribe", b"{gen:abc}:live", 1),
    (b"message", b"{gen:abc}:live", b'1 message 17 {"text":"\r\n"}'),
    b"PONG",
    (b"smessage", b"c", b""),
    (b"unsubscribe", b"{gen:abc}:live", 0),
]


def plain(items: list[Push | Reply]) -> list[Any]:
    """Replies as their values, errors as their text: comparable."""
    return [item if not isinstance(item, Reply) else
            f"error: {item.value}" if isinstance(item.value, ResponseError) else item.value
            for item in items]


def test_resp3_pushes_and_replies_in_one_read() -> None:
    assert plain(PushParser(resp3=True).feed(RESP3)) == EXPECTED


def test_resp2_arrays_are_pushes_too() -> None:
    data = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n+PONG\r\n"
    assert plain(PushParser().feed(data)) == [(b"message", b"ch", b"hello"), b"PONG"]


@pytest.mark.parametrize("split", range(1, len(RESP3)))
def test_any_split_gives_the_same_pushes(split: int) -> None:
    """A read may end anywhere, even inside a CRLF or a payload holding CRLF: the incomplete
    tail waits for the next read and nothing is lost, repeated or mangled."""
    for parser in (PushParser(), PushParser(resp3=True)):
        first = parser.feed(RESP3[:split])
        assert plain(first + parser.feed(RESP3[split:])) == EXPECTED
        assert parser.feed(b"") == []  # nothing left over


def test_under_resp3_only_pushes_are_pushes() -> None:
    """A command's reply that looks like a push (an array of three, bytes first: a script's
    answer) is a reply under RESP3, where Redis marks its pushes; so are maps, and RESP3's
    false, which hiredis would otherwise answer as "incomplete"."""
    script_reply = b"*3\r\n$7\r\nrunning\r\n:5\r\n*0\r\n"
    parser = PushParser(resp3=True)
    assert plain(parser.feed(RESP3[:44] + script_reply + b"#f\r\n" + b"%1\r\n$1\r\na\r\n:1\r\n"
                             + b"#t\r\n")) == [EXPECTED[0], [b"running", 5, []], False,
                                               {b"a": 1}, True]


def test_error_replies_come_in_their_place() -> None:
    data = b"+OK\r\n-NOPERM no permissions\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n"
    assert plain(PushParser(resp3=True).feed(data)) == [
        b"OK", "error: NOPERM no permissions", (b"message", b"c", b"x")]


def test_bytes_that_are_not_resp_fail_the_connection() -> None:
    with pytest.raises(RedisConnectionError):
        PushParser().feed(b"?what\r\n")


def test_commands_are_resp_arrays() -> None:
    assert encode_command(b"SUBSCRIBE", ("a", "é")) == (
        b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$2\r\n\xc3\xa9\r\n")
    assert encode_command(b"EVAL", ("s", 2, b"\xff")) == (
        b"*4\r\n$4\r\nEVAL\r\n$1\r\ns\r\n$1\r\n2\r\n$1\r\n\xff\r\n")
