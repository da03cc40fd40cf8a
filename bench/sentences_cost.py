"""The worker's sentence buffer alone: CPU per token on B6's corpus, the flusher included.

Every answer of ``bench/corpus.py`` (prose, a how-to with code, CJK, emoji, the 21 sentences
of 11 words) is fed token by token on a fake clock at R tokens/s, exactly as
``GenerationRun`` uses the buffer: per token ``pending_since`` before and after ``feed``; the
flusher's part each time its deadline passes (``flush_due``, then ``deadline`` again), then
``flush`` at the end. Prints microseconds of CPU per token, the best and the median of several
repeats (``time.process_time``), per rate.

    .venv/bin/python -m bench.sentences_cost          # ~20 s, not part of python -m bench
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.corpus import answers
from broker.core.sentences import SentenceBuffer


def stream(tokens: list[str], rate: float) -> int:
    """One answer through a buffer, as the worker drives it; returns characters handed out."""
    buf = SentenceBuffer()
    sent = 0
    wake: float | None = None  # when the flusher's sleep ends (None: waiting for text)
    for i, token in enumerate(tokens):
        now = i / rate
        while wake is not None and wake <= now:
            sent += len(buf.flush_due(wake))
            wake = buf.deadline()
        buf.pending_since  # noqa: B018  (the worker reads it before and after each feed)
        for message in buf.feed(token, now):
            sent += len(message)
        if buf.pending_since is not None and wake is None:
            wake = buf.deadline()
    return sent + len(buf.flush())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sentences_cost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,100", help="tokens/s of the fake clock")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=20, help="corpus passes per repeat")
    args = parser.parse_args(argv)
    corpus = [a.tokens for a in answers()]
    texts = sum(len("".join(t)) for t in corpus)
    tokens = sum(map(len, corpus))
    print(f"{tokens} tokens, {texts} characters per pass\n")
    print("| tokens/s | µs CPU per token, best | median |\n|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        runs = []
        for _ in range(args.repeats):
            started = time.process_time()
            for _ in range(args.rounds):
                for t in corpus:
                    assert stream(t, rate) == len("".join(t))
            runs.append((time.process_time() - started) / (args.rounds * tokens) * 1e6)
        print(f"| {rate:g} | {min(runs):.2f} | {statistics.median(runs):.2f} |")


if __name__ == "__main__":
    main()
