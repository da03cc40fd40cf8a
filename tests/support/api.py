"""Small helpers for talking to an edge in tests."""

from __future__ import annotations

import uuid

import httpx

from .fakellm import TRICKY_TEXT

# Texts that break naive framing, reading or buffering: CJK punctuation, joined emoji, every
# line break, every character str.splitlines breaks at.
HARD_TEXTS = [
    TRICKY_TEXT,
    "你好，世界。这是第二句！第三句？最后一句。",
    "Emoji 🎉 and family 👨\u200d👩\u200d👧 and flags 🇫🇷. Done! 👍",
    "Line one.\r\nLine two.\r\n\r\nNew paragraph.\rLone CR. Tabs\tand  double  spaces. ",
    "  leading spaces, trailing newline\n",
]


def unique(label: str) -> str:
    """A prompt no other test uses, so the fake LLM's script for it is this test's own."""
    return f"{label} {uuid.uuid4().hex}"


async def create(http: httpx.AsyncClient, base: str, prompt: str, **fields: object) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], **fields}
    response = await http.post(f"{base}/v1/generations", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def metric(text: str, name: str) -> float:
    """The sum of the samples in Prometheus ``text`` whose line starts with ``name`` (0 if
    none): one series, or every label set of it."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def events_url(base: str, gen_id: str) -> str:
    return f"{base}/v1/generations/{gen_id}/events"


async def status(http: httpx.AsyncClient, base: str, gen_id: str) -> dict[str, object]:
    response = await http.get(f"{base}/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def assert_error_body(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    if code is not None:
        assert error["code"] == code
