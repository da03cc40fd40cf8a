"""The project's mock LLM, scripted per prompt, served over real HTTP from a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from broker.core.deltas import Piece
from broker.tools.mockllm import Record, Reply, create_mock_llm_app, tokenize
from worker.llm import LLM, LLMError

from .procs import free_port, wait_until

# Every kind of character an LLM may send that a careless reader breaks: the ones
# ``str.splitlines`` (httpx's ``aiter_lines``) splits at but SSE does not (U+2028, U+2029,
# U+0085, VT, FF, U+001C-001E), CR, CRLF and LF inside the text, characters of 2, 3 and 4
# UTF-8 bytes that a read may cut in two (CJK, emoji, astral), combining marks and a U+FEFF
# that is not at the start. The fake LLM writes them unescaped (``ensure_ascii=False``), as
# UTF-8 JSON servers do; every end-to-end test's text carries them.
TRICKY_TEXT = (
    "Separators\u2028line\u2029paragraph\u0085next\x0bvtab\x0cfeed\x1cfile\x1dgroup\x1erecord, "
    "CR\rCRLF\r\nLF\n, astral 😀🎉𝄞, CJK 汉字，combining e\u0301 n\u0303, zwnbsp\ufeff kept."
)


async def _ignore(pieces: list[Piece]) -> None:
    return None


async def stream_failure(
    llm: LLM, prompt: str, on_pieces: Callable[[list[Piece]], Awaitable[None]] = _ignore,
) -> LLMError:
    """The error the worker's ``llm`` streaming ``prompt`` fails with (the test fails if it
    does not)."""
    with pytest.raises(LLMError) as failed:
        await llm.stream({"model": "m", "messages": [{"role": "user", "content": prompt}]},
                         on_pieces)
    return failed.value


class FakeLLM:
    """Answers each prompt with the ``Reply`` registered for it (by the last user message)."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.app = create_mock_llm_app(self._script)
        self.port = free_port()
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                           lifespan="off")
        )
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def records(self) -> list[Record]:
        return self.app.state.records  # type: ignore[no-any-return]

    def script(self, prompt: str, text: str | None = None, **reply: Any) -> str:
        """Register the reply to ``prompt``: ``text`` split into tokens, or ``tokens=[...]``."""
        if text is not None:
            reply["tokens"] = tokenize(text)
        reply.setdefault("delay", 0.005)
        self.replies[prompt] = Reply(**reply)
        return prompt

    def reply_for(self, prompt: str) -> Reply:
        return self.replies[prompt]

    def record_for(self, prompt: str) -> Record:
        return wait_until(
            lambda: next((r for r in self.records if prompt_of(r.body) == prompt), None),
            10, f"an LLM request for {prompt!r}",
        )

    def _script(self, body: dict[str, Any]) -> Reply:
        prompt = prompt_of(body)
        return self.replies.get(prompt) or Reply(tokenize(default_answer(prompt)), delay=0.005)

    def _serve(self) -> None:
        asyncio.run(self._server.serve())

    def start(self) -> FakeLLM:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, "the fake LLM")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def prompt_of(body: dict[str, Any]) -> str:
    """The prompt of a chat-completions request body: its last user message."""
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def default_answer(prompt: str) -> str:
    """What the fake LLM answers a prompt no test scripted."""
    return f"Echo: {prompt}. {TRICKY_TEXT} Done."
