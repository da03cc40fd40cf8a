"""SentenceBuffer: where messages end, when pending text goes out, and that no character is
ever lost, duplicated, split from its grapheme cluster or held past the bound."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.core.sentences import SentenceBuffer


def run(deltas: list[str], max_chars: int = 400) -> tuple[list[str], str]:
    """Feed ``deltas`` in order (no timed flush); return feed()'s messages and the flush()."""
    buf = SentenceBuffer(max_chars)
    messages: list[str] = []
    for i, delta in enumerate(deltas):
        messages += buf.feed(delta, float(i))
    return messages, buf.flush()


def cluster_starts(text: str) -> set[int]:
    """Every offset where an extended grapheme cluster of ``text`` starts, and its end."""
    return {m.start() for m in regex.finditer(r"\X", text)} | {len(text)}


# -- a fake clock: the worker's flusher, simulated --------------------------------------------


@dataclass
class Sent:
    text: str
    at: float  # fake time it was handed out
    timed: bool  # by flush_due (True), by feed or the final flush (False)
    took_all: bool  # a timed cut that left nothing pending


def simulate(
    buf: SentenceBuffer, arrivals: list[tuple[float, str]], lateness: list[float] | None = None
) -> list[Sent]:
    """Drive ``buf`` as ``GenerationRun`` does, on a fake clock: each delta is fed at its time;
    the flusher wakes at ``deadline()`` (each wake ``lateness[j]`` late: the event loop's
    scheduling) and hands out ``flush_due(now)``; the answer ends (``flush()``) with its last
    delta. A delta arriving before a wake is fed first."""
    out: list[Sent] = []
    late = iter(lateness or [])
    pending_wake: float | None = None
    i = 0
    for _ in range(100_000):
        deadline = buf.deadline()
        if deadline is not None and pending_wake is None:
            pending_wake = deadline + next(late, 0.0)
        if i < len(arrivals) and (pending_wake is None or arrivals[i][0] <= pending_wake):
            at, delta = arrivals[i]
            i += 1
            out += [Sent(m, at, False, False) for m in buf.feed(delta, at)]
        elif pending_wake is not None:
            now, pending_wake = pending_wake, None
            text = buf.flush_due(now)
            if text:
                out.append(Sent(text, now, True, buf.pending_since is None))
        else:
            break
        if i == len(arrivals) and buf.pending_since is not None and arrivals:
            # The LLM's stream has ended: the worker flushes what is left at once.
            last = arrivals[-1][0]
            if pending_wake is None or pending_wake > last:
                out.append(Sent(buf.flush(), last, False, True))
                break
    else:
        raise AssertionError("the flusher never got the buffer empty")
    return [s for s in out if s.text]


def arrival_times(arrivals: list[tuple[float, str]]) -> list[float]:
    """Per character: the time of the delta that brought it."""
    return [at for at, delta in arrivals for _ in delta]


def assert_within_bound(sent: list[Sent], arrivals: list[tuple[float, str]], bound: float,
                        first_wait: float, tick: float) -> None:
    """No character waited longer than ``bound`` (+ the flusher's lateness); the first visible
    one no longer than ``first_wait``."""
    arrived = arrival_times(arrivals)
    at = 0
    shown = False
    for s in sent:
        for k, ch in enumerate(s.text):
            waited = s.at - arrived[at + k]
            assert waited <= bound + tick + 1e-9, (
                f"{s.text[k:]!r} waited {waited:.3f}s > {bound}s + {tick}s")
            if not shown and not ch.isspace():
                assert waited <= first_wait + tick + 1e-9, (
                    f"the first text waited {waited:.3f}s > {first_wait}s")
                shown = True
        at += len(s.text)


# -- properties: exactness -------------------------------------------------------------------

PIECES = [
    "Hello", "there", "word", " ", "  ", ". ", "? ", "! ", "?! ", ".", "!", "?", "3.14",
    "1,000.5", "e.g. ", "i.e.", "Dr. ", "Mr.", "J. ", "U.S.", "...", "… ", '."', "?)", "!'",
    "。", "\N{FULLWIDTH EXCLAMATION MARK}", "\N{FULLWIDTH QUESTION MARK}", "」", "你好",
    "\N{FULLWIDTH COMMA}", "、", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", "\t", "1. ", "- ",
    "* ", "## ", "| a |", "---", "```", "```py\n", "~~~\n", "    ",
    "https://example.com/a.b?c=d", "me@mail.example.org", "🙂", "👨‍👩‍👧", "🇫🇷", "👍🏽",
    "e\u0301", "\u0301", "\u200d", "\ufe0f", "\u2028", "\u2029", "\x85", "\u1100\u1161",
]

sentence_like = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=60).map("".join)
PUNCTUATION = (".!? \r\n\t\"')。…ab1\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}"
               "-*#|`\u0301\u200d🙂")
texts = st.text() | sentence_like | st.text(alphabet=PUNCTUATION, max_size=80)
max_chars_st = st.sampled_from([400, 1000]) | st.integers(min_value=1, max_value=50)


@st.composite
def split_text(draw: st.DrawFn, source: st.SearchStrategy[str] = texts) -> tuple[str, list[str]]:
    """A text and an arbitrary split of it into deltas (empty deltas included)."""
    text = draw(source)
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
    """A flush between deltas (the end of an answer, a cancel) loses or repeats nothing."""
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


# deadline=None on the heavier properties: on a busy machine one example may take longer than
# hypothesis's default 200 ms; they assert outcomes, not speed.
@settings(max_examples=500, deadline=None)
@given(split_text(st.text(max_size=200) | sentence_like))
def test_feed_never_cuts_a_grapheme_cluster(case: tuple[str, list[str]]) -> None:
    """Every end feed() gives a message is where a grapheme cluster of the whole text starts:
    an emoji ZWJ sequence, a flag, a skin tone, a combining mark, a CRLF stays whole, however
    the deltas split it. (Only the size limit may cut one, for a cluster longer than it.)"""
    text, deltas = case
    messages, rest = run(deltas)
    starts = cluster_starts(text)
    at = 0
    for message in messages:
        at += len(message)
        assert at in starts, (messages, rest)


class ScanOnly(SentenceBuffer):
    FAST_PATHS = False


def state(buf: SentenceBuffer) -> dict[str, object]:
    return {name: getattr(buf, name) for name in SentenceBuffer.__slots__}


word_deltas = st.lists(
    st.sampled_from(["word", " word", "Ab1", " x", ". ", ".", " Dr", "3", "\n", "- ", "```"])
    | st.text(max_size=3), max_size=40)


@settings(max_examples=1000, deadline=None)
@given(split_text(sentence_like) | word_deltas.map(lambda d: ("".join(d), d)),
       st.sampled_from([400, 6]), st.data())
def test_fast_paths_do_what_the_scan_does(
    case: tuple[str, list[str]], max_chars: int, data: st.DataObject
) -> None:
    """The shortcuts for plain word deltas leave every output and every bit of state as the
    character scan would."""
    _, deltas = case
    fast, scan = SentenceBuffer(max_chars), ScanOnly(max_chars)
    for i, delta in enumerate(deltas):
        assert fast.feed(delta, i * 0.01) == scan.feed(delta, i * 0.01)
        if data.draw(st.booleans()):
            now = i * 0.01 + data.draw(st.sampled_from([0.0, 0.02, 1.0]))
            assert fast.flush_due(now) == scan.flush_due(now)
        assert state(fast) == state(scan)
    assert fast.flush() == scan.flush()


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
        deadline = buf.deadline()
        assert (deadline is None) == (expected is None)
        if deadline is not None and expected is not None:
            assert expected <= deadline <= expected + 1.0  # the default bound: 1 s


# -- properties: the bound, on a fake clock ----------------------------------------------------

HARD_PIECES = [
    "a" * 30, "https://example.com/" + "x" * 40, "1234567890" * 3, "汉字" * 10,
    "👨‍👩‍👧‍👦" * 3, "🇯🇵🇫🇷🇩🇪", "e\u0301" * 8, "\u0301" * 5, "👍🏽👍🏿",
    " ", "\n", "\n\n", ". ", "```\n", "\N{FULLWIDTH COMMA}",
]
hard_texts = st.lists(st.sampled_from(HARD_PIECES + PIECES), max_size=40).map("".join)
# Gaps between deltas: bursts, typical token gaps, and around the waits (first text 0.02 s,
# bound 0.05 / 0.2 / 1 s), up to several bounds of silence.
GAPS = [0.0, 0.0, 0.001, 0.01, 0.02, 0.021, 0.05, 0.1, 0.19, 0.2, 0.25, 0.5, 0.99, 1.0, 1.01,
        3.0]


@st.composite
def timed_stream(draw: st.DrawFn) -> tuple[str, list[tuple[float, str]]]:
    text, deltas = draw(split_text(texts | hard_texts))
    deltas = [d for d in deltas if d]
    gaps = draw(st.lists(st.sampled_from(GAPS), min_size=len(deltas), max_size=len(deltas)))
    at, arrivals = 0.0, []
    for gap, delta in zip(gaps, deltas, strict=True):
        at += gap
        arrivals.append((at, delta))
    return text, arrivals


waits = st.sampled_from([(0.02, 1.0), (0.0, 0.2), (0.02, 0.05), (0.2, 0.2), (1.0, 0.5)])
TICK = 0.004  # how late the flusher may wake in these runs (the event loop's scheduling)


@settings(max_examples=1500, deadline=None)
@given(timed_stream(), waits, st.sampled_from([400, 12, 3]),
       st.lists(st.sampled_from([0.0, TICK / 2, TICK]), max_size=50))
@example(("x" * 50, [(0.0, "x" * 50)]), (0.02, 1.0), 400, [])
def test_no_character_waits_past_the_bound(
    stream: tuple[str, list[tuple[float, str]]], wait: tuple[float, float], max_chars: int,
    lateness: list[float],
) -> None:
    """Whatever arrives when, with the flusher waking up to a tick late: every character goes
    out within the bound, the first text within its own wait; the messages are exactly the
    text; and every timed cut that leaves text pending is at a grapheme cluster start."""
    text, arrivals = stream
    first_wait, bound = wait
    buf = SentenceBuffer(max_chars, first_wait=first_wait, max_wait=bound)
    sent = simulate(buf, arrivals, lateness)
    assert "".join(s.text for s in sent) == text
    assert_within_bound(sent, arrivals, bound, min(first_wait, bound), TICK)
    starts = cluster_starts(text)
    at = 0
    for s in sent:
        at += len(s.text)
        if s.timed and not s.took_all:
            assert at in starts, sent


def test_the_bound_check_fails_for_a_buffer_that_waits_too_long() -> None:
    """The property above can fail: a buffer whose waits overrun the bound by half is caught."""

    class Late(SentenceBuffer):
        def wait(self) -> float:
            return super().wait() * 1.5

    arrivals = [(0.0, "A sentence that"), (0.5, " never ends"), (2.0, " at all")]
    sent = simulate(Late(first_wait=0.02, max_wait=1.0), arrivals)
    with pytest.raises(AssertionError, match="waited"):
        assert_within_bound(sent, arrivals, 1.0, 0.02, TICK)
    sent = simulate(SentenceBuffer(first_wait=0.02, max_wait=1.0), arrivals)
    assert_within_bound(sent, arrivals, 1.0, 0.02, TICK)  # the real one is within it


def test_the_exactness_check_fails_for_a_buffer_that_drops_a_character() -> None:
    class Lossy(SentenceBuffer):
        def flush_due(self, now: float) -> str:
            return super().flush_due(now)[1:]

    arrivals = [(0.0, "Hello"), (0.1, " world"), (1.5, " again")]
    sent = simulate(Lossy(first_wait=0.02, max_wait=1.0), arrivals)
    assert "".join(s.text for s in sent) != "Hello world again"
    sent = simulate(SentenceBuffer(first_wait=0.02, max_wait=1.0), arrivals)
    assert "".join(s.text for s in sent) == "Hello world again"


# -- sentence ends, by example ----------------------------------------------------------------


def test_splits_at_sentence_ends_and_keeps_the_unfinished_one() -> None:
    assert run(["Hello there. How are you? Fine!"]) == (
        ["Hello there. ", "How are you? "],
        "Fine!",
    )


def test_token_by_token_gives_the_same_sentences() -> None:
    deltas = ["Hel", "lo", " there", ".", " How", " are", " you", "?", " Fine", "!"]
    assert run(deltas) == (["Hello there. ", "How are you? "], "Fine!")


def test_a_line_feed_ends_the_message_at_once_a_space_waits_for_the_next_character() -> None:
    """After a line feed a new grapheme cluster starts whatever comes; after a space a
    combining mark would still belong to it, so the message waits for the next character."""
    buf = SentenceBuffer()
    assert buf.feed("Hello there.\n", 0.0) == ["Hello there.\n"]
    assert buf.pending_since is None
    assert buf.feed("Next one. ", 1.0) == []
    assert buf.feed("And", 2.0) == ["Next one. "]
    assert run(["Hello. ", "\u0301x"]) == (["Hello. \u0301"], "x")


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
    assert buf.feed("14 or so. Then", 1.0) == ["Pi is 3.14 or so. "]


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
        'He said "Hi."Then',
        "Mr.\xa0Smith",
        "a single\nline feed in prose",
        "#hashtag is no heading\n",
    ],
)
def test_no_split(text: str) -> None:
    assert run([text]) == ([], text)
    assert run(list(text)) == ([], text)  # char by char too


def test_decimal_sentence_is_one_message() -> None:
    assert run(["It costs 3.14 dollars. Next"]) == (["It costs 3.14 dollars. "], "Next")


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


def test_cjk_clause_punctuation_is_no_end() -> None:
    text = "首先，其次、再次；最后：结束"
    assert run([text]) == ([], text)


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


def test_closing_quote_belongs_to_the_sentence() -> None:
    assert run(['He said "Hi." Then']) == (['He said "Hi." '], "Then")
    assert run(["(Really?) Yes. 'Sure!' Ok"]) == (["(Really?) ", "Yes. ", "'Sure!' "], "Ok")


def test_emoji_after_a_sentence_end_stay_with_it() -> None:
    assert run(["Congrats! 🎉 Next one. 👍🏽👍 And"]) == (
        ["Congrats! 🎉 ", "Next one. 👍🏽👍 "], "And")
    assert run(list("Congrats! 🎉 Next")) == (["Congrats! 🎉 "], "Next")
    # On a new line they start the next message; a word right after them is cut off.
    assert run(["Done.\n🎉 Yes"]) == (["Done.\n"], "🎉 Yes")
    assert run(["Done! 🎉Next"]) == (["Done! 🎉"], "Next")


def test_crlf_after_sentence_end() -> None:
    assert run(["Hello.\r\nWorld"]) == (["Hello.\r\n"], "World")
    # The delta ends between "\r" and "\n": the pair is kept whole.
    assert run(["Hello.\r", "\nWorld"]) == (["Hello.\r\n"], "World")


# -- Markdown blocks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "messages", "rest"),
    [
        ("- one\n- two\n", ["- one\n", "- two\n"], ""),
        ("* one\n+ two\nafter", ["* one\n", "+ two\n"], "after"),
        ("1. first\n2) second\n10. tenth\nend", ["1. first\n", "2) second\n", "10. tenth\n"],
         "end"),
        ("  - nested\n    item", ["  - nested\n"], "    item"),
        ("# Title\n## Sub title\nBody", ["# Title\n", "## Sub title\n"], "Body"),
        ("| a | b |\n|---|---|\n| 1 | 2 |\n", ["| a | b |\n", "|---|---|\n", "| 1 | 2 |\n"],
         ""),
        ("Text\n---\nMore", ["Text\n---\n"], "More"),
        ("Steps:\n- one. Two\n", ["Steps:\n- one. ", "Two\n"], ""),
        ("- item\n\nParagraph. Next", ["- item\n", "\nParagraph. "], "Next"),
    ],
)
def test_markdown_block_lines_end_at_their_line_feed(
    text: str, messages: list[str], rest: str
) -> None:
    assert run([text]) == (messages, rest)
    assert run(list(text)) == (messages, rest)


def test_fenced_code_goes_line_by_line_without_sentences() -> None:
    text = (
        "Code:\n\n```python\nx = 1. y = 2\n\n    if x:  # Done. Next\n        pass\n```\n"
        "After it. More"
    )
    expected = [
        "Code:\n\n", "```python\n", "x = 1. y = 2\n",
        "\n    if x:  # Done. Next\n",  # a blank code line goes with the next line
        "        pass\n", "```\n", "After it. ",  # sentences again after the fence
    ]
    assert run([text]) == (expected, "More")
    assert run(list(text)) == (expected, "More")


def test_tilde_fence_closes_only_with_tildes() -> None:
    text = "~~~\na\n```\nb\n~~~\nc. d"
    assert run([text]) == (["~~~\n", "a\n", "```\n", "b\n", "~~~\n", "c. "], "d")


# -- size ------------------------------------------------------------------------------------


def test_max_chars_cuts_at_the_last_word_boundary() -> None:
    assert run(["aaa bbb ccc ddd"], max_chars=9) == (["aaa bbb "], "ccc ddd")
    assert run(list("aaa bbb ccc ddd"), max_chars=9) == (["aaa bbb "], "ccc ddd")
    assert run(["the quick brown fox"], max_chars=12) == (["the quick "], "brown fox")


def test_max_chars_without_a_word_boundary_cuts_between_clusters() -> None:
    assert run(["abcdefghij"], max_chars=4) == (["abcd", "efgh"], "ij")
    # Char by char the 4th character's cluster may not be complete yet: cut before it.
    assert run(list("abcdefghij"), max_chars=4) == (["abc", "def", "ghi"], "j")
    family = "👨‍👩‍👧"  # 5 code points, one cluster
    assert run(["ab" + family + "cd"], max_chars=6) == (["ab", family + "c"], "d")


def test_max_chars_does_not_split_crlf() -> None:
    assert run(["abc\r\ndef"], max_chars=4) == (["abc", "\r\n"], "def")


def test_long_sentence_is_cut_then_continues() -> None:
    text = "word " * 100 + "end. Next"
    messages, rest = run([text], max_chars=50)
    assert all(len(m) <= 50 for m in messages)
    assert messages[-1].endswith("end. ")
    assert rest == "Next"


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SentenceBuffer(0)
    with pytest.raises(ValueError):
        SentenceBuffer(max_wait=0)


# -- time: the first text, the adaptive wait, the bound ---------------------------------------


def test_first_text_goes_out_after_first_wait_in_whole_words() -> None:
    buf = SentenceBuffer(first_wait=0.02, max_wait=1.0)
    assert buf.feed("Great", 10.0) == []
    assert buf.deadline() == pytest.approx(10.02)
    assert buf.feed(" quest", 10.01) == []
    assert buf.flush_due(10.019) == ""  # not yet
    assert buf.flush_due(10.02) == "Great "  # the last word boundary: "quest" may go on
    assert buf.feed("ion! Next", 10.03) == ["question! "]
    # From now on the wait is the adaptive one, not the first text's.
    assert buf.deadline() == pytest.approx(10.03 + 1.0)


def test_first_text_that_is_not_a_whole_word_yet_still_goes_out_at_its_wait() -> None:
    """A slow model's first word in several tokens: the reader sees its start on time."""
    buf = SentenceBuffer(first_wait=0.02)
    assert buf.feed("Gre", 0.0) == []
    assert buf.flush_due(0.02) == "Gre"
    assert buf.feed("at answer", 0.1) == []
    assert buf.deadline() == pytest.approx(0.1 + 1.0)


def test_a_whole_first_sentence_within_the_first_wait_is_one_message() -> None:
    buf = SentenceBuffer(first_wait=0.02)
    assert buf.feed("Yes", 0.0) == []
    assert buf.feed("! Sure", 0.01) == ["Yes! "]
    assert buf.deadline() == pytest.approx(0.01 + 1.0)


def test_whitespace_alone_is_not_the_first_text() -> None:
    buf = SentenceBuffer(first_wait=0.02)
    assert buf.feed("\n\n", 0.0) == []
    assert buf.flush_due(0.02) == "\n\n"
    assert buf.feed("Hi there", 5.0) == []
    assert buf.deadline() == pytest.approx(5.02)  # still the first text's wait


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (100.0, 0.6),  # 60 tokens' time
        (50.0, 1.0),  # 1.2 s would exceed the bound
        (10.0, 1.0),
        (1000.0, 0.25),  # never below min_wait
    ],
)
def test_the_wait_adapts_to_the_token_rate_under_the_bound(rate: float, expected: float) -> None:
    buf = SentenceBuffer(max_wait=1.0, min_wait=0.25, patience_tokens=60)
    buf.feed("Hi. ", 0.0)
    buf.flush_due(1.0)  # the first text is out
    for i in range(1, 21):
        buf.feed(" word", i / rate)
    assert buf.wait() == pytest.approx(expected)
    assert buf.deadline() == pytest.approx(1 / rate + expected)


def test_before_a_rate_is_known_the_wait_is_the_bound() -> None:
    buf = SentenceBuffer(max_wait=0.7)
    buf.feed("One. Two", 0.0)  # one token: no rate yet
    assert buf.wait() == 0.7


def test_the_bound_cuts_at_the_last_word_boundary_never_inside_a_word() -> None:
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    assert buf.feed("Hi. ", 0.0) == []
    assert buf.flush_due(0.0) == "Hi. "
    buf.feed("A sentence that goes on and on", 0.5)
    buf.feed(" and keeps go", 1.0)
    assert buf.flush_due(1.49) == ""
    assert buf.flush_due(1.5) == "A sentence that goes on and on and keeps "
    assert buf.flush() == "go"


@pytest.mark.parametrize(
    ("pending", "sent"),
    [
        ("costs 1,250.75", "costs "),  # a number stays whole
        ("see https://example.com/a.b?c=d", "see "),  # a URL stays whole
        ("call 👨‍👩‍👧‍👦", "call "),  # a ZWJ sequence stays whole
        ("flags 🇯🇵🇫🇷", "flags "),
        ("cafe\u0301 au", "cafe\u0301 "),
    ],
)
def test_the_bound_keeps_numbers_urls_and_clusters_whole(pending: str, sent: str) -> None:
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    buf.feed("Hi. ", 0.0)
    buf.flush_due(0.0)
    for i, ch in enumerate(pending):  # one code point per delta: the worst split
        buf.feed(ch, 0.5 + i * 0.001)
    assert buf.flush_due(1.5) == sent


def test_one_long_word_goes_out_at_the_bound_anyway() -> None:
    """No word boundary after the due text: the bound is a promise, so the word is cut at
    the last grapheme cluster boundary (the last character may still have a mark coming)."""
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    buf.feed("Hi. ", 0.0)
    buf.flush_due(0.0)
    url = "https://example.com/" + "x" * 30
    for i in range(0, len(url), 4):
        buf.feed(url[i : i + 4], 0.5 + i / 1000)
    assert buf.flush_due(1.5) == url[:-1]
    assert buf.flush() == url[-1]


def test_an_open_cluster_goes_out_whole_at_the_bound() -> None:
    """The due text ends inside a cluster whose end has not arrived: it goes out as it is."""
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    buf.feed("Hi. ", 0.0)
    buf.flush_due(0.0)
    buf.feed("👨\u200d", 0.5)
    assert buf.flush_due(1.5) == "👨\u200d"


def test_cjk_at_the_bound_cuts_after_clause_punctuation_else_between_characters() -> None:
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    assert buf.feed("好。", 0.0) == []
    assert buf.feed("如", 0.0) == ["好。"]
    buf.feed("果模型很慢\N{FULLWIDTH COMMA}一句", 0.5)
    buf.feed("话要等", 0.9)
    assert buf.flush_due(1.0) == "如果模型很慢\N{FULLWIDTH COMMA}"
    assert buf.flush_due(1.5) == "一句话要"  # no punctuation: the last cluster boundary
    assert buf.flush() == "等"


def test_a_line_feed_at_the_end_lets_everything_go_at_the_bound() -> None:
    buf = SentenceBuffer(first_wait=0.0, max_wait=1.0)
    buf.feed("Hi. ", 0.0)
    buf.flush_due(0.0)
    buf.feed("a soft line break\n", 0.5)
    assert buf.flush_due(1.5) == "a soft line break\n"


def test_pending_since_and_deadline() -> None:
    buf = SentenceBuffer(first_wait=0.02, max_wait=0.5)
    assert buf.pending_since is None and buf.deadline() is None
    assert buf.flush_due(100.0) == ""
    assert buf.feed("", 1.0) == []
    assert buf.pending_since is None  # an empty delta adds nothing
    assert buf.feed("Hello", 10.0) == []
    assert buf.feed(" world", 10.25) == []
    assert buf.pending_since == 10.0
    assert buf.deadline() == pytest.approx(10.02)
    assert buf.flush_due(10.02) == "Hello "
    assert buf.pending_since == 10.25
    assert buf.feed(". Next", 11.0) == ["world. "]
    assert buf.pending_since == 11.0  # "Next" came with the last delta
    assert buf.flush() == "Next"
    assert buf.pending_since is None and buf.deadline() is None
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
    assert buf.flush() == "Hello."  # the end of an answer, or a timed flush of everything
    assert buf.feed(" World. Next", 1.0) == [" World. "]


def test_two_buffers_are_independent() -> None:
    """An answer and its reasoning each get a buffer: one's state never leaks into the other."""
    answer, reasoning = SentenceBuffer(), SentenceBuffer()
    assert answer.feed("```\ncode. more", 0.0) == ["```\n"]
    assert reasoning.feed("Think. Then", 0.0) == ["Think. "]
    assert reasoning.deadline() == pytest.approx(1.0)
    assert answer.deadline() == pytest.approx(1.0)
