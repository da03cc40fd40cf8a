"""SentenceBuffer: where messages end, and that no character is ever lost or duplicated."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.sentences import SentenceBuffer


def run(deltas: list[str], max_chars: int = 400) -> tuple[list[str], str]:
    """Feed ``deltas`` in order; return the messages feed() handed out and the final flush()."""
    buf = SentenceBuffer(max_chars)
    messages: list[str] = []
    for i, delta in enumerate(deltas):
        messages += buf.feed(delta, float(i))
    return messages, buf.flush()


# -- properties ------------------------------------------------------------------------------

PIECES = [
    "Hello",
    "there",
    "word",
    " ",
    "  ",
    ". ",
    "? ",
    "! ",
    "?! ",
    ".",
    "!",
    "?",
    "3.14",
    "1,000.5",
    "e.g. ",
    "i.e.",
    "Dr. ",
    "Mr.",
    "J. ",
    "U.S.",
    "...",
    "… ",
    '."',
    "?)",
    "!'",
    "。",
    "\N{FULLWIDTH EXCLAMATION MARK}",
    "\N{FULLWIDTH QUESTION MARK}",
    "」",
    "你好",
    "\n",
    "\n\n",
    "\r\n",
    "\r\n\r\n",
    "\r",
    "\t",
    "1. ",
    "https://example.com/a.b?c=d",
    "me@mail.example.org",
    "🙂",
    "👨‍👩‍👧",
]

sentence_like = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=60).map("".join)
PUNCTUATION = ".!? \r\n\t\"')。…ab1\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}"
texts = st.text() | sentence_like | st.text(alphabet=PUNCTUATION, max_size=80)
max_chars_st = st.sampled_from([400, 1000]) | st.integers(min_value=1, max_value=50)


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A text and an arbitrary split of it into deltas (empty deltas included)."""
    text = draw(texts)
    cuts = draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=30))
    bounds = [0, *sorted(cuts), len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=1000)
@given(split_text(), max_chars_st)
def test_messages_reassemble_exactly(case: tuple[str, list[str]], max_chars: int) -> None:
    text, deltas = case
    messages, rest = run(deltas, max_chars)
    assert "".join(messages) + rest == text
    assert all(messages), "no empty message"
    assert all(len(m) <= max_chars for m in messages)
    assert len(rest) < max_chars  # reaching max_chars forces a message out


@settings(max_examples=300)
@given(split_text(), max_chars_st, st.data())
def test_interleaved_flushes_keep_the_text(
    case: tuple[str, list[str]], max_chars: int, data: st.DataObject
) -> None:
    """The worker flushes on an interval between deltas; still nothing is lost or repeated."""
    text, deltas = case
    buf = SentenceBuffer(max_chars)
    out: list[str] = []
    for delta in deltas:
        out += buf.feed(delta, 0.0)
        if data.draw(st.booleans()):
            flushed = buf.flush()
            assert buf.flush() == ""
            assert buf.pending_since is None
            out.append(flushed)
    out.append(buf.flush())
    assert "".join(out) == text
    assert all(len(m) <= max_chars for m in out)


@settings(max_examples=300)
@given(split_text(), st.integers(min_value=2, max_value=50) | st.just(400))
def test_crlf_not_split_between_messages(case: tuple[str, list[str]], max_chars: int) -> None:
    _, deltas = case
    messages, rest = run(deltas, max_chars)
    parts = [*messages, rest]
    for left, right in itertools.pairwise(parts):
        assert not (left.endswith("\r") and right.startswith("\n")), parts


@settings(max_examples=300)
@given(split_text(), max_chars_st)
def test_pending_since_is_the_time_of_the_oldest_pending_character(
    case: tuple[str, list[str]], max_chars: int
) -> None:
    _, deltas = case
    buf = SentenceBuffer(max_chars)
    arrival: list[float] = []  # per character: `now` of the feed that brought it
    sent = 0
    for i, delta in enumerate(deltas):
        now = float(i)
        arrival += [now] * len(delta)
        sent += sum(map(len, buf.feed(delta, now)))
        expected = arrival[sent] if sent < len(arrival) else None
        assert buf.pending_since == expected
        if expected is not None:
            assert buf.due(now + 1.0, now + 1.0 - expected)
            assert not buf.due(now + 1.0, now + 1.5 - expected)


# -- rules, by example -----------------------------------------------------------------------


def test_splits_at_sentence_ends_and_keeps_the_unfinished_one() -> None:
    assert run(["Hello there. How are you? Fine!"]) == (
        ["Hello there. ", "How are you? "],
        "Fine!",
    )


def test_token_by_token_gives_the_same_sentences() -> None:
    deltas = ["Hel", "lo", " there", ".", " How", " are", " you", "?", " Fine", "!"]
    assert run(deltas) == (["Hello there. ", "How are you? "], "Fine!")


def test_boundary_at_end_of_delta_does_not_wait_for_more_whitespace() -> None:
    buf = SentenceBuffer()
    assert buf.feed("Hello there. ", 0.0) == ["Hello there. "]
    assert buf.pending_since is None


def test_whitespace_already_arrived_goes_with_the_sentence() -> None:
    assert run(["One.  Two.\n\tThree"]) == (["One.  ", "Two.\n\t"], "Three")


def test_delta_ending_at_punctuation_stays_pending_until_next_delta() -> None:
    buf = SentenceBuffer()
    assert buf.feed("Hello.", 1.0) == []
    assert buf.pending_since == 1.0
    assert buf.feed(" World", 2.0) == ["Hello. "]
    assert buf.pending_since == 2.0
    assert buf.flush() == "World"


def test_decimal_split_across_deltas_is_not_a_sentence_end() -> None:
    buf = SentenceBuffer()
    assert buf.feed("Pi is 3.", 0.0) == []
    assert buf.feed("14 or so. ", 1.0) == ["Pi is 3.14 or so. "]


@pytest.mark.parametrize(
    "text",
    [
        "It costs 3.14 dollars",
        "Total 1,000.5 units",
        "e.g. this",
        "E.g. this",
        "i.e. that",
        "Dr. Smith",
        "Mr. and Mrs. Jones met Prof. Plum",
        "Ms. Sr. Jr. St. No. Fig. approx. vs. etc. here",
        "at 9 a.m. or 5 p.m. in the U.S. today",
        "J. R. R. Tolkien",
        '("Dr. Who")',
        "Wait... what",
        "Wait… what",
        "Visit https://example.com/a.b?c=d for more",
        "mail me@mail.example.org now",
        "1. first\n2. second",
        'He said "Hi."Then',
        "Mr.\xa0Smith",
    ],
)
def test_no_split(text: str) -> None:
    assert run([text]) == ([], text)
    assert run(list(text)) == ([], text)  # char by char too


def test_decimal_sentence_is_one_message_at_the_end() -> None:
    assert run(["It costs 3.14 dollars. "]) == (["It costs 3.14 dollars. "], "")


def test_url_then_sentence_end() -> None:
    text = "See https://example.com/a.b?c=d. Then more"
    assert run([text]) == (["See https://example.com/a.b?c=d. "], "Then more")


def test_number_ending_a_sentence_mid_line_is_a_sentence_end() -> None:
    assert run(["I counted to 3. Then stopped"]) == (["I counted to 3. "], "Then stopped")


def test_repeated_and_mixed_terminal_punctuation() -> None:
    assert run(["Really?! Yes!!! No"]) == (["Really?! ", "Yes!!! "], "No")


def test_ellipsis_then_question_mark_ends() -> None:
    assert run(["Well...? Maybe"]) == (["Well...? "], "Maybe")


def test_cjk() -> None:
    assert run(["你好。我很好\N{FULLWIDTH EXCLAMATION MARK}"]) == (
        ["你好。"],
        "我很好\N{FULLWIDTH EXCLAMATION MARK}",
    )
    assert run(["你好。我很好\N{FULLWIDTH EXCLAMATION MARK}谢谢"]) == (
        ["你好。", "我很好\N{FULLWIDTH EXCLAMATION MARK}"],
        "谢谢",
    )
    assert run(list("你好。我很好\N{FULLWIDTH EXCLAMATION MARK}谢谢")) == (
        ["你好。", "我很好\N{FULLWIDTH EXCLAMATION MARK}"],
        "谢谢",
    )


def test_cjk_closing_bracket_stays_with_its_sentence() -> None:
    assert run(["「你好。", "」他说"]) == (["「你好。」"], "他说")


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("Title\n\nBody", "Title\n\n"),
        ("Title\r\n\r\nBody", "Title\r\n\r\n"),
        ("One line\nsame paragraph\n\nNext", "One line\nsame paragraph\n\n"),
    ],
)
def test_paragraph_break(text: str, first: str) -> None:
    rest = text[len(first) :]
    assert run([text]) == ([first], rest)
    assert run(list(text)) == ([first], rest)


def test_sentence_end_takes_the_whitespace_that_has_arrived() -> None:
    assert run(["End.\n\nNext"]) == (["End.\n\n"], "Next")
    # Token by token the first "\n" already completes the sentence; the second one arrives
    # later and goes with the next message rather than becoming a message of its own.
    assert run(["End.", "\n", "\n", "Next"]) == (["End.\n"], "\nNext")


def test_single_newline_is_not_a_paragraph_break() -> None:
    assert run(["line one\nline two"]) == ([], "line one\nline two")


def test_closing_quote_belongs_to_the_sentence() -> None:
    assert run(['He said "Hi." Then']) == (['He said "Hi." '], "Then")
    assert run(["(Really?) Yes. 'Sure!' Ok"]) == (["(Really?) ", "Yes. ", "'Sure!' "], "Ok")


def test_crlf_after_sentence_end() -> None:
    assert run(["Hello.\r\nWorld"]) == (["Hello.\r\n"], "World")
    # The delta ends between "\r" and "\n": cut before the "\r" rather than split the pair.
    assert run(["Hello.\r", "\nWorld"]) == (["Hello."], "\r\nWorld")


def test_max_chars_cuts_after_last_whitespace() -> None:
    # "aaa bbb c" reaches 9 characters: cut after the last space, keep "c" pending.
    assert run(["aaa bbb ccc ddd"], max_chars=9) == (["aaa bbb "], "ccc ddd")
    assert run(list("aaa bbb ccc ddd"), max_chars=9) == (["aaa bbb "], "ccc ddd")


def test_max_chars_cut_examples() -> None:
    assert run(["the quick brown fox"], max_chars=12) == (["the quick "], "brown fox")
    assert run(["abcdefghij"], max_chars=4) == (["abcd", "efgh"], "ij")
    assert run(list("abcdefghij"), max_chars=4) == (["abcd", "efgh"], "ij")


def test_max_chars_does_not_split_crlf() -> None:
    # "\r" is the last character that fits: cut before it, not between "\r" and "\n".
    assert run(["abc\r\ndef"], max_chars=4) == (["abc", "\r\n"], "def")


def test_long_sentence_is_cut_then_continues() -> None:
    text = "word " * 100 + "end. Next"
    messages, rest = run([text], max_chars=50)
    assert all(len(m) <= 50 for m in messages)
    assert messages[-1].endswith("end. ")
    assert rest == "Next"


def test_pending_since_and_due() -> None:
    buf = SentenceBuffer()
    assert buf.pending_since is None
    assert not buf.due(100.0, 0.0)
    assert buf.feed("", 1.0) == []
    assert buf.pending_since is None  # an empty delta adds nothing
    assert buf.feed("Hello", 10.0) == []
    assert buf.feed(" world", 10.25) == []
    assert buf.pending_since == 10.0
    assert not buf.due(10.25, 0.5)
    assert buf.due(10.5, 0.5)
    assert buf.feed(". Next", 11.0) == ["Hello world. "]
    assert buf.pending_since == 11.0  # "Next" came with the last delta
    assert not buf.due(11.25, 0.5)
    assert buf.flush() == "Next"
    assert buf.pending_since is None
    assert not buf.due(50.0, 0.5)
    assert buf.flush() == ""


def test_pending_since_follows_the_oldest_pending_character() -> None:
    buf = SentenceBuffer()
    buf.feed("One. Tw", 1.0)
    assert buf.pending_since == 1.0  # "Tw" arrived at 1.0
    buf.feed("o", 2.0)
    assert buf.pending_since == 1.0
    assert buf.feed(". Three", 3.0) == ["Two. "]
    assert buf.pending_since == 3.0


def test_space_after_a_flushed_sentence_end_is_not_a_message_of_its_own() -> None:
    buf = SentenceBuffer()
    assert buf.feed("Hello.", 0.0) == []
    assert buf.flush() == "Hello."  # the interval fired
    assert buf.feed(" World. ", 1.0) == [" World. "]


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SentenceBuffer(0)
