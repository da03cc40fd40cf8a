"""B6's answers: realistic LLM text, its true sentence and block ends, and its tokens.

Each answer is written as a list of UNITS: a sentence, a Markdown block line (list item,
heading, table row, fence line, code line) or a paragraph's last sentence, each with the
whitespace that follows it. The units are the ground truth B6 judges messages against, kept
apart from the worker's rules: a message "ends on an end" when, trailing whitespace aside, it
ends where a unit ends (or where the answer ends).

``tokenize`` cuts text like a byte-level BPE tokenizer would hand it to a streaming client:
a word with its leading space (most words whole: about four characters a token on
average in English), longer words in pieces of up to five characters, digits in
groups of up to three, CJK in pieces of one or two characters, and emoji one code point at a
time (a ZWJ sequence, a flag or a skin tone arrives in several deltas).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import regex

# Prose with abbreviations, initialisms, numbers, versions, prices, a URL and an e-mail
# address, a list, questions and exclamations.
PROSE = [
    "Short answer: yes, but it depends on what you measure. ",
    "Latency is the time until a reader sees the first words, while throughput is how many "
    "tokens per second the model produces overall. ",
    "They are related, i.e. a slow model also tends to start late, but they are not the "
    "same thing.\n\n",
    "Dr. Lee's team at the U.S. lab measured both in 2023 and found a median of 0.42 s to the "
    "first token vs. 1.8 s for a full sentence. ",
    "That gap is why streaming matters so much for chat interfaces. ",
    "A reader who waits two seconds for a block of text feels the delay; the same reader "
    "barely notices 300 ms. ",
    "Their write-up is at https://example.org/papers/latency-v2.1.pdf and the raw data "
    "(about 1,250 runs, 3.7 GB) is mirrored on the project site.\n\n",
    "Here is what usually helps, roughly in order of impact:\n\n",
    "- Send the first words at once, even before a sentence is complete.\n",
    "- Group the rest into whole sentences, so the text reads naturally.\n",
    "- Keep each message under a few hundred characters, e.g. 400.\n",
    "- Never hold text for much longer than a second.\n\n",
    "If you need numbers for a budget, plan for 20 to 50 tokens per second per stream. ",
    "Smaller models on a single GPU often reach 100 tok/s, while large reasoning models can "
    "drop below 15. ",
    "At 30 tokens per second a typical sentence of 25 tokens takes a little under a second. ",
    "Does that mean you should always wait for a full sentence? ",
    "Not quite! ",
    "Waiting too long makes the interface feel frozen, which is worse than a slightly ragged "
    "line.\n\n",
    "Questions about a specific setup are welcome; send them to support@example.com with your "
    "model name, version (for instance v3.2.1) and hardware.",
]

# A how-to: a heading, a numbered list, inline code, a fenced code block whose comment holds
# sentence ends, a table.
HOWTO = [
    "## Reading a stream in Python\n\n",
    "The simplest client uses the `httpx` library, which supports streaming responses out of "
    "the box. ",
    "Install it with `pip install httpx` (version 0.27 or later).\n\n",
    "1. Open a client with a generous read timeout.\n",
    "2. Send the request and iterate over the lines as they arrive.\n",
    "3. Stop when the server sends its terminal event.\n\n",
    "```python\n",
    "import httpx\n",
    "\n",
    "def follow(url: str) -> str:\n",
    "    text = []\n",
    '    with httpx.stream("GET", url, timeout=30.0) as response:\n',
    "        for line in response.iter_lines():\n",
    '            if line.startswith("data: "):  # one event per line. Keep going.\n',
    "                text.append(line[6:])\n",
    '    return "".join(text)\n',
    "```\n\n",
    "A few notes on the code above. ",
    "The timeout of 30.0 seconds applies to each read, not to the whole response, so a long "
    "answer is fine. ",
    "`iter_lines()` splits on line breaks only; if your text may contain U+2028, use a proper "
    "SSE parser instead.\n\n",
    "| Setting | Default | Meaning |\n",
    "|---|---|---|\n",
    "| timeout | 30.0 | seconds per read |\n",
    "| retries | 2 | attempts before giving up |\n\n",
    "That's it. ",
    "For more, see https://www.python-httpx.org/async/ or ask me about async clients.",
]

# Chinese and Japanese: sentence ends without spaces, clause punctuation, a list, a URL.
CJK = [
    "当然可以。",
    "流式输出的关键在于：第一个词要尽快出现，后面的内容按句子整理好再发送。",
    "如果模型每秒生成20个词元，一句话大约需要一秒钟，所以等待整句是合理的。\n\n",
    "具体做法如下：\n\n",
    "1. 收到第一个词元后立即发送，让用户马上看到回答。\n",
    "2. 之后在句号、问号或感叹号处分段。\n",
    "3. 超过一秒仍未结束的句子，在逗号、顿号或分号处切开。\n\n",
    "你觉得这样够快吗？",
    "我们测过，平均延迟只有0.3秒！",
    "详细数据见 https://example.cn/report 。\n\n",
    "日本語でも同じです。",
    "最初の言葉はすぐに表示され、その後は文ごとに届きます。",
    "読点で区切ることもできますが、文の終わりで区切るほうが自然です。",
]

# Casual text: emoji (ZWJ sequences, skin tones, flags), a decomposed accent, an ellipsis,
# guillemets, a list.
EMOJI = [
    "Congrats on the launch! 🎉 ",
    "That's a big milestone for a team of five 👩🏽‍💻👨🏻‍💻 and one very patient cat 🐈‍⬛. ",
    "Here's a quick checklist for launch day:\n\n",
    "- ✅ Status page is up at https://status.example.com\n",
    "- ✅ On-call covers both 🇺🇸 and 🇯🇵 time zones\n",
    "- ⏳ Blog post scheduled for 9:00 a.m. PT\n",
    "- ❓ Who's bringing the cake? 🎂\n\n",
    "Honestly... I'd also plan a small buffer, e.g. 10–15% extra capacity, in case the post "
    "goes viral. ",
    "Cafe\u0301 owners call that « la marge »; engineers call it headroom. ",
    "Either way, it's cheap insurance. ",
    "Good luck, and enjoy it 🙌🏾!",
]

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
    "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
]


def word_sentences(count: int = 21, words: int = 11) -> list[str]:
    """The issue's measurement: ``count`` sentences of ``words`` words."""
    cycle = itertools.cycle(WORDS)
    units = []
    for i in range(count):
        sentence = [next(cycle) for _ in range(words)]
        text = " ".join(sentence).capitalize() + "."
        units.append(text if i == count - 1 else text + " ")
    return units


@dataclass(frozen=True)
class Answer:
    name: str
    units: list[str]
    tokens: list[str]

    @property
    def text(self) -> str:
        return "".join(self.units)

    def ends(self) -> set[int]:
        """Offsets (in the text) where a unit ends, its trailing whitespace left out."""
        offsets, at = set(), 0
        for unit in self.units:
            offsets.add(at + len(unit.rstrip()))
            at += len(unit)
        return offsets


# Like GPT-2's pre-tokenizer: a word, a digit group or a run of symbols, each with one
# leading space; whitespace runs leave their last space to the word after them.
_PIECES = regex.compile(
    r" ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
_SYMBOL = regex.compile(r"[^\s\p{L}\p{N}\p{P}]")  # emoji and other symbols: code points


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for piece in _PIECES.findall(text):
        if _CJK.search(piece):
            tokens += [piece[i : i + 2] for i in range(0, len(piece), 2)]
        elif _SYMBOL.search(piece):
            tokens += _code_points(piece)
        elif len(piece) > 8:
            parts = math.ceil(len(piece) / 5)
            size = math.ceil(len(piece) / parts)
            tokens += [piece[i : i + size] for i in range(0, len(piece), size)]
        else:
            tokens.append(piece)
    assert "".join(tokens) == text
    return tokens


def _code_points(piece: str) -> list[str]:
    """Symbols one code point each (a leading space stays with the first)."""
    head = " " if piece.startswith(" ") else ""
    rest = piece[len(head) :]
    return [head + rest[0], *rest[1:]] if rest else [piece]


def answer(name: str, units: list[str], one_word_tokens: bool = False) -> Answer:
    text = "".join(units)
    tokens = regex.findall(r" ?\S+|\s+", text) if one_word_tokens else tokenize(text)
    return Answer(name, units, tokens)


def answers() -> list[Answer]:
    """Every answer B6 streams: the four of the realistic corpus, then the issue's 21
    sentences of 11 words at one word per token."""
    return [
        answer("prose", PROSE),
        answer("howto", HOWTO),
        answer("cjk", CJK),
        answer("emoji", EMOJI),
        answer("words", word_sentences(), one_word_tokens=True),
    ]
