"""From an OpenAI-compatible streamed chat completion to typed events.

Shared by the built-in worker (it reads the raw stream and hands each chunk over as the dict
``json.loads`` made of it) and the producer library's ``pipe()`` (the ``openai`` SDK's
``ChatCompletionChunk`` objects: ``chunk_dict`` turns one into the same dict).

``DeltaReader`` reads the chunks of one stream, in order, and hands back ``Piece``s in the
upstream's order:

* ``delta.content`` -> ``Text("message", ...)``;
* ``delta.reasoning_content`` (DeepSeek, Qwen, vLLM's reasoning parsers) or
  ``delta.reasoning`` (OpenRouter, Ollama, newer vLLM) -> ``Text("reasoning", ...)``. A delta
  carrying both (a server in transition between the two names) counts once:
  ``reasoning_content`` wins;
* ``delta.tool_calls[]`` fragments, keyed by ``index`` (the first fragment of a call has its
  ``id`` and ``function.name``, the next ones pieces of ``function.arguments``; several calls
  may interleave) -> one ``ToolCall`` per call once the calls are complete: when the choice's
  ``finish_reason`` arrives, or the stream ends. In index order; ``arguments`` the exact
  concatenation of the fragments, never parsed nor re-encoded;
* ``delta.refusal`` pieces -> one ``Refusal`` with their concatenation, at the same time.
  The answer text is never made up from it.

``TextChannels`` turns the text pieces into sentence-sized ``message`` and ``reasoning``
events with one ``SentenceBuffer`` each. When the stream switches from one to the other, the
text pending in the other is handed over first: so events follow the upstream's order and no
event mixes the answer and the reasoning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from broker.core import protocol
from broker.core.protocol import NewEvent
from broker.core.sentences import SentenceBuffer

TextKind = Literal["message", "reasoning"]


@dataclass(slots=True)  # not frozen: one per token, and a frozen init costs twice as much
class Text:
    kind: TextKind
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # the exact concatenation of the upstream's fragments

    def event(self) -> NewEvent:
        return protocol.new_tool_call(self.index, self.id, self.name, self.arguments)


@dataclass(frozen=True, slots=True)
class Refusal:
    text: str

    def event(self) -> NewEvent:
        return protocol.new_data("refusal", self.text)


Piece = Text | ToolCall | Refusal


def chunk_dict(chunk: Any) -> dict[str, Any]:
    """A chunk as the dict its JSON decodes to: a dict as it is; an ``openai`` SDK model
    (``ChatCompletionChunk``) through pydantic's ``model_dump``, which keeps the fields the SDK
    does not declare (``reasoning_content``, ``reasoning``: the SDK's models allow extra
    fields and keep them in ``model_extra``). Anything else has no fields: ``{}``."""
    if isinstance(chunk, dict):
        return chunk
    dump = getattr(chunk, "model_dump", None)
    if callable(dump):
        dumped = dump(exclude_none=True)
        if isinstance(dumped, dict):
            return dumped
    return {}


class _CallParts:
    """One tool call being put together from its fragments."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []

    def add(self, fragment: dict[str, Any]) -> None:
        call_id = fragment.get("id")
        if isinstance(call_id, str) and call_id and not self.id:
            self.id = call_id
        function = fragment.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        # The name comes whole in the first fragment (OpenAI, vLLM); some servers repeat it on
        # every fragment (ignored); a name sent in pieces is joined.
        if isinstance(name, str) and name and name != self.name:
            self.name += name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.arguments.append(arguments)


class DeltaReader:
    """Reads one streamed chat completion's chunks (dicts; see ``chunk_dict``) in order."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self._calls: dict[int, _CallParts] = {}
        self._refusal: list[str] = []
        self._done = False  # the calls and the refusal were handed over

    def feed(self, chunk: dict[str, Any]) -> list[Piece]:
        """The pieces ``chunk`` completes, in order (often one text, often none). Only the
        first choice is read: a generation is one answer (``n`` is 1). This is the worker's
        hot path (once per token): plain dict lookups, no ABC ``isinstance`` checks."""
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            return []
        choice = choices[0]
        if not isinstance(choice, dict):
            return []
        pieces: list[Piece] = []
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta:
            self._read_delta(delta, pieces)
        finish_reason = choice.get("finish_reason")
        if finish_reason and isinstance(finish_reason, str):
            self.finish_reason = finish_reason
            pieces += self.finish()
        return pieces

    def finish(self) -> list[Piece]:
        """At the end of the stream (or the choice's ``finish_reason``): the complete tool
        calls, in index order, then the refusal, if any. Once: later calls hand back nothing."""
        if self._done:
            return []
        self._done = True
        pieces: list[Piece] = [
            ToolCall(index, parts.id, parts.name, joined(parts.arguments))
            for index, parts in sorted(self._calls.items())
        ]
        if self._refusal:
            pieces.append(Refusal("".join(self._refusal)))
        return pieces

    def _read_delta(self, delta: dict[str, Any], pieces: list[Piece]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            pieces.append(Text("reasoning", reasoning))
        content = delta.get("content")
        if content and isinstance(content, str):
            pieces.append(Text("message", content))
        tool_calls = delta.get("tool_calls")
        if tool_calls and isinstance(tool_calls, list):
            for fragment in tool_calls:
                if isinstance(fragment, dict):
                    self._call_of(fragment).add(fragment)
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            self._refusal.append(refusal)

    def _call_of(self, fragment: dict[str, Any]) -> _CallParts:
        """The call a fragment belongs to: by its ``index``. Without one (some servers send
        each call whole, unindexed): by its ``id``, else a new call if it has an id, else the
        last call."""
        index = fragment.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = self._index_without_one(fragment.get("id"))
        parts = self._calls.get(index)
        if parts is None:
            parts = self._calls[index] = _CallParts()
        return parts

    def _index_without_one(self, call_id: Any) -> int:
        for index, parts in self._calls.items():
            if call_id and parts.id == call_id:
                return index
        if call_id or not self._calls:
            return max(self._calls, default=-1) + 1
        return max(self._calls)


class TextChannels:
    """The answer's and the reasoning's sentence buffers, as one: ``feed`` a text piece, get
    the events it completes. At most one buffer holds text at a time: feeding one kind hands
    the other's pending text over first, whole."""

    def __init__(self, make_buffer: Callable[[], SentenceBuffer]) -> None:
        self.buffers: dict[TextKind, SentenceBuffer] = {
            "message": make_buffer(), "reasoning": make_buffer(),
        }

    def feed(self, kind: TextKind, text: str, now: float) -> list[NewEvent]:
        other: TextKind = "reasoning" if kind == "message" else "message"
        events = _text_events(other, [self.buffers[other].flush()])
        return events + _text_events(kind, self.buffers[kind].feed(text, now))

    @property
    def pending_since(self) -> float | None:
        """When the oldest pending character arrived (None: nothing pending)."""
        # (Asked twice per token: spelled out for the two buffers rather than a list built.)
        message = self.buffers["message"].pending_since
        reasoning = self.buffers["reasoning"].pending_since
        if message is None or reasoning is None:
            return reasoning if message is None else message
        return min(message, reasoning)

    def deadline(self) -> float | None:
        """When pending text must go out (``flush_due``), None when nothing is pending."""
        times = [t for b in self.buffers.values() if (t := b.deadline()) is not None]
        return min(times, default=None)

    def flush_due(self, now: float) -> list[NewEvent]:
        """The text due by ``now`` (``SentenceBuffer.flush_due``), as events."""
        return [event for kind, buffer in self.buffers.items()
                for event in _text_events(kind, [buffer.flush_due(now)])]

    def flush(self) -> list[NewEvent]:
        """Everything pending, as events (the end of the answer, or before a tool call)."""
        return [event for kind, buffer in self.buffers.items()
                for event in _text_events(kind, [buffer.flush()])]


_SURROGATE = re.compile("[\ud800-\udfff]")


def joined(fragments: list[str]) -> str:
    """The fragments' exact concatenation. A server writing ``\\u`` escapes may cut an astral
    character's surrogate pair between two fragments: the halves, joined, are the character
    again. A surrogate without its pair (no UTF-8 can carry it) becomes U+FFFD."""
    text = "".join(fragments)
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _text_events(kind: TextKind, texts: list[str]) -> list[NewEvent]:
    new = protocol.new_message if kind == "message" else protocol.new_reasoning
    return [new(text) for text in texts if text]
