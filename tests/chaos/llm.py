"""The chaos run's LLM: the project's mock (``broker.tools.mockllm``) in a process of its own,
scripted by the prompt itself, so the harness needs no channel to it and a generation's answer
follows from its prompt alone (the checker recomputes it).

A prompt reads ``chaos <label> seed=<n> tokens=<n> delay=<seconds> mode=<mode>``; ``mode`` is
``ok`` (the whole answer), ``fail`` (HTTP 500, every attempt), ``silent`` (goes quiet after a
few tokens, keeping the connection) or ``broken`` (the connection cut after a few tokens).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import uvicorn

from broker.tools.mockllm import Reply, create_mock_llm_app, tokenize
from tests.support.api import HARD_TEXTS

MODES = ("ok", "fail", "silent", "broken")
# Where a silent or broken answer stops: after this many tokens (some text has flowed).
CUT_AFTER = 5


def prompt(label: str, seed: int, tokens: int, delay: float, mode: str) -> str:
    return f"chaos {label} seed={seed} tokens={tokens} delay={delay:.3f} mode={mode}"


def parse(prompt_text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in prompt_text.split() if "=" in part)


def answer(prompt_text: str) -> str:
    """The whole answer to a chaos prompt: words drawn from its seed, with the hard texts
    (line separators, astral characters, CJK, CR/LF) among them."""
    fields = parse(prompt_text)
    rng = random.Random(int(fields["seed"]))
    words = [w for text in HARD_TEXTS for w in tokenize(text)]
    count = int(fields["tokens"])
    return "".join(rng.choice(words) for _ in range(count)) + " The end."


def reply(body: dict[str, Any]) -> Reply:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    text = str(users[-1]) if users else ""
    if not text.startswith("chaos "):
        return Reply(tokenize("Not a chaos prompt."), delay=0.005)
    fields = parse(text)
    mode, delay = fields.get("mode", "ok"), float(fields.get("delay", "0.05"))
    tokens = tokenize(answer(text))
    if mode == "fail":
        return Reply(tokens, delay=delay, status=500)
    if mode == "silent":
        return Reply(tokens, delay=delay, stall_after=CUT_AFTER)
    if mode == "broken":
        return Reply(tokens, delay=delay, break_after=CUT_AFTER)
    return Reply(tokens, delay=delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(create_mock_llm_app(reply), host="127.0.0.1", port=args.port,
                log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
