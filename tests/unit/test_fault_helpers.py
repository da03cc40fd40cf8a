"""The fault suite's judge of a viewer across a Redis failover (``failover_outcome``) accepts
the documented outcomes and nothing else: a fault test is only as strict as this helper."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import ServerSentEvent

from tests.faults.helpers import failover_outcome
from tests.support.sse import Received

ANSWER = "One. Two. Three."


def stream(*events: tuple[str, str, dict[str, object]]) -> Received:
    """A viewer's stream as httpx-sse parses it: an event without ``id:`` carries the last
    id seen (the SSE spec's last event ID buffer), so an id of "" means "none of its own"."""
    got = Received(200, httpx.Headers())
    last_id = ""
    for kind, event_id, data in events:
        last_id = event_id or last_id
        got.events.append(ServerSentEvent(event=kind, data=json.dumps(data), id=last_id))
    return got


def message(seq: int, text: str) -> tuple[str, str, dict[str, object]]:
    return ("message", f"{seq:010d}", {"text": text})


def error(code: str, seq: int | None = None) -> tuple[str, str, dict[str, object]]:
    return ("error", f"{seq:010d}" if seq else "", {"code": code, "message": "m"})


END = ("end", "0000000004", {"finish_reason": "stop", "usage": None})


def test_the_exact_text_and_the_two_documented_errors_pass() -> None:
    exact = stream(message(1, "One."), message(2, " Two."), message(3, " Three."), END)
    assert failover_outcome(exact, ANSWER) == "exact text"
    # The edge's history_lost is not in the log: no id of its own.
    lost = stream(message(1, "One."), message(2, " Two."), error("history_lost"))
    assert failover_outcome(lost, ANSWER) == "history_lost"
    assert failover_outcome(stream(error("history_lost")), ANSWER) == "history_lost"
    # The reaper's worker_lost is in the log, right after what the viewer had.
    reaped = stream(message(1, "One."), error("worker_lost", 2))
    assert failover_outcome(reaped, ANSWER) == "worker_lost"


@pytest.mark.parametrize("got", [
    stream(message(1, "One."), message(2, " Two.")),  # never ended
    stream(message(1, "One."), error("llm_timeout", 2)),  # not a failover's error
    stream(message(1, "One."), message(2, " Too."), error("history_lost")),  # wrong text
    stream(message(1, "One."), message(1, "One."), error("history_lost")),  # repeated
    stream(message(1, "One."), message(3, " Three."), error("history_lost")),  # a gap
    stream(message(1, "One."), error("worker_lost", 1)),  # reaped under a delivered id
    stream(message(1, "One."), error("history_lost", 2)),  # history_lost with a log id
    stream(message(1, "One."), ("end", "0000000002", {"finish_reason": "stop"})),  # cut short
], ids=["unended", "other-error", "wrong-text", "repeated", "gap", "reaped-twice",
        "history-lost-with-id", "end-too-soon"])
def test_anything_else_fails(got: Received) -> None:
    with pytest.raises(AssertionError):
        failover_outcome(got, ANSWER)
