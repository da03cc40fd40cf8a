"""Property-based fuzzing of a live, secured edge from its own OpenAPI document (schemathesis):
no input gets a 5xx, every answer matches the document, every error has the JSON shape. Plus
the create bodies no schema generates (``tests.support.hostile``: NaN, 100k-deep nesting,
4301-digit integers, SDK call options), each a 4xx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import hypothesis
import pytest
import requests
import schemathesis

from tests.conftest import StartBroker
from tests.support.hostile import HOSTILE_BODIES, SDK_CALL_OPTIONS, body_with, hostile_bodies
from tests.support.procs import BrokerProcess, RedisServer

API_KEY = "fuzz-key"
CASES: Counter[tuple[str, str]] = Counter()  # cases run per (operation, mode), for the report


@pytest.fixture(scope="module")
def fuzzed_edge(start_broker: StartBroker) -> Iterator[BrokerProcess]:
    redis = RedisServer().start()
    # No worker: created generations stay queued, and the queue quota is part of the surface.
    yield start_broker(
        "edge", redis.url, broker_api_keys=API_KEY, broker_viewer_token_keys="fuzz-viewer-key",
        broker_insecure="0", broker_max_queued_per_key="50", broker_max_body_bytes="65536",
    )
    redis.stop()


def _explicit_examples(test: Callable[..., None]) -> Callable[..., None]:
    """Every case of ``tests.support.hostile`` runs on every run, besides the draws."""
    for body in HOSTILE_BODIES.values():
        test = hypothesis.example(body=body)(test)
    for option in SDK_CALL_OPTIONS:
        test = hypothesis.example(body=body_with(option, "{}"))(test)
    return test


# schemathesis's own pytest plugin does not run under pytest 9 (it reaches for a private
# attribute), so the operations are driven here with its strategies and hypothesis directly.
OPERATIONS = ["POST /v1/generations", "GET /v1/generations/{gen_id}",
              "POST /v1/generations/{gen_id}/cancel", "GET /v1/generations/{gen_id}/events",
              "GET /v1/conversations/{cid}", "GET /v1/conversations/{cid}/events",
              "POST /v1/generations/{gen_id}/append", "POST /v1/generations/{gen_id}/finish",
              "POST /v1/generations/{gen_id}/heartbeat",
              "GET /healthz", "GET /readyz", "GET /metrics",
              "POST /v1/ai-sdk/chat", "GET /v1/ai-sdk/chat/{chat_id}/stream"]
# A valid chat turn opens a stream that never ends here (no worker runs it): the chat's POST
# gets negative cases only (tests/integration/test_ai_sdk.py runs valid ones, with a worker).
# A negative case may still break the schema where the edge lets it (a header) with a valid
# body, and the resume GET may draw a chat id that case created: the answers of both are not
# read past their status and headers.
NEGATIVE_ONLY = {"POST /v1/ai-sdk/chat"}
ENDLESS = {"POST /v1/ai-sdk/chat", "GET /v1/ai-sdk/chat/{chat_id}/stream"}


MODES = [(label, mode) for label in OPERATIONS for mode in ("positive", "negative")
         if (label not in NEGATIVE_ONLY if mode == "positive"
             else "/v1/" in label)]  # the others take no input


@pytest.mark.parametrize(("label", "mode"), MODES)
def test_no_input_breaks_the_api(fuzzed_edge: BrokerProcess, label: str, mode: str) -> None:
    schema = schemathesis.openapi.from_url(fuzzed_edge.url + "/openapi.json")
    operations = {op.ok().label: op.ok() for op in schema.get_all_operations()}
    assert set(operations) == set(OPERATIONS)
    strategy = operations[label].as_strategy(
        generation_mode=schemathesis.GenerationMode(mode)
    )

    @hypothesis.given(case=strategy)
    # (The chat's bodies are the largest to draw and send: fewer of them.)
    @hypothesis.settings(max_examples=60 if label in NEGATIVE_ONLY else 150, deadline=None,
                         database=None, suppress_health_check=list(hypothesis.HealthCheck))
    def run(case: schemathesis.Case) -> None:
        CASES[label, mode] += 1
        auth = {"authorization": f"Bearer {API_KEY}"}
        if label in ENDLESS:
            with requests.request(**case.as_transport_kwargs(fuzzed_edge.url, auth),
                                  stream=True, timeout=10) as streamed:
                status = streamed.status_code
                assert status < 500 or status == 503
                if mode == "positive":
                    assert str(status) in case.operation.definition.raw["responses"], status
                if status >= 400:
                    error = streamed.json()["error"]
                    assert isinstance(error["code"], str) and isinstance(error["message"], str)
            return
        response = case.call(base_url=fuzzed_edge.url, timeout=10, headers=auth)
        assert response.status_code < 500 or response.status_code == 503, response.text
        if mode == "positive":
            # ignored_auth would read our real key, set over the generated one, as "invalid
            # auth accepted"; test_security.py covers wrong keys and tokens one by one.
            case.validate_response(response, excluded_checks=[schemathesis.checks.ignored_auth])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)

    run()
    assert CASES[label, mode] > 0, f"no {mode} case of {label} ran"


@hypothesis.given(body=hostile_bodies)
@hypothesis.settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@_explicit_examples
def test_no_hostile_create_body_breaks_the_api(fuzzed_edge: BrokerProcess, body: bytes) -> None:
    """What the schema cannot generate (JSON that ``json.loads`` takes but no request may carry,
    SDK call options): a 4xx with the JSON error shape, never a 5xx or a late failure."""
    CASES["POST /v1/generations", "hostile"] += 1
    response = httpx.post(f"{fuzzed_edge.url}/v1/generations", content=body, timeout=10,
                          headers={"authorization": f"Bearer {API_KEY}",
                                   "content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)


def test_fuzz_report(request: pytest.FixtureRequest) -> None:
    """Runs after the fuzz (same module, later): every operation and mode fuzzed in this
    session ran cases; how many, for the record."""
    fuzzed = [(item.callspec.params["label"], item.callspec.params["mode"])
              for item in request.session.items
              if getattr(item, "originalname", "") == "test_no_input_breaks_the_api"]
    if not fuzzed:
        pytest.skip("no fuzz test was selected in this session")
    if any(getattr(item, "originalname", "") == "test_no_hostile_create_body_breaks_the_api"
           for item in request.session.items):
        fuzzed.append(("POST /v1/generations", "hostile"))
    ran = {key: CASES[key] for key in fuzzed}
    assert all(ran.values()), f"operations that ran no case: {ran}"
    print(f"\napi fuzz: {sum(ran.values())} cases over {len({label for label, _ in ran})} "
          f"operations: " + ", ".join(f"{label} {mode} {n}" for (label, mode), n in ran.items()))
