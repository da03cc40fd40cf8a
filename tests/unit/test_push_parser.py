"""The edge's lean pub/sub reader (``broker.core.pubsub.PushParser``): what Redis sends in
subscribe mode, RESP2 and RESP3, arriving in any split, comes out as the same pushes."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from broker.core.pubsub import CallRefused, PushParser, encode_command

RESP3 = (
    b">3\r\n$9\r\nsubscribe\r\n$14\r\n{gen:abc}:live\r\n:1\r\n"
    b">3\r\n$7\r\nmessage\r\n$14\r\n{gen:abc}:live\r\n$26\r\n1 message 17 {\"text\":\"\r\n\"}\r\n"
    b"+PONG\r\n"
    b">3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$0\r\n\r\n"
    b">3\r\n$11\r\nunsubscribe\r\n$14\r\n{gen:abc}:live\r\n:0\r\n"
)
EXPECTED = [
    (b"subscribe", b"{gen:abc}:live", 1),
    (b"message", b"{gen:abc}:live", b'1 message 17 {"text":"\r\n"}'),
    (b"smessage", b"c", b""),
    (b"unsubscribe", b"{gen:abc}:live", 0),
]


def test_resp3_pushes_in_one_read() -> None:
    assert PushParser().feed(RESP3) == (EXPECTED, [b"PONG"])


def test_resp2_arrays_are_pushes_too() -> None:
    data = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"
    assert PushParser().feed(data) == ([(b"message", b"ch", b"hello")], [])


@pytest.mark.parametrize("split", range(1, len(RESP3)))
def test_any_split_gives_the_same_pushes(split: int) -> None:
    """A read may end anywhere, even inside a CRLF or a payload holding CRLF: the incomplete
    tail waits for the next read and nothing is lost, repeated or mangled."""
    for parser in (PushParser(), PushParser(resp3=True)):
        first, first_replies = parser.feed(RESP3[:split])
        rest, rest_replies = parser.feed(RESP3[split:])
        assert first + rest == EXPECTED
        assert first_replies + rest_replies == [b"PONG"]
        assert parser.feed(b"") == ([], [])  # nothing left over


def test_under_resp3_only_pushes_are_pushes() -> None:
    """A command's reply that looks like a push (an array of three, bytes first: a script's
    answer) is a reply under RESP3, where Redis marks its pushes."""
    script_reply = b"*3\r\n$7\r\nrunning\r\n:5\r\n*0\r\n"
    log_reply = b"*1\r\n*2\r\n$3\r\n0-1\r\n*2\r\n$1\r\nk\r\n$7\r\nmessage\r\n"
    parser = PushParser(resp3=True)
    assert parser.feed(RESP3[:44] + script_reply + log_reply + b"%1\r\n$1\r\na\r\n:1\r\n") == (
        EXPECTED[:1], [[b"running", 5, []], [[b"0-1", [b"k", b"message"]]], {b"a": 1}])


def test_error_reply_raises() -> None:
    with pytest.raises(ResponseError, match="NOPERM"):
        PushParser().feed(b"-NOPERM no permissions\r\n")


def test_commands_are_resp_arrays() -> None:
    assert encode_command(b"SUBSCRIBE", ("a", "é")) == (
        b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$2\r\n\xc3\xa9\r\n")


@pytest.mark.parametrize(("message", "for_good"), [
    ("NOPERM this user has no permissions to run the 'eval' command", True),
    ("ERR unknown command 'EVAL', with args beginning with: ", True),
    ("LOADING Redis is loading the dataset in memory", False),
    ("OOM command not allowed when used memory > 'maxmemory'.", False),
    ("BUSY Redis is busy running a script.", False),
])
def test_only_a_lasting_refusal_stops_the_calls(message: str, for_good: bool) -> None:
    """A refusal that would come again turns the reads on the pub/sub connection off (each
    would fail the connection again); a passing one (Redis loading, full, busy) does not."""
    assert CallRefused(message).for_good() is for_good
