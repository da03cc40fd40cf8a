"""Logging set-up: plain text or one JSON object per line, each record with its generation id.

What never reaches a log: API keys, viewer tokens (the edge logs no URLs with query strings,
and uvicorn's access log is off), and prompt or answer text unless ``BROKER_LOG_PROMPTS``.
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "generation", None):
            entry["generation"] = record.generation
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging for a broker process (``fmt``: ``text`` or ``json``)."""
    if fmt not in ("text", "json"):
        raise SystemExit(f"BROKER_LOG_FORMAT: expected text or json, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_GenerationFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
