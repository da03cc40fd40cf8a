"""The exactly-once checker. The log is the truth:

- every generation ends, with exactly one terminal event, the log's last; its ids are 1..n;
- a generation that ended with ``end`` has exactly the answer the LLM streamed (the prompt
  names it);
- an ``error`` has a documented code, and a fault of the timeline explains it (``worker_lost``
  only with its own worker killed or stopped, or a master killed, while it ran, ...);
- every viewer's received sequence, across all its reconnects, is the log's from its start
  point: no duplicate, no gap, nothing else; it ends with the terminal event, a ``204`` at
  the log's end, or a ``history_lost`` that a fault explains;
- no viewer waits longer than the bound without hearing from the server (an event, a
  keepalive, an accepted reconnect), unless a fault covers the wait.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.faults import Fault
from tests.chaos.load import Generation
from tests.chaos.viewers import TERMINAL

DOCUMENTED_CODES = {
    "llm_unreachable", "llm_timeout", "llm_auth_failed", "llm_rejected", "llm_server_error",
    "llm_stream_broken", "llm_error", "worker_lost", "worker_error", "worker_shutdown",
    "producer_lost", "producer_error", "history_lost",
}
# Which faults may explain each terminal error code (the LLM codes: the generation's own mode).
EXPLAINED_BY = {
    "worker_lost": {"worker_kill", "worker_stop", "master_kill"},
    "worker_shutdown": {"worker_term"},
    "history_lost": {"master_kill"},
    # A worker frozen past BROKER_LLM_IDLE_TIMEOUT: when it wakes, its idle timer has run out
    # before it reads what the LLM sent meanwhile (docs/failure-model.md, known limits).
    "llm_timeout": {"worker_stop"},
}
MODE_CODES = {"fail": {"llm_server_error"}, "silent": {"llm_timeout"},
              "broken": {"llm_stream_broken"}}


@dataclass
class Violation:
    kind: str
    generation: str
    viewer: str
    detail: str
    window: tuple[float, float]  # monotonic: the faults in it form its timeline excerpt
    excerpt: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "generation": self.generation, "viewer": self.viewer,
                "detail": self.detail, "timeline": self.excerpt}


@dataclass
class Bounds:
    keepalive: float
    lease: float
    retry: float
    drain: float
    llm_idle: float
    margin: float

    @property
    def quiet(self) -> float:
        """The longest a viewer may hear nothing with no fault about: a keepalive is at most
        1.25 intervals late (the hub's wake-ups), plus a reconnect's retry and a margin for a
        shared machine."""
        return 1.25 * self.keepalive + self.retry + self.margin

    @property
    def after_fault(self) -> float:
        """How long a fault may go on disturbing a viewer after it healed: a lease (a lost
        worker is reaped), the LLM's idle bound, a reconnect, and the quiet bound."""
        return self.lease + self.llm_idle + self.retry + self.quiet


def pid_of(worker_name: str) -> int | None:
    """The pid in a worker's name (``host-pid-random``, ``Settings.worker_name``), or None."""
    parts = worker_name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class Checker:
    def __init__(self, generations: list[Generation], timeline: list[Fault], bounds: Bounds,
                 t0: float) -> None:
        self.generations = generations
        self.timeline = timeline
        self.bounds = bounds
        self.t0 = t0
        self.violations: list[Violation] = []
        self.deliveries = 0  # events received by viewers and checked against the log
        self.outcomes: dict[str, int] = {}  # generation terminal: end / error code
        self.viewer_outcomes: dict[str, int] = {}
        self.max_quiet = 0.0  # the longest wait a viewer had, raw
        self.max_quiet_unexplained = 0.0

    def check(self) -> list[Violation]:
        for gen in self.generations:
            if not gen.gen_id:
                continue  # never created (the create failed through an outage: reported)
            self._generation(gen)
        return self.violations

    # -- helpers ---------------------------------------------------------------------------

    def _fail(self, kind: str, gen: Generation, viewer: str, detail: str,
              window: tuple[float, float] | None = None) -> None:
        if window is None:
            window = (gen.created_at, gen.ended_at or gen.created_at)
        excerpt = [f.to_json(self.t0) for f in self._faults_in(window[0] - 5, window[1] + 5)]
        self.violations.append(Violation(kind, f"{gen.label} ({gen.gen_id})", viewer, detail,
                                         window, excerpt))

    def _faults_in(self, start: float, end: float, kinds: set[str] | None = None) -> list[Fault]:
        out = []
        for f in self.timeline:
            healed = f.healed if f.healed is not None else float("inf")
            if f.start <= end and healed >= start and (kinds is None or f.kind in kinds):
                out.append(f)
        return out

    # -- a generation ----------------------------------------------------------------------

    def _generation(self, gen: Generation) -> None:
        log = gen.log
        if log is None or gen.ended_at is None:
            self._fail("unended", gen, "", f"no final status (status {gen.status!r}, "
                       f"log error {gen.log_error!r})")
            return
        seqs = [entry[0] for entry in log]
        if seqs != list(range(1, len(seqs) + 1)):
            self._fail("log_ids", gen, "", f"log ids {seqs[:5]}...{seqs[-5:]}")
        terminals = [e for e in log if e[1] in TERMINAL]
        if gen.status == "gone" and not log:
            # Its keys vanished: only a lossy failover explains it. Its viewers cannot be
            # judged by a log that is gone; they are judged by the answer (below).
            if not self._faults_in(gen.created_at - 1, gen.ended_at, {"master_kill"}):
                self._fail("vanished", gen, "", "the generation's keys vanished")
            self.outcomes["gone"] = self.outcomes.get("gone", 0) + 1
            for viewer in gen.viewers:
                self._viewer_of_lost(gen, viewer)
            return
        elif len(terminals) != 1 or log[-1][1] not in TERMINAL:
            self._fail("terminal_count", gen, "",
                       f"{len(terminals)} terminal events; last kind {log[-1][1] if log else None}")
        else:
            self._terminal(gen, log)
        for viewer in gen.viewers:
            self._viewer(gen, viewer, log)

    def _terminal(self, gen: Generation, log: list[tuple[int, str, Any, int]]) -> None:
        kind, data = log[-1][1], log[-1][2]
        if kind == "end":
            outcome = f"end/{data.get('finish_reason')}"
            text = "".join(e[2]["text"] for e in log if e[1] == "message")
            if data.get("finish_reason") == "stop" and text != gen.answer:
                self._fail("wrong_text", gen, "", f"the log's text differs from the answer "
                           f"({len(text)} vs {len(gen.answer)} characters)")
            if gen.mode not in ("ok", "producer"):
                self._fail("unexpected_end", gen, "", f"mode {gen.mode} ended {outcome}")
        else:
            code = str(data.get("code"))
            outcome = f"error/{code}"
            if code not in DOCUMENTED_CODES:
                self._fail("undocumented_code", gen, "", f"code {code!r}")
            elif not self._explained(gen, code):
                self._fail("unexplained_error", gen, "", f"{code}: {data.get('message')}")
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _explained(self, gen: Generation, code: str) -> bool:
        if code in MODE_CODES.get(gen.mode, set()):
            return True
        if code == "producer_lost" and gen.mode == "producer" and gen.producer_crashed:
            return True  # its producer stopped dead (killed, or gave up through an outage)
        kinds = EXPLAINED_BY.get(code)
        if not kinds:
            return False
        end = gen.ended_at if gen.ended_at is not None else gen.created_at
        faults = self._faults_in(gen.requested_at - 1, end, kinds)
        owner_pid = pid_of(gen.owner)
        if code == "worker_lost" and owner_pid is not None:
            # Its own worker's death or freeze explains it, or a master's (a lease renewal
            # lost with it): not another worker's fault at the same time.
            faults = [f for f in faults
                      if f.kind == "master_kill" or f.detail.get("pid") == owner_pid]
        return bool(faults)

    # -- a viewer --------------------------------------------------------------------------

    def _viewer(self, gen: Generation, viewer: Any, log: list[tuple[int, str, Any, int]]) -> None:
        name = viewer.name
        start = viewer.start_point
        expected = [e for e in log if e[0] > start]
        logged = [g for g in viewer.received if g.seq is not None]
        unlogged = [g for g in viewer.received if g.seq is None]
        self.deliveries += len(viewer.received)
        self.viewer_outcomes[viewer.outcome] = self.viewer_outcomes.get(viewer.outcome, 0) + 1
        got = [(g.seq, g.kind, g.data) for g in logged]
        want = [(e[0], e[1], e[2]) for e in expected[:len(got)]]
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                         min(len(got), len(want)))
            self._fail("sequence", gen, name,
                       f"from start point {start}: event #{first} is "
                       f"{got[first][:2] if first < len(got) else None}, the log has "
                       f"{want[first][:2] if first < len(want) else None} "
                       f"(received ids {[g[0] for g in got][:40]})")
            return
        for extra in unlogged:
            if extra.kind == "error" and extra.data.get("code") == "history_lost":
                if not self._explained(gen, "history_lost"):
                    self._fail("unexplained_error", gen, name, "history_lost at the viewer")
            else:
                self._fail("unlogged_event", gen, name, f"{extra.kind} without an id")
        complete = len(got) == len(expected)
        if viewer.outcome == "terminal":
            if not complete and not unlogged:
                self._fail("incomplete", gen, name,
                           f"ended after {len(got)} of {len(expected)} events")
        elif viewer.outcome == "204":
            if not complete:
                self._fail("early_204", gen, name,
                           f"204 after {len(got)} of {len(expected)} events")
        else:
            self._fail("viewer_end", gen, name,
                       f"ended {viewer.outcome!r} after {len(got)} of {len(expected)} events; "
                       f"answers {viewer.statuses}")
        self._waits(gen, viewer)

    def _viewer_of_lost(self, gen: Generation, viewer: Any) -> None:
        """A viewer of a generation whose history a failover lost: its events are still ids
        start+1.. with none missing or repeated, its text a beginning of the answer, and it
        ended clearly: ``history_lost`` (no id), or 404 / 204 on a resume."""
        name = viewer.name
        self.deliveries += len(viewer.received)
        self.viewer_outcomes[viewer.outcome] = self.viewer_outcomes.get(viewer.outcome, 0) + 1
        logged = [g for g in viewer.received if g.seq is not None]
        ids = [g.seq for g in logged]
        if ids != list(range(viewer.start_point + 1, viewer.start_point + 1 + len(ids))):
            self._fail("sequence", gen, name, f"ids {ids[:40]} after a lost history")
        text = "".join(g.data.get("text", "") for g in logged if g.kind == "message")
        if viewer.start_point == 0 and not gen.answer.startswith(text):
            self._fail("wrong_text", gen, name, "a text that is not the answer's beginning")
        last = viewer.received[-1] if viewer.received else None
        clear = (viewer.outcome in ("http_404", "204") or (
            viewer.outcome == "terminal" and last is not None and last.seq is None
            and last.kind == "error" and last.data.get("code") == "history_lost"))
        if not clear:
            self._fail("viewer_end", gen, name, f"ended {viewer.outcome!r} after a lost "
                       f"history, last event {last.kind if last else None}")

    def _waits(self, gen: Generation, viewer: Any) -> None:
        if viewer.plan.pause_after is not None:
            return  # a slow viewer: its own silence
        heard = sorted([*viewer.heard_at, viewer.done_at])
        for before, after in itertools.pairwise(heard):
            quiet = after - before
            if any(a <= before and after <= b + 0.5 for a, b in viewer.away):
                continue  # it chose to be away
            self.max_quiet = max(self.max_quiet, quiet)
            if quiet <= self.bounds.quiet:
                continue
            covering = self._faults_in(before - self.bounds.after_fault, after)
            if covering:
                continue
            self.max_quiet_unexplained = max(self.max_quiet_unexplained, quiet)
            self._fail("waited", gen, viewer.name,
                       f"heard nothing for {quiet:.2f} s (bound {self.bounds.quiet:.2f} s)",
                       (before, after))
