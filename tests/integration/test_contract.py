"""Every clause of API.md, against real edges and a real worker on a real redis-server, with
the real ``openai`` SDK talking HTTP to the scripted fake LLM."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from broker.core import protocol
from broker.core.settings import Settings
from broker.tools.mockllm import tokenize
from tests.conftest import Stack, StartBroker
from tests.support.api import (
    HARD_TEXTS,
    assert_error_body,
    create,
    events_url,
    metric,
    unique,
)
from tests.support.cluster import RedisClusterServers
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import RedisServer, eventually, wait_until
from tests.support.sse import Received, read_events

KEEPALIVE = Settings().keepalive_interval  # the stack's edges run the default
STORY = (
    "The broker streams answers. It buffers tokens into sentences! Does it lose text? "
    "Never: the log in Redis is the truth.\n\nA second paragraph follows here. It ends now. "
    f"{TRICKY_TEXT}"
)


# -- create ----------------------------------------------------------------------------------


async def test_create_answers_201_with_id_and_events_url(stack: Stack, http: httpx.AsyncClient):
    response = await http.post(
        f"{stack.a}/v1/generations", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 201
    body = response.json()
    assert protocol.is_generation_id(body["id"])
    assert body["events_url"] == f"/v1/generations/{body['id']}/events"
    assert body["status"] == "queued"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 422, "invalid_request"),
        (b'{"messages": []}', 422, "invalid_request"),
        (b'{"messages": [{"role": "user"}]}', 422, "invalid_request"),
        (b'{"messages": [{"role": 1, "content": "x"}]}', 422, "invalid_request"),
        (b'{"messages": [{"role": "user", "content": "x"}], "model": 7}', 422, "invalid_request"),
    ],
)
async def test_create_rejects_bad_input_with_json_error(
    stack: Stack, http: httpx.AsyncClient, content: bytes, status: int, code: str
):
    response = await http.post(
        f"{stack.a}/v1/generations", content=content,
        headers={"content-type": "application/json"},
    )
    assert_error_body(response, status, code)


async def test_create_caps_the_body_at_one_mib(stack: Stack, http: httpx.AsyncClient):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    assert_error_body(await http.post(f"{stack.a}/v1/generations", content=big), 413)

    async def chunked():  # no Content-Length: the edge must stop reading past the cap
        for _ in range(40):
            yield b"x" * 65536

    response = await http.post(f"{stack.a}/v1/generations", content=chunked())
    assert_error_body(response, 413, "body_too_large")


async def test_unknown_routes_and_methods_answer_json_errors(stack: Stack, http: httpx.AsyncClient):
    assert_error_body(await http.get(f"{stack.a}/nope"), 404)
    assert_error_body(await http.delete(f"{stack.a}/v1/generations"), 405)


# -- the stream --------------------------------------------------------------------------------


async def test_stream_framing_text_and_terminal_event(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("story"), STORY)
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.a, gen_id))

    assert got.status == 200
    assert got.headers["content-type"].startswith("text/event-stream")
    assert got.headers["cache-control"] == "no-cache"
    assert got.headers["x-accel-buffering"] == "no"
    assert got.text == STORY
    ids = [protocol.parse_event_id(i) for i in got.ids]
    assert ids == sorted(set(ids)) and got.ids == sorted(got.ids)
    assert all(e.event == "message" for e in got.events[:-1])
    # Sentence-sized messages: one per sentence here, not one per token.
    assert 6 <= len(got.messages) < len(tokenize(STORY)) // 3
    assert got.terminal is not None and got.terminal.event == "end" and got.terminal.id
    end = got.terminal_data()
    assert end["finish_reason"] == "stop"
    assert end["usage"]["completion_tokens"] > 0


def eval_calls(stack: Stack) -> int:
    """``EVAL`` commands Redis ran (on a cluster: every live node): only a read sent on an
    edge's pub/sub connection is one (redis-py sends its scripts by ``EVALSHA``)."""
    servers = stack.redis.live_nodes() if isinstance(stack.redis, RedisClusterServers) else [
        stack.redis]
    return sum(int(server.client().info("commandstats").get("cmdstat_eval", {}).get("calls", 0))
               for server in servers)


async def test_a_viewers_reads_go_on_the_edges_pubsub_connection_on_one_redis(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    """On one Redis (RESP3), a viewer's meta read goes on the edge's pub/sub connection
    beside its subscriptions, not through redis-py's call (docs/performance.md); on a cluster,
    where a reply may be MOVED, through redis-py. The stream is the same either way."""
    prompt = fake_llm.script(unique("beside"), "One. Two.")
    gen_id = await create(http, stack.a, prompt)
    before = eval_calls(stack)
    got = await read_events(http, events_url(stack.a, gen_id))
    assert got.text == "One. Two." and got.terminal is not None
    if stack.cluster:
        assert eval_calls(stack) == before
    else:
        assert eval_calls(stack) > before


async def test_stream_starts_with_retry_and_frames_raw_bytes(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("raw"), "One. Two.")
    gen_id = await create(http, stack.a, prompt)
    async with http.stream("GET", events_url(stack.a, gen_id)) as response:
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert raw.startswith(b"retry: ")
    blocks = [b for b in raw.decode().split("\n\n") if b and not b.startswith("retry:")]
    assert blocks[0].startswith("id: ") and "\ndata: {" in blocks[0] and "event:" not in blocks[0]
    assert "event: end" in blocks[-1] and blocks[-1].startswith("id: ")


@pytest.mark.parametrize(
    "text",
    [
        *HARD_TEXTS,
        "Pi is 3.14159, e.g. roughly 3.14. See https://example.com/a.b?c=d. Wait... what? Yes.",
    ],
)
async def test_text_integrity_is_exact(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, text: str
):
    prompt = fake_llm.script(unique("exact"), tokens=list(text))  # one character per token
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.a, gen_id))
    assert got.text == text
    status = (await http.get(f"{stack.b}/v1/generations/{gen_id}")).json()
    assert status["text"] == text and status["status"] == "completed"


async def test_late_join_gets_everything_from_the_start(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("late"), STORY)
    gen_id = await create(http, stack.a, prompt)
    first = await read_events(http, events_url(stack.a, gen_id))
    late = await read_events(http, events_url(stack.b, gen_id))
    assert late.text == first.text == STORY
    assert late.ids == first.ids


async def test_late_join_of_a_long_finished_answer_is_prompt(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    """More events than one log read brings: the viewer keeps reading, it does not wait."""
    text = "".join(f"Line {i}.\n\n" for i in range(1200))
    prompt = fake_llm.script(unique("long"), text, delay=0)
    gen_id = await create(http, stack.a, prompt)
    await read_events(http, events_url(stack.a, gen_id))
    started = time.monotonic()
    late = await read_events(http, events_url(stack.b, gen_id))
    assert late.text == text and len(late.messages) >= 1200
    # A stream that stopped reading and waited to be woken would wait for its keepalive,
    # one interval after its last write: it would take at least that long.
    assert time.monotonic() - started < KEEPALIVE
    resumed = await read_events(http, events_url(stack.b, gen_id), last_event_id=late.ids[3])
    assert resumed.ids == late.ids[4:]


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_on_a_second_edge_mid_stream(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient, how: str
):
    answer = STORY * 3
    # The LLM holds halfway (several sentences published) until the resume is under way, so
    # the generation is still running when the viewer comes back: the rest arrives live.
    prompt = fake_llm.script(unique("resume"), answer, delay=0.01,
                             hold_at=len(tokenize(answer)) // 2)
    try:
        gen_id = await create(http, stack.a, prompt)
        head = await read_events(http, events_url(stack.a, gen_id), stop_after=3)
        assert len(head.messages) == 3 and head.terminal is None
        cursor = head.ids[-1]
        kwargs = {"last_event_id": cursor} if how == "header" else {"query_last_event_id": cursor}
        progress: list[Received] = []
        resuming = asyncio.create_task(
            read_events(http, events_url(stack.b, gen_id), progress=progress, **kwargs))
        await eventually(lambda: asyncio.sleep(0, bool(progress)), 10, "the resumed stream")
        at_resume = (await http.get(f"{stack.b}/v1/generations/{gen_id}")).json()
        assert at_resume["status"] == "running" and progress[0].status == 200
        fake_llm.reply_for(prompt).release.set()
        tail = await asyncio.wait_for(resuming, 20)
    finally:
        fake_llm.reply_for(prompt).release.set()
    assert tail.terminal is not None
    assert head.text + tail.text == answer
    assert len(at_resume["text"]) < len(answer)  # the rest was published after the resume
    assert not set(head.ids) & set(tail.ids)
    assert protocol.parse_event_id(tail.ids[0]) == protocol.parse_event_id(cursor) + 1


async def test_header_wins_over_query_on_reconnect(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("both"), STORY)
    gen_id = await create(http, stack.a, prompt)
    full = await read_events(http, events_url(stack.a, gen_id))
    # EventSource keeps the first URL's query on reconnects and updates only the header.
    got = await read_events(
        http, events_url(stack.b, gen_id), query_last_event_id=full.ids[0],
        last_event_id=full.ids[2],
    )
    assert got.ids == full.ids[3:]


async def test_204_after_the_terminal_id(stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient):
    prompt = fake_llm.script(unique("done"), "Short answer.")
    gen_id = await create(http, stack.a, prompt)
    full = await read_events(http, events_url(stack.a, gen_id))
    terminal_id = full.ids[-1]
    for base in (stack.a, stack.b):
        by_header = await http.get(events_url(base, gen_id), headers={"last-event-id": terminal_id})
        assert by_header.status_code == 204
        by_query = await http.get(events_url(base, gen_id), params={"last_event_id": terminal_id})
        assert by_query.status_code == 204
    # Resuming before the end still replays the rest, after the generation finished.
    rest = await read_events(http, events_url(stack.b, gen_id), last_event_id=full.ids[0])
    assert rest.ids == full.ids[1:]


async def test_unknown_generation_and_bad_last_event_id(stack: Stack, http: httpx.AsyncClient):
    unknown = protocol.new_generation_id()
    assert_error_body(await http.get(events_url(stack.a, unknown)), 404, "not_found")
    assert_error_body(await http.get(f"{stack.a}/v1/generations/{unknown}"), 404)
    assert_error_body(await http.post(f"{stack.a}/v1/generations/{unknown}/cancel"), 404)
    assert_error_body(await http.get(events_url(stack.a, "short")), 404)

    gen_id = await create(http, stack.a, unique("bad-id"))
    for bad in ("abc", "1-2", "-5", "0x10"):
        response = await http.get(events_url(stack.a, gen_id), headers={"last-event-id": bad})
        assert_error_body(response, 400, "invalid_last_event_id")
        response = await http.get(events_url(stack.a, gen_id), params={"last_event_id": bad})
        assert_error_body(response, 400, "invalid_last_event_id")
    beyond = await http.get(events_url(stack.a, gen_id), headers={"last-event-id": "99999"})
    assert_error_body(beyond, 400, "invalid_last_event_id")


async def test_keepalive_comments_while_idle(queue_only: Stack, http: httpx.AsyncClient):
    gen_id = await create(http, queue_only.a, unique("idle"))  # no worker: stays queued
    async with http.stream("GET", events_url(queue_only.a, gen_id)) as response:
        seen = b""
        async with asyncio.timeout(10):
            async for chunk in response.aiter_bytes():
                seen += chunk
                if b"\n: keepalive" in seen or seen.startswith(b": keepalive"):
                    break
    assert b": keepalive\n\n" in seen


# -- fan-out ------------------------------------------------------------------------------------


def numsub(stack: Stack, gen_id: str) -> int:
    channel = protocol.live_channel(gen_id)
    return stack.numsub(channel)


async def test_fifty_viewers_share_one_subscription(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("fanout"), STORY * 2, delay=0.02)
    gen_id = await create(http, stack.a, prompt)

    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=100)) as many:
        viewers = [asyncio.create_task(read_events(many, events_url(stack.a, gen_id)))
                   for _ in range(50)]
        await asyncio.to_thread(
            wait_until, lambda: numsub(stack, gen_id) == 1, 10, "the edge's subscription"
        )
        results = await asyncio.gather(*viewers)

    assert {r.text for r in results} == {STORY * 2}
    assert all(r.ids == results[0].ids for r in results)
    # One subscription, and the edge did not open a Redis connection per viewer: per node,
    # the bounded pool plus one pub/sub connection (on a cluster, one per master).
    name = f"broker-edge-{stack.edges[0].proc.pid}"
    for on_node in stack.connections_of(name):
        assert sum(1 for c in on_node if int(c["sub"]) + int(c.get("ssub", 0)) > 0) <= 1
        # The pool (16); on a cluster also its headroom for pipelines and slot-map reads (4),
        # and the shard's subscription and probe connections (2): bounded, whatever the viewers.
        assert len(on_node) <= 16 + 4 + 2
    assert sum(1 for on_node in stack.connections_of(name) for c in on_node
               if int(c["sub"]) + int(c.get("ssub", 0)) > 0) == (3 if stack.cluster else 1)
    await asyncio.to_thread(
        wait_until, lambda: numsub(stack, gen_id) == 0, 10, "the edge to unsubscribe"
    )


async def test_last_viewer_leaving_unsubscribes(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("leave"), STORY * 5, delay=0.05)
    gen_id = await create(http, stack.a, prompt)
    head = await read_events(http, events_url(stack.a, gen_id), stop_after=1)
    assert head.messages
    await asyncio.to_thread(
        wait_until, lambda: numsub(stack, gen_id) == 0, 10, "the unsubscribe"
    )
    await http.post(f"{stack.a}/v1/generations/{gen_id}/cancel")


async def test_a_viewer_leaving_a_quiet_stream_is_released_at_once(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    # Nothing is written while the answer holds, and the next keepalive is seconds away: only
    # the disconnect itself can end the stream (and release the edge's subscription).
    prompt = fake_llm.script(unique("quiet"), STORY, hold_at=1)
    gen_id = await create(http, stack.a, prompt)

    async def viewers() -> float:
        return metric((await http.get(f"{stack.a}/metrics")).text, "broker_viewers ")

    before = await viewers()
    opened = time.monotonic()
    head = await read_events(http, events_url(stack.a, gen_id), stop_after=1)
    assert head.messages

    async def released() -> bool:
        return await viewers() <= before

    # Its first keepalive write (which would fail and end it) comes one interval after its
    # last write, the first message: released before then, the disconnect itself ended it.
    await eventually(released, opened + KEEPALIVE - time.monotonic(), "the stream to end")
    await asyncio.to_thread(wait_until, lambda: numsub(stack, gen_id) == 0, 5, "the unsubscribe")
    fake_llm.reply_for(prompt).release.set()


async def test_live_events_reach_a_caught_up_viewer_by_direct_writes(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    # The edge's fast path (the fan-out writes to parked viewers' sockets) leans on uvicorn's
    # internals and falls back to the slow path when they change: only a real edge shows
    # which one it takes.
    prompt = fake_llm.script(unique("direct"), STORY, hold_at=1)
    gen_id = await create(http, stack.a, prompt)

    async def direct() -> float:
        return metric((await http.get(f"{stack.a}/metrics")).text, "broker_direct_writes_total")

    before = await direct()
    reading = asyncio.create_task(read_events(http, events_url(stack.a, gen_id)))

    async def parked() -> bool:  # the viewer has the first message and waits for the rest
        return metric((await http.get(f"{stack.a}/metrics")).text,
                      "broker_events_delivered_total") > 0 and not reading.done()

    await eventually(parked, 5, "the viewer to catch up")
    fake_llm.reply_for(prompt).release.set()
    got = await reading
    assert "".join(json.loads(m.data)["text"] for m in got.messages) == STORY
    assert await direct() - before >= len(got.messages) - 1


# -- status and cancel ---------------------------------------------------------------------------


async def test_status_while_running_and_after(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("status"), STORY, delay=0.02)
    gen_id = await create(http, stack.a, prompt)
    head = await read_events(http, events_url(stack.a, gen_id), stop_after=1)
    running = (await http.get(f"{stack.b}/v1/generations/{gen_id}")).json()
    assert running["status"] == "running" and running["finish_reason"] is None
    assert running["text"].startswith(head.text)
    await read_events(http, events_url(stack.a, gen_id))
    done = (await http.get(f"{stack.b}/v1/generations/{gen_id}")).json()
    assert done == {**done, "id": gen_id, "status": "completed", "text": STORY,
                    "finish_reason": "stop"}


async def test_cancel_while_running_closes_the_upstream_request(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("cancel"), STORY * 20, delay=0.05)
    gen_id = await create(http, stack.a, prompt)
    head = await read_events(http, events_url(stack.a, gen_id), stop_after=1)
    viewer = asyncio.create_task(
        read_events(http, events_url(stack.b, gen_id), last_event_id=head.ids[-1])
    )
    response = await http.post(f"{stack.a}/v1/generations/{gen_id}/cancel")
    assert response.status_code == 202
    again = await http.post(f"{stack.b}/v1/generations/{gen_id}/cancel")
    assert again.status_code in (202, 409)

    tail = await asyncio.wait_for(viewer, 10)
    assert tail.terminal is not None and tail.terminal.event == "end"
    assert tail.terminal_data()["finish_reason"] == "cancelled"
    record = fake_llm.record_for(prompt)
    assert await asyncio.to_thread(record.closed_by_client.wait, 10)
    assert record.sent_tokens < len(STORY * 20) // 3
    status = (await http.get(f"{stack.a}/v1/generations/{gen_id}")).json()
    assert status["status"] == "cancelled" and status["finish_reason"] == "cancelled"
    assert status["text"] == head.text + tail.text
    late = await http.post(f"{stack.a}/v1/generations/{gen_id}/cancel")
    assert_error_body(late, 409, "already_finished")


async def test_cancel_while_queued_ends_the_stream_at_once(
    queue_only: Stack, http: httpx.AsyncClient
):
    gen_id = await create(http, queue_only.a, unique("queued"))
    viewer = asyncio.create_task(read_events(http, events_url(queue_only.a, gen_id)))
    assert (await http.post(f"{queue_only.a}/v1/generations/{gen_id}/cancel")).status_code == 202
    got = await asyncio.wait_for(viewer, 10)
    assert got.messages == [] and got.terminal_data()["finish_reason"] == "cancelled"
    assert (await http.get(f"{queue_only.a}/v1/generations/{gen_id}")).json()["status"] == (
        "cancelled"
    )


# -- the LLM ------------------------------------------------------------------------------------


async def test_sampling_fields_pass_through_to_the_llm(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("sampling"), "Fine.")
    fields = {"temperature": 0.3, "max_tokens": 77, "top_p": 0.9, "stop": ["\n\n"], "seed": 42,
              "top_k": 5, "model": "special-model", "stream": False}
    gen_id = await create(http, stack.a, prompt, **fields)
    await read_events(http, events_url(stack.a, gen_id))
    body = fake_llm.record_for(prompt).body
    for name in ("temperature", "max_tokens", "top_p", "stop", "seed", "top_k", "model"):
        assert body[name] == fields[name], name
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_default_model_when_none_is_given(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("model"), "Fine.")
    gen_id = await create(http, stack.a, prompt)
    await read_events(http, events_url(stack.a, gen_id))
    assert fake_llm.record_for(prompt).body["model"] == "gpt-4o-mini"


async def test_llm_failing_mid_stream_keeps_the_text_before_it(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("broken"), STORY, break_after=12)
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.a, gen_id))
    assert got.terminal is not None and got.terminal.event == "error"
    error = got.terminal_data()
    assert error["code"] == "llm_stream_broken" and error["message"]
    assert got.text == "".join(tokenize(STORY)[:12])
    status = (await http.get(f"{stack.a}/v1/generations/{gen_id}")).json()
    assert status["status"] == "failed" and status["text"] == got.text


async def test_llm_http_error_ends_with_an_error_event(
    stack: Stack, fake_llm: FakeLLM, http: httpx.AsyncClient
):
    prompt = fake_llm.script(unique("http500"), "never", status=500)
    gen_id = await create(http, stack.a, prompt)
    got = await read_events(http, events_url(stack.a, gen_id))
    assert got.messages == []
    error = got.terminal_data()
    assert error["code"] == "llm_server_error" and "500" in error["message"]


# -- operations ---------------------------------------------------------------------------------


async def test_health_ready_and_metrics(stack: Stack, http: httpx.AsyncClient):
    assert (await http.get(f"{stack.a}/healthz")).status_code == 200
    assert (await http.get(f"{stack.a}/readyz")).status_code == 200
    metrics = (await http.get(f"{stack.a}/metrics")).text
    for name in ("broker_viewers", "broker_live_subscriptions", "broker_events_delivered_total",
                 "broker_resumes_total", "broker_redis_errors_total",
                 "broker_generations_created_total"):
        assert name in metrics, name


async def test_readyz_is_503_when_redis_is_down(
    start_broker: StartBroker, http: httpx.AsyncClient
):
    redis = RedisServer().start()
    try:
        edge = start_broker("edge", redis.url)

        async def ready() -> bool:  # once the first delivery probe came back
            return (await http.get(f"{edge.url}/readyz")).status_code == 200

        await eventually(ready, 5, "the edge to be ready")
        redis.kill()
        assert_error_body(await http.get(f"{edge.url}/readyz"), 503, "redis_unavailable")
        assert (await http.get(f"{edge.url}/healthz")).status_code == 200
    finally:
        redis.stop()
