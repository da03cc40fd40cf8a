"""External producers over HTTP (docs/api.md, "Producers"): real edges on a real Redis (and a
Redis Cluster) take an application's own events and serve them as they serve the worker's."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker.core import protocol
from broker.core.external import SWEEP_BATCH, ExternalStore
from broker.core.settings import Settings
from broker.core.store import Store, connect
from tests.conftest import Stack, StartBroker
from tests.support.api import assert_error_body, create, events_url, status, unique
from tests.support.cluster import RedisClusterServers
from tests.support.node_viewer import NodeViewers
from tests.support.procs import RedisServer, eventually
from tests.support.sse import read_events

# Every event type, with text that breaks careless framing, and JSON values of every shape.
MIXED: list[dict[str, Any]] = [
    {"type": "reasoning", "text": "First, the weather. "},
    {"type": "reasoning", "text": "Zürich: \"quotes\", \\ and\nnewlines\u2028 😀. "},
    {"type": "text", "text": "Let me look that up.\r\n"},
    {"type": "tool_call", "index": 0, "id": "call_1", "name": "get_weather",
     "arguments": '{"city": "Z\\u00fcrich"'},  # a model's arguments need not be valid JSON
    {"type": "tool_result", "id": "call_1", "result": {"temp": 21.5, "sky": ["sun", None]}},
    {"type": "data", "name": "sources", "value": [{"url": "https://example.com/?a=1&b=2"}]},
    {"type": "data", "name": "progress", "value": 0.5},
    {"type": "text", "text": "It is 21.5 °C in Zürich. "},
    {"type": "tool_result", "id": "call_2", "result": "plain string"},
    {"type": "text", "text": "你好。"},
]
SSE_NAME = {"text": None, "reasoning": "reasoning", "tool_call": "tool_call",
            "tool_result": "tool_result", "data": "data"}


async def create_external(http: httpx.AsyncClient, base: str, **fields: Any) -> dict[str, Any]:
    response = await http.post(f"{base}/v1/generations",
                               json={"producer": "external", **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def append(http: httpx.AsyncClient, base: str, created: dict[str, Any], after: int,
                 events: list[dict[str, Any]]) -> httpx.Response:
    return await http.post(base + created["append_url"], json={"after": after, "events": events})


def expected_data(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "type"}


def sse_event(event: Any) -> str | None:
    """The ``event:`` name as httpx-sse reports it: 'message' for none."""
    return None if event.event == "message" else event.event


async def test_every_event_type_end_to_end_and_resume_from_every_id(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    created = await create_external(http, stack.a, metadata={"chat": "c1", "turn": 3})
    assert created["status"] == "running"
    gen_id = created["id"]
    assert created["events_url"].startswith(f"/v1/generations/{gen_id}/events")
    # A viewer on edge B watches live while the producer appends on edge A.
    watching = asyncio.ensure_future(read_events(http, events_url(stack.b, gen_id)))
    count = 0
    for batch in (MIXED[:3], MIXED[3:4], MIXED[4:9], MIXED[9:]):
        response = await append(http, stack.a, created, count, batch)
        assert response.status_code == 200, response.text
        count += len(batch)
        assert response.json() == {"count": count}
    finish = await http.post(stack.a + created["finish_url"],
                             json={"finish_reason": "stop", "usage": {"total_tokens": 7}})
    assert finish.status_code == 200, finish.text
    assert finish.json()["status"] == "completed"
    live = await asyncio.wait_for(watching, 20)

    for received in (live, await read_events(http, events_url(stack.a, gen_id))):
        events = received.events
        assert [sse_event(e) for e in events[:-1]] == [SSE_NAME[e["type"]] for e in MIXED]
        assert [json.loads(e.data) for e in events[:-1]] == [expected_data(e) for e in MIXED]
        assert events[-1].event == "end"
        assert json.loads(events[-1].data) == {"finish_reason": "stop",
                                               "usage": {"total_tokens": 7}}
        assert received.ids == [protocol.event_id(i) for i in range(1, len(MIXED) + 2)]
    # Resume from every id, on the other edge: exactly what follows.
    ids = live.ids
    for i, last_id in enumerate(ids[:-1]):
        resumed = await read_events(http, events_url(stack.b if i % 2 else stack.a, gen_id),
                                    last_event_id=last_id)
        assert resumed.ids == ids[i + 1:]
        assert [e.data for e in resumed.events] == [e.data for e in live.events[i + 1:]]
    done = await http.get(events_url(stack.b, gen_id), headers={"last-event-id": ids[-1]})
    assert done.status_code == 204

    snapshot = await status(http, stack.b, gen_id)
    assert snapshot["status"] == "completed"
    assert snapshot["text"] == "".join(e["text"] for e in MIXED if e["type"] == "text")
    assert snapshot["reasoning"] == "".join(e["text"] for e in MIXED if e["type"] == "reasoning")
    assert snapshot["tool_calls"] == [expected_data(MIXED[3])]
    assert snapshot["events"] == {"message": 3, "reasoning": 2, "tool_call": 1,
                                  "tool_result": 2, "data": 2}
    assert snapshot["producer"] == "external"
    assert snapshot["metadata"] == {"chat": "c1", "turn": 3}


async def test_retried_append_is_a_no_op_and_gaps_or_overlaps_are_refused(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    created = await create_external(http, stack.a)
    first = [{"type": "text", "text": "One. "}, {"type": "text", "text": "Two. "}]
    assert (await append(http, stack.a, created, 0, first)).json() == {"count": 2}
    # The same batch again (its answer was lost): a no-op, on any edge.
    for base in (stack.a, stack.b):
        retried = await append(http, base, created, 0, first)
        assert retried.status_code == 200 and retried.json() == {"count": 2}
    # A gap (after > count) and an overlap (after < count, not the last batch's retry): a
    # different batch sent with the last one's `after`, of its size, is one too (acknowledged
    # as a retry, its text would be lost), whatever differs: a text, a kind.
    other_text = [{"type": "text", "text": "One. "}, {"type": "text", "text": "Else. "}]
    other_kind = [{"type": "text", "text": "One. "}, {"type": "reasoning", "text": "Two. "}]
    for after, batch in ((3, first), (1, first[:1]), (0, first[:1]), (0, other_text),
                         (0, other_kind)):
        refused = await append(http, stack.b, created, after, batch)
        assert_error_body(refused, 409, "offset_mismatch")
        assert refused.json()["count"] == 2
    assert (await append(http, stack.b, created, 2, [{"type": "text", "text": "Three."}])
            ).json() == {"count": 3}
    # The previous batch is no longer the last one: sent again, it overlaps.
    assert_error_body(await append(http, stack.a, created, 0, first), 409, "offset_mismatch")
    end = {"finish_reason": "stop", "usage": None}
    assert (await http.post(stack.a + created["finish_url"], json=end)).status_code == 200
    # finish is idempotent: the same terminal again is 200, another one 409.
    again = await http.post(stack.b + created["finish_url"], json=end)
    assert again.status_code == 200 and again.json()["status"] == "completed"
    other = await http.post(stack.b + created["finish_url"],
                            json={"error": {"code": "tool_failed", "message": "boom"}})
    assert_error_body(other, 409, "already_finished")
    late = await append(http, stack.a, created, 3, [{"type": "text", "text": "Late."}])
    assert_error_body(late, 409, "already_finished")
    received = await read_events(http, events_url(stack.b, created["id"]))
    assert received.text == "One. Two. Three."
    assert received.ids == [protocol.event_id(i) for i in range(1, 5)]


BAD_BATCHES: list[tuple[Any, int, str]] = [
    ({"after": 0, "events": [{"type": "text", "text": "ok. "}, {"type": "shout", "text": "x"}]},
     422, "invalid_event"),
    ({"after": 0, "events": [{"type": "text", "text": "ok. "}, {"type": "text"}]},
     422, "invalid_event"),
    ({"after": 0, "events": [{"type": "text", "text": "ok. "}, {"type": "text", "text": 5}]},
     422, "invalid_event"),
    ({"after": 0, "events": [{"type": "reasoning", "text": ["a"]}]}, 422, "invalid_event"),
    ({"after": 0, "events": [{"type": "tool_call", "index": 0, "id": "c", "name": "f"}]},
     422, "invalid_event"),
    ({"after": 0, "events": [{"type": "tool_call", "index": "0", "id": "c", "name": "f",
                              "arguments": "{}"}]}, 422, "invalid_event"),
    ({"after": 0, "events": [{"type": "tool_call", "index": 10**29, "id": "c", "name": "f",
                              "arguments": "{}"}]}, 422, "invalid_event"),  # (JS cannot read it)
    ({"after": 0, "events": [{"type": "tool_result", "id": "c"}]}, 422, "invalid_event"),
    ({"after": 0, "events": [{"type": "data", "value": 1}]}, 422, "invalid_event"),
    ({"after": 0, "events": [{"type": "text", "text": "x", "extra": 1}]}, 422, "invalid_event"),
    ({"after": 0, "events": [{"type": "end", "finish_reason": "stop"}]}, 422, "invalid_event"),
    ({"after": 0, "events": []}, 422, "invalid_request"),
    ({"after": -1, "events": [{"type": "text", "text": "x"}]}, 422, "invalid_request"),
    ({"after": True, "events": [{"type": "text", "text": "x"}]}, 422, "invalid_request"),
    ({"events": [{"type": "text", "text": "x"}]}, 422, "invalid_request"),
    ([{"type": "text", "text": "x"}], 422, "invalid_request"),
    ({"after": 0, "events": [{"type": "text", "text": "x"}] * 1001}, 413, "batch_too_large"),
]


async def test_bad_batches_are_refused_whole(stack: Stack, http: httpx.AsyncClient) -> None:
    created = await create_external(http, stack.a)
    for body, code, error in BAD_BATCHES:
        response = await http.post(stack.a + created["append_url"], json=body)
        assert_error_body(response, code, error)
    for raw in (b"{not json", b'{"after": 0, "events": [{"type": "text", "text": "\\ud800"}]}'):
        response = await http.post(stack.a + created["append_url"], content=raw)
        assert_error_body(response, 400, "invalid_json")
    # A body past BROKER_MAX_BODY_BYTES (1 MiB by default).
    huge = {"after": 0, "events": [{"type": "text", "text": "x" * (1 << 20)}]}
    assert_error_body(await http.post(stack.a + created["append_url"], json=huge), 413,
                      "body_too_large")
    # Nothing of any of them was applied: the first good batch is event 1.
    snapshot = await status(http, stack.b, created["id"])
    assert snapshot["events"] == dict.fromkeys(protocol.CONTENT_KINDS, 0)
    assert (await append(http, stack.b, created, 0, [{"type": "text", "text": "Good."}])
            ).json() == {"count": 1}


async def test_bad_creates_and_finishes_are_4xx_json(stack: Stack, http: httpx.AsyncClient
                                                     ) -> None:
    url = stack.a + "/v1/generations"
    for body in ({"producer": "internal"}, {"producer": "external", "metadata": [1]},
                 {"producer": "external", "model": ""}, {"producer": "external", "tools": []}):
        assert_error_body(await http.post(url, json=body), 422, "invalid_request")
    created = await create_external(http, stack.a, model="my-agent")
    for body in ({"finish_reason": 3}, {"usage": [1]}, {"error": {"code": "Bad Code"}},
                 {"error": {"message": 1}}, {"error": "x"},
                 {"finish_reason": "stop", "error": {"code": "x", "message": "y"}}):
        response = await http.post(stack.a + created["finish_url"], json=body)
        assert_error_body(response, 422, "invalid_request")
    # Appending to a worker's generation, or to none, is refused.
    missing = "A" * 22
    response = await http.post(f"{stack.a}/v1/generations/{missing}/append",
                               json={"after": 0, "events": [{"type": "text", "text": "x"}]})
    assert_error_body(response, 404, "not_found")
    worker_gen = await create(http, stack.a, unique("a worker's"))
    response = await http.post(f"{stack.a}/v1/generations/{worker_gen}/append",
                               json={"after": 0, "events": [{"type": "text", "text": "x"}]})
    assert_error_body(response, 409, "not_external")
    failed = await http.post(stack.b + created["finish_url"],
                             json={"error": {"code": "agent_crashed", "message": "sorry"}})
    assert failed.status_code == 200 and failed.json()["status"] == "failed"
    received = await read_events(http, events_url(stack.a, created["id"]))
    assert received.terminal is not None and received.terminal.event == "error"
    assert received.terminal_data() == {"code": "agent_crashed", "message": "sorry"}
    assert (await status(http, stack.a, created["id"]))["model"] == "my-agent"


async def test_cancel_is_answered_to_the_producer(stack: Stack, http: httpx.AsyncClient
                                                  ) -> None:
    created = await create_external(http, stack.a)
    assert (await append(http, stack.a, created, 0, [{"type": "text", "text": "Hi. "}])
            ).status_code == 200
    cancel = await http.post(f"{stack.b}/v1/generations/{created['id']}/cancel")
    assert cancel.status_code == 202
    # The generation ended at once (no worker to stop): the viewers see the end now.
    received = await read_events(http, events_url(stack.a, created["id"]))
    assert received.terminal_data() == {"finish_reason": "cancelled", "usage": None}
    refused = await append(http, stack.a, created, 1, [{"type": "text", "text": "More."}])
    assert_error_body(refused, 409, "cancelled")
    assert refused.json()["count"] == 1
    assert_error_body(await http.post(stack.b + created["heartbeat_url"]), 409, "cancelled")
    assert_error_body(await http.post(stack.b + created["finish_url"], json={}), 409,
                      "cancelled")


@pytest.fixture(scope="module", params=["redis", "cluster"])
def short_lease(request: pytest.FixtureRequest, start_broker: StartBroker) -> Any:
    """Two edges (no worker) whose producers' lease is short, on a Redis of their own or on
    the three-master Redis Cluster (where the sweep's index and the generation are on
    different slots)."""
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url, server, owned = cluster.url, cluster, None
    else:
        owned = server = RedisServer().start()
        url = owned.url
    edges = [start_broker("edge", url, broker_producer_lease="1",
                          broker_probe_interval="0.25") for _ in range(2)]
    yield server, edges
    for edge in edges:
        edge.stop()
    if owned is not None:
        owned.stop()


async def test_a_silent_producer_is_lost_exactly_once(short_lease: Any,
                                                       http: httpx.AsyncClient) -> None:
    """Nobody watches it, no worker runs: the edges' sweep still ends it, with ONE error."""
    server, edges = short_lease
    lease, sweep = 1.0, 0.25
    created = await create_external(http, edges[0].url)
    assert created["lease_seconds"] == lease
    gen_id = created["id"]
    # Heartbeats (on either edge) and appends keep it alive past several leases.
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < 3 * lease:
        if count % 2:
            beat = await http.post(edges[count % 2].url + created["heartbeat_url"])
            assert beat.status_code == 200, beat.text
        else:
            ok = await append(http, edges[1].url, created, count // 2,
                              [{"type": "text", "text": f"{count}. "}])
            assert ok.status_code == 200, ok.text
        silent_since = time.monotonic()  # (the last renewal: its answer came)
        count += 1
        await asyncio.sleep(lease / 4)
    assert (await status(http, edges[0].url, gen_id))["status"] == "running"
    client = server.client()

    def ended() -> bool:
        return client.hget(protocol.meta_key(gen_id), "status") == b"failed"

    # Lapsed a lease after the last renewal; a sweep round after that at most (plus slack
    # for a loaded machine).
    bound = lease + sweep + 2.0
    while not ended():
        assert time.monotonic() - silent_since < bound, "the silent producer was not reaped"
        await asyncio.sleep(0.05)
    reaped_after = time.monotonic() - silent_since
    assert reaped_after >= lease * 0.9
    received = await read_events(http, events_url(edges[1].url, gen_id))
    errors = [e for e in received.events if e.event in ("error", "end")]
    assert len(errors) == 1 and received.terminal_data()["code"] == "producer_lost"
    assert received.text == "".join(f"{i}. " for i in range(0, count, 2))
    # Nothing more comes, however many sweeps pass; the index forgot it.
    await asyncio.sleep(4 * sweep)
    log = client.xrange(protocol.log_key(gen_id))
    assert [fields[b"k"] for _, fields in log].count(b"error") == 1
    assert client.zscore(protocol.PRODUCERS_KEY, gen_id) is None
    refused = await append(http, edges[0].url, created, count // 2 + 1,
                           [{"type": "text", "text": "late"}])
    assert_error_body(refused, 409, "already_finished")


async def test_only_the_creating_key_may_write(start_broker: StartBroker,
                                               redis_server: RedisServer,
                                               http: httpx.AsyncClient) -> None:
    edge = start_broker("edge", redis_server.url, broker_insecure="0",
                        broker_api_keys="key-one,key-two", broker_viewer_token_keys="vt")
    one, two = ({"authorization": f"Bearer {k}"} for k in ("key-one", "key-two"))
    body = {"producer": "external"}
    assert_error_body(await http.post(edge.url + "/v1/generations", json=body), 401,
                      "unauthorized")
    created = (await http.post(edge.url + "/v1/generations", json=body, headers=one)).json()
    assert "token=" in created["events_url"]
    batch = {"after": 0, "events": [{"type": "text", "text": "Mine."}]}
    for headers, code in (({}, 401), (two, 403)):
        for url, payload in ((created["append_url"], batch), (created["finish_url"], {}),
                             (created["heartbeat_url"], None)):
            response = await http.post(edge.url + url, json=payload, headers=headers)
            assert response.status_code == code, (url, response.text)
    assert (await http.post(edge.url + created["append_url"], json=batch, headers=one)
            ).json() == {"count": 1}
    assert (await http.post(edge.url + created["finish_url"], json={}, headers=one)
            ).status_code == 200
    received = await read_events(http, edge.url + created["events_url"])
    assert received.text == "Mine."


async def test_a_v1_node_eventsource_sees_a_producers_answer_text_alone(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """The ``eventsource`` npm package with ``onmessage`` (and the terminal events) only, as a
    v1 client: of a producer's mixed stream it gets exactly the answer's messages."""
    created = await create_external(http, stack.a)
    node = NodeViewers(stack.b + created["events_url"]).start()
    try:
        count = 0
        for batch in (MIXED[:4], MIXED[4:]):
            response = await append(http, stack.a, created, count, batch)
            assert response.status_code == 200, response.text
            count += len(batch)
        finish = await http.post(stack.a + created["finish_url"], json={})
        assert finish.status_code == 200
        (viewer,) = await asyncio.to_thread(node.result, 30)
    finally:
        node.stop()
    full = await read_events(http, events_url(stack.a, created["id"]))
    assert viewer["text"] == full.text == "".join(
        e["text"] for e in MIXED if e["type"] == "text")
    assert viewer["ids"] == [*(e.id for e in full.messages), full.ids[-1]]
    assert viewer["terminal"] == "end" and viewer["finish_reason"] == "stop"


async def test_many_silent_producers_are_all_lost_within_a_lease_and_a_few_sweeps(
    short_lease: Any,
) -> None:
    """More lapsed leases than one sweep batch takes: a sweep goes on until none is due."""
    server, _edges = short_lease
    lease = 1.0
    settings = Settings(redis_url=server.url)
    store = Store(connect(settings, "test-many-producers"), settings)
    external = ExternalStore(store)
    ids = [protocol.new_generation_id() for _ in range(3 * SWEEP_BATCH)]
    try:
        await asyncio.gather(*(external.create(gen_id, model="m", lease=lease)
                               for gen_id in ids))
        created = time.monotonic()

        async def all_failed() -> bool:
            metas = await asyncio.gather(*(store.meta(gen_id) for gen_id in ids))
            return all(m is not None and m.status == "failed" for m in metas)

        await eventually(all_failed, lease + 5.0, "every silent producer reaped")
        assert time.monotonic() - created >= lease * 0.9
        logs = await asyncio.gather(*(store.read_log(gen_id, 0, 10) for gen_id in ids))
        assert all([e.kind for e in log] == ["error"] for log in logs)

        async def forgotten() -> bool:
            scores = await asyncio.gather(*(store.redis.zscore(protocol.PRODUCERS_KEY, gen_id)
                                            for gen_id in ids))
            return all(score is None for score in scores)

        await eventually(forgotten, 5.0, "the sweep's index forgot them")
    finally:
        if isinstance(store.redis, aioredis.Redis):  # (its own pool: closed only when told)
            await store.redis.aclose(close_connection_pool=True)
        else:
            await store.redis.aclose()


async def test_an_escaped_producer_field_still_makes_an_external_generation(
    queue_only: Stack, http: httpx.AsyncClient
) -> None:
    """JSON may spell a key with escapes (``"\\u0070roducer"`` is ``"producer"``): the same
    body must make the same generation. The edge looked for the key's bytes before parsing,
    so this body became a worker's generation, the ``producer`` field sent on to the LLM."""
    body = (b'{"\\u0070roducer": "external", '
            b'"messages": [{"role": "user", "content": "hi"}]}')
    response = await http.post(f"{queue_only.a}/v1/generations", content=body,
                               headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "running" and "append_url" in created, created
