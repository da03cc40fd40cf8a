"""Logging set-up: plain text or one JSON object per line, each record with its generation id.

What never reaches a log: API keys, viewer tokens (the edge logs no URLs with query strings,
and uvicorn's access log is off), and prompt or answer text unless ``BROKER_LOG_PROMPTS``.
What cannot forge one: a control character or line separator in a logged field (a model name
with a newline) is escaped, in text and JSON logs alike.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

# Loggers of libraries that log routine traffic at INFO; heard only with BROKER_LOG_LEVEL=debug.
CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")

# The generation the current task works on; set by the routes and the worker's runs.
generation: contextvars.ContextVar[str | None] = contextvars.ContextVar("generation", default=None)


class _GenerationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "generation"):
            record.generation = generation.get()
        return True


# Characters that end a line for some reader of a log (Python's ``splitlines`` knows them all)
# or that a terminal acts on: C0 controls, DEL, C1 controls, U+2028 and U+2029. A field that
# carries one (a model name with a newline) could otherwise forge a line of its own.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = {c: _SHORT.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
            for c in _CONTROLS}
# In a JSON string these are legal unescaped, and ``json.dumps`` leaves them: escaped here, the
# object is the same and stays on its line.
_JSON_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def escape_controls(text: str) -> str:
    """``text`` with every control character and line separator escaped (``\\n``, ``\\x85``)."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>``, one line per record whatever its fields hold. A
    traceback follows on lines of its own, each indented, so that none passes for a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape_controls(self.formatMessage(record))
        details = []
        if record.exc_info:
            details.append(self.formatException(record.exc_info))
        if record.stack_info:
            details.append(self.formatStack(record.stack_info))
        for detail in details:
            line += "".join("\n    " + escape_controls(part) for part in detail.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        generation_id = getattr(record, "generation", None)  # (set by _GenerationFilter)
        if generation_id:
            entry["generation"] = generation_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False).translate(_JSON_LINE_BREAKS)


def configure(level: str, fmt: str) -> None:
    """Root logging for a broker process (``fmt``: ``text`` or ``json``)."""
    if fmt not in ("text", "json"):
        raise SystemExit(f"BROKER_LOG_FORMAT: expected text or json, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_GenerationFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours, so they share the format.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The HTTP clients under the openai SDK log every request at INFO ("HTTP Request: POST
    # ..."): a line per LLM call is noise, so they speak only at debug.
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level.lower() == "debug" else logging.WARNING
        )
