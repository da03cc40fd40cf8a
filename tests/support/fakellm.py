"""The project's mock LLM, scripted per prompt, served over real HTTP from a background thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import uvicorn

from broker.mockllm import Record, Reply, create_mock_llm_app, tokenize

from .procs import free_port, wait_until


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
        return self.replies.get(prompt) or Reply(tokenize(f"Echo: {prompt}. Done."), delay=0.005)

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
