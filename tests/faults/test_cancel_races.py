"""Cancel at every moment of a generation's life: queued, running, ended, twice, ten times at
once, and racing the natural end. Every stream ends with exactly ONE terminal event, the
status agrees with it, and the text before the cancel stays intact."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx

from broker.core import protocol
from broker.core.settings import Settings
from broker.tools.mockllm import tokenize
from tests.faults.helpers import Viewer, report, requests_for, wait_worker_ready
from tests.support.api import assert_error_body, create, events_url, unique
from tests.support.api import status as status_of
from tests.support.fakellm import FakeLLM, prompt_of
from tests.support.procs import wait_until
from tests.support.sse import read_events

STORY = (
    "The broker streams answers. It buffers tokens into sentences! Does it lose text? "
    "Never: the log in Redis is the truth.\n\nA second paragraph follows here. It ends now. "
)

# -- helpers -----------------------------------------------------------------------------------

FROM_CANCEL = "the cancel to every viewer's terminal event"

# A running generation's worker hears of a cancel by its notice on ``broker:cancel`` at once;
# failing that, its heartbeat brings the flag back, every third of the lease (the fixtures
# run the default lease). A run's first heartbeat comes a whole period after it started.
HEARTBEAT = Settings().lease_ttl / 3


async def cancel(http: httpx.AsyncClient, base: str, gen_id: str) -> httpx.Response:
    return await http.post(f"{base}/v1/generations/{gen_id}/cancel")


async def wait_subscribed(d: Any, gen_id: str, viewers_edges: int = 1) -> None:
    """Until the edges of the live viewers hold their subscription to the generation."""
    client = d.redis.client()
    channel = protocol.live_channel(gen_id)

    def subscribed() -> bool:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()]) >= viewers_edges

    try:
        await asyncio.to_thread(wait_until, subscribed, 10, "the viewers' subscription")
    finally:
        client.close()


async def right_after_a_renewal(d: Any, gen_id: str) -> float:
    """Wait for the worker's next lease renewal of ``gen_id`` (a heartbeat, seen as a new
    ``lease`` in the meta); return the moment before which its following heartbeat cannot
    run. A cancel sent now that ends the streams before that moment was heard by its notice:
    the heartbeat could not have brought it yet."""
    client = d.redis.client()
    meta = protocol.meta_key(gen_id)

    def next_heartbeat_earliest() -> float:
        asked_at = time.monotonic()
        first = client.hget(meta, "lease")
        deadline = asked_at + 2 * HEARTBEAT
        while time.monotonic() < deadline:
            # A renewal this read sees ran after the previous read was sent.
            previous, asked_at = asked_at, time.monotonic()
            if client.hget(meta, "lease") != first:
                return previous + HEARTBEAT
            time.sleep(0.005)
        raise AssertionError(f"no lease renewal within {2 * HEARTBEAT:.1f}s")

    try:
        return await asyncio.to_thread(next_heartbeat_earliest)
    finally:
        client.close()


def assert_heard_by_the_notice(viewers: list[Viewer], cancelled_at: float,
                               next_heartbeat: float) -> None:
    ended_at = max(v.terminal_at or float("inf") for v in viewers)
    assert ended_at < next_heartbeat, (
        f"the streams ended {ended_at - cancelled_at:.2f}s after the cancel, not before the "
        f"next heartbeat ({next_heartbeat - cancelled_at:.2f}s): the cancel notice was lost")


def log_kinds(d: Any, gen_id: str) -> list[str]:
    """The kinds of the events in the generation's log, straight from Redis."""
    client = d.redis.client()
    try:
        entries = client.xrange(protocol.log_key(gen_id))
    finally:
        client.close()
    return [protocol.decode_log_entry(eid, fields).kind for eid, fields in entries]


# -- the scenarios -----------------------------------------------------------------------------


async def test_cancel_while_queued_ends_at_once_and_the_worker_skips_the_job(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(workers=0)  # nobody takes the job: it stays queued
    base = d.edges[0].url
    prompt = fake_llm.script(unique("queued"), STORY)
    gen_id = await create(http, base, prompt)
    viewer = Viewer(http, events_url(base, gen_id))
    await wait_subscribed(d, gen_id)

    cancelled_at = time.monotonic()
    response = await cancel(http, base, gen_id)
    assert response.status_code == 202, response.text
    got = await viewer.result()
    assert viewer.terminal_at is not None
    report(record_property, "cancel while queued", viewer.terminal_at - cancelled_at,
           FROM_CANCEL)

    assert got.messages == []
    assert got.terminal is not None and got.terminal.event == "end"
    assert got.terminal_data() == {"finish_reason": "cancelled", "usage": None}
    status = await status_of(http, base, gen_id)
    assert (status["status"], status["finish_reason"], status["text"]) == (
        "cancelled", "cancelled", "")

    # A worker comes up now: it takes the job, sees it cancelled, acks it and skips it.
    worker = d.add_worker()
    client = d.redis.client()

    def job_consumed() -> bool:
        groups = client.xinfo_groups(protocol.jobs_stream(0))  # NOGROUP until the worker is up
        pending = sum(int(g["pending"]) for g in groups)
        return bool(groups) and pending == 0 and client.xlen(protocol.jobs_stream(0)) == 0

    try:
        await asyncio.to_thread(wait_until, job_consumed, 20, "the worker to ack the job")
    finally:
        client.close()
    assert worker.proc.poll() is None
    assert requests_for(fake_llm, prompt) == 0  # the LLM never heard of it
    status = await status_of(http, base, gen_id)
    assert (status["status"], status["finish_reason"], status["text"]) == (
        "cancelled", "cancelled", "")
    assert log_kinds(d, gen_id) == ["end"]
    late = await read_events(http, events_url(base, gen_id))
    assert late.ids == got.ids and late.messages == []


async def test_cancel_while_running_ends_promptly_and_closes_the_upstream(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(edges=2)
    await wait_worker_ready(d, d.workers[0])
    a, b = d.edges[0].url, d.edges[1].url
    answer = STORY * 20
    prompt = fake_llm.script(unique("running"), answer, delay=0.05)
    gen_id = await create(http, a, prompt)
    viewers = [Viewer(http, events_url(a, gen_id)), Viewer(http, events_url(b, gen_id))]
    for viewer in viewers:
        await viewer.wait_first_message()
    next_heartbeat = await right_after_a_renewal(d, gen_id)

    cancelled_at = time.monotonic()
    response = await cancel(http, b, gen_id)
    assert response.status_code == 202, response.text
    results = [await viewer.result() for viewer in viewers]
    seconds = max(v.terminal_at or 0 for v in viewers) - cancelled_at
    report(record_property, "cancel while running", seconds, FROM_CANCEL)
    assert_heard_by_the_notice(viewers, cancelled_at, next_heartbeat)

    for got in results:
        assert got.terminal is not None and got.terminal.event == "end"
        assert got.terminal_data()["finish_reason"] == "cancelled"
    assert results[0].ids == results[1].ids
    record = fake_llm.record_for(prompt)
    assert await asyncio.to_thread(record.closed_by_client.wait, 10)  # upstream closed
    assert not record.completed and record.sent_tokens < len(answer.split()) // 2
    status = await status_of(http, a, gen_id)
    assert status["status"] == "cancelled" and status["finish_reason"] == "cancelled"
    assert status["text"] == results[0].text  # the text so far, intact
    assert status["text"] and answer.startswith(status["text"])
    assert requests_for(fake_llm, prompt) == 1


async def test_cancel_after_the_end_changes_nothing(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(edges=2)
    await wait_worker_ready(d, d.workers[0])
    a, b = d.edges[0].url, d.edges[1].url
    prompt = fake_llm.script(unique("ended"), STORY)
    gen_id = await create(http, a, prompt)
    first = await Viewer(http, events_url(a, gen_id)).result()
    assert first.text == STORY and first.terminal_data()["finish_reason"] == "stop"
    before = await status_of(http, a, gen_id)
    kinds = log_kinds(d, gen_id)

    cancelled_at = time.monotonic()
    for base in (a, b):
        assert_error_body(await cancel(http, base, gen_id), 409, "already_finished")
    late_viewer = Viewer(http, events_url(b, gen_id))
    late = await late_viewer.result()
    assert late_viewer.terminal_at is not None
    report(record_property, "cancel after the end", late_viewer.terminal_at - cancelled_at,
           FROM_CANCEL)

    assert await status_of(http, b, gen_id) == before
    assert before["status"] == "completed" and before["finish_reason"] == "stop"
    assert log_kinds(d, gen_id) == kinds
    assert late.ids == first.ids and late.text == STORY
    assert [e.data for e in late.events] == [e.data for e in first.events]
    assert late.terminal_data()["finish_reason"] == "stop"


async def test_cancel_twice_while_running(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(edges=2)
    await wait_worker_ready(d, d.workers[0])
    a, b = d.edges[0].url, d.edges[1].url
    prompt = fake_llm.script(unique("twice"), STORY * 20, delay=0.05)
    gen_id = await create(http, a, prompt)
    viewer = Viewer(http, events_url(a, gen_id))
    await viewer.wait_first_message()
    next_heartbeat = await right_after_a_renewal(d, gen_id)

    cancelled_at = time.monotonic()
    answers = [await cancel(http, a, gen_id), await cancel(http, b, gen_id)]
    got = await viewer.result()
    assert viewer.terminal_at is not None
    report(record_property, "cancel twice", viewer.terminal_at - cancelled_at, FROM_CANCEL)
    assert_heard_by_the_notice([viewer], cancelled_at, next_heartbeat)

    assert answers[0].status_code == 202, answers[0].text
    assert answers[1].status_code in (202, 409), answers[1].text
    if answers[1].status_code == 409:
        assert_error_body(answers[1], 409, "already_finished")
    assert got.terminal_data()["finish_reason"] == "cancelled"
    assert log_kinds(d, gen_id).count("end") == 1
    late = await Viewer(http, events_url(b, gen_id)).result()
    assert late.ids == got.ids and late.text == got.text
    status = await status_of(http, b, gen_id)
    assert status["status"] == "cancelled" and status["text"] == got.text
    assert_error_body(await cancel(http, b, gen_id), 409, "already_finished")


async def test_ten_concurrent_cancels_give_one_terminal_event(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy(edges=2)
    await wait_worker_ready(d, d.workers[0])
    bases = [e.url for e in d.edges]
    prompt = fake_llm.script(unique("ten"), STORY * 20, delay=0.05)
    gen_id = await create(http, bases[0], prompt)
    viewers = [Viewer(http, events_url(base, gen_id)) for base in bases]
    for viewer in viewers:
        await viewer.wait_first_message()
    next_heartbeat = await right_after_a_renewal(d, gen_id)

    cancelled_at = time.monotonic()
    answers = await asyncio.gather(*(cancel(http, bases[i % 2], gen_id) for i in range(10)))
    results = [await viewer.result() for viewer in viewers]
    report(record_property, "ten concurrent cancels",
           max(v.terminal_at or 0 for v in viewers) - cancelled_at, FROM_CANCEL)
    assert_heard_by_the_notice(viewers, cancelled_at, next_heartbeat)

    codes = [r.status_code for r in answers]
    print(f"cancel answers: {codes}")
    assert set(codes) <= {202, 409}, [r.text for r in answers]
    assert 202 in codes  # the generation was running when the first one ran
    for response in answers:
        if response.status_code == 409:
            assert_error_body(response, 409, "already_finished")
    for got in results:
        assert got.terminal_data()["finish_reason"] == "cancelled"
    assert results[0].ids == results[1].ids
    assert log_kinds(d, gen_id).count("end") == 1
    assert [k for k in log_kinds(d, gen_id) if k != "message"] == ["end"]
    late = await Viewer(http, events_url(bases[1], gen_id)).result()
    assert late.ids == results[0].ids
    assert [e.data for e in late.events] == [e.data for e in results[0].events]
    status = await status_of(http, bases[0], gen_id)
    assert status["status"] == "cancelled" and status["text"] == results[0].text


async def test_cancel_racing_the_natural_end(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    d = deploy()
    await wait_worker_ready(d, d.workers[0])
    base = d.edges[0].url
    text = "Yes. It is done now."  # the first message, then three short tokens to go
    outcomes: list[tuple[float, int, str, float]] = []
    # From "already over" to "plenty of time left": the cancel lands on both sides of the end.
    for delay in (0.0, 0.0, 0.0002, 0.0005, 0.0008, 0.001, 0.0015, 0.002, 0.005, 0.02):
        prompt = fake_llm.script(unique(f"race {delay}"), text, delay=delay)
        created_at = time.monotonic()
        gen_id = await create(http, base, prompt)
        viewer = Viewer(http, events_url(base, gen_id))
        await viewer.wait_first_message()
        cancelled_at = time.monotonic()
        response = await cancel(http, base, gen_id)
        got = await viewer.result()
        assert viewer.terminal_at is not None
        seconds = max(0.0, viewer.terminal_at - cancelled_at)
        # The race is settled by the notice or the answer's own end, before the run's first
        # heartbeat (a whole period after its start, which came after the create) could
        # have decided it.
        assert viewer.terminal_at < created_at + HEARTBEAT, (
            f"delay {delay}: ended {viewer.terminal_at - created_at:.2f}s after the create")

        assert response.status_code in (202, 409), response.text
        assert got.terminal is not None and got.terminal.event == "end", got.events
        reason = got.terminal_data()["finish_reason"]
        assert reason in ("stop", "cancelled")
        if response.status_code == 409:
            assert_error_body(response, 409, "already_finished")
            assert reason == "stop"  # 409 means it had ended: it cannot be cancelled after
        status = await status_of(http, base, gen_id)
        assert status["status"] == {"stop": "completed", "cancelled": "cancelled"}[reason]
        assert status["finish_reason"] == reason
        assert status["text"] == got.text
        assert got.text == text if reason == "stop" else text.startswith(got.text)
        assert [k for k in log_kinds(d, gen_id) if k != "message"] == ["end"]
        late = await read_events(http, events_url(base, gen_id))
        assert late.ids == got.ids
        assert json.loads(late.events[-1].data)["finish_reason"] == reason
        outcomes.append((delay, response.status_code, reason, seconds))

    for delay, code, reason, seconds in outcomes:
        print(f"delay {delay:.4f}: cancel {code}, finish_reason {reason}, {seconds:.3f} s")
    worst = max(seconds for *_, seconds in outcomes)
    report(record_property, "cancel racing the natural end (worst of 10)", worst, FROM_CANCEL)



class ClaimLagProxy:
    """A TCP proxy in front of Redis for ONE worker that holds back the reply to its CLAIM
    script by ``lag`` seconds, as a busy worker or a slow network would: the generation is
    ``running`` in Redis while the worker does not know yet that it runs it. Every other byte
    (the worker's other commands, its ``broker:cancel`` subscription) passes at once."""

    def __init__(self, redis_port: int, lag: float) -> None:
        self.redis_port = redis_port
        self.lag = lag
        self.claim_sha = hashlib.sha1(protocol.CLAIM_SCRIPT.encode()).hexdigest().encode()
        self.claims_held = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> ClaimLagProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [client_w, server_w]
        claims = [0]  # claim calls sent on this connection whose reply is still to come

        async def upstream() -> None:
            while data := await client_r.read(65536):
                claims[0] += data.count(self.claim_sha)
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if claims[0]:
                    claims[0] = 0
                    self.claims_held += 1
                    await asyncio.sleep(self.lag)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        for pump in (upstream(), downstream()):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def test_cancel_right_after_the_claim_is_not_lost(
    deploy: Any, fake_llm: FakeLLM, http: httpx.AsyncClient, record_property: Any
):
    lag = 1.0
    answer = STORY * 3
    delay = 0.01
    # The answer ends by itself before the run's first heartbeat: only the flag the worker
    # reads when it registers the run can turn it into a cancel.
    answer_seconds = len(tokenize(answer)) * delay
    assert answer_seconds < HEARTBEAT
    d = deploy(workers=0)
    base = d.edges[0].url
    client = d.redis.client()
    client.script_load(protocol.CLAIM_SCRIPT)  # the worker's first EVALSHA hits, no NOSCRIPT
    proxy = await ClaimLagProxy(d.redis.port, lag).start()
    try:
        worker = d.add_worker(redis_url=proxy.url, broker_drain_timeout=0.5)
        await wait_worker_ready(d, worker)
        await asyncio.to_thread(
            wait_until, lambda: dict(client.pubsub_numsub(protocol.CANCEL_CHANNEL))[
                protocol.CANCEL_CHANNEL.encode()] >= 1, 10, "the worker's cancel subscription")
        prompt = fake_llm.script(unique("claimed"), answer, delay=delay)
        gen_id = await create(http, base, prompt)
        viewer = Viewer(http, events_url(base, gen_id))
        meta = protocol.meta_key(gen_id)
        await asyncio.to_thread(wait_until, lambda: client.hget(meta, "status") == b"running",
                                10, "the claim")
        cancelled_at = time.monotonic()
        response = await cancel(http, base, gen_id)
        assert response.status_code == 202, response.text  # it was running: accepted
        assert proxy.claims_held == 1

        got = await viewer.result()
        assert viewer.terminal_at is not None
        seconds = viewer.terminal_at - cancelled_at
        report(record_property, "cancel right after the claim (claim reply 1 s late)", seconds,
               FROM_CANCEL)
        status = await status_of(http, base, gen_id)
        sent = sum(r.sent_tokens for r in fake_llm.records if prompt_of(r.body) == prompt)
        print(f"terminal {got.terminal_data()}, status {status['status']}, LLM sent {sent} tokens")
        # Once the worker learns it runs the generation (``lag`` after the claim), the cancel
        # accepted meanwhile must stop it at once: before the answer would have ended.
        assert got.terminal_data()["finish_reason"] == "cancelled"
        assert seconds < lag + answer_seconds, (
            f"the stream ended {seconds:.2f}s after the cancel")
        assert status["status"] == "cancelled" and status["text"] == got.text
    finally:
        for proc in d.workers:  # in a thread: the worker talks to Redis through this loop
            await asyncio.to_thread(proc.stop, 5)
        await proxy.close()
        client.close()
