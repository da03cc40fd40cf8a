"""The Vercel AI SDK's chat protocol (`ai` package: ``useChat``, ``Chat`` with
``DefaultChatTransport``), both ways, as pure functions: a generation's typed events as the
UI message stream (SSE ``data:`` JSON chunks, ``data: [DONE]`` last), and the UI messages the
transport posts as the OpenAI chat messages a worker runs.

The chunk shapes are the SDK's own (``packages/ai/src/ui-message-stream/ui-message-chunks.ts``,
``uiMessageChunkSchema``; the docs' "Stream Protocols" page), and so is what the client does
with them (``packages/ai/src/ui/process-ui-message-stream.ts``): a ``text-delta`` needs an
open ``text-start`` of the same id, a ``tool-output-available`` a tool part of the same call id
in the message, or the client fails the whole stream. The mapping keeps to that, and is
deterministic in the events alone (part ids come from event ids), so a resumed stream rebuilds
the very message the first one did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.core import protocol, sse
from broker.core.protocol import EventKind
from broker.edge.errors import ApiError
from broker.edge.validation import check_create_request, load_json

# The header by which the SDK's docs tell a custom backend's UI message stream apart.
UI_MESSAGE_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-vercel-ai-ui-message-stream", b"v1"),
]

# The stream's last line ("Stream Termination"); the transport's parser skips it.
DONE = sse.frame("[DONE]")

# OpenAI's finish reasons as the SDK's (``FinishReason``: stop, length, content-filter,
# tool-calls, error, other); any other is ``other``. ``cancelled`` is the broker's own: the
# stream ends with ``abort`` instead of ``finish``, as the SDK's streamText does when aborted.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}
CANCELLED = "cancelled"

Chunk = dict[str, Any]
_COMPACT = (",", ":")


def encode(chunks: Iterable[Chunk]) -> bytes:
    """Chunks as SSE events, one ``data:`` line each (compact JSON never holds a line break)."""
    return b"".join(
        sse.frame(json.dumps(c, ensure_ascii=False, separators=_COMPACT)) for c in chunks
    )


class UIMessageStream:
    """One generation's events, from its first, as the chunks of one assistant UI message.

    Text and reasoning runs become parts whose ids name the event that opened them
    (``text-<seq>``, ``reasoning-<seq>``); a part is closed before another kind of part opens,
    so parts keep the events' order. Content after a tool result starts a new step (the model
    was called again with the result), as the SDK's multi-step streams do."""

    __slots__ = ("_after_tool_output", "_open", "_tool_calls", "done", "message_id")

    def __init__(self, message_id: str, tool_calls: Iterable[str] = ()) -> None:
        """``tool_calls``: the call ids the message holds already (one it continues)."""
        self.message_id = message_id
        self._open: tuple[str, str] | None = None  # (part type, id) of the open text/reasoning
        self._tool_calls = set(tool_calls)  # call ids with a tool part in the message
        self._after_tool_output = False
        self.done = False  # the terminal event was mapped

    def start(self) -> list[Chunk]:
        return [{"type": "start", "messageId": self.message_id}, {"type": "start-step"}]

    def event(self, seq: int, kind: EventKind, data: dict[str, Any]) -> list[Chunk]:
        """The chunks of event ``seq``, given its kind and decoded data."""
        chunks: list[Chunk] = []
        if kind in ("message", "reasoning", "tool_call") and self._after_tool_output:
            self._after_tool_output = False
            self._close(chunks)
            chunks += [{"type": "finish-step"}, {"type": "start-step"}]
        if kind == "message" or kind == "reasoning":
            part = "text" if kind == "message" else "reasoning"
            if self._open is None or self._open[0] != part:
                self._close(chunks)
                self._open = (part, f"{part}-{seq}")
                chunks.append({"type": f"{part}-start", "id": self._open[1]})
            chunks.append({"type": f"{part}-delta", "id": self._open[1], "delta": data["text"]})
            return chunks
        self._close(chunks)
        if kind == "tool_call":
            chunks.append(self._tool_input(data))
        elif kind == "tool_result":
            chunks.append(self._tool_output(data))
        elif kind == "data":
            chunks.append({"type": f"data-{data['name']}", "data": data["value"]})
        elif kind == "end":
            self.done = True
            reason = data.get("finish_reason")
            chunks.append({"type": "finish-step"})
            if reason == CANCELLED:
                chunks.append({"type": "abort", "reason": CANCELLED})
            else:
                chunks.append({"type": "finish",
                               "finishReason": FINISH_REASONS.get(reason or "", "other")})
        elif kind == "error":
            self.done = True
            chunks.append({"type": "error", "errorText": f"{data['code']}: {data['message']}"})
        return chunks

    def _close(self, chunks: list[Chunk]) -> None:
        if self._open is not None:
            part, part_id = self._open
            chunks.append({"type": f"{part}-end", "id": part_id})
            self._open = None

    def _tool_input(self, call: dict[str, Any]) -> Chunk:
        """``tool-input-available`` with the arguments parsed; arguments that are not JSON
        (the model wrote them) give ``tool-input-error`` with the raw text as ``input``: the
        part shows the call failed, and the client keeps streaming. Empty arguments are an
        empty object (a tool without parameters; some servers send "")."""
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
        self._tool_calls.add(call_id)
        if not arguments.strip():
            return {"type": "tool-input-available", "toolCallId": call_id, "toolName": name,
                    "input": {}}
        try:
            parsed = json.loads(arguments)
        except ValueError as e:
            return {"type": "tool-input-error", "toolCallId": call_id, "toolName": name,
                    "input": arguments, "errorText": f"the arguments are not JSON: {e}"}
        return {"type": "tool-input-available", "toolCallId": call_id, "toolName": name,
                "input": parsed}

    def _tool_output(self, result: dict[str, Any]) -> Chunk:
        """``tool-output-available`` for a call in this message. A result for a call the
        message does not hold (the SDK's client would fail the stream on it) goes as the data
        part ``data-tool-result`` instead."""
        call_id = result["id"]
        if call_id not in self._tool_calls:
            return {"type": "data-tool-result", "data": {"toolCallId": call_id,
                                                         "output": result["result"]}}
        self._after_tool_output = True
        return {"type": "tool-output-available", "toolCallId": call_id,
                "output": result["result"]}


# -- UI messages -> OpenAI chat messages ----------------------------------------------------

_ROLES = ("system", "user", "assistant")
# Tool part states whose call has an outcome the model may be shown.
_OUTPUT_STATES = ("output-available", "output-error")


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def to_chat_messages(ui_messages: Any) -> list[dict[str, Any]]:
    """The OpenAI chat messages for the UI messages ``ui_messages`` (``422`` for a shape that
    is not one).

    Text parts are the content (joined: a UI message may hold several). An assistant message
    is cut at its ``step-start`` parts (one LLM call each): each step is an assistant message
    with its text and the tool calls that have an outcome in the history (``tool_calls``),
    followed by one ``tool`` message per outcome (the output as JSON, or the error text).
    A tool call without an outcome is left out: OpenAI refuses a call with no answer. Reasoning,
    files, sources and data parts are for the page, not the model."""
    if not isinstance(ui_messages, list):
        raise _invalid("'messages' must be a list of UI messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(ui_messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"{where} must be an object")
        role, parts = message.get("role"), message.get("parts")
        if role not in _ROLES:
            raise _invalid(f"{where}.role must be one of {', '.join(_ROLES)}")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise _invalid(f"{where}.parts must be a list of objects")
        if role == "assistant":
            for step in _steps(parts):
                out += _assistant_step(step, where)
        else:
            out.append({"role": role, "content": _text_of(parts, where)})
    return out


def _text_of(parts: list[dict[str, Any]], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}.parts[{j}].text must be a string")
            texts.append(text)
    return "".join(texts)


def _steps(parts: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    steps: list[list[dict[str, Any]]] = [[]]
    for part in parts:
        if part.get("type") == "step-start":
            if steps[-1]:
                steps.append([])
        else:
            steps[-1].append(part)
    return steps


def _tool_name(part: dict[str, Any]) -> str | None:
    """The tool of a tool part: ``tool-<name>`` (a static tool) or ``dynamic-tool`` with
    ``toolName``; None for any other part."""
    kind = part.get("type")
    if kind == "dynamic-tool":
        name = part.get("toolName")
        return name if isinstance(name, str) else None
    if isinstance(kind, str) and kind.startswith("tool-"):
        return kind[len("tool-"):]
    return None


def _assistant_step(parts: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    for part in parts:
        name = _tool_name(part)
        if name is None or part.get("state") not in _OUTPUT_STATES:
            continue
        call_id = part.get("toolCallId")
        if not isinstance(call_id, str):
            raise _invalid(f"{where}: a tool part's toolCallId must be a string")
        # ``rawInput``: the SDK's place for input that did not parse (``tool-input-error``).
        tool_input = part.get("input", part.get("rawInput"))
        arguments = tool_input if isinstance(tool_input, str) else _json(tool_input or {})
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": name, "arguments": arguments}})
        if part["state"] == "output-available":
            content = _json(part.get("output"))
        else:
            content = str(part.get("errorText") or "the tool failed")
        outcomes.append({"role": "tool", "tool_call_id": call_id, "content": content})
    text = _text_of(parts, where)
    if not text and not calls:
        return []  # a step of reasoning alone, or of calls with no outcome
    step: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        step["tool_calls"] = calls
    return [step, *outcomes]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=_COMPACT)


# -- the request body ------------------------------------------------------------------------

# What ``Chat`` asks for: a new answer to the last user message, or another answer in place of
# the last assistant message (the client has dropped that one from ``messages`` already).
TRIGGERS = ("submit-message", "regenerate-message")


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """What ``POST /v1/ai-sdk/chat`` asks for."""

    chat_id: str  # the conversation
    request: dict[str, Any]  # the chat-completions request, validated
    # The assistant message the answer continues (the last UI message, when it is one: after
    # a client-side tool's output the client sends the conversation back to go on), else None,
    # and the tool calls that message holds (a result for one of them is its output).
    continues: str | None
    continued_calls: frozenset[str] = frozenset()


def parse_chat_body(
    body: bytes, default_model: str, *, max_messages: int, max_content_chars: int
) -> ChatTurn:
    """The body ``DefaultChatTransport`` posts: ``id`` (the chat: the conversation),
    ``messages`` (UI messages), ``trigger``, ``messageId``, and whatever the transport's
    ``body`` option adds, which goes into the request as in ``POST /v1/generations``
    (``model``, ``temperature``, ``tools``...)."""
    request = load_json(body)
    if not isinstance(request, dict):
        raise _invalid("request body must be a JSON object")
    chat_id = request.pop("id", None)
    if not protocol.is_conversation_id(chat_id):
        raise ApiError(422, "invalid_conversation_id",
                       "'id' (the chat id) must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    trigger = request.pop("trigger", TRIGGERS[0])
    if trigger not in TRIGGERS:
        raise _invalid(f"'trigger' must be one of {', '.join(TRIGGERS)}")
    request.pop("messageId", None)  # (which message a regenerate replaces: gone already)
    request.pop("conversation_id", None)  # the chat id is the conversation
    ui_messages = request.get("messages")
    request["messages"] = to_chat_messages(ui_messages)
    chat_request = check_create_request(request, default_model, max_messages=max_messages,
                                        max_content_chars=max_content_chars)
    last = ui_messages[-1] if ui_messages else {}
    continues = last.get("id") if last.get("role") == "assistant" else None
    if not isinstance(continues, str):
        return ChatTurn(str(chat_id), chat_request, None)
    calls = frozenset(part["toolCallId"] for part in last["parts"]
                      if _tool_name(part) is not None
                      and isinstance(part.get("toolCallId"), str))
    return ChatTurn(str(chat_id), chat_request, continues, calls)
