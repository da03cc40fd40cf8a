"""The worker's own handling of the LLM's chunks (worker.llm); the SSE decoding itself is
broker.core.sse.SSEDecoder's (tests/unit/test_sse.py)."""

from __future__ import annotations

from worker.llm import _without_none


def test_without_none_drops_null_fields_at_any_depth():
    usage = {"prompt_tokens": 3, "completion_tokens_details": None,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": None}}
    assert _without_none(usage) == {"prompt_tokens": 3,
                                    "prompt_tokens_details": {"cached_tokens": 0}}
