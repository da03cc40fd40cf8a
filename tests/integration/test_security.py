"""Who may see what, against real edges with API keys and viewer tokens: keys, tokens, CORS,
limits, slow clients, and what the logs keep to themselves."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from broker.client import Follower
from broker.core import protocol
from broker.core.settings import Settings
from broker.core.store import Store
from broker.edge.auth import ViewerTokens
from tests.conftest import StartBroker
from tests.support.api import assert_error_body, metric, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
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
ANSWER = f"Private answer one. {TRICKY_TEXT} Private answer two! Private answer three?"
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
    # Ready before the first test: its streams end after 1.5 s (broker_max_stream_seconds).
    start_broker("worker", redis.url, fake_llm).wait_for_log("taking jobs")
    yield edge
    redis.stop()


def worker_is_up(worker: BrokerProcess) -> BrokerProcess:
    """Wait until a worker takes jobs: a test's first stream would otherwise wait for its
    start-up, and the secured edge cuts streams at 1.5 s."""
    worker.wait_for_log("taking jobs")
    return worker


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


# -- hostile input (issue 13) ------------------------------------------------------------------
# What an adversarial probe of a keyed edge sent, each against a real edge process.

KEYED = {"broker_api_keys": KEYS, "broker_viewer_token_keys": TOKEN_KEYS, "broker_insecure": "0"}
VIEWER_CAP = 100


@dataclass
class Stack:
    redis: RedisServer
    edge: BrokerProcess
    worker: BrokerProcess


@pytest.fixture(scope="module")
def plain(fake_llm: FakeLLM, start_broker: StartBroker) -> Iterator[Stack]:
    """An edge with keys and every other setting at its default (text logs, the default header,
    body and viewer limits), and a worker that sends large messages (for the slow viewers)."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, **KEYED)
    worker = worker_is_up(start_broker("worker", redis.url, fake_llm,
                                       broker_max_message_chars="4096"))
    yield Stack(redis, edge, worker)
    redis.stop()


@pytest.fixture(scope="module")
def tight(plain: Stack, start_broker: StartBroker) -> BrokerProcess:
    """A second edge on the same Redis: a cap of 100 viewers and a 1 s send timeout."""
    return start_broker("edge", plain.redis.url, **KEYED, broker_max_viewers=str(VIEWER_CAP),
                        broker_send_timeout="1")


def full_log(edge: BrokerProcess) -> str:
    return edge.log.read_text(errors="replace")


def viewer_url(edge: BrokerProcess, gen_id: str) -> str:
    token = ViewerTokens([TOKEN_KEYS.split(",")[0]], 3600).issue(gen_id)
    return f"{edge.url}/v1/generations/{gen_id}/events?token={token}"


async def write_job(redis: RedisServer, request: object) -> str:
    """Queue a generation straight into Redis, as an edge of an earlier version did."""
    client = aioredis.Redis(port=redis.port)
    async with client:
        gen_id = protocol.new_generation_id()
        await Store(client, Settings()).create(gen_id, request, "gpt-4o-mini")  # type: ignore[arg-type]
    return gen_id


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_answer(raw: bytes) -> RawAnswer:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


def assert_json_error(answer: RawAnswer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    assert json.loads(answer.body)["error"]["code"] == code, answer


def send_raw(port: int, head: bytes, filler: int = 0) -> tuple[float | None, bytes]:
    """Send ``head``, then ``filler`` bytes more of its last header's value and the end of the
    headers, while a thread reads: (seconds until the first byte of an answer, the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        started = time.monotonic()
        first: list[float] = []
        answer = bytearray()

        def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    if not first:
                        first.append(time.monotonic() - started)
                    answer.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        with contextlib.suppress(OSError):  # the edge may hang up before all is sent
            sock.sendall(head)
            piece = b"a" * (1 << 20)
            for _ in range(filler // len(piece)):
                sock.sendall(piece)
            sock.sendall(b"\r\n\r\n")
        reader.join(60)
        return (first[0] if first else None), bytes(answer)


HEAD = b"GET /healthz HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"


async def arrival_times(http: httpx.AsyncClient, url: str, times: list[float]) -> str:
    """Follow a stream to its end, noting when each event arrived; returns the text."""
    text = []
    async with aconnect_sse(http, "GET", url) as source:
        async for event in source.aiter_sse():
            if not event.data:
                continue
            times.append(time.monotonic())
            if event.event in ("end", "error"):
                break
            text.append(json.loads(event.data)["text"])
    return "".join(text)


async def test_a_48_mib_header_is_refused_at_once_and_stalls_no_stream(
    plain: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient,
    record_property: pytest.RecordProperty,
):
    edge = plain.edge
    sentences = [f"Sentence {i} streams on. " for i in range(400)]
    prompt = fake_llm.script(unique("live during the attack"), tokens=sentences, delay=0.01)
    created = await create(http, edge, prompt)
    times: list[float] = []
    stream = asyncio.create_task(arrival_times(http, edge.url + created["events_url"], times))
    await eventually(lambda: asyncio.sleep(0, len(times) >= 20), 20, "the stream to flow")

    ready: list[int] = []
    attack = asyncio.create_task(asyncio.to_thread(send_raw, edge.port, HEAD + b"X-Big: ",
                                                   48 << 20))
    attack_started = time.monotonic()
    while not attack.done():
        ready.append((await http.get(edge.url + "/readyz")).status_code)
        await asyncio.sleep(0.05)
    refused_after, raw = await attack
    attack_ended = time.monotonic()
    text = await stream
    gaps_during = [b - a for a, b in itertools.pairwise(times)
                   if b > attack_started and a < attack_ended]
    gaps_before = [b - a for a, b in itertools.pairwise(times) if b <= attack_started]
    answered_ms = round((refused_after or 0) * 1000, 1)
    longest_gap_ms = round(max(gaps_during, default=0) * 1000)
    record_property("header_48mib_answered_ms", answered_ms)
    record_property("stream_longest_gap_during_ms", longest_gap_ms)
    print(f"\n48 MiB header: {raw[:12]!r} after {answered_ms} ms; the live stream's longest gap "
          f"during the attack {longest_gap_ms} ms (before it {max(gaps_before) * 1000:.0f} ms); "
          f"/readyz answers {sorted(set(ready))}")
    assert_json_error(parse_answer(raw), 431, "headers_too_large")
    assert set(ready) == {200}, f"/readyz during the attack: {ready}"
    assert text == "".join(sentences)  # nothing lost either


async def test_too_many_headers_are_refused_but_a_browsers_big_cookie_fits(plain: Stack):
    many = HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    _, raw = await asyncio.to_thread(send_raw, plain.edge.port, many)
    assert_json_error(parse_answer(raw), 431, "headers_too_large")
    # What a browser with many cookies sends: 32 KB of Cookie and 30 more headers.
    browser = (HEAD + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(30))
               + b"Cookie: " + b"; ".join(b"c%d=%s" % (i, b"x" * 4000) for i in range(8)))
    _, raw = await asyncio.to_thread(send_raw, plain.edge.port, browser)
    assert parse_answer(raw).status == 200


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` in one write, then read until the edge closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def head_of(size: int, path: bytes = b"/healthz", close: bool = True) -> bytes:
    """A GET head of exactly ``size`` bytes, its closing blank line included."""
    head = b"GET %s HTTP/1.1\r\nHost: edge\r\n%sX-Pad: " % (
        path, b"Connection: close\r\n" if close else b"")
    return head + b"p" * (size - len(head) - 4) + b"\r\n\r\n"


async def test_the_head_bound_is_exact_and_counts_no_body(plain: Stack):
    port, limit = plain.edge.port, Settings().max_header_bytes
    answer = await asyncio.to_thread(exchange, port, head_of(limit))
    assert parse_answer(answer).status == 200
    answer = await asyncio.to_thread(exchange, port, head_of(limit + 1))
    assert_json_error(parse_answer(answer), 431, "headers_too_large")
    # Two heads just under the bound in one write (pipelined): each is counted on its own.
    answer = await asyncio.to_thread(exchange, port,
                                     head_of(limit - 1, close=False) + head_of(limit - 1))
    assert answer.count(b"HTTP/1.1 200 ") == 2
    # A head near the bound and a body three times its size, in one write: only the head counts.
    body = json.dumps(chat("x" * 150_000)).encode()
    pad = b"X-Pad: " + b"p" * 60_000 + b"\r\n"
    post = (b"POST /v1/generations HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n"
            b"Authorization: Bearer key-current\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), pad, body))
    answer = await asyncio.to_thread(exchange, port, post)
    assert parse_answer(answer).status == 201, answer[:300]


async def test_a_malformed_request_gets_the_json_error_shape(plain: Stack):
    _, raw = await asyncio.to_thread(send_raw, plain.edge.port,
                                     b"GET /healthz HTTP/1.1\r\nHost: edge\r\nNo colon here")
    assert_json_error(parse_answer(raw), 400, "invalid_http")


def answers_in(raw: bytes) -> list[RawAnswer]:
    """The answers of one connection, one after the other (each with a Content-Length)."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        answer = parse_answer(head + b"\r\n\r\n")
        length = int(answer.headers["content-length"])
        answer.body, raw = rest[:length], rest[length:]
        answers.append(answer)
    return answers


async def test_bytes_that_are_not_a_request_after_valid_ones_are_refused_after_their_answers(
    plain: Stack, http: httpx.AsyncClient
):
    """A valid request, then bytes that are not one, in the same packet (or a body longer
    than its Content-Length): the request runs, so its answer must reach the client (the
    edge closed the connection at once, and a generation was created whose id its client never
    got); then the refusal, then the close. Requests pipelined in between are answered too."""
    post_body = json.dumps(chat(unique("pipelined then garbage"))).encode()
    post = (b"POST /v1/generations HTTP/1.1\r\nHost: edge\r\n"
            b"Authorization: Bearer key-current\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(post_body), post_body))
    get = b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n"
    cases = [
        (post + b"zz\r\n\r\n", [201, 400]),
        (get + b"xx\r\n\r\n", [200, 400]),
        (get + get + b"xx\r\n\r\n", [200, 200, 400]),
        (get.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n") + b"helloworld12345",
         [200, 400]),
    ]
    for data, statuses in cases:
        answers = answers_in(await asyncio.to_thread(exchange, plain.edge.port, data))
        assert [a.status for a in answers] == statuses, (data[:60], answers)
        assert_json_error(answers[-1], 400, "invalid_http")
        if statuses[0] == 201:
            created = json.loads(answers[0].body)
            found = await http.get(f"{plain.edge.url}/v1/generations/{created['id']}",
                                   headers={"authorization": "Bearer key-current"})
            assert found.status_code == 200


async def test_a_stream_followed_by_bytes_that_are_not_a_request_runs_to_its_end(
    no_worker: BrokerProcess, http: httpx.AsyncClient
):
    """The same on a long answer: the stream runs its course (here to
    BROKER_MAX_STREAM_SECONDS, past BROKER_REQUEST_TIMEOUT, which bounds a request head and
    was cutting it), then the refusal follows."""
    created = await http.post(f"{no_worker.url}/v1/generations", json=chat(unique("held")),
                              headers=AUTH)
    assert created.status_code == 201, created.text
    request = f"GET {created.json()['events_url']} HTTP/1.1\r\nHost: edge\r\n\r\n"
    started = time.monotonic()
    raw = await asyncio.to_thread(exchange, no_worker.port, request.encode() + b"xx\r\n\r\n")
    elapsed = time.monotonic() - started
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw[:300]
    stream, ended, after = rest.partition(b"\r\n0\r\n\r\n")  # the chunked body's end
    assert ended and b"retry:" in stream, raw[:500]
    assert_json_error(answers_in(after)[0], 400, "invalid_http")
    assert elapsed >= float(SECURED["broker_max_stream_seconds"]) > REQUEST_TIMEOUT


async def read_head(reader: asyncio.StreamReader) -> RawAnswer:
    answer = parse_answer(await reader.readuntil(b"\r\n\r\n"))
    if "content-length" in answer.headers:
        answer.body = await reader.readexactly(int(answer.headers["content-length"]))
    return answer


async def test_a_burst_of_1000_viewers_never_passes_a_cap_of_100(
    plain: Stack, tight: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient,
    record_property: pytest.RecordProperty,
):
    prompt = fake_llm.script(unique("burst"), ANSWER, hold_at=1)
    created = await create(http, plain.edge, prompt)
    request = f"GET {created['events_url']} HTTP/1.1\r\nHost: edge\r\n\r\n".encode()
    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", tight.port)
                                         for _ in range(1000)))
    try:
        for _, writer in connections:  # all at once: no await between the writes
            writer.write(request)
        answers = await asyncio.gather(*(read_head(reader) for reader, _ in connections))
        passed = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.status != 200]
        record_property("burst_passed", len(passed))
        print(f"\n1000 simultaneous GETs on a cap of {VIEWER_CAP}: {len(passed)} streams, "
              f"{len(refused)} refused")
        assert len(passed) == VIEWER_CAP
        for answer in refused:
            assert_json_error(answer, 503, "too_many_viewers")
            assert answer.headers["retry-after"] == "5"
    finally:
        for _, writer in connections:
            writer.close()
    # The slots come back as the viewers leave: the cap admits a new crowd.
    await eventually(lambda: slots_free(http, tight), 20, "the viewers' slots to be free")
    async with httpx.AsyncClient(timeout=20) as crowd:
        url = f"{tight.url}{created['events_url']}"
        viewers = [asyncio.create_task(read_events(crowd, url)) for _ in range(VIEWER_CAP)]
        await wait_for_streams(http, tight, VIEWER_CAP)
        fake_llm.reply_for(prompt).release.set()
        assert {r.text for r in await asyncio.gather(*viewers)} == {ANSWER}


async def slots_free(http: httpx.AsyncClient, edge: BrokerProcess) -> bool:
    return metric((await http.get(edge.url + "/metrics")).text, "broker_viewers ") == 0


async def test_every_refused_or_ended_stream_request_gives_its_slot_back(
    secured: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    done = await create(http, secured, fake_llm.script(unique("done"), ANSWER))
    follower = Follower(http, secured.url + done["events_url"])  # resumes past the 1.5 s cut
    assert "".join([m.text async for m in follower]) == ANSWER
    unknown = viewer_url(secured, protocol.new_generation_id())
    for _ in range(3):  # more than the cap of 4, were any slot kept
        assert (await http.get(unknown)).status_code == 404
        last = {"last-event-id": follower.last_event_id}
        assert (await http.get(secured.url + done["events_url"], headers=last)).status_code == 204
        beyond = {"last-event-id": "9999"}
        assert (await http.get(secured.url + done["events_url"], headers=beyond)).status_code == 400
    prompt = fake_llm.script(unique("after refusals"), ANSWER, hold_at=1)
    held = await create(http, secured, prompt)
    async with httpx.AsyncClient(timeout=20) as crowd:
        viewers = [asyncio.create_task(read_events(crowd, secured.url + held["events_url"]))
                   for _ in range(4)]
        await wait_for_streams(http, secured, 4)
        fake_llm.reply_for(prompt).release.set()
        assert {r.text for r in await asyncio.gather(*viewers)} == {ANSWER}


@pytest.mark.parametrize(("name", "value"), [
    ("extra_headers", {"X-Upstream": "chosen by the producer"}), ("extra_body", {}),
    ("extra_query", {"api-version": "x"}), ("timeout", 0.001),
])
async def test_sdk_call_options_in_a_create_body_are_refused(
    secured: BrokerProcess, http: httpx.AsyncClient, name: str, value: object
):
    response = await http.post(f"{secured.url}/v1/generations",
                               json={**chat("options"), name: value}, headers=AUTH)
    assert_error_body(response, 422, "invalid_request")
    assert name in response.json()["error"]["message"]


async def test_a_job_carrying_sdk_call_options_runs_without_them(
    plain: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("an older edge's job"), ANSWER)
    gen_id = await write_job(plain.redis, {
        **chat(prompt), "extra_body": {}, "extra_headers": {"X-Upstream": "x"}, "timeout": "x",
    })
    got = await read_events(http, viewer_url(plain.edge, gen_id))
    assert got.text == ANSWER and got.terminal is not None and got.terminal.event == "end"
    assert not {"extra_body", "extra_headers", "timeout"} & set(fake_llm.record_for(prompt).body)


async def test_a_worker_side_failure_of_one_generation_is_a_worker_error(
    plain: Stack, http: httpx.AsyncClient
):
    gen_id = await write_job(plain.redis, ["a request that is not an object"])
    got = await read_events(http, viewer_url(plain.edge, gen_id))
    assert got.terminal is not None and got.terminal.event == "error"
    error = got.terminal_data()
    assert error["code"] == "worker_error"
    assert "Traceback" not in error["message"] and "TypeError" not in error["message"]
    worker_metrics = (await http.get(
        f"http://127.0.0.1:{plain.worker.metrics_port}/metrics")).text
    assert metric(worker_metrics, "broker_workers_lost_total") == 0


DEEP = 100_000
HOSTILE_BODIES = {
    "nested 100k deep": b'{"messages": [{"role": "user", "content": "x"}], "metadata": '
                        + b"[" * DEEP + b"]" * DEEP + b"}",
    "a 4301-digit integer": b'{"messages": [{"role": "user", "content": "x"}], "seed": '
                            + b"7" * 4301 + b"}",
    "NaN": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "Infinity": b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
    "-Infinity": b'{"messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
    "1e999": b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
}


@pytest.mark.parametrize("label", list(HOSTILE_BODIES))
async def test_hostile_json_bodies_get_a_4xx_and_no_traceback(
    secured: BrokerProcess, http: httpx.AsyncClient, label: str
):
    before = len(full_log(secured))
    response = await http.post(f"{secured.url}/v1/generations", content=HOSTILE_BODIES[label],
                               headers={**AUTH, "content-type": "application/json"})
    assert_error_body(response, 400, "invalid_json")
    assert "Traceback" not in full_log(secured)[before:]


async def test_the_model_name_is_bounded(secured: BrokerProcess, http: httpx.AsyncClient):
    for model, status in [("m" * 257, 422), ("m" * 256, 201)]:
        response = await http.post(f"{secured.url}/v1/generations",
                                   json={**chat("bounded"), "model": model}, headers=AUTH)
        assert response.status_code == status, response.text


FORGED = "2099-01-01 00:00:00,000 ERROR x: forged"


async def test_a_model_name_cannot_forge_a_text_log_line(plain: Stack, http: httpx.AsyncClient):
    model = "".join(f"m{sep}{FORGED}" for sep in ("\n", "\r", "\u2028", "\u2029", "\x85",
                                                   "\x0b"))
    response = await http.post(f"{plain.edge.url}/v1/generations",
                               json={**chat("forge"), "model": model}, headers=AUTH)
    assert response.status_code == 201
    created = f"created generation {response.json()['id']}"
    await eventually(lambda: asyncio.sleep(0, created in full_log(plain.edge)), 10,
                     "the create's log line")
    lines = full_log(plain.edge).splitlines()  # at every line break Python knows, U+2028 too
    assert not [line for line in lines if line.startswith(FORGED)]
    assert [line for line in lines if created in line and "\\n" + FORGED in line]


async def test_json_log_lines_survive_every_line_separator(
    secured: BrokerProcess, http: httpx.AsyncClient
):
    model = "a\u2028b\u2029c\x85d\ne"
    response = await http.post(f"{secured.url}/v1/generations",
                               json={**chat("json log"), "model": model}, headers=AUTH)
    assert response.status_code == 201
    entries = [json.loads(line) for line in full_log(secured).splitlines()
               if line.startswith("{")]
    assert any(model in e["message"] for e in entries)


async def test_the_page_and_static_files_carry_security_headers_and_the_api_nosniff(
    plain: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    edge = plain.edge.url
    for path in ("/", "/static/broker-stream.js"):
        response = await http.get(edge + path)
        assert response.status_code == 200
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp, csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    created = await http.post(f"{edge}/v1/generations",
                              json=chat(fake_llm.script(unique("headers"), ANSWER)), headers=AUTH)
    answers = [created, await http.post(f"{edge}/v1/generations", json=chat("no key")),
               await http.get(f"{edge}/nowhere"), await http.get(f"{edge}/healthz"),
               await http.get(f"{edge}/metrics"), await http.get(f"{edge}/openapi.json")]
    async with http.stream("GET", edge + created.json()["events_url"]) as stream:
        answers.append(stream)
    for response in answers:
        assert response.headers["x-content-type-options"] == "nosniff", response.url


async def test_a_trailing_slash_is_not_redirected_to_the_host_header(
    plain: Stack, http: httpx.AsyncClient
):
    for method, path in [("GET", "/healthz/"), ("POST", "/v1/generations/")]:
        response = await http.request(method, plain.edge.url + path,
                                      headers={**AUTH, "host": "evil.example"})
        assert_error_body(response, 404, "not_found")
        assert "location" not in response.headers


async def test_readyz_keeps_the_redis_address_to_the_log(
    start_broker: StartBroker, http: httpx.AsyncClient
):
    port = free_port()  # nothing listens there
    edge = start_broker("edge", f"redis://127.0.0.1:{port}/0", **KEYED)
    response = await http.get(edge.url + "/readyz")
    assert_error_body(response, 503, "redis_unavailable")
    assert str(port) not in response.text and "127.0.0.1" not in response.text
    await eventually(lambda: asyncio.sleep(0, str(port) in full_log(edge)), 10,
                     "the address in the log")


async def test_a_refused_cors_preflight_gets_the_json_error_shape(
    secured: BrokerProcess, http: httpx.AsyncClient
):
    for headers in [{"origin": "https://evil.example", "access-control-request-method": "POST"},
                    {"origin": ORIGIN, "access-control-request-method": "DELETE"}]:
        response = await http.options(f"{secured.url}/v1/generations", headers=headers)
        assert_error_body(response, 400, "cors_refused")
        assert "access-control-allow-origin" not in response.headers or headers["origin"] == ORIGIN


async def test_cancelling_a_queued_generation_frees_its_quota_slot(
    start_broker: StartBroker, http: httpx.AsyncClient
):
    redis = RedisServer().start()  # no worker: generations stay queued
    try:
        edge = start_broker("edge", redis.url, **SECURED, broker_max_queued_per_key="2")
        for round_ in range(3):
            ids = [(await create(http, edge, unique(f"queued {round_}")))["id"] for _ in range(2)]
            for gen_id in ids:
                cancelled = await http.post(f"{edge.url}/v1/generations/{gen_id}/cancel",
                                            headers={"authorization": "Bearer key-previous"})
                assert cancelled.status_code == 202  # by another key than the creator's
    finally:
        redis.stop()


async def test_slow_viewers_closed_by_the_send_timeout_log_one_info_line_each(
    plain: Stack, tight: BrokerProcess, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    slow = 50
    block = ("slow " * 800).rstrip() + ". "  # ~4 kB: one message each
    tokens = [block] * 1500
    prompt = fake_llm.script(unique("slow viewers"), tokens=tokens, delay=0.002)
    created = await create(http, plain.edge, prompt)
    request = f"GET {created['events_url']} HTTP/1.1\r\nHost: edge\r\n\r\n".encode()
    sockets = []
    for _ in range(slow):  # viewers that never read, behind a small receive buffer
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", tight.port))
        sock.sendall(request)
        sockets.append(sock)
    try:
        async def all_closed() -> bool:
            text = (await http.get(tight.url + "/metrics")).text
            return metric(text, "broker_slow_viewers_closed_total") >= slow

        # The answer streams for ~len(tokens) * delay; each viewer is closed a send timeout
        # after its writes block.
        await eventually(all_closed, len(tokens) * 0.002 * 4 + 10, "the slow viewers' close")
    finally:
        for sock in sockets:
            sock.close()
    log = full_log(tight)
    assert log.count("closing a slow viewer") == slow
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
