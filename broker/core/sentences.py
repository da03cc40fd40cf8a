"""Group LLM token deltas into sentence-sized messages.

The worker feeds every delta it receives into a ``SentenceBuffer`` and publishes each message the
buffer hands back; on the flush interval (and at the end of the answer) it calls ``flush()`` so
no text waits longer than that. Whatever the split into deltas, the messages joined together
(plus the final ``flush()``) are exactly the text fed in.

A message ends at:

* ``.``, ``!`` or ``?`` (possibly repeated, e.g. ``?!``), then any closing quotes/brackets, then
  whitespace. The message takes the whitespace that has arrived with it, but never waits for more.
  Not a sentence end: ellipses (``...``, ``…``), decimals (``3.14``, the dot is not followed by
  whitespace), dots inside URLs and e-mail addresses (likewise), common abbreviations
  (``Dr.``, ``e.g.``, ``U.S.``), single-capital initials (``J. R. R. Tolkien``) and list
  markers at the start of a line (``1. ``).
* CJK ``。`` and fullwidth ``!``/``?`` (U+FF01, U+FF1F), plus any closing brackets; no
  whitespace needed.
* A paragraph break: a run of whitespace holding two line feeds (``\\n\\n``, ``\\r\\n\\r\\n``).
* ``max_chars`` pending characters without any of the above: cut after the last whitespace
  within the limit, else hard at ``max_chars``.
"""

from __future__ import annotations

from collections import deque

__all__ = ["SentenceBuffer"]

# Characters that make up a run of terminal punctuation ("?!", "...", "…"); the run as a whole
# decides whether it ends a sentence.
_RUN_CHARS = frozenset(".!?…")
_CJK_TERMINALS = frozenset("。\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}")
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

_ABBREVIATIONS = frozenset(
    {"Mr", "Mrs", "Ms", "Messrs", "Dr", "Prof", "Sr", "Jr", "St", "Mt", "No", "Fig"}
)
# Matched case-insensitively so a capitalised one starting a sentence is still caught.
_ABBREVIATIONS_ANY_CASE = frozenset({"vs", "etc", "approx", "cf", "al"})

# What the scanned text currently ends with (see SentenceBuffer._term).
_NONE = 0
_ASCII = 1  # terminal punctuation (+ closers): a sentence end if whitespace follows
_CJK = 2  # CJK terminator (+ closers): a sentence end before the next other character


def _is_ws(c: str) -> bool:
    return c.isspace() and c not in _NON_BREAKING


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


class SentenceBuffer:
    """Turns a stream of deltas into sentence-sized messages without losing a character.

    Scanning is incremental: everything that is still undecided (trailing punctuation, a run of
    whitespace that may become a paragraph break) lives in a few state fields, so each ``feed``
    only looks at the characters it adds: amortised O(len(delta)).
    """

    def __init__(self, max_chars: int = 400) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        self._max = max_chars
        self._buf = ""  # the pending text; all of it has been scanned
        self._base = 0  # absolute stream offset of _buf[0], to match _times against
        # (absolute end offset, now) per feed() that still has pending characters.
        self._times: deque[tuple[int, float]] = deque()
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
        self._last_ws = -1

    @property
    def pending_since(self) -> float | None:
        """`now` of the feed() that added the oldest still-pending character; None when empty."""
        return self._times[0][1] if self._buf else None

    def due(self, now: float, interval: float) -> bool:
        """True when pending text has waited >= interval."""
        since = self.pending_since
        return since is not None and now - since >= interval

    def flush(self) -> str:
        """Return all pending text ('' if none) and empty the buffer."""
        text = self._buf
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
        buf = self._buf + delta
        n = len(buf)
        self._times.append((self._base + n, now))
        out: list[str] = []
        max_chars = self._max
        p = 0  # start of the pending text within buf; messages are buf[p:k]

        # Locals for speed: this loop runs for every character of every answer.
        term = self._term
        run_start, run_end = self._run_start, self._run_end
        in_word, word_start = self._in_word, self._word_start
        word_at_line_start, blank_line = self._word_at_line_start, self._blank_line
        ws_active, ws_break, newlines = self._ws_active, self._ws_break, self._newlines
        last_ws = self._last_ws

        for i in range(len(self._buf), n):
            c = buf[i]
            if _is_ws(c):
                if not ws_active:
                    ws_active = True
                    in_word = False
                    newlines = 0
                    if term == _ASCII:
                        # Clamp: a hard cut may already have sent part of the word or run.
                        rs = max(run_start, p)
                        ws_break = run_end > p and _ends_sentence(
                            buf[rs:run_end], buf[max(word_start, p) : rs], word_at_line_start
                        )
                    else:
                        ws_break = term == _CJK
                    term = _NONE
                if c == "\n":
                    blank_line = True
                    newlines += 1
                    if newlines >= 2:
                        ws_break = True
                last_ws = i
            else:
                if ws_active:
                    ws_active = False
                    if ws_break and i > p:
                        out.append(buf[p:i])
                        p = i
                elif term == _CJK and c not in _CLOSERS and c not in _CJK_TERMINALS and i > p:
                    out.append(buf[p:i])
                    p = i
                if not in_word:
                    in_word = True
                    word_start = i
                    word_at_line_start = blank_line
                    blank_line = False
                if c in _RUN_CHARS:
                    if term != _ASCII or run_end != i:
                        run_start = i
                    run_end = i + 1
                    term = _ASCII
                elif c in _CJK_TERMINALS:
                    term = _CJK
                elif term == _NONE or c not in _CLOSERS:
                    term = _NONE
            if i + 1 - p >= max_chars:
                # Full without a sentence end: cut after the last whitespace if there is one.
                if last_ws >= p:
                    k = last_ws + 1
                    if k == i + 1 and c == "\r" and last_ws > p:
                        k = last_ws  # a "\n" may come next: keep "\r\n" together
                else:
                    k = i + 1
                out.append(buf[p:k])
                p = k

        if ws_active and ws_break:
            # The delta ends inside a whitespace run after a sentence end: that is a boundary
            # now. Hold back only a trailing "\r" so a following "\n" stays with it.
            k = n - 1 if buf[-1] == "\r" else n
            if k > p:
                out.append(buf[p:k])
                p = k
            # The rest of this run (if more arrives) goes with the next sentence.
            ws_break = False
            newlines = 0

        self._buf = buf
        self._term = term
        self._run_start, self._run_end = run_start, run_end
        self._in_word, self._word_start = in_word, word_start
        self._word_at_line_start, self._blank_line = word_at_line_start, blank_line
        self._ws_active, self._ws_break, self._newlines = ws_active, ws_break, newlines
        self._last_ws = last_ws
        self._trim(p)
        return out

    def _trim(self, k: int) -> None:
        """Drop the first ``k`` pending characters (they have been handed out)."""
        if not k:
            return
        self._buf = self._buf[k:]
        self._base += k
        self._run_start -= k
        self._run_end -= k
        self._word_start -= k
        self._last_ws -= k
        times = self._times
        while times and times[0][0] <= self._base:
            times.popleft()
