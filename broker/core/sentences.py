"""Group LLM token deltas into sentence-sized messages, on time.

The worker feeds every delta into a ``SentenceBuffer`` (one per text channel: each buffer
keeps its own state, so an answer and its reasoning each get one) and publishes each message
it hands back. A flusher asks ``deadline()`` when pending text must go out, and at that time
publishes ``flush_due(now)``; at the end of the answer ``flush()`` hands over the rest.
Whatever the split into deltas and whenever the flusher runs, the messages joined together
are exactly the text fed in.

**Where a message ends** (at once, as soon as the characters that decide it have arrived):

* ``.``, ``!`` or ``?`` (possibly repeated, e.g. ``?!``), then any closing quotes/brackets,
  then whitespace; the message takes the whitespace that has arrived with it. Not a sentence
  end: ellipses (``...``, ``…``), decimals (``3.14``: no whitespace after the dot), dots inside
  URLs and e-mail addresses (likewise), common abbreviations (``Dr.``, ``e.g.``, ``U.S.``),
  single-capital initials (``J. R. R. Tolkien``) and list markers at the start of a line
  (``1. ``). Emoji right after the end on the same line (``Done! 🎉``) stay with the sentence.
* CJK full stops, exclamation and question marks (U+3002, U+FF01, U+FF1F, U+FF61), plus
  closing brackets; no whitespace needed.
* A paragraph break: whitespace holding two line feeds (``\\n\\n``, ``\\r\\n\\r\\n``).
* The line feed ending a Markdown block line: a list item (``- ``, ``* ``, ``+ ``, ``1. ``,
  ``1) ``), a heading (``#``), a table row (``|``), a thematic break (``---``) or a code fence
  (```` ``` ````, ``~~~``). Inside a fenced code block sentences do not count: every line
  that is not blank is a message of its own (a blank line goes with the next).

**When text goes out without an end** (``deadline()``), the wait counted from the arrival of
the oldest pending character:

* The first text of the buffer: after ``first_wait`` (the reader sees the answer start).
* Later: ``patience_tokens`` tokens' time at the rate observed so far (a long sentence takes
  that long at that rate), never more than ``max_wait``, the hard bound, nor less than
  ``min_wait`` (unless ``max_wait`` is smaller). Until ``RATE_AFTER_TOKENS`` tokens have
  arrived (the first few often come in a burst) the rate is not trusted: ``max_wait``.

A timed cut sends every character whose wait is over, and as much after them as reads well:
up to the last word boundary (after whitespace, or after a CJK comma, enumeration comma,
semicolon or colon: U+FF0C, U+3001, U+FF1B, U+FF1A, U+FF64); failing that (one
long word, a URL, CJK without punctuation) up to the last grapheme cluster boundary; and if
even that is not past every due character (a cluster still open when its wait is over), all
of it: the bound is a promise, kept before anything else.

**Never inside a grapheme cluster.** A cut before a character is made only once that
character has arrived and starts a cluster of its own (Unicode's extended grapheme clusters,
via ``regex``'s ``\\X``): a combining mark, a ZWJ or a skin tone arriving after a space stays
with it. So a message that ends in a space waits for the next character; one that ends in a
line feed (after which a cluster always starts) does not. Only the size limit (a cluster
longer than ``max_chars``, in crafted text) and an open cluster at the bound cut one.

**Size.** A message never exceeds ``max_chars``: text reaching it without an end is cut at
the last word boundary, else at the last cluster boundary, else hard.
"""

from __future__ import annotations

from collections import deque

import regex

__all__ = ["SentenceBuffer"]

# Characters that make up a run of terminal punctuation ("?!", "...", "…"); the run as a whole
# decides whether it ends a sentence.
_RUN_CHARS = frozenset(".!?…")
_CJK_TERMINALS = frozenset(
    "。\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}"
    "\N{HALFWIDTH IDEOGRAPHIC FULL STOP}"
)
# CJK clause punctuation: a place to cut when a sentence runs past its wait.
_CJK_CLAUSE = frozenset(
    "\N{FULLWIDTH COMMA}\N{IDEOGRAPHIC COMMA}\N{FULLWIDTH SEMICOLON}\N{FULLWIDTH COLON}"
    "\N{HALFWIDTH IDEOGRAPHIC COMMA}"
)
# May follow the terminal punctuation and still belong to the sentence: `."` `?)` `!'` `。」`.
# `*` and `_` because LLM answers are Markdown (`**Done.** Next`).
_CLOSERS = frozenset(
    "\"')]}*_”»」』】〉》"
    "\N{RIGHT SINGLE QUOTATION MARK}\N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK}"
    "\N{FULLWIDTH RIGHT PARENTHESIS}\N{RIGHT TORTOISE SHELL BRACKET}"
    "\N{FULLWIDTH RIGHT SQUARE BRACKET}\N{FULLWIDTH RIGHT CURLY BRACKET}"
)
# Stripped from the front of the word before the dot when looking it up: `(Dr.` `"e.g.`.
_OPENERS = "\"'([{*_“«¿¡「『【\N{LEFT SINGLE QUOTATION MARK}\N{FULLWIDTH LEFT PARENTHESIS}"
# These never separate sentences: a non-breaking space after `Mr.` is there to prevent a break.
_NON_BREAKING = frozenset("\xa0\u2007\u202f")
# Whitespace after which a grapheme cluster always starts (Unicode's Control characters; CR
# is not among them: a LF may follow it). A message may end with one of these before the next
# character has arrived.
_BREAK_AFTER = frozenset("\t\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029")

_ABBREVIATIONS = frozenset(
    {"Mr", "Mrs", "Ms", "Messrs", "Dr", "Prof", "Sr", "Jr", "St", "Mt", "No", "Fig"}
)
# Matched case-insensitively so a capitalised one starting a sentence is still caught.
_ABBREVIATIONS_ANY_CASE = frozenset({"vs", "etc", "approx", "cf", "al"})

# What the scanned text currently ends with (SentenceBuffer._term).
_NONE = 0
_ASCII = 1  # terminal punctuation (+ closers): a sentence end if whitespace follows
_CJK = 2  # CJK terminator (+ closers): a sentence end before the next other character
_CLAUSE = 3  # CJK clause punctuation (+ closers): a word boundary before the next character
_EMOJI_TAIL = 4  # emoji after a sentence end: the end follows them

# -- grapheme clusters ------------------------------------------------------------------------

_GRAPHEME = regex.compile(r"\X")
_JOINS_PREVIOUS = regex.compile(  # never starts a cluster: belongs to the character before
    r"[\p{Grapheme_Cluster_Break=Extend}\p{Grapheme_Cluster_Break=ZWJ}"
    r"\p{Grapheme_Cluster_Break=SpacingMark}]"
)
_EMOJI = regex.compile(r"[\p{Extended_Pictographic}\p{Regional_Indicator}]")
_PLAIN, _JOINER, _EMOJI_CHAR = 0, 1, 2
RATE_AFTER_TOKENS = 8  # deltas seen before the observed token rate sets the wait
# Class of each non-ASCII character seen (a memo: a regex match per character would cost more
# than the rest of the scan). Bounded: past the limit characters are classified uncached.
_CLASSES: dict[str, int] = {}
_CLASSES_LIMIT = 1 << 16


def _classify(c: str) -> int:
    """_JOINER, _EMOJI_CHAR or _PLAIN; ASCII is always _PLAIN (callers skip it)."""
    kind = _CLASSES.get(c)
    if kind is None:
        kind = (_JOINER if _JOINS_PREVIOUS.match(c)
                else _EMOJI_CHAR if _EMOJI.match(c) else _PLAIN)
        if len(_CLASSES) < _CLASSES_LIMIT:
            _CLASSES[c] = kind
    return kind


_CONTEXT = 32  # characters already sent, kept as the left context of cluster boundaries


def _last_cluster_start(left: str, text: str, lo: int, hi: int) -> int:
    """The largest index k with lo <= k <= hi at which a grapheme cluster of ``text`` starts
    (0 < k < len(text): the character at k has arrived), or -1. ``left`` is what came just
    before ``text``: a flag's pairing or an emoji ZWJ sequence may reach across."""
    best = -1
    offset = len(left)
    for match in _GRAPHEME.finditer(left + text, 0, offset + min(len(text), hi + 1)):
        at = match.start() - offset
        if at > hi:
            break
        if at >= lo and at > 0:
            best = at
    return best


# -- sentence ends ----------------------------------------------------------------------------


def _is_abbreviation(token: str, at_line_start: bool) -> bool:
    """Whether ``token`` (the word before a single ``.``) makes that dot a non-sentence-end."""
    word = token.lstrip(_OPENERS)
    if not word:
        return False
    if word in _ABBREVIATIONS or word.lower() in _ABBREVIATIONS_ANY_CASE:
        return True
    if word.isascii() and word.isdigit():
        # "1. Install it" at the start of a line is a list item, not a one-word sentence.
        return at_line_start and len(word) <= 3
    if len(word) == 1:
        # An initial ("J. R. R. Tolkien"); a lowercase letter is more likely a real word end.
        return word.isupper()
    parts = word.split(".")
    # Dotted initialism: e.g. i.e. a.m. p.m. U.S. U.S.A.
    return len(parts) > 1 and all(len(p) == 1 and p.isalpha() for p in parts)


def _ends_sentence(run: str, token: str, at_line_start: bool) -> bool:
    """Whether the punctuation ``run`` after word ``token``, followed by whitespace, ends one."""
    last = run[-1]
    if last == "…":
        return False
    if last == ".":
        if len(run) > 1:
            return ".." not in run and "…" not in run  # "?." is an end, "..." is not
        return not _is_abbreviation(token, at_line_start)
    return True  # ends with "!" or "?" ("?!", "...?" included)


# -- Markdown lines ---------------------------------------------------------------------------

_HEAD = 4  # characters of a line (after its indentation) that tell its Markdown block kind
_LINE, _BLOCK, _FENCE = 0, 1, 2
_LIST_ITEM = regex.compile(r"(?:[-*+] |\d{1,2}[.)](?: |$))")


def _line_kind(head: str) -> int:
    """What a line starting with ``head`` is: a code fence, another block line whose line feed
    ends it (list item, heading, table row, thematic break), or an ordinary line."""
    if head.startswith(("```", "~~~")):
        return _FENCE
    if not head:
        return _LINE
    first = head[0]
    if first == "#":
        return _BLOCK if len(head) == 1 or head[1] in "# " else _LINE
    if first == "|" or _LIST_ITEM.match(head):
        return _BLOCK
    if len(head) >= 3 and first in "-*_" and head.rstrip() == first * len(head.rstrip()):
        return _BLOCK
    return _LINE


# ASCII letters and digits: inside a word they decide nothing.
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


class SentenceBuffer:
    """Turns a stream of deltas into sentence-sized messages without losing a character, and
    says when pending text is due (see the module docstring for the policy).

    Scanning is incremental: everything still undecided (trailing punctuation, a run of
    whitespace that may become a paragraph break, a line's first characters) lives in a few
    state fields, so each ``feed`` only looks at the characters it adds.
    """

    FAST_PATHS = True  # (off in the test that checks they do what the scan does)

    __slots__ = (
        "_base",
        "_blank_line",
        "_buf",
        "_fence",
        "_first_at",
        "_first_wait",
        "_head",
        "_head_need",
        "_in_word",
        "_last_at",
        "_left",
        "_line_cut",
        "_max",
        "_max_wait",
        "_min_wait",
        "_newlines",
        "_patience",
        "_run_end",
        "_run_start",
        "_shown",
        "_soft",
        "_term",
        "_times",
        "_tokens",
        "_word_at_line_start",
        "_word_start",
        "_ws_active",
        "_ws_break",
        "_ws_start",
    )

    def __init__(
        self, max_chars: int = 400, *, first_wait: float = 0.01, max_wait: float = 1.0,
        min_wait: float = 0.25, patience_tokens: float = 60.0,
    ) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        if not (first_wait >= 0 and min_wait >= 0 and max_wait > 0 and patience_tokens > 0):
            raise ValueError("waits must be >= 0 (max_wait > 0), patience_tokens > 0")
        self._max = max_chars
        self._first_wait = min(first_wait, max_wait)
        self._max_wait = max_wait
        self._min_wait = min(min_wait, max_wait)
        self._patience = patience_tokens
        self._buf = ""  # the pending text; all of it has been scanned
        self._base = 0  # absolute stream offset of _buf[0], to match _times against
        # (absolute end offset, now) per feed() that still has pending characters.
        self._times: deque[tuple[int, float]] = deque()
        self._shown = False  # a message with a visible character has gone out
        self._left = ""  # the last characters that went out (see _last_cluster_start)
        self._tokens = 0  # non-empty feeds so far, and when the first and last came
        self._first_at = 0.0
        self._last_at = 0.0
        # Scan state. Indices are relative to _buf and may go negative once their text has been
        # emitted; users clamp them to the pending start.
        self._term = _NONE
        self._run_start = 0  # the last run of terminal punctuation: [_run_start, _run_end)
        self._run_end = 0
        self._in_word = False
        self._word_start = 0
        self._word_at_line_start = False
        self._blank_line = True  # only spaces since the last line feed (or the start)
        self._ws_active = False  # the scanned text ends in a run of whitespace ...
        self._ws_break = False  # ... that ends a message once it ends (or the delta does)
        self._newlines = 0  # line feeds in that run
        self._ws_start = 0  # where that run began
        self._line_cut = False  # a message ended inside that run: the rest leads the next
        self._soft = -1  # the last word boundary: a cluster starts there, after whitespace
        self._head = ""  # the current line's first characters after its indentation ...
        self._head_need = _HEAD  # ... and how many more to take
        self._fence = ""  # "`" or "~" inside a fenced code block

    # -- time ----------------------------------------------------------------------------------

    @property
    def pending_since(self) -> float | None:
        """`now` of the feed() that added the oldest still-pending character; None when empty."""
        return self._times[0][1] if self._buf else None

    def wait(self) -> float:
        """How long pending text may wait now, counted from its oldest character's arrival."""
        if not self._shown:
            return self._first_wait
        span = self._last_at - self._first_at
        if self._tokens < RATE_AFTER_TOKENS or span <= 0:
            return self._max_wait
        rate = (self._tokens - 1) / span
        return min(self._max_wait, max(self._min_wait, self._patience / rate))

    def deadline(self) -> float | None:
        """When the pending text is due (the clock of ``feed``'s ``now``); None when empty."""
        return self._times[0][1] + self.wait() if self._buf else None

    def flush_due(self, now: float) -> str:
        """At or after ``deadline()``: the message to send now, ('' before it): every character
        whose wait is over, cut at the best place at or after them (the module docstring)."""
        if not self._buf:
            return ""
        wait = self.wait()
        due_end = 0
        for end, at in self._times:
            if at + wait > now:
                break
            due_end = end - self._base
        if not due_end:
            return ""
        k = self._timed_cut(due_end)
        if k == len(self._buf):
            return self.flush()
        text = self._buf[:k]
        self._sent(text)
        self._trim(k)
        return text

    def _timed_cut(self, due_end: int) -> int:
        buf = self._buf
        if buf[-1] in _BREAK_AFTER:
            return len(buf)  # all of it, and a cluster starts after it for sure
        if self._soft >= due_end:
            return self._soft
        k = _last_cluster_start(self._left, buf, due_end, len(buf) - 1)
        return k if k > 0 else len(buf)

    def _sent(self, text: str) -> None:
        """``text`` goes out (the messages of one call, in order)."""
        self._left = (self._left + text)[-_CONTEXT:]
        if not self._shown and not text.isspace():
            self._shown = True

    # -- text ----------------------------------------------------------------------------------

    def flush(self) -> str:
        """Return all pending text ('' if none) and empty the buffer."""
        text = self._buf
        self._sent(text)
        self._trim(len(text))
        # What was undecided has gone out; what follows starts afresh (otherwise a space after a
        # flushed "Hello." would become a whitespace-only message).
        self._term = _NONE
        self._ws_active = False
        self._ws_break = False
        self._newlines = 0
        return text

    def feed(self, delta: str, now: float) -> list[str]:
        """Add a delta (arrived at monotonic time `now`); return the messages now complete."""
        if not delta:
            return []
        self._tokens += 1
        if self._tokens == 1:
            self._first_at = now
        self._last_at = now
        buf = self._buf + delta
        n = len(buf)
        self._times.append((self._base + n, now))
        if self.FAST_PATHS and self._feed_word(buf, delta):
            return []
        out: list[str] = []
        max_chars = self._max
        p = 0  # start of the pending text within buf; messages are buf[p:k]

        # Locals for speed: this loop runs for every character of every answer.
        term = self._term
        run_start, run_end = self._run_start, self._run_end
        in_word, word_start = self._in_word, self._word_start
        word_at_line_start, blank_line = self._word_at_line_start, self._blank_line
        ws_active, ws_break, newlines = self._ws_active, self._ws_break, self._newlines
        ws_start = self._ws_start
        line_cut, soft = self._line_cut, self._soft
        head, head_need, fence = self._head, self._head_need, self._fence

        for i in range(len(self._buf), n):
            c = buf[i]
            if c in _WORD_CHARS and in_word and not term and not head_need and (
                    i + 1 - p < max_chars):
                continue  # a letter inside a word: changes nothing (the common case)
            kind = _PLAIN if c < "\x80" else _classify(c)
            if head_need and c != "\n" and (head or (c != " " and c != "\t")):
                head += c
                head_need -= 1
            if kind == _JOINER:
                pass  # part of the character before it: decides nothing
            elif c.isspace() and c not in _NON_BREAKING:
                if not ws_active:
                    ws_active = True
                    ws_start = i
                    in_word = False
                    newlines = 0
                    line_cut = False
                    if term == _ASCII and not fence:
                        # Clamp: a cut may already have sent part of the word or run.
                        rs = max(run_start, p)
                        ws_break = run_end > p and _ends_sentence(
                            buf[rs:run_end], buf[max(word_start, p) : rs], word_at_line_start
                        )
                    else:
                        ws_break = term in (_CJK, _EMOJI_TAIL)
                    term = _NONE
                if c == "\n":
                    line = _line_kind(head)
                    if fence:
                        if line == _FENCE and head.startswith(fence * 3):
                            fence = ""
                        ends_line = bool(head)  # a blank code line goes with the next one
                    else:
                        if line == _FENCE:
                            fence = head[0]
                        ends_line = line != _LINE
                    if ends_line and i + 1 > p:
                        out.append(buf[p : i + 1])
                        p = i + 1
                        ws_break = False
                        line_cut = True
                    blank_line = True
                    newlines += 1
                    if newlines >= 2 and not line_cut and not fence:
                        ws_break = True
                    head = ""
                    head_need = _HEAD
            else:
                if ws_active:
                    ws_active = False
                    if ws_break and ws_start > p:  # (whitespace alone is no message)
                        if newlines == 0 and kind == _EMOJI_CHAR:
                            term = _EMOJI_TAIL  # "Done! 🎉": the emoji end the sentence
                        else:
                            out.append(buf[p:i])
                            p = i
                    if i > p:
                        soft = i
                elif term in (_CJK, _EMOJI_TAIL):
                    if term == _CJK:
                        ended = c not in _CLOSERS and c not in _CJK_TERMINALS
                    else:
                        ended = kind != _EMOJI_CHAR
                    if ended:
                        if i > p:
                            out.append(buf[p:i])
                            p = i
                        term = _NONE
                elif term == _CLAUSE and c not in _CLOSERS:
                    soft = i
                    term = _NONE
                if not in_word:
                    in_word = True
                    word_start = i
                    word_at_line_start = blank_line
                    blank_line = False
                if fence:
                    pass  # code: no sentences
                elif c in _RUN_CHARS:
                    if term != _ASCII or run_end != i:
                        run_start = i
                    run_end = i + 1
                    term = _ASCII
                elif c in _CJK_TERMINALS:
                    term = _CJK
                elif c in _CJK_CLAUSE:
                    term = _CLAUSE
                elif term == _EMOJI_TAIL:
                    pass  # still among the emoji (anything else was cut before, above)
                elif term == _NONE or c not in _CLOSERS:
                    term = _NONE
            if i + 1 - p >= max_chars:
                # Full without an end: cut at the last word boundary, else cluster boundary.
                if soft > p:
                    k = soft
                elif c in _BREAK_AFTER:
                    k = i + 1
                else:
                    left = (self._left + buf[:p])[-_CONTEXT:]
                    k = p + _last_cluster_start(left, buf[p:], 1, i + 1 - p)
                if k <= p:  # (-1 + p: no cluster boundary at all)
                    k = i + 1
                out.append(buf[p:k])
                p = k

        if ws_active and ws_break and buf[-1] in _BREAK_AFTER and ws_start > p:
            # The delta ends inside whitespace after an end, and a cluster starts after its
            # last character whatever comes: a boundary now. (After a space or a CR the next
            # character decides: a combining mark or a LF would belong to it.)
            out.append(buf[p:n])
            p = n
            ws_break = False
            line_cut = True  # the rest of this run (if more arrives) leads the next message

        self._buf = buf
        self._term = term
        self._run_start, self._run_end = run_start, run_end
        self._in_word, self._word_start = in_word, word_start
        self._word_at_line_start, self._blank_line = word_at_line_start, blank_line
        self._ws_active, self._ws_break, self._newlines = ws_active, ws_break, newlines
        self._ws_start = ws_start
        self._line_cut, self._soft = line_cut, soft
        self._head, self._head_need, self._fence = head, head_need, fence
        if out:
            self._sent("".join(out))
        self._trim(p)
        return out

    def _feed_word(self, buf: str, delta: str) -> bool:
        """The two commonest deltas, handled without the scan when nothing can end there:
        more letters of the word in progress (``"ency"``), or a space and a word
        (``" word"``) after a word with no sentence end pending. Does exactly what the scan
        would (``test_fast_paths_do_what_the_scan_does``); False: not such a delta."""
        if (not self._in_word or self._head_need or len(buf) >= self._max
                or not delta.isascii()):
            return False
        term = self._term
        if delta.isalnum():
            if term != _NONE and term != _ASCII:
                return False
            self._buf = buf
            self._term = _NONE  # ("3." + "14": the dot was no end)
            return True
        if term != _NONE or delta[0] != " " or len(delta) < 2 or not delta[1:].isalnum():
            return False
        start = len(self._buf)  # the space
        self._buf = buf
        self._ws_start = start
        self._soft = self._word_start = start + 1
        self._word_at_line_start = False  # (in a word: not at the start of its line)
        self._ws_break = self._line_cut = False
        self._newlines = 0
        return True

    def _trim(self, k: int) -> None:
        """Drop the first ``k`` pending characters (they have been handed out)."""
        if not k:
            return
        self._buf = self._buf[k:]
        self._base += k
        self._run_start -= k
        self._run_end -= k
        self._word_start -= k
        self._ws_start -= k
        self._soft -= k
        times = self._times
        while times and times[0][0] <= self._base:
            times.popleft()

