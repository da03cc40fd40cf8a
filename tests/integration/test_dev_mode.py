"""``broker dev`` as a newcomer meets it: what its startup log says is open is what is open,
and ``OPENAI_BASE_URL`` alone means a local LLM server that needs no key."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import httpx
import pytest

from broker.tools.mockllm import streamed_messages
from tests.support.api import unique
from tests.support.devserver import DevServer
from tests.support.fakellm import FakeLLM
from tests.support.sse import read_events

pytestmark = pytest.mark.timeout(120)

# A sentence end, as a reader sees one: terminal punctuation, closing quotes, then whitespace
# or the end of the answer; or a CJK full stop.
SENTENCE_END = re.compile(r"([.!?][\"')]*\s*|。)$")


def non_loopback_address() -> str | None:
    """An address of this machine that other machines would use (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.255", 9))  # TEST-NET-1: routing only, nothing sent
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def dev(request: pytest.FixtureRequest) -> Iterator[DevServer]:
    server = DevServer(*getattr(request, "param", ())).start()
    yield server
    server.stop()


async def test_the_startup_log_says_what_is_open_and_it_is(dev: DevServer) -> None:
    lines = dev.log_lines("broker.tools.dev")
    assert ("dev mode: no API keys: whoever reaches the port may create generations, read "
            "their text and cancel them; it listens on 127.0.0.1 only: other machines cannot "
            "reach it (--host / BROKER_HOST changes that)") in lines, lines
    assert ("dev mode: viewer tokens are on, signed with a key made at startup: a stream needs "
            "the token of its events_url, and no token outlives this process") in lines, lines
    assert not [line for line in dev.log().splitlines() if "INSECURE" in line]  # edges' words

    async with httpx.AsyncClient(base_url=dev.url, timeout=20) as http:
        # No API key: create, read and cancel are open.
        created = await http.post("/v1/generations", json={"messages": [
            {"role": "user", "content": "Who may read this?"}]})
        assert created.status_code == 201, created.text
        gen_id, events_url = created.json()["id"], created.json()["events_url"]
        assert (await http.get(f"/v1/generations/{gen_id}")).status_code == 200
        # Viewer tokens are on: the stream needs the one in events_url.
        bare = await http.get(f"/v1/generations/{gen_id}/events")
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "unauthorized"
        assert "?token=" in events_url
        assert (await http.post(f"/v1/generations/{gen_id}/cancel")).status_code == 202
        got = await read_events(http, events_url)
        assert got.status == 200 and got.terminal_data()["finish_reason"] == "cancelled"

    other = non_loopback_address()
    if other is not None:  # a machine with a network address: the port is not on it
        assert not connects(other, dev.port)


@pytest.mark.parametrize("dev", [("--host", "0.0.0.0")], indirect=True)
def test_on_every_interface_the_log_says_other_machines_reach_it(dev: DevServer) -> None:
    lines = dev.log_lines("broker.tools.dev")
    assert (f"dev mode: no API keys: whoever reaches the port may create generations, read "
            f"their text and cancel them; it listens on every interface (0.0.0.0): other "
            f"machines can reach port {dev.port}") in lines, lines
    assert dev.url == f"http://127.0.0.1:{dev.port}"  # the banner names a URL that opens
    other = non_loopback_address()
    if other is not None:
        assert connects(other, dev.port)


def test_with_producer_keys_the_log_says_they_are_needed() -> None:
    dev = DevServer(env={"BROKER_API_KEYS": "a-dev-key", "BROKER_VIEWER_TOKEN_KEYS": "v"})
    try:
        dev.start()
        lines = dev.log_lines("broker.tools.dev")
        refused = httpx.post(dev.url + "/v1/generations", json={"messages": [
            {"role": "user", "content": "no key"}]})
    finally:
        dev.stop()
    assert ("dev mode: creating, reading and cancelling generations needs an API key "
            "(BROKER_API_KEYS); it listens on 127.0.0.1 only: other machines cannot reach it "
            "(--host / BROKER_HOST changes that)") in lines, lines
    assert "dev mode: viewer tokens are on, signed with BROKER_VIEWER_TOKEN_KEYS" in lines
    assert refused.status_code == 401


async def test_a_base_url_without_a_key_is_a_local_llm_server(fake_llm: FakeLLM) -> None:
    """Ollama or llama.cpp's server need no key: ``OPENAI_BASE_URL`` alone is used as is."""
    answer = "A local model answers. It needs no key! Done."
    prompt = fake_llm.script(unique("local llm"), answer)
    dev = DevServer(env={"OPENAI_BASE_URL": fake_llm.base_url}).start()
    try:
        async with httpx.AsyncClient(base_url=dev.url, timeout=20) as http:
            created = await http.post("/v1/generations", json={"messages": [
                {"role": "user", "content": prompt}]})
            assert created.status_code == 201, created.text
            got = await read_events(http, created.json()["events_url"])
        lines = dev.log_lines("broker.tools.dev")
    finally:
        dev.stop()
    assert got.text == answer and got.terminal_data()["finish_reason"] == "stop"
    assert fake_llm.record_for(prompt).completed
    assert (f"dev mode: an in-memory store (nothing survives a restart); LLM at "
            f"{fake_llm.base_url} without an API key (OPENAI_BASE_URL alone: a local server "
            f"such as Ollama or llama.cpp)") in lines, lines


async def test_the_mock_answer_shows_its_first_words_at_once_then_whole_sentences(
    dev: DevServer,
) -> None:
    """With every setting at its default, the built-in answer (a steady 40 tokens/s) goes out
    as the worker's sentence buffer promises: its first words at once, the rest of the first
    sentence, then every message one whole sentence (the demo page tints each message: a
    timed cut mid-sentence would show as a band cut in two)."""
    async with httpx.AsyncClient(base_url=dev.url, timeout=30) as http:
        created = await http.post("/v1/generations", json={"messages": [{"role": "user",
            "content": "Explain how Server-Sent Events resume after a dropped connection."}]})
        got = await read_events(http, created.json()["events_url"])
    messages = [json.loads(e.data)["text"] for e in got.messages]
    assert got.terminal_data()["finish_reason"] == "stop"
    assert messages == streamed_messages("".join(messages), messages[0])
    assert len(messages) >= 10
    for message in messages[1:]:
        assert SENTENCE_END.search(message), f"cut mid-sentence: {message!r}"
