"""The LLM call: an OpenAI-compatible chat completion, streamed with the ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import openai
from openai import AsyncOpenAI, AsyncStream
from openai._base_client import make_request_options
from openai._constants import RAW_RESPONSE_HEADER
from openai._models import FinalRequestOptions
from openai._response import AsyncAPIResponse, AsyncResponseContextManager
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from broker.core.deltas import DeltaReader, Piece
from broker.core.protocol import SDK_CALL_OPTIONS
from broker.core.settings import Settings
from broker.core.sse import aiter_sse_data
from worker.body import BodyBroken, BodySilent, lean_body
from worker.pool import LeanPool, lean_transport, transport_pool

log = logging.getLogger(__name__)

# How long the body's end is waited for after `[DONE]` (see ``_read_to_the_end``).
DONE_DRAIN = 0.25
# Set by the worker on every call, whatever a request says.
_WORKER_FIELDS = frozenset({"stream", "stream_options"})

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


def environment_proxies() -> list[str]:
    """The proxy variables set (``HTTPS_PROXY``, ``ALL_PROXY``, ...; ``NO_PROXY`` alone is
    none): httpx honours them only in a client that makes its own transport."""
    return sorted(scheme for scheme in urllib.request.getproxies() if scheme != "no")


class LLM:
    def __init__(self, settings: Settings) -> None:
        # The SDK's own client and limits, on a leaner connection pool (``worker.pool``); the
        # SDK's client as it is when a proxy is set (a client given a transport ignores them).
        http_client = None
        self.pool: LeanPool | None = None  # (tests look at it)
        if environment_proxies():
            log.info("the LLM is reached through the proxy that %s names: the LLM client "
                     "keeps httpx's own connection pool",
                     "/".join(f"{p.upper()}_PROXY" for p in environment_proxies()))
        else:
            transport = lean_transport(openai.DEFAULT_CONNECTION_LIMITS)
            self.pool = transport_pool(transport)
            http_client = openai.DefaultAsyncHttpxClient(transport=transport)
        self.client = AsyncOpenAI(
            api_key=settings.openai_api_key or "unset",
            base_url=settings.openai_base_url or None,
            max_retries=settings.llm_max_retries,
            # The read timeout bounds the silence between two chunks: an LLM that sends no
            # token for that long fails the generation instead of hanging it.
            timeout=openai.Timeout(
                connect=10.0, read=settings.llm_idle_timeout, write=30.0, pool=30.0
            ),
            http_client=http_client,
        )
        # What ``chat.completions.with_streaming_response.create`` sends, less its work on the
        # arguments (a recursive walk of the request against the SDK's TypedDicts, ~0.3 ms per
        # call, and 40 keyword arguments): the job's request is already JSON, fields checked
        # by the edge, with no aliases or Python values for the SDK to convert. The request
        # itself is still the SDK's: auth, retries, status errors.
        # Built once, copied per call (what ``client.post`` builds each time: ``construct``
        # deep-copies the model's defaults, ~6 % of the worker's CPU on the create path), the
        # URL absolute (no merge with the base URL per call, which parsed it twice).
        self._request_options = FinalRequestOptions.construct(
            method="post", url=str(self.client.base_url.join("chat/completions")),
            **make_request_options(
                extra_headers={RAW_RESPONSE_HEADER: "stream"}, security={"bearer_auth": True}),
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def stream(
        self, request: dict[str, Any], on_pieces: Callable[[list[Piece]], Awaitable[None]]
    ) -> Completion:
        """Stream the answer to ``request``, calling ``on_pieces`` with what each chunk
        completes (``broker.core.deltas``: answer and reasoning text, tool calls, a refusal),
        in the upstream's order."""
        # Only fields of the request body reach the SDK: call options (a job queued by an edge
        # that did not refuse them yet) would set the upstream request's headers or timeout.
        dropped = sorted((SDK_CALL_OPTIONS | _WORKER_FIELDS) & request.keys())
        if dropped:
            log.warning("ignoring %s in the request: not fields of the request body",
                        ", ".join(dropped))
        body = {k: v for k, v in request.items() if k not in dropped}
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        reader = DeltaReader()
        usage: dict[str, Any] | None = None
        done = False  # the stream's own end, `data: [DONE]`, came
        # The SDK's own stream would build a pydantic model of every chunk: that was ~40 % of
        # the worker's CPU (B5, py-spy). The raw response is read here instead, SSE-decoded
        # and json.loads'ed; the request itself (retries, status errors) is still the SDK's.
        # Decoded as bytes by the SSE rules (broker.core.sse.SSEDecoder), not with aiter_lines:
        # that splits like str.splitlines, so a raw U+2028 in a chunk's JSON broke the stream.
        # aiter_bytes, not aiter_raw: a gzip/deflate/br/zstd Content-Encoding is undone.
        # An uncompressed HTTP/1.1 body is read lean instead (``worker.body``: the same
        # connection and parser, without httpx's and httpcore's per-chunk layers).
        call = AsyncResponseContextManager(cast(
            Awaitable[AsyncAPIResponse[ChatCompletion]],
            self.client.request(
                ChatCompletion, self._request_options.model_copy(update={"json_data": body}),
                stream=True, stream_cls=AsyncStream[ChatCompletionChunk],
            ),
        ))
        try:
            async with call as response:
                http = response.http_response
                body_bytes = lean_body(http) or http.aiter_bytes()
                datas = aiter_sse_data(body_bytes)
                try:
                    async for data in datas:
                        if data.startswith("[DONE]"):
                            done = True
                            await _read_to_the_end(datas)
                            break
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            continue
                        if chunk.get("error"):
                            raise LLMError(
                                "llm_error", f"the LLM failed: {_error_message(chunk)}")
                        if chunk.get("usage") is not None:
                            usage = _without_none(chunk["usage"])
                        pieces = reader.feed(chunk)
                        if pieces:
                            await on_pieces(pieces)
                finally:
                    # Closed now, before the response, not whenever they are collected: the
                    # lean reader's end sets the connection's reading back as anyio leaves it,
                    # and run later it would do so under the next request on the connection
                    # (which then waited forever for its answer).
                    await _aclose(datas)
                    await _aclose(body_bytes)
        except LLMError:
            raise
        except BodySilent as e:
            raise LLMError("llm_timeout", f"the LLM went silent mid-answer: {e}") from e
        except BodyBroken as e:
            raise LLMError("llm_stream_broken", f"the LLM stream broke: {e}") from e
        except openai.APIError as e:  # the request: the SDK wraps its errors
            raise _translate(e) from e
        except (OSError, ValueError, openai.OpenAIError) as e:
            raise LLMError("llm_stream_broken", f"the LLM stream broke: {e!r}") from e
        except Exception as e:
            # httpx2's transport errors (reset, incomplete chunked body, read timeout) land here.
            if type(e).__module__.startswith("httpx"):
                if "Timeout" in type(e).__name__:
                    raise LLMError("llm_timeout", f"the LLM went silent mid-answer: {e!r}") from e
                raise LLMError("llm_stream_broken", f"the LLM stream broke: {e!r}") from e
            raise
        if reader.finish_reason is None and not done:
            # Neither a finish_reason nor `[DONE]` (every OpenAI-compatible server sends one):
            # the body ended cleanly but the answer was cut (a proxy closing it, a crashed
            # server behind one). Ended as complete, it would read as the whole answer.
            raise LLMError("llm_stream_broken",
                           "the LLM stream ended without a finish_reason or [DONE]: the "
                           "answer may be cut short")
        # A stream that ended with [DONE] and no finish_reason: its tool calls are complete now.
        pieces = reader.finish()
        if pieces:
            await on_pieces(pieces)
        return Completion(reader.finish_reason or "stop", usage)


async def _read_to_the_end(datas: AsyncIterator[str]) -> None:
    """The body after ``[DONE]``: its end (the last chunk) follows at once, but often in a
    read of its own (over TLS a record each). Closed before it came, the response would take
    the connection with it (a new connection, and TLS handshake, per answer); so it is read,
    for at most ``DONE_DRAIN`` seconds (a server holding the body open after ``[DONE]``
    delays the answer's end by that much). What comes or fails there is no part of the
    answer."""
    try:
        async with asyncio.timeout(DONE_DRAIN):
            async for _ in datas:
                pass
    except Exception as e:  # (any: the reader's, httpx's; the answer is whole already)
        log.debug("the LLM's body after [DONE] was not read to its end: %r", e)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


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


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk["error"]
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else "an error occurred mid-stream"


def _without_none(value: Any) -> Any:
    """Like the SDK's ``model_dump(exclude_none=True)``: no null fields, at any depth."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value
