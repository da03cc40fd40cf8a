"""Conversations end to end: turns created with ``conversation_id`` run by the real worker (the
real ``openai`` SDK against the fake LLM), followed over ONE SSE response per device from real
edges on a real Redis and on a three-master Redis Cluster (the ``stack`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from broker.core import protocol
from tests.conftest import Stack, StartBroker
from tests.support.api import assert_error_body, metric, unique
from tests.support.fakellm import FakeLLM
from tests.support.procs import RedisServer, eventually

TERMINAL = ("end", "error")


def new_cid() -> str:
    return f"chat:{uuid.uuid4().hex[:12]}.v1"


async def turn(http: httpx.AsyncClient, base: str, cid: str, prompt: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "conversation_id": cid}
    response = await http.post(f"{base}/v1/generations", json=body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


@dataclass
class Device:
    """One viewer of a conversation: every event it received, in order, as they come."""

    status: int = 0
    events: list[ServerSentEvent] = field(default_factory=list)

    def turns_ended(self) -> int:
        return sum(1 for e in self.events if e.event in TERMINAL)

    def of_turn(self, gen_id: str) -> list[ServerSentEvent]:
        return [e for e in self.events if json.loads(e.data)["generation_id"] == gen_id]

    def text_of(self, gen_id: str) -> str:
        return "".join(json.loads(e.data)["text"] for e in self.of_turn(gen_id)
                       if e.event == "message")

    async def until(self, check: Any, what: str) -> None:
        async def met() -> bool:
            return bool(check(self))
        try:
            await eventually(met, 15, what)
        except TimeoutError as e:
            raise AssertionError(f"{what}: got {self.status} {self.events}") from e


@contextlib.asynccontextmanager
async def following(
    http: httpx.AsyncClient, url: str, *, last_event_id: str | None = None,
) -> AsyncIterator[Device]:
    """A device following ``url`` in the background while the block runs, then hanging up."""
    device = Device()
    headers = {"last-event-id": last_event_id} if last_event_id is not None else {}
    opened = asyncio.Event()

    async def follow() -> None:
        async with aconnect_sse(http, "GET", url, headers=headers) as source:
            device.status = source.response.status_code
            opened.set()
            if device.status != 200:
                await source.response.aread()
                return
            async for event in source.aiter_sse():
                if event.data:
                    device.events.append(event)

    task = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(10):
            await opened.wait()
        yield device
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def at_least(n: int) -> Any:
    return lambda device: len(device.events) >= n


def seen(events: list[ServerSentEvent]) -> list[tuple[str, str, dict[str, Any]]]:
    """What a device was sent, but the status in a turn's opening event (a device sees the
    turn's status when it reaches the turn: queued or running live, completed in a replay)."""
    out = []
    for event in events:
        data = json.loads(event.data)
        if event.event == "turn":
            assert data.pop("status") in ("queued", "running", "completed")
        out.append((event.event, event.id, data))
    return out


def assert_well_formed(device: Device, turns: list[str]) -> None:
    """Each turn opens with ``event: turn`` and ends with its terminal event, in creation
    order; ids strictly increase; every data object names its generation."""
    ids = [protocol.parse_conversation_event_id(e.id) for e in device.events]
    assert ids == sorted(set(ids)), "ids must strictly increase"
    assert [e.id for e in device.events] == sorted(e.id for e in device.events)  # as strings too
    order = []
    for event in device.events:
        gen_id = json.loads(event.data)["generation_id"]
        if event.event == "turn":
            order.append(gen_id)
        else:
            assert order and order[-1] == gen_id, "a turn's events come after its turn event"
    assert order == turns


async def test_two_turns_stream_over_one_connection_with_exact_texts(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    cid = new_cid()
    first = fake_llm.script(unique("first"), "Hello there. How can I help?")
    second = fake_llm.script(unique("second"), "Paris is the capital. It is in France.")
    one = await turn(http, stack.a, cid, first)
    assert one["conversation_id"] == cid
    assert one["conversation_url"] == f"/v1/conversations/{cid}/events"
    async with following(http, stack.a + one["conversation_url"]) as device:
        await device.until(lambda d: d.turns_ended() == 1, "the first turn")
        # The same response stays open: the second turn comes over it.
        two = await turn(http, stack.b, cid, second)
        await device.until(lambda d: d.turns_ended() == 2, "the second turn")
    assert device.status == 200
    assert_well_formed(device, [one["id"], two["id"]])
    assert device.text_of(one["id"]) == "Hello there. How can I help?"
    assert device.text_of(two["id"]) == "Paris is the capital. It is in France."
    opening = json.loads(device.events[0].data)
    assert opening == {"generation_id": one["id"], "status": opening["status"], "turn": 1}
    assert device.events[-1].event == "end"
    assert json.loads(device.events[-1].data)["finish_reason"] == "stop"

    status = (await http.get(f"{stack.b}/v1/conversations/{cid}")).json()
    assert status["id"] == cid and status["active"] is None
    assert [(t["generation_id"], t["turn"], t["status"]) for t in status["turns"]] == [
        (one["id"], 1, "completed"), (two["id"], 2, "completed")]


async def test_a_second_device_joins_mid_turn_and_sees_the_same_events(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    cid = new_cid()
    done = fake_llm.script(unique("done"), "An earlier answer.")
    held = fake_llm.script(unique("held"), tokens=["Half ", "way. ", "Then ", "the ", "rest."],
                           hold_at=2)
    earlier = await turn(http, stack.a, cid, done)
    async with following(http, f"{stack.a}/v1/conversations/{cid}/events") as phone:
        await phone.until(lambda d: d.turns_ended() == 1, "the earlier turn")
        now = await turn(http, stack.a, cid, held)
        await phone.until(lambda d: "Half way. " in d.text_of(now["id"]), "the turn's start")
        status = (await http.get(f"{stack.b}/v1/conversations/{cid}")).json()
        assert status["active"] == now["id"]
        async with (
            following(http, f"{stack.b}/v1/conversations/{cid}/events") as laptop,
            following(http, f"{stack.b}/v1/conversations/{cid}/events?from=active") as tab,
        ):
            await laptop.until(lambda d: "Half way. " in d.text_of(now["id"]), "the catch-up")
            await tab.until(lambda d: "Half way. " in d.text_of(now["id"]), "the active turn")
            fake_llm.reply_for(held).release.set()
            for device in (phone, laptop, tab):
                await device.until(lambda d: d.turns_ended() == 2 - (d is tab), "the end")
    # Same ids, same data, same order, from either edge.
    assert seen(laptop.events) == seen(phone.events)
    assert seen(tab.events) == seen(phone.events[len(phone.of_turn(earlier["id"])):])
    assert phone.text_of(now["id"]) == "Half way. Then the rest."
    assert_well_formed(phone, [earlier["id"], now["id"]])


async def test_last_event_id_resumes_exactly_once_at_every_id_on_the_other_edge(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    """Every id of a two-turn conversation, the turn events' and the boundary's included,
    resumed on the other edge after the conversation went on while the device was away."""
    cid = new_cid()
    prompts = [fake_llm.script(unique("r1"), "One. Two."),
               fake_llm.script(unique("r2"), "Three. Four.")]
    url = f"/v1/conversations/{cid}/events"
    gens = []
    async with following(http, stack.a + url) as whole:
        for i, prompt in enumerate(prompts):
            gens.append((await turn(http, stack.a, cid, prompt))["id"])
            await whole.until(lambda d, n=i + 1: d.turns_ended() == n, f"turn {i + 1}")
    full = whole.events
    assert_well_formed(whole, gens)
    for i, event in enumerate(full[:-1]):
        rest = full[i + 1:]
        async with following(http, stack.b + url, last_event_id=event.id) as resumed:
            await resumed.until(at_least(len(rest)), "the rest")
            assert seen(resumed.events) == seen(rest), f"resumed after {event.id}"
    # After the last turn's end: nothing is sent again, and the next turn comes live.
    async with following(http, stack.b + url, last_event_id=full[-1].id) as away:
        third = await turn(http, stack.a, cid, unique("r3"))
        await away.until(lambda d: d.turns_ended() == 1, "the third turn")
    assert away.events[0].event == "turn"
    assert json.loads(away.events[0].data)["generation_id"] == third["id"]
    assert all(json.loads(e.data)["generation_id"] == third["id"] for e in away.events)


async def test_one_subscription_per_conversation_per_edge_with_many_devices(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    cid = new_cid()
    held = fake_llm.script(unique("many"), tokens=["Wait ", "for ", "it."], hold_at=1)
    created = await turn(http, stack.a, cid, held)
    url = f"/v1/conversations/{cid}/events"
    channel = protocol.conversation_channel(cid)
    async with contextlib.AsyncExitStack() as devices:
        viewers = [await devices.enter_async_context(following(http, base + url))
                   for base in [stack.a] * 4 + [stack.b] * 3]
        for device in viewers:
            await device.until(lambda d: any(e.event == "message" for e in d.events), "a start")
        assert stack.numsub(channel) == 2  # one per edge, not one per device
        assert stack.numsub(protocol.live_channel(created["id"])) == 2
        metrics = (await http.get(f"{stack.a}/metrics")).text
        assert metric(metrics, "broker_conversation_subscriptions") >= 1
        fake_llm.reply_for(held).release.set()
        for device in viewers:
            await device.until(lambda d: d.turns_ended() == 1, "the end")
        assert all(seen(d.events) == seen(viewers[0].events) for d in viewers)

    async def unsubscribed() -> bool:
        return stack.numsub(channel) == 0
    await eventually(unsubscribed, 10, "the last device leaving unsubscribes")


async def test_bad_conversation_ids_and_unknown_conversations(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    # "." and "..": URL dot-segments every client removes ("/v1/conversations/../events"
    # is fetched as "/v1/events"), so no device could follow them.
    for bad in ["", "x" * 129, "a b", "{slot}", "ü", 42, ".", ".."]:
        response = await http.post(f"{stack.a}/v1/generations", json={
            "messages": [{"role": "user", "content": "hi"}], "conversation_id": bad})
        assert_error_body(response, 422, "invalid_conversation_id")
    unknown = new_cid()
    # A conversation with no turn yet: no turns, and the stream's URL for its first devices.
    empty = (await http.get(f"{stack.a}/v1/conversations/{unknown}")).json()
    assert empty == {"id": unknown, "turns": [], "active": None,
                     "events_url": f"/v1/conversations/{unknown}/events"}
    assert_error_body(await http.get(f"{stack.a}/v1/conversations/a%20b"), 404, "not_found")
    response = await http.get(f"{stack.a}/v1/conversations/{unknown}/events",
                              headers={"last-event-id": "nope"})
    assert_error_body(response, 400, "invalid_last_event_id")
    response = await http.get(f"{stack.a}/v1/conversations/{unknown}/events?from=later")
    assert_error_body(response, 400, "invalid_request")
    response = await http.head(f"{stack.a}/v1/conversations/{unknown}/events")
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-type"].startswith("text/event-stream")


@pytest.fixture(scope="module")
def secured(start_broker: StartBroker) -> Any:
    """One edge with API keys and viewer tokens, no worker (turns stay queued)."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_insecure="0", broker_api_keys="key-1",
                        broker_viewer_token_keys="tokens-1")
    yield edge
    redis.stop()


async def test_a_conversation_token_opens_its_conversation_alone(
    secured: Any, http: httpx.AsyncClient
) -> None:
    base = secured.url
    auth = {"authorization": "Bearer key-1"}
    cid, other = new_cid(), new_cid()
    body = {"messages": [{"role": "user", "content": "hi"}], "conversation_id": cid}
    created = (await http.post(f"{base}/v1/generations", json=body, headers=auth)).json()
    body["conversation_id"] = other
    elsewhere = (await http.post(f"{base}/v1/generations", json=body, headers=auth)).json()
    conversation_url = created["conversation_url"]
    token = httpx.URL(conversation_url).params["token"]
    async with following(http, base + conversation_url) as device:
        await device.until(lambda d: d.events, "the queued turn")
    assert device.status == 200 and device.events[0].event == "turn"

    async def answer(url: str, **kwargs: Any) -> httpx.Response:
        async with http.stream("GET", base + url, **kwargs) as response:
            if response.status_code == 200:
                return response
            await response.aread()
            return response

    # Its token opens neither another conversation nor a generation, even one of its own.
    assert_error_body(await answer(f"/v1/conversations/{other}/events?token={token}"),
                      403, "forbidden")
    assert_error_body(await answer(f"/v1/generations/{created['id']}/events?token={token}"),
                      403, "forbidden")
    # A generation's token does not open its conversation; no token is a 401.
    gen_token = httpx.URL(elsewhere["events_url"]).params["token"]
    assert_error_body(await answer(f"/v1/conversations/{other}/events?token={gen_token}"),
                      403, "forbidden")
    assert_error_body(await answer(f"/v1/conversations/{cid}/events"), 401, "unauthorized")
    # The cookie, as for a generation stream (EventSource withCredentials).
    response = await answer(f"/v1/conversations/{cid}/events",
                            cookies={f"broker_conversation_token_{cid}": token})
    assert response.status_code == 200
    # The status needs the API key.
    assert_error_body(await http.get(f"{base}/v1/conversations/{cid}"), 401, "unauthorized")
    status = (await http.get(f"{base}/v1/conversations/{cid}", headers=auth)).json()
    assert status["active"] == created["id"]
    assert status["turns"] == [{"generation_id": created["id"], "turn": 1, "status": "queued"}]


async def test_an_idle_conversation_stream_sends_keepalives_and_takes_its_first_turn_live(
    queue_only: Stack, http: httpx.AsyncClient
) -> None:
    """Opened before the conversation has a turn: keepalive comments (every 0.3 s on this
    edge) while it waits, then the first turn when it is created (no worker: it stays
    queued)."""
    cid = new_cid()
    received = b""
    async with http.stream("GET", f"{queue_only.a}/v1/conversations/{cid}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.aiter_raw()
        async with asyncio.timeout(5):
            while received.count(b": keepalive\n") < 2:
                received += await anext(chunks)
        created = await turn(http, queue_only.a, cid, "hello")
        async with asyncio.timeout(5):
            while b"event: turn" not in received:
                received += await anext(chunks)
    turn_event = received[received.index(b"id: "):].decode()
    assert turn_event.startswith(f"id: {protocol.conversation_event_id(1, 0)}\nevent: turn\n")
    assert json.loads(turn_event.split("data: ", 1)[1].split("\n", 1)[0]) == {
        "generation_id": created["id"], "status": "queued", "turn": 1}


async def test_a_turn_that_ends_first_waits_for_the_earlier_turn(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    """Two turns run at once (two worker slots); the later one ends first. Every device
    shows them in creation order: the later one's events after the earlier one's end."""
    cid = new_cid()
    slow = fake_llm.script(unique("slow"), tokens=["Slow ", "and ", "steady."], hold_at=1)
    fast = fake_llm.script(unique("fast"), "Quick answer.")
    earlier = await turn(http, stack.a, cid, slow)
    async with following(http, f"{stack.b}/v1/conversations/{cid}/events") as device:
        await device.until(lambda d: d.text_of(earlier["id"]) == "Slow ", "the slow start")
        later = await turn(http, stack.a, cid, fast)

        async def later_ended() -> bool:
            response = await http.get(f"{stack.a}/v1/generations/{later['id']}")
            return bool(response.json()["status"] == "completed")
        await eventually(later_ended, 10, "the later turn's end")
        assert device.turns_ended() == 0  # it waits in Redis, not on this device's screen
        fake_llm.reply_for(slow).release.set()
        await device.until(lambda d: d.turns_ended() == 2, "both turns")
    assert_well_formed(device, [earlier["id"], later["id"]])
    assert device.text_of(later["id"]) == "Quick answer."


@pytest.mark.parametrize("stack", ["redis"], indirect=True)  # (the CLI is no cluster client)
async def test_two_terminals_follow_a_conversation_with_broker_tail(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
) -> None:
    """``broker tail --conversation`` in two terminals (one per edge, one printing JSON), a
    turn asked with ``broker ask --conversation`` and one over HTTP: both terminals print both
    turns, in order, exactly."""
    from tests.integration.test_cli import finish, start

    cid = new_cid()
    answers = ["First answer. Short.", "Second answer, with a comma. Done."]
    prompts = [fake_llm.script(unique("t1"), answers[0]),
               fake_llm.script(unique("t2"), answers[1])]
    text = await start("tail", "--conversation", cid, "--turns", "2", url=stack.a)
    as_json = await start("tail", "--json", "--conversation", cid, "--turns", "2", url=stack.b)

    async def following_now() -> bool:
        return stack.numsub(protocol.conversation_channel(cid)) == 2
    await eventually(following_now, 15, "the terminals to subscribe")
    asked = await finish(await start("ask", "--conversation", cid, prompts[0], url=stack.a))
    assert asked.code == 0, asked.stderr
    assert asked.stdout == answers[0] + "\n"
    gens = [asked.stderr_lines[0], (await turn(http, stack.b, cid, prompts[1]))["id"]]
    done = await finish(text)
    assert done.code == 0, done.stderr
    assert done.stdout == "".join(
        f"── turn {i + 1} ({gen}) ──\n{answer}\n"
        for i, (gen, answer) in enumerate(zip(gens, answers, strict=True)))
    lines = [json.loads(line) for line in (await finish(as_json)).stdout.splitlines()]
    assert [line["generation_id"] for line in lines if "turn" in line] == gens
    assert [line["finish_reason"] for line in lines if "finish_reason" in line] == ["stop"] * 2
    assert "".join(line.get("text", "") for line in lines) == "".join(answers)


@pytest.fixture(scope="module")
def tokens_only(start_broker: StartBroker) -> Any:
    """One edge as ``broker dev`` runs its own: viewer tokens on, no API keys, no worker."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_insecure="1",
                        broker_viewer_token_keys="tokens-1")
    yield redis, edge
    redis.stop()


@pytest.mark.parametrize("keyed", [False, True], ids=["tokens-no-keys", "keys-and-tokens"])
async def test_broker_tail_follows_a_conversation_opened_before_its_first_turn(
    keyed: bool, tokens_only: Any, secured: Any, http: httpx.AsyncClient
) -> None:
    """The README's three terminals: ``broker tail --conversation`` starts BEFORE the first
    turn, on an edge with viewer tokens (as ``broker dev``), with or without API keys. The
    edge hands a producer the conversation's token for a conversation with no turn yet
    (``GET /v1/conversations/{cid}``), so the terminal follows it and prints the turn when it
    comes."""
    from tests.integration.test_cli import cli_env

    redis, edge = tokens_only
    if keyed:
        edge = secured
    auth = {"authorization": "Bearer key-1"} if keyed else {}
    cid = new_cid()
    status = await http.get(f"{edge.url}/v1/conversations/{cid}", headers=auth)
    assert status.status_code == 200, status.text
    assert status.json()["turns"] == [] and status.json()["active"] is None
    assert "token=" in status.json()["events_url"]

    env = cli_env(edge.url) | ({"BROKER_API_KEY": "key-1"} if keyed else {})
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "tail", "--json", "--conversation", cid, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert tail.stdout is not None and tail.stderr is not None
    try:
        if not keyed:  # (the keyed edge's Redis is its fixture's own)
            async def following_now() -> bool:
                channel = protocol.conversation_channel(cid)
                return int(dict(redis.client().pubsub_numsub(channel))[channel.encode()]) == 1
            await eventually(following_now, 15, "the terminal to subscribe")
        created = await http.post(f"{edge.url}/v1/generations", headers=auth, json={
            "messages": [{"role": "user", "content": "hi"}], "conversation_id": cid})
        async with asyncio.timeout(15):
            line = await tail.stdout.readline()
        assert line, (await tail.stderr.read()).decode()
        assert json.loads(line) == {"id": protocol.conversation_event_id(1, 0),
                                    "event": "turn", "generation_id": created.json()["id"],
                                    "turn": 1, "status": "queued"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            tail.kill()
        await tail.wait()


@pytest.mark.parametrize("cid", ["bad id", "", "x" * 129, "ü", ".."])
async def test_broker_tail_says_a_conversation_id_is_malformed(cid: str, tokens_only: Any) -> None:
    """Not "this stream needs a viewer token" (the edge's answer to a stream it cannot give a
    token for) nor a bare 404: the id is wrong, and the terminal says so (exit 2)."""
    from tests.integration.test_cli import finish, start

    _, edge = tokens_only
    done = await finish(await start("tail", "--conversation", cid, url=edge.url))
    assert done.code == 2, done.stderr
    assert done.stderr == ("error: invalid_conversation_id: --conversation must be 1-128 "
                           "characters of A-Z a-z 0-9 _ . : -\n")


async def test_the_python_client_follows_the_conversation_its_create_names(
    tokens_only: Any, http: httpx.AsyncClient
) -> None:
    """``create(..., conversation_id=cid)`` answers the ``conversation_url`` the edge gave
    (with its viewer token), and a ``ConversationFollower`` on it gets the turn."""
    from broker.client import ConversationFollower, create

    _, edge = tokens_only
    cid = new_cid()
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        created = await create(client, [{"role": "user", "content": "hi"}],
                               conversation_id=cid)
        assert created.conversation_id == cid
        assert created.conversation_url is not None
        assert created.conversation_url.startswith(f"/v1/conversations/{cid}/events?token=")
        follower = ConversationFollower(client, created.conversation_url)
        async with asyncio.timeout(10), contextlib.aclosing(follower.__aiter__()) as events:
            first = await anext(events)
        plain = await create(client, [{"role": "user", "content": "hi"}])
    assert (first.event, first.generation_id) == ("turn", created.id)
    assert plain.conversation_id is None and plain.conversation_url is None


async def test_broker_ask_prints_the_conversations_url_for_devices_without_a_key(
    tokens_only: Any, http: httpx.AsyncClient
) -> None:
    """``broker ask --conversation``: stderr has the id, the events URL, then the
    conversation's URL, whose token ``broker tail --conversation --token`` takes (README)."""
    from tests.integration.test_cli import cli_env, start

    _, edge = tokens_only
    cid = new_cid()
    asking = await start("ask", "--conversation", cid, "hi", url=edge.url)
    assert asking.stderr is not None
    async with asyncio.timeout(15):
        lines = [(await asking.stderr.readline()).decode().strip() for _ in range(3)]
    asking.kill()
    await asking.wait()
    assert lines[1].startswith(f"{edge.url}/v1/generations/{lines[0]}/events?token=")
    assert lines[2].startswith(f"{edge.url}/v1/conversations/{cid}/events?token=")
    token = httpx.URL(lines[2]).params["token"]
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "tail", "--json", "--conversation", cid,
        "--token", token, env=cli_env(edge.url), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert tail.stdout is not None
    try:
        async with asyncio.timeout(15):
            line = await tail.stdout.readline()
        assert json.loads(line)["generation_id"] == lines[0]
    finally:
        tail.kill()
        await tail.wait()


async def test_a_last_event_id_of_turn_zero_is_refused_before_the_stream(
    queue_only: Stack, http: httpx.AsyncClient
) -> None:
    """Turns are numbered from 1: an id naming turn 0 is none the stream ever sent. It was
    answered 200 and then cut (Redis refused the index read it made), so a client resuming
    with it would reconnect for ever; it is a 400 like any other malformed id."""
    cid = new_cid()
    await turn(http, queue_only.a, cid, "queued")
    url = f"{queue_only.a}/v1/conversations/{cid}/events"
    for zero in ["0" * 18, "00000000" + "0000000007"]:
        response = await http.get(url, headers={"last-event-id": zero})
        assert_error_body(response, 400, "invalid_last_event_id")
        response = await http.get(url, params={"last_event_id": zero})
        assert_error_body(response, 400, "invalid_last_event_id")


async def test_a_resume_point_beyond_the_conversation_is_refused_before_the_stream(
    queue_only: Stack, http: httpx.AsyncClient
) -> None:
    """An id past the newest turn, or past its turn's last event, is none the stream sent:
    followed from there, the device skipped every turn (or event) up to it without a word
    (turn 4 never came, turn 5 without its `turn` event). 400, as a generation stream answers
    an id beyond its log; the ids it did send still resume."""
    cid = new_cid()
    await turn(http, queue_only.a, cid, "queued")  # turn 1: queued, no event of its own yet
    url = f"{queue_only.a}/v1/conversations/{cid}/events"
    for beyond in [protocol.conversation_event_id(5, 0), protocol.conversation_event_id(2, 0),
                   protocol.conversation_event_id(1, 99), protocol.conversation_event_id(1, 1)]:
        response = await http.get(url, headers={"last-event-id": beyond})
        assert_error_body(response, 400, "invalid_last_event_id")
    unknown = f"{queue_only.a}/v1/conversations/{new_cid()}/events"
    response = await http.get(
        unknown, params={"last_event_id": protocol.conversation_event_id(1, 0)})
    assert_error_body(response, 400, "invalid_last_event_id")
    # The turn's own event: a resume point it sent.
    async with http.stream("GET", url, headers={
            "last-event-id": protocol.conversation_event_id(1, 0)}) as response:
        assert response.status_code == 200


@pytest.fixture(scope="module")
def short_logs(start_broker: StartBroker) -> Any:
    """One edge whose generations' logs keep their last 3 events (no worker: producers)."""
    redis = RedisServer().start()
    edge = start_broker("edge", redis.url, broker_max_log_length="3")
    yield edge
    redis.stop()


async def produced_turn(http: httpx.AsyncClient, base: str, cid: str, texts: list[str]) -> str:
    """A turn of ``cid`` by an external producer: ``texts``, one append each, then its end."""
    created = await http.post(f"{base}/v1/generations",
                              json={"producer": "external", "conversation_id": cid})
    assert created.status_code == 201, created.text
    gen = created.json()
    for i, text in enumerate(texts):
        response = await http.post(base + gen["append_url"],
                                   json={"after": i, "events": [{"type": "text", "text": text}]})
        assert response.status_code == 200, response.text
    response = await http.post(base + gen["finish_url"], json={"finish_reason": "stop"})
    assert response.status_code == 200, response.text
    return str(gen["id"])


async def test_a_turn_whose_history_was_trimmed_does_not_stop_the_next_turns(
    short_logs: Any, http: httpx.AsyncClient
) -> None:
    """A device resuming inside an ended turn whose events were trimmed from its log gets
    that turn's ``history_lost`` error as its terminal event, with an id past the turn, then
    the next turns. It used to get the error without an id and the end of the response, and
    resumed into the same hole for ever: no later turn ever reached it."""
    base, cid = short_logs.url, new_cid()
    first = await produced_turn(http, base, cid, [f"Sentence {i}. " for i in range(6)])
    second = await produced_turn(http, base, cid, ["The next turn."])
    url = f"{base}/v1/conversations/{cid}/events"
    resume_at = protocol.conversation_event_id(1, 1)  # after turn 1's first event: trimmed
    async with following(http, url, last_event_id=resume_at) as device:
        await device.until(lambda d: d.turns_ended() == 2, "both turns' terminal events")
    lost, *rest = device.events
    assert (lost.event, json.loads(lost.data)["generation_id"]) == ("error", first)
    assert json.loads(lost.data)["code"] == "history_lost"
    assert lost.id == protocol.conversation_event_id(1, 7)  # the turn's end: resumes after it
    assert [e.event for e in rest] == ["turn", "message", "end"]
    assert device.text_of(second) == "The next turn."
    # Resumed after the error, the device goes on from the next turn.
    async with following(http, url, last_event_id=lost.id) as again:
        await again.until(lambda d: d.turns_ended() == 1, "the next turn")
    assert [e.event for e in again.events] == ["turn", "message", "end"]
