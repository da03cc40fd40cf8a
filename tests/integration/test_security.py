"""Who may see what, against real edges with API keys and viewer tokens: keys, tokens, CORS,
limits, slow clients, and what the logs keep to themselves."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker import protocol
from broker.client import Follower
from tests.conftest import StartBroker
from tests.support.api import assert_error_body, metric, unique
from tests.support.fakellm import FakeLLM
from tests.support.procs import (
    TIMER_RESOLUTION,
    BrokerProcess,
    RedisServer,
    eventually,
    free_port,
)
from tests.support.sse import read_events

KEYS = "key-current,key-previous"
TOKEN_KEYS = "viewer-key-new,viewer-key-old"
ORIGIN = "https://chat.example"
ANSWER = "Private answer one. Private answer two! Private answer three?"
SECURED = {
    "broker_api_keys": KEYS, "broker_viewer_token_keys": TOKEN_KEYS, "broker_insecure": "0",
    "broker_cors_origins": f"{ORIGIN},https://other.example", "broker_log_format": "json",
    "broker_max_messages": "4", "broker_max_content_chars": "100", "broker_max_viewers": "4",
    "broker_max_stream_seconds": "1.5", "broker_request_timeout": "1",
}
AUTH = {"authorization": "Bearer key-current"}
REQUEST_TIMEOUT = float(SECURED["broker_request_timeout"])


@pytest.fixture(scope="module")
def secured(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[BrokerProcess]:
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, **SECURED)
    start_broker("worker", redis.url, fake_llm)
    yield edge
    redis.stop()


@pytest.fixture(scope="module")
def no_worker(start_broker: StartBroker) -> Iterator[BrokerProcess]:
    """A secured edge whose generations stay queued: for the queue quota."""
    redis = RedisServer().start()
    yield start_broker("edge", redis.url, **SECURED, broker_max_queued_per_key="2")
    redis.stop()


def chat(prompt: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}]}


async def create(http: httpx.AsyncClient, edge: BrokerProcess, prompt: str,
                 key: str = "key-current") -> dict[str, str]:
    response = await http.post(f"{edge.url}/v1/generations", json=chat(prompt),
                               headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body


def token_of(events_url: str) -> str:
    return parse_qs(urlsplit(events_url).query)["token"][0]


# -- starting up -------------------------------------------------------------------------------


def test_an_edge_without_keys_refuses_to_start_unless_told(redis_server: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"REDIS_URL": redis_server.url, "BROKER_PORT": str(free_port())}
    refused = subprocess.run([sys.executable, "-m", "broker", "edge"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "BROKER_API_KEYS" in refused.stderr and "--insecure" in refused.stderr

    edge = BrokerProcess("edge", {"REDIS_URL": redis_server.url, "BROKER_INSECURE": "1"},
                         free_port()).wait_ready()
    try:
        assert "INSECURE" in edge.output()  # said loudly
    finally:
        edge.stop()


# -- producers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic key-current", "key-current"])
async def test_producer_calls_need_a_valid_api_key(
    secured: BrokerProcess, http: httpx.AsyncClient, header: str | None
):
    headers = {"authorization": header} if header else {}
    gen_id = protocol.new_generation_id()
    for method, path, body in [("POST", "/v1/generations", chat("hi")),
                               ("GET", f"/v1/generations/{gen_id}", None),
                               ("POST", f"/v1/generations/{gen_id}/cancel", None)]:
        response = await http.request(method, secured.url + path, json=body, headers=headers)
        assert_error_body(response, 401, "unauthorized")


async def test_every_configured_key_works_so_keys_rotate(
    secured: BrokerProcess, http: httpx.AsyncClient
):
    for key in ("key-current", "key-previous"):
        created = await create(http, secured, unique("rotation"), key=key)
        state = await http.get(f"{secured.url}/v1/generations/{created['id']}",
                               headers={"authorization": f"Bearer {key}"})
        assert state.status_code == 200


# -- viewers -----------------------------------------------------------------------------------


async def test_the_events_url_token_opens_that_stream_and_no_other(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    mine = await create(http, secured, fake_llm.script(unique("mine"), ANSWER))
    theirs = await create(http, secured, fake_llm.script(unique("theirs"), ANSWER))
    assert mine["events_url"].startswith(f"/v1/generations/{mine['id']}/events?token=")
    got = await read_events(http, secured.url + mine["events_url"])
    assert got.status == 200 and got.text == ANSWER

    bare = f"{secured.url}/v1/generations/{mine['id']}/events"
    assert_error_body(await http.get(bare), 401, "unauthorized")
    with_their_token = f"{bare}?token={token_of(theirs['events_url'])}"
    forbidden = await http.get(with_their_token)
    assert_error_body(forbidden, 403, "forbidden")
    tampered = token_of(mine["events_url"])[:-2] + "xx"
    assert_error_body(await http.get(f"{bare}?token={tampered}"), 403, "forbidden")
    # An id that does not exist answers exactly like one that does: no hint either way.
    unknown = protocol.new_generation_id()
    probe = await http.get(f"{secured.url}/v1/generations/{unknown}/events"
                           f"?token={token_of(theirs['events_url'])}")
    assert (probe.status_code, probe.json()) == (forbidden.status_code, forbidden.json())


async def test_a_cookie_carries_the_token_for_with_credentials_viewers(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    created = await create(http, secured, fake_llm.script(unique("cookie"), ANSWER))
    async with httpx.AsyncClient(
        timeout=20, cookies={f"broker_token_{created['id']}": token_of(created["events_url"])}
    ) as browser:
        got = await read_events(browser, f"{secured.url}/v1/generations/{created['id']}/events")
    assert got.status == 200 and got.text == ANSWER


async def test_cors_allows_listed_origins_with_credentials_and_preflight(
    secured: BrokerProcess, http: httpx.AsyncClient
):
    preflight = await http.options(f"{secured.url}/v1/generations", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    })
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    created = await http.post(f"{secured.url}/v1/generations", json=chat("cors"),
                              headers={**AUTH, "origin": ORIGIN})
    assert created.headers["access-control-allow-origin"] == ORIGIN

    stranger = await http.options(f"{secured.url}/v1/generations", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert stranger.status_code == 400
    assert "access-control-allow-origin" not in stranger.headers


# -- limits ------------------------------------------------------------------------------------


async def test_request_size_limits(secured: BrokerProcess, http: httpx.AsyncClient):
    many = {"messages": [{"role": "user", "content": "x"}] * 5}
    response = await http.post(f"{secured.url}/v1/generations", json=many, headers=AUTH)
    assert_error_body(response, 422, "too_many_messages")
    response = await http.post(f"{secured.url}/v1/generations", json=chat("y" * 101),
                               headers=AUTH)
    assert_error_body(response, 422, "content_too_long")


async def test_queued_generations_per_key_are_capped_with_429(
    no_worker: BrokerProcess, http: httpx.AsyncClient
):
    for _ in range(2):
        await create(http, no_worker, unique("queued"), key="key-previous")
    refused = await http.post(f"{no_worker.url}/v1/generations", json=chat("one more"),
                              headers={"authorization": "Bearer key-previous"})
    assert_error_body(refused, 429, "too_many_queued")
    assert refused.headers["retry-after"] == "1"
    await create(http, no_worker, unique("other key"), key="key-current")  # its own quota


async def test_viewers_past_the_edge_limit_get_503_with_retry_after(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("crowd"), ANSWER, hold_at=1)
    created = await create(http, secured, prompt)
    url = secured.url + created["events_url"]
    async with httpx.AsyncClient(timeout=20) as crowd:
        first = [asyncio.create_task(read_events(crowd, url)) for _ in range(4)]
        await wait_for_streams(http, secured, 4)
        refused = await http.get(url)
        assert_error_body(refused, 503, "too_many_viewers")
        assert refused.headers["retry-after"] == "5"
        fake_llm.reply_for(prompt).release.set()
        assert {r.text for r in await asyncio.gather(*first)} == {ANSWER}


async def wait_for_streams(http: httpx.AsyncClient, edge: BrokerProcess, count: int) -> None:
    async def enough() -> bool:
        return metric((await http.get(edge.url + "/metrics")).text, "broker_viewers ") >= count

    await eventually(enough, 10, f"{count} open streams")


async def test_a_stream_past_its_maximum_duration_is_closed_and_resumes(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    text = " ".join(f"Sentence {i} of a long answer." for i in range(40))
    created = await create(http, secured, fake_llm.script(unique("long"), text, delay=0.02))
    follower = Follower(http, secured.url + created["events_url"])
    got = "".join([m.text async for m in follower])
    assert got == text
    assert follower.reconnects >= 1  # closed at 1.5 s; the answer takes ~3 s


# -- slow clients ------------------------------------------------------------------------------


def closed_after(edge: BrokerProcess, send: bytes) -> tuple[float, bytes]:
    """Send ``send`` and then nothing: seconds until the edge answered (or else closed), and
    what it answered."""
    started = time.monotonic()  # before the edge can start its timer
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
        sock.sendall(send)
        answer, answered_at = b"", None
        while chunk := sock.recv(4096):
            answer += chunk
            answered_at = answered_at or time.monotonic()
        return (answered_at or time.monotonic()) - started, answer


@pytest.mark.parametrize("send", [b"", b"GET /healthz HTTP/1.1\r\nHost: edge\r\nX-Slow: "])
async def test_slow_headers_are_cut_off(secured: BrokerProcess, send: bytes):
    elapsed, answer = await asyncio.to_thread(closed_after, secured, send)
    assert answer == b""
    # The timer starts as the connection opens (again at the request's first byte): never
    # before one timeout (to the event loop's millisecond), and once, so before a second.
    assert REQUEST_TIMEOUT - TIMER_RESOLUTION <= elapsed < 2 * REQUEST_TIMEOUT, (
        f"closed after {elapsed:.4f}s")


async def test_a_slow_body_gets_408(secured: BrokerProcess):
    head = (b"POST /v1/generations HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer key-current"
            b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\"")
    elapsed, answer = await asyncio.to_thread(closed_after, secured, head)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    # The body's timer starts once the headers are in: never before one timeout, once.
    assert REQUEST_TIMEOUT - TIMER_RESOLUTION <= elapsed < 2 * REQUEST_TIMEOUT, (
        f"answered after {elapsed:.4f}s")


# -- logs --------------------------------------------------------------------------------------


async def test_logs_are_json_with_the_generation_and_no_secrets(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    secret_prompt = fake_llm.script(unique("do not log this prompt"), ANSWER)
    created = await create(http, secured, secret_prompt)
    await read_events(http, secured.url + created["events_url"])
    output = secured.output()
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e.get("generation") == created["id"] for e in entries)
    for secret in ("key-current", "key-previous", "viewer-key-new", token_of(
            created["events_url"]), secret_prompt, "Private answer"):
        assert secret not in output


async def test_prompts_reach_the_log_only_when_asked_for(
    redis_server: RedisServer, start_broker: StartBroker, http: httpx.AsyncClient
):
    edge = start_broker("edge", redis_server.url, **SECURED, broker_log_prompts="1")
    prompt = unique("a prompt the operator asked to see")
    created = await create(http, edge, prompt)
    entries = [json.loads(line) for line in edge.output().splitlines() if line.startswith("{")]
    logged = [e for e in entries if prompt in e["message"]]
    assert logged and logged[0]["generation"] == created["id"]
    assert "key-current" not in edge.output()
