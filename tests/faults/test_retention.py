"""Nothing lives forever: a generation's keys expire after the retention TTL (and carry a TTL
at every moment, so they go even if every process dies), and the log is capped in length
without ever handing a viewer a silently partial text."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from broker.core import protocol
from tests.faults.helpers import Viewer, report, wait_worker_ready
from tests.support.api import assert_error_body, create, events_url, unique
from tests.support.fakellm import TRICKY_TEXT, FakeLLM
from tests.support.procs import wait_until
from tests.support.sse import read_events

# -- helpers -----------------------------------------------------------------------------------


def keys_of(gen_id: str) -> list[str]:
    return [protocol.meta_key(gen_id), protocol.log_key(gen_id), protocol.text_key(gen_id)]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """``assert_error_body`` for ``code``, and a message that is not empty."""
    assert_error_body(response, status, code)
    assert response.json()["error"]["message"]


async def wait_redis(d: Any, check: Any, within: float, what: str) -> float:
    """Poll ``check(client)`` in a thread until it is truthy; the monotonic time it was."""
    client = d.redis.client()
    try:
        await asyncio.to_thread(wait_until, lambda: check(client), within, what)
        return time.monotonic()
    finally:
        client.close()


def pttls(d: Any, gen_id: str) -> dict[str, int]:
    client = d.redis.client()
    try:
        return {key: int(client.pttl(key)) for key in keys_of(gen_id)}
    finally:
        client.close()


SENTENCES = TRICKY_TEXT + "".join(
    f" Sentence number {i} of the long answer is here." for i in range(1, 21)
)


# -- the scenarios -----------------------------------------------------------------------------


async def test_finished_generation_expires_after_the_retention_ttl(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    retention_ttl = 1.0
    d = deploy(edges=2, broker_retention_ttl=retention_ttl)
    await wait_worker_ready(d, d.workers[0])
    a, b = d.edges[0].url, d.edges[1].url
    text = "A short answer. It has two sentences."
    prompt = fake_llm.script(unique("expire"), text, delay=0.002)

    started = time.monotonic()
    gen_id = await create(http, a, prompt)
    viewer = Viewer(http, events_url(a, gen_id))
    got = await viewer.result(terminal_id=False)
    assert viewer.terminal_at is not None
    report(record_property, "retention: stream to its end", viewer.terminal_at - started,
           "the create to the viewer's terminal event")
    assert got.text == text and got.terminal_data()["finish_reason"] == "stop"
    ttls = pttls(d, gen_id)
    assert all(0 < ttl <= 1000 for ttl in ttls.values()), ttls  # the TTL, renewed at the end
    client = d.redis.client()
    try:
        *_, (entry_id, fields) = client.xrange(protocol.log_key(gen_id))
    finally:
        client.close()
    end = protocol.decode_log_entry(entry_id, fields)
    assert end.kind == "end"

    # Gone one TTL after the end event's publish (EXISTS itself expires a key whose time has
    # come; one more TTL is left as slack)...
    gone_at = await wait_redis(d, lambda r: r.exists(*keys_of(gen_id)) == 0, 2 * retention_ttl,
                               "the generation's keys to expire")
    gone_ms = time.time() * 1000
    seconds = gone_at - viewer.terminal_at
    print(f"[retention] keys gone {seconds:.3f} s after the end (TTL 1 s)")
    record_property("seconds_to_expiry", round(seconds, 3))
    # ...and never before: the TTL is set by the same call that publishes the end event.
    assert gone_ms - end.published_ms >= retention_ttl * 1000, (
        f"the keys vanished {(gone_ms - end.published_ms) / 1000:.3f}s after the end")

    for base in (a, b):
        resumed = await http.get(events_url(base, gen_id), headers={"last-event-id": got.ids[0]})
        assert_error(resumed, 404, "not_found")
        at_end = await http.get(events_url(base, gen_id), headers={"last-event-id": got.ids[-1]})
        assert_error(at_end, 404, "not_found")  # not 204: the generation is gone
        assert_error(await http.get(events_url(base, gen_id)), 404, "not_found")
        assert_error(await http.get(f"{base}/v1/generations/{gen_id}"), 404, "not_found")
        cancel = await http.post(f"{base}/v1/generations/{gen_id}/cancel")
        assert_error(cancel, 404, "not_found")
    client = d.redis.client()
    try:
        assert client.exists(*keys_of(gen_id)) == 0  # the 404s did not bring anything back
    finally:
        client.close()


async def test_keys_carry_a_ttl_at_every_moment_so_they_outlive_no_process(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    ttl_ms = 3000
    d = deploy(workers=0, broker_retention_ttl=ttl_ms / 1000)
    base = d.edges[0].url

    # Queued: the meta (the only key so far) already expires.
    queued = await create(http, base, unique("queued"))
    meta_ttl = pttls(d, queued)[protocol.meta_key(queued)]
    assert 0 < meta_ttl <= ttl_ms, meta_ttl
    assert (await http.post(f"{base}/v1/generations/{queued}/cancel")).status_code == 202
    assert all(0 < t <= ttl_ms for t in pttls(d, queued).values() if t != -2)

    # Running: meta, log and text all expire.
    worker = d.add_worker()
    await wait_worker_ready(d, worker)
    prompt = fake_llm.script(unique("running"), SENTENCES * 10, delay=0.02)
    gen_id = await create(http, base, prompt)
    head = await read_events(http, events_url(base, gen_id), stop_after=2)
    assert len(head.messages) == 2 and head.terminal is None
    ttls = pttls(d, gen_id)
    assert all(0 < ttl <= ttl_ms for ttl in ttls.values()), ttls
    assert (await http.get(f"{base}/v1/generations/{gen_id}")).json()["status"] == "running"

    # Every process dies mid-answer: nobody will ever end or clean up this generation.
    killed_at = time.monotonic()
    for proc in [*d.workers, *d.edges]:
        proc.proc.kill()
        proc.proc.wait(10)
    gone_at = await wait_redis(d, lambda r: r.exists(*keys_of(gen_id), *keys_of(queued)) == 0,
                               ttl_ms / 1000 + 3, "the orphaned generation's keys to expire")
    seconds = gone_at - killed_at
    assert seconds <= ttl_ms / 1000 + 1
    # A new edge tells a viewer the generation is gone.
    edge = d.add_edge()
    viewer_started = time.monotonic()
    response = await http.get(events_url(edge.url, gen_id), headers={"last-event-id": head.ids[-1]})
    assert_error(response, 404, "not_found")
    report(record_property, "every process killed mid-answer", seconds,
           "the kill until the orphaned keys were gone (a viewer then gets 404 in "
           f"{time.monotonic() - viewer_started:.3f} s)")


async def test_capped_log_never_serves_a_silently_partial_text(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    cap = 5
    d = deploy(workers=0, broker_max_log_length=cap)
    base = d.edges[0].url
    prompt = fake_llm.script(unique("capped"), SENTENCES, delay=0.001)
    gen_id = await create(http, base, prompt)
    # A viewer from before the first event sees everything live.
    live = Viewer(http, events_url(base, gen_id))
    channel = protocol.live_channel(gen_id)
    await wait_redis(d, lambda r: dict(r.pubsub_numsub(channel))[channel.encode()] == 1, 10,
                     "the live viewer's subscription")
    d.add_worker()
    claimed_at = await wait_redis(
        d, lambda r: r.hget(protocol.meta_key(gen_id), "status") != b"queued", 20,
        "the worker to claim the generation")
    full = await live.result(terminal_id=False)
    assert live.terminal_at is not None
    report(record_property, "capped log: live viewer", live.terminal_at - claimed_at,
           "the claim to the live viewer's terminal event")
    assert full.text == SENTENCES
    assert len(full.messages) >= 20 and full.terminal_data()["finish_reason"] == "stop"
    client = d.redis.client()
    try:
        assert client.xlen(protocol.log_key(gen_id)) <= cap
    finally:
        client.close()

    # A late viewer from the start: the events it needs were trimmed. It is told so before
    # any event, with a non-200 answer that stops an EventSource from reconnecting.
    asked_at = time.monotonic()
    late = await http.get(events_url(base, gen_id))
    report(record_property, "capped log: late viewer", time.monotonic() - asked_at,
           "the late viewer's request to its answer")
    assert_error(late, 410, "history_lost")

    # Resumes from within the kept window get exactly the rest; from before it, history_lost.
    # ``back`` events to come: from the oldest kept event, and from just before it.
    for back in (cap - 1, cap):
        cursor = full.ids[-back - 1]
        viewer = Viewer(http, events_url(base, gen_id), last_event_id=cursor)
        rest = await viewer.result(terminal_id=False)
        assert rest.ids == full.ids[-back:]
        assert [e.data for e in rest.events] == [e.data for e in full.events[-back:]]
        assert rest.terminal is not None and rest.terminal.event == "end"
    for cursor in (full.ids[-cap - 2], full.ids[0]):
        gap = await http.get(events_url(base, gen_id), headers={"last-event-id": cursor})
        assert_error(gap, 410, "history_lost")

    # The status keeps the FULL text: it is stored apart from the log.
    status = (await http.get(f"{base}/v1/generations/{gen_id}")).json()
    assert status["status"] == "completed" and status["text"] == SENTENCES
