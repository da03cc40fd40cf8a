"""The LLM call: an OpenAI-compatible chat completion, streamed with the ``openai`` SDK."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
from openai import AsyncOpenAI

from broker.settings import Settings

# The SDK retries the request itself (connection errors, 408/409/429/5xx) before any token
# has arrived; once the stream has begun nothing is retried, so text is never duplicated.


@dataclass(frozen=True, slots=True)
class Completion:
    finish_reason: str
    usage: dict[str, Any] | None


class LLMError(Exception):
    """The upstream failed; ``code`` names how, ``message`` carries the upstream's words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LLM:
    def __init__(self, settings: Settings) -> None:
        self.client = AsyncOpenAI(
            api_key=settings.openai_api_key or "unset",
            base_url=settings.openai_base_url or None,
            max_retries=settings.llm_max_retries,
            # The read timeout bounds the silence between two chunks: an LLM that sends no
            # token for that long fails the generation instead of hanging it.
            timeout=openai.Timeout(
                connect=10.0, read=settings.llm_idle_timeout, write=30.0, pool=30.0
            ),
        )
        self._known = set(inspect.signature(self.client.chat.completions.create).parameters)

    async def aclose(self) -> None:
        await self.client.close()

    async def stream(self, request: dict[str, Any], on_text: Callable[[str], Any]) -> Completion:
        """Stream the answer to ``request``, calling ``on_text`` with each content delta."""
        known = {k: v for k, v in request.items() if k in self._known}
        extra = {k: v for k, v in request.items() if k not in self._known}
        try:
            stream = await self.client.chat.completions.create(
                **known,
                extra_body=extra or None,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIError as e:
            raise _translate(e) from e
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.model_dump(exclude_none=True)
                    for choice in chunk.choices[:1]:
                        if choice.delta is not None and choice.delta.content:
                            await on_text(choice.delta.content)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
        except openai.APITimeoutError as e:
            raise LLMError("llm_timeout", f"the LLM went silent mid-answer: {e}") from e
        except openai.APIConnectionError as e:
            raise LLMError("llm_stream_broken", f"the LLM stream broke: {e.__cause__!r}") from e
        except openai.APIError as e:
            raise _translate(e) from e
        except (OSError, ValueError, openai.OpenAIError) as e:
            raise LLMError("llm_stream_broken", f"the LLM stream broke: {e!r}") from e
        except Exception as e:
            # httpx2's transport errors (reset, incomplete chunked body, read timeout) land here.
            if type(e).__module__.startswith("httpx"):
                code = "llm_timeout" if "Timeout" in type(e).__name__ else "llm_stream_broken"
                raise LLMError(code, f"the LLM stream broke: {e!r}") from e
            raise
        return Completion(finish_reason or "stop", usage)


def _translate(e: openai.APIError) -> LLMError:
    if isinstance(e, openai.APITimeoutError):
        return LLMError("llm_timeout", f"the LLM did not answer in time: {e}")
    if isinstance(e, openai.APIConnectionError):
        return LLMError("llm_unreachable", f"could not reach the LLM: {e} ({e.__cause__!r})")
    if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMError("llm_auth_failed", f"the LLM rejected the API key: {e}")
    if isinstance(e, openai.APIStatusError):
        kind = "llm_server_error" if e.status_code >= 500 else "llm_rejected"
        return LLMError(kind, f"the LLM answered HTTP {e.status_code}: {e.message}")
    return LLMError("llm_error", f"the LLM failed: {e}")
