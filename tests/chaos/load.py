"""The steady load: a generation created every so often (through the viewers' link, as a
producer behind the load balancer would), each followed by a few viewers with plans drawn from
the seed; and, for each generation, its log read straight from Redis once it has ended (the
truth the checker judges the viewers by)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.exceptions import RedisClusterException, RedisError

from broker import producer
from broker.core import protocol
from broker.core.settings import Settings
from broker.tools.mockllm import tokenize
from tests.chaos import llm
from tests.chaos.viewers import Plan, Viewer

PRODUCER_SHARE = 0.2  # of the generations, made by an external producer instead of a worker
CREATE_ATTEMPTS_FOR = 20.0  # seconds a create is retried through an outage
LOG_POLL = 0.5


@dataclass
class Generation:
    label: str
    prompt: str
    mode: str
    created_at: float = 0.0  # monotonic, when the 201 came
    requested_at: float = 0.0
    gen_id: str = ""
    create_error: str = ""
    create_attempts: int = 0
    viewers: list[Viewer] = field(default_factory=list)
    log: list[tuple[int, str, Any, int]] | None = None  # (seq, kind, data, publish ms)
    status: str = ""
    ended_at: float | None = None  # monotonic, when the log reader saw the final status
    log_error: str = ""
    producer_crashed: str = ""  # an external producer's: why it stopped without finishing
    owner: str = ""  # the worker last seen running it (host-pid-random), if seen
    crash_requested: bool = False  # the producer_kill fault: stop as if the process died

    @property
    def answer(self) -> str:
        return llm.answer(self.prompt)

    def to_json(self, t0: float) -> dict[str, Any]:
        """What happened to it, for diagnosis (``generations.json``)."""
        def at(t: float | None) -> float | None:
            return None if not t else round(t - t0, 3)

        return {
            "label": self.label, "id": self.gen_id, "mode": self.mode,
            "requested": at(self.requested_at), "created": at(self.created_at),
            "ended": at(self.ended_at), "status": self.status, "owner": self.owner,
            "create_error": self.create_error,
            "log": None if self.log is None else [f"{e[0]}:{e[1]}" for e in self.log][-3:],
            "log_length": None if self.log is None else len(self.log),
            "viewers": [{
                "name": v.name, "plan": vars(v.plan), "outcome": v.outcome,
                "connects": v.connects, "answers": v.statuses,
                "received": [g.seq for g in v.received],
                "started": at(v.started_at), "done": at(v.done_at),
            } for v in self.viewers],
        }


class Load:
    def __init__(self, seed: int, entry_url: str, admin: Any, *, retry_s: float,
                 rate: float) -> None:
        self.rng = random.Random(f"load-{seed}")
        self.entry_url = entry_url
        self.admin = admin
        self.retry_s = retry_s
        self.rate = rate  # generations per second
        self.generations: list[Generation] = []
        self._modes: list[str] = []  # LLM modes the next generations get (LLM faults)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slow: list[float] = []  # slow viewers to add to the next generation (pause s)
        self.viewer_deadline = float("inf")
        self.producer_settings = Settings.from_env({})  # the sentence buffer's defaults
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0, read=60.0), limits=limits)

    # -- what the faults ask for -----------------------------------------------------------

    def next_modes(self, mode: str, count: int) -> list[str]:
        start = len(self.generations) + len(self._modes)
        self._modes.extend([mode] * count)
        return [f"g{start + i:05d}" for i in range(count)]

    def add_slow_viewer(self, pause: float) -> str:
        running = [g for g in self.generations if g.gen_id and g.ended_at is None]
        if not running:
            self._slow.append(pause)
            return "the next generation's"
        gen = running[int(self.rng.random() * len(running))]
        viewer = Viewer(gen.label, f"{gen.label}.slow{len(gen.viewers)}",
                        Plan(pause_after=1, pause_for=pause))
        gen.viewers.append(viewer)
        self._spawn(self._follow(gen, viewer))
        return viewer.name

    def crash_producer(self, pick: float) -> str:
        """Make a running external producer stop dead (as its process would if killed):
        no finish, no fail, its heartbeat gone; the generation ends at its lease."""
        running = [g for g in self.generations
                   if g.mode == "producer" and g.gen_id and g.ended_at is None
                   and not g.crash_requested]
        if not running:
            return ""
        gen = running[min(len(running) - 1, int(pick * len(running)))]
        gen.crash_requested = True
        return gen.label

    def running_ids(self) -> list[str]:
        return [g.gen_id for g in self.generations if g.gen_id and g.ended_at is None]

    # -- the load --------------------------------------------------------------------------

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            self._spawn(self._generation(self._new_generation()))
            await asyncio.sleep(self.rng.expovariate(self.rate))

    async def drain(self, within: float) -> None:
        """Wait (bounded) for every generation and viewer task to finish."""
        self.viewer_deadline = time.monotonic() + within
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=within + 5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_generation(self) -> Generation:
        rng = self.rng
        label = f"g{len(self.generations):05d}"
        mode = self._modes.pop(0) if self._modes else "ok"
        if mode == "ok" and rng.random() < PRODUCER_SHARE:
            mode = "producer"  # an external producer streams it over the edges' HTTP API
        prompt = llm.prompt(label, rng.randrange(1 << 30), rng.randint(20, 90),
                            rng.uniform(0.02, 0.08), mode)
        gen = Generation(label, prompt, mode)
        plans = [self._plan() for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
        plans += [Plan(pause_after=1, pause_for=p) for p in self._slow]
        self._slow.clear()
        gen.viewers = [Viewer(label, f"{label}.v{i}", plan) for i, plan in enumerate(plans)]
        self.generations.append(gen)
        return gen

    def _plan(self) -> Plan:
        rng = self.rng
        plan = Plan()
        roll = rng.random()
        if roll < 0.15:
            plan.join_after = rng.uniform(1.0, 8.0)  # late: maybe after the end
        elif roll < 0.25:
            plan.join_after = rng.uniform(0.5, 3.0)
            plan.start_after = rng.randint(1, 4)  # a page that knew an earlier id
        if rng.random() < 0.2:
            plan.leave_after = rng.randint(1, 6)
            plan.away_for = rng.uniform(0.3, 3.0)
        return plan

    async def _generation(self, gen: Generation) -> None:
        gen.requested_at = time.monotonic()
        if gen.mode == "producer":
            await self._produced(gen)
            return
        if not await self._create(gen):
            return
        url = f"{self.entry_url}/v1/generations/{gen.gen_id}/events"
        followers = [asyncio.create_task(self._follow(gen, v, url)) for v in gen.viewers]
        await self._read_log(gen)
        await asyncio.gather(*followers, return_exceptions=True)

    async def _follow(self, gen: Generation, viewer: Viewer, url: str | None = None) -> None:
        url = url or f"{self.entry_url}/v1/generations/{gen.gen_id}/events"
        await viewer.run(self.http, url, self.retry_s, self._deadline)

    @property
    def _deadline(self) -> float:
        return self.viewer_deadline

    async def _produced(self, gen: Generation) -> None:
        """An external producer (``broker.producer`` over HTTP, through the viewers' link and
        the load balancer) streams the answer token by token, then finishes; the viewers
        follow it as any other generation."""
        fields = llm.parse(gen.prompt)
        delay = float(fields["delay"])
        source = producer.over_http(self.entry_url, settings=self.producer_settings)
        deadline = time.monotonic() + CREATE_ATTEMPTS_FOR
        while True:
            gen.create_attempts += 1
            try:
                await source.start()
                break
            except (producer.ProducerError, httpx.HTTPError, ValueError) as e:
                # (ValueError: broker.producer reads a load balancer's own 503 page as JSON
                # and fails with JSONDecodeError; reported in docs/failure-model.md)
                gen.create_error = repr(e)
                if time.monotonic() > deadline:
                    await source.aclose()
                    return
                await asyncio.sleep(self.retry_s)
        gen.gen_id = source.id
        gen.created_at = time.monotonic()
        url = f"{self.entry_url}/v1/generations/{gen.gen_id}/events"
        followers = [asyncio.create_task(self._follow(gen, v, url)) for v in gen.viewers]
        reading = asyncio.create_task(self._read_log(gen))
        try:
            for token in tokenize(gen.answer):
                if gen.crash_requested:
                    gen.producer_crashed = "killed (producer_kill)"
                    break
                await source.text(token)
                await asyncio.sleep(delay)
            else:
                await source.finish()
        except (producer.ProducerError, httpx.HTTPError) as e:
            # It gave up (its retries ran out through an outage): as a crashed process, it
            # leaves the generation to its lease.
            gen.producer_crashed = f"gave up: {e!r}"
        finally:
            await source.aclose()
        await reading
        await asyncio.gather(*followers, return_exceptions=True)

    async def _create(self, gen: Generation) -> bool:
        body = {"messages": [{"role": "user", "content": gen.prompt}]}
        deadline = time.monotonic() + CREATE_ATTEMPTS_FOR
        while time.monotonic() < deadline:
            gen.create_attempts += 1
            try:
                response = await self.http.post(f"{self.entry_url}/v1/generations", json=body)
                if response.status_code == 201:
                    gen.gen_id = response.json()["id"]
                    gen.created_at = time.monotonic()
                    return True
                gen.create_error = f"HTTP {response.status_code}"
                if response.status_code < 500:
                    return False
            except httpx.HTTPError as e:
                gen.create_error = type(e).__name__
            await asyncio.sleep(self.retry_s)
        return False

    async def _read_log(self, gen: Generation) -> None:
        """Poll the meta until the generation has a final status, then read its whole log."""
        meta_key = protocol.meta_key(gen.gen_id)
        while time.monotonic() < self.viewer_deadline:
            try:
                raw_status, owner = await self.admin.hmget(meta_key, ["status", "owner"])
                status = raw_status.decode() if raw_status else ""
                if status == "running" and owner:
                    # Who runs it, seen while it runs: a reap writes the reaper's name there.
                    gen.owner = owner.decode()
                if status in protocol.TERMINAL_STATUSES or status == "":
                    gen.status = status or "gone"
                    gen.ended_at = time.monotonic()
                    gen.log = await self._log_of(gen.gen_id)
                    return
            except (RedisError, RedisClusterException, OSError, AttributeError,
                    RuntimeError) as e:
                # (redis-py's cluster client may meet a connection closed under it during a
                # failover as AttributeError/RuntimeError: see broker.core.store)
                gen.log_error = repr(e)
            await asyncio.sleep(LOG_POLL)
        with contextlib.suppress(RedisError, RedisClusterException, OSError, AttributeError,
                                 RuntimeError):
            gen.log = await self._log_of(gen.gen_id)

    async def _log_of(self, gen_id: str) -> list[tuple[int, str, Any, int]]:
        entries = await self.admin.xrange(protocol.log_key(gen_id))
        return [(e.seq, e.kind, json.loads(e.data), e.published_ms)
                for e in (protocol.decode_log_entry(i, f) for i, f in entries)]
