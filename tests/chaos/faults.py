"""The fault scheduler: a schedule drawn from the seed before the run starts (so a seed names
the same faults at the same offsets every time), then carried out on the topology. Faults may
overlap, but never two on the same target at once.

Every fault lands in the timeline: kind, target, when it began, when it healed (the process
restarted, the link restored, ...), and what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from tests.chaos.topology import Slot, Topology

# Kinds, by topology (weights: how often each is drawn).
COMMON = {
    "edge_kill": 3, "edge_term": 2, "edge_stop": 1,
    "worker_kill": 3, "worker_term": 2, "worker_stop": 1,
    "viewer_sever": 2, "pubsub_drop": 2,
    "llm_fail": 1, "llm_silent": 1, "llm_broken": 1, "slow_viewer": 1, "producer_kill": 1,
}
ONE_REDIS = {"redis_stop": 2, "redis_restart": 2, "redis_latency": 2, "redis_sever": 2,
             "pubsub_overflow": 2}
CLUSTER = {"master_kill": 3, "slot_move": 2}
# The overflow: a pub/sub output-buffer limit this low, an edge frozen, and this much published
# to it (its own probe channel: nothing a viewer sees) fills the kernel's socket buffers and
# then Redis's, which closes the connection as it does in production at its limits.
OVERFLOW_LIMIT = "pubsub 256kb 128kb 1"
OVERFLOW_DEFAULT = "pubsub 32mb 8mb 60"
OVERFLOW_PIECE = b"x" * (256 * 1024)
OVERFLOW_PIECES = 48
# Generation modes the LLM faults give the next few generations created.
LLM_MODE = {"llm_fail": "fail", "llm_silent": "silent", "llm_broken": "broken"}


def kinds_for(topology: str) -> dict[str, int]:
    return {**COMMON, **(CLUSTER if topology == "cluster" else ONE_REDIS)}


@dataclass
class Planned:
    at: float  # seconds from the start of the load
    kind: str
    params: dict[str, Any]


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # monotonic
    healed: float | None = None  # monotonic: the process back, the link restored
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, t0: float) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "start": round(self.start - t0, 3),
                "healed": None if self.healed is None else round(self.healed - t0, 3),
                **self.detail}


def plan(seed: int, topology: str, duration: float, mean_gap: float) -> list[Planned]:
    """The whole schedule: fault starts as a Poisson process, each kind with its parameters."""
    rng = random.Random(f"faults-{seed}")
    weights = kinds_for(topology)
    kinds, w = list(weights), list(weights.values())
    out: list[Planned] = []
    at = rng.uniform(2.0, 2.0 + mean_gap)
    while at < duration:
        kind = rng.choices(kinds, w)[0]
        out.append(Planned(round(at, 3), kind, {
            "pick": rng.random(),  # which edge/worker/master/generation
            "restart_after": round(rng.uniform(0.3, 4.0), 3),
            "never": rng.random() < 0.15,  # not restarted within the run (when others are up)
            "seconds": round(rng.uniform(1.0, 4.0), 3),
            "latency": round(rng.uniform(0.05, 0.3), 3),
            "count": rng.randint(1, 3),
        }))
        at += rng.expovariate(1 / mean_gap)
    return out


class Scheduler:
    def __init__(self, topo: Topology, load: Any, lease_ttl: float, drain_timeout: float) -> None:
        self.topo = topo
        self.load = load  # tests.chaos.load.Load: the LLM modes, the slow viewers
        self.lease_ttl = lease_ttl
        self.drain_timeout = drain_timeout
        self.timeline: list[Fault] = []
        self.skipped: dict[str, int] = {}
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.down_forever: set[str] = set()

    async def run(self, schedule: list[Planned], t0: float, until: float) -> None:
        for planned in schedule:
            delay = t0 + planned.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= until:
                break
            self._spawn(self._inject(planned))

    async def heal_all(self) -> None:
        """The end of the fault period: wait for the faults under way, then restart what was
        left down for good, so the run ends on the whole topology."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in [*self.topo.edges, *self.topo.workers]:
            if not slot.alive():
                await asyncio.to_thread(self._restart, slot)
                if slot.name in self.down_forever:
                    for fault in self.timeline:
                        if fault.target == slot.name and fault.healed is None:
                            fault.healed = time.monotonic()
        self.down_forever.clear()

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _skip(self, kind: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1

    def _pick(self, items: list[Any], pick: float) -> Any:
        return items[min(len(items) - 1, int(pick * len(items)))]

    async def _inject(self, p: Planned) -> None:
        kind, params = p.kind, p.params
        target = self._target(kind, params)
        if target is None or target in self._busy:
            self._skip(kind)
            return
        self._busy.add(target)
        fault = Fault(kind, target, time.monotonic())
        self.timeline.append(fault)
        try:
            await getattr(self, f"_do_{kind}")(fault, params)
        except Exception as e:  # a fault that could not be carried out is reported, not fatal
            fault.detail["failed"] = repr(e)
        finally:
            self._busy.discard(target)

    def _target(self, kind: str, params: dict[str, Any]) -> str | None:
        topo = self.topo
        if kind.startswith("edge_"):
            live = [s for s in topo.edges if s.alive()]
            return self._pick(live, params["pick"]).name if live else None
        if kind.startswith("worker_"):
            live = [s for s in topo.workers if s.alive()]
            return self._pick(live, params["pick"]).name if live else None
        if kind.startswith("redis_"):
            return "redis"
        if kind == "master_kill":
            return "cluster"
        if kind == "slot_move":
            return "cluster"
        if kind == "viewer_sever":
            return "viewer_link"
        if kind in ("pubsub_drop", "pubsub_overflow"):
            return "redis"
        if kind in LLM_MODE:
            return "llm"
        if kind == "producer_kill":
            return "producer"
        if kind == "slow_viewer":
            return f"slow_viewer{len(self.timeline)}"
        return None

    def _slot(self, name: str) -> Slot:
        return next(s for s in [*self.topo.edges, *self.topo.workers] if s.name == name)

    # -- processes -------------------------------------------------------------------------

    def _restart(self, slot: Slot) -> None:
        slot.start()
        slot.wait_ready()

    async def _kill_and_restart(self, fault: Fault, params: dict[str, Any], sig: int) -> None:
        slot = self._slot(fault.target)
        pid = slot.proc.pid if slot.proc else None
        slot.signal(sig)
        fault.detail["pid"] = pid
        if sig == signal.SIGTERM:
            exited = await asyncio.to_thread(slot.wait_exit, self.drain_timeout + 10)
            fault.detail["exited_after"] = round(time.monotonic() - fault.start, 3)
            if not exited:
                fault.detail["did_not_exit"] = True
                slot.signal(signal.SIGKILL)
                await asyncio.to_thread(slot.wait_exit, 5)
        else:
            await asyncio.to_thread(slot.wait_exit, 5)
        group = self.topo.edges if slot.command == "edge" else self.topo.workers
        others_up = sum(1 for s in group if s.alive() and s is not slot)
        if params["never"] and others_up >= 1 and len(group) > 1:
            fault.detail["restart"] = "never within the fault period"
            self.down_forever.add(slot.name)
            return
        await asyncio.sleep(params["restart_after"])
        await asyncio.to_thread(self._restart, slot)
        fault.healed = time.monotonic()
        fault.detail["restart_after"] = params["restart_after"]

    async def _do_edge_kill(self, fault: Fault, params: dict[str, Any]) -> None:
        await self._kill_and_restart(fault, params, signal.SIGKILL)

    async def _do_edge_term(self, fault: Fault, params: dict[str, Any]) -> None:
        await self._kill_and_restart(fault, params, signal.SIGTERM)

    async def _do_worker_kill(self, fault: Fault, params: dict[str, Any]) -> None:
        await self._kill_and_restart(fault, params, signal.SIGKILL)

    async def _do_worker_term(self, fault: Fault, params: dict[str, Any]) -> None:
        await self._kill_and_restart(fault, params, signal.SIGTERM)

    async def _stop_for(self, fault: Fault, proc_signal: Any, seconds: float) -> None:
        proc_signal(signal.SIGSTOP)
        fault.detail["seconds"] = seconds
        try:
            await asyncio.sleep(seconds)
        finally:
            proc_signal(signal.SIGCONT)
            fault.healed = time.monotonic()

    async def _do_edge_stop(self, fault: Fault, params: dict[str, Any]) -> None:
        await self._stop_for(fault, self._slot(fault.target).signal, params["seconds"])

    async def _do_worker_stop(self, fault: Fault, params: dict[str, Any]) -> None:
        # Up to twice a lease: its generations may be reaped (worker_lost) meanwhile.
        seconds = round(params["seconds"] / 4.0 * 2 * self.lease_ttl, 3)
        slot = self._slot(fault.target)
        fault.detail["pid"] = slot.proc.pid if slot.proc else None  # (whose worker_lost)
        await self._stop_for(fault, slot.signal, seconds)

    # -- Redis -----------------------------------------------------------------------------

    async def _do_redis_stop(self, fault: Fault, params: dict[str, Any]) -> None:
        server = self.topo.redis
        assert server is not None and server.proc is not None
        await self._stop_for(fault, server.proc.send_signal, params["seconds"])

    async def _do_redis_restart(self, fault: Fault, params: dict[str, Any]) -> None:
        server = self.topo.redis
        assert server is not None
        await asyncio.to_thread(server.restart)  # SIGKILL, then start on the same AOF
        fault.healed = time.monotonic()

    async def _do_redis_latency(self, fault: Fault, params: dict[str, Any]) -> None:
        link = self.topo.redis_link
        assert link is not None
        link.delay = params["latency"]
        fault.detail.update(latency=params["latency"], seconds=params["seconds"])
        try:
            await asyncio.sleep(params["seconds"])
        finally:
            link.delay = 0.0
            fault.healed = time.monotonic()

    async def _do_redis_sever(self, fault: Fault, params: dict[str, Any]) -> None:
        link = self.topo.redis_link
        assert link is not None
        fault.detail["connections"] = await asyncio.to_thread(link.sever)
        fault.healed = time.monotonic()

    async def _do_pubsub_drop(self, fault: Fault, params: dict[str, Any]) -> None:
        """What Redis does to a subscriber whose output buffer overflows: it closes the
        connection (every subscriber's, here; on a cluster, on every node)."""
        def kill() -> int:
            dropped = 0
            for node in self.topo.redis_nodes():
                with contextlib.suppress(redis.RedisError):
                    dropped += int(node.client().execute_command(
                        "CLIENT", "KILL", "TYPE", "pubsub"))
            return dropped

        fault.detail["connections"] = await asyncio.to_thread(kill)
        fault.healed = time.monotonic()

    async def _do_pubsub_overflow(self, fault: Fault, params: dict[str, Any]) -> None:
        """A real output-buffer overflow: a low limit, an edge frozen (SIGSTOP), megabytes
        published to the edges' probe channels until Redis drops the frozen one's connection;
        then the edge resumes and the limit is restored."""
        server = self.topo.redis
        live = [s for s in self.topo.edges if s.alive() and s.name not in self._busy]
        if server is None or not live:
            fault.detail["skipped"] = "no edge free"
            fault.healed = time.monotonic()
            return
        edge = self._pick(live, params["pick"])
        self._busy.add(edge.name)
        fault.detail["edge"] = edge.name

        name = f"broker-edge-{edge.proc.pid if edge.proc else 0}"

        def subscribed(client: Any) -> bool:
            return any(c.get("name") == name and int(c.get("sub", 0)) > 0
                       for c in client.client_list())

        def overflow() -> int:
            """Pieces published until Redis dropped the frozen edge's subscription (0: never)."""
            client = server.client()
            client.config_set("client-output-buffer-limit", OVERFLOW_LIMIT)
            try:
                probes = [c.decode() for c in client.pubsub_channels("broker:edge:*")]
                for piece in range(1, OVERFLOW_PIECES + 1):
                    for channel in probes:
                        client.publish(channel, OVERFLOW_PIECE)
                    if not subscribed(client):
                        return piece
                return 0
            finally:
                client.config_set("client-output-buffer-limit", OVERFLOW_DEFAULT)

        edge.signal(signal.SIGSTOP)
        try:
            fault.detail["dropped_after_pieces"] = await asyncio.to_thread(overflow)
        finally:
            edge.signal(signal.SIGCONT)
            self._busy.discard(edge.name)
            fault.healed = time.monotonic()

    async def _do_master_kill(self, fault: Fault, params: dict[str, Any]) -> None:
        cluster = self.topo.cluster
        assert cluster is not None
        if not await asyncio.to_thread(lambda: cluster.healthy() and cluster.replicas_in_sync()):
            fault.detail["skipped"] = "the cluster was not whole"
            fault.healed = time.monotonic()
            return
        masters = [n for n in cluster.live_nodes() if cluster.role(n) == "master"]
        node = self._pick(masters, params["pick"])
        replica = await asyncio.to_thread(cluster.replica_of, node)
        fault.detail["port"] = node.port
        await asyncio.to_thread(node.kill)

        def promoted() -> bool:
            return cluster.role(replica) == "master" and cluster.healthy()

        # Back only after its replica took over (then it rejoins as a replica and syncs): the
        # node keeps no data of its own (no AOF), so back sooner it would serve its slots
        # empty, which is a restart without persistence, not a failover.
        promoted_in_time = await asyncio.to_thread(_wait, promoted, 30)
        fault.healed = time.monotonic()  # its slots served again: recovery counts from here
        fault.detail["failover_s"] = round(fault.healed - fault.start, 3)
        if not promoted_in_time:
            fault.detail["failover"] = "not within 30 s"
        await asyncio.sleep(params["restart_after"])
        await asyncio.to_thread(node.start)
        await asyncio.to_thread(_wait, cluster.replicas_in_sync, 30)
        fault.detail["rejoined_s"] = round(time.monotonic() - fault.start, 3)

    async def _do_slot_move(self, fault: Fault, params: dict[str, Any]) -> None:
        cluster = self.topo.cluster
        assert cluster is not None
        running = self.load.running_ids()
        if not running:
            fault.detail["skipped"] = "no generation running"
            fault.healed = time.monotonic()
            return
        gen_id = self._pick(running, params["pick"])
        key = f"{{gen:{gen_id}}}:meta"

        def move() -> int:
            source = cluster.node_of(key)
            masters = [n for n in cluster.live_nodes()
                       if cluster.role(n) == "master" and n is not source]
            target = self._pick(masters, params["pick"])
            cluster.move_slot_of(key, target)
            return target.port

        fault.detail["generation"] = gen_id
        fault.detail["to_port"] = await asyncio.to_thread(move)
        fault.healed = time.monotonic()

    # -- clients and the LLM ---------------------------------------------------------------

    async def _do_viewer_sever(self, fault: Fault, params: dict[str, Any]) -> None:
        link = self.topo.viewer_link
        assert link is not None
        fault.detail["connections"] = await asyncio.to_thread(link.sever)
        fault.healed = time.monotonic()

    async def _llm_mode(self, fault: Fault, params: dict[str, Any]) -> None:
        mode = LLM_MODE[fault.kind]
        fault.detail["generations"] = self.load.next_modes(mode, params["count"])
        fault.healed = time.monotonic()

    _do_llm_fail = _do_llm_silent = _do_llm_broken = _llm_mode

    async def _do_producer_kill(self, fault: Fault, params: dict[str, Any]) -> None:
        fault.detail["generation"] = self.load.crash_producer(params["pick"]) or "none running"
        fault.healed = time.monotonic()

    async def _do_slow_viewer(self, fault: Fault, params: dict[str, Any]) -> None:
        fault.detail["viewer"] = self.load.add_slow_viewer(params["seconds"] * 2)
        fault.healed = time.monotonic()


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(0.1)
    return False
