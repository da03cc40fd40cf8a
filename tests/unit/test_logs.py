"""Log set-up and log lines: which libraries speak at which level; whatever a logged field
holds, a record stays one line and cannot forge another."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from broker.core import logs
from broker.core.logs import JsonFormatter, TextFormatter


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level,
             {name: logging.getLogger(name).level for name in logs.CHATTY_LOGGERS})
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize("name", logs.CHATTY_LOGGERS)
def test_http_client_request_lines_only_at_debug(name: str):
    # httpx2 (under the openai SDK) logs "HTTP Request: POST ..." at INFO for every LLM call.
    logs.configure("info", "text")
    assert logging.getLogger("worker.loop").isEnabledFor(logging.INFO)
    assert not logging.getLogger(name).isEnabledFor(logging.INFO)
    assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    logs.configure("debug", "text")
    assert logging.getLogger(name).isEnabledFor(logging.DEBUG)


# Every character some reader takes for the end of a line (Python's str.splitlines knows them
# all), and the rest of the controls a terminal acts on.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("broker.edge.routes", logging.INFO, __file__, 1, message, args,
                             exc_info)  # type: ignore[arg-type]


@given(st.text())
@example(f"model{LINE_BREAKS}2099-01-01 00:00:00,000 ERROR x: forged")
def test_a_text_record_is_one_line_whatever_its_fields_hold(field: str) -> None:
    line = TextFormatter().format(record("created generation g (model %s)", field))
    assert line.splitlines() == [line]
    assert not any(0x7F <= ord(c) < 0xA0 or ord(c) < 0x20 for c in line)


def test_text_escapes_are_readable() -> None:
    line = TextFormatter().format(record("model %s", "a\nb\rc\td\x1b[31m\x85\u2028"))
    assert line.endswith("model a\\nb\\rc\\td\\x1b[31m\\x85\\u2028")


def test_a_traceback_follows_indented_so_no_line_passes_for_a_record() -> None:
    try:
        raise ValueError("bad\n2099-01-01 00:00:00,000 ERROR x: forged")
    except ValueError:
        text = TextFormatter().format(record("failed", exc_info=sys.exc_info()))
    first, *rest = text.split("\n")
    assert first.endswith("INFO broker.edge.routes: failed")
    assert rest and all(line.startswith("    ") for line in rest)
    assert "ValueError: bad" in text


@given(st.text())
@example(LINE_BREAKS)
def test_a_json_record_is_one_line_and_reads_back_exactly(field: str) -> None:
    line = JsonFormatter().format(record("model %s", field))
    assert line.splitlines() == [line]
    assert json.loads(line)["message"] == f"model {field}"
