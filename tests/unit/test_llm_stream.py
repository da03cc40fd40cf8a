"""The worker's own reading of the LLM's SSE stream (worker.llm)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from worker.llm import _sse_data, _without_none


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_data_joins_data_lines_and_skips_the_rest():
    got = [d async for d in _sse_data(lines(
        ": a comment", "event: chunk", 'data: {"a":1}', "", "",
        "data:first", "data:  second", "id: 7", "",
        "data: [DONE]",  # the stream may end without the blank line
    ))]
    assert got == ['{"a":1}', "first\n second", "[DONE]"]


def test_without_none_drops_null_fields_at_any_depth():
    usage = {"prompt_tokens": 3, "completion_tokens_details": None,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": None}}
    assert _without_none(usage) == {"prompt_tokens": 3,
                                    "prompt_tokens_details": {"cached_tokens": 0}}
