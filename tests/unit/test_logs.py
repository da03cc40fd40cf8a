"""Log set-up: which libraries speak at which level."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from broker import logs


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
