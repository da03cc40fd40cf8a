"""A fixed CPU budget per process, through Linux cgroups: ``--edge-core 0.25`` puts each edge
serving process in a cgroup of its own capped at a quarter of a core.

Why: on the 2-core bench machine the load generators that read the deliveries cost more CPU
than the edge that writes them, so one edge process and the load generators fill both cores
and a second edge process has no core to use. Capping each edge process at a share of a
core smaller than a real one stands for "one core of an edge host" while the load
generators, Redis and the publisher keep spare CPU: 1 process at 0.25 is a 1-core edge host,
2 processes at 0.25 each a 2-core one.

Each process's cgroup also gets a high weight (``cpu.shares`` / ``cpu.weight``), so that on a
busy machine it gets its whole budget whenever it is runnable: the budget, not the
neighbours, is what limits it.

cgroup v1 (a ``cpu`` hierarchy: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) is used when
mounted and writable, else cgroup v2 (``cpu.max``) when its ``cpu`` controller is available;
neither: :class:`BudgetUnavailable`, one line saying why. Needs root (or a delegated
hierarchy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

# A short period keeps a throttled process's stalls short (it runs its quota, then waits for
# the next period): 20 ms at 0.25 core is 5 ms of running then at most 15 ms of waiting,
# instead of 75 ms waits with the kernel's default 100 ms period.
PERIOD_US = 20_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas
V1_SHARES = 10 * 1024  # ten times a plain process's weight
V2_WEIGHT = 1000  # ten times the default 100


class BudgetUnavailable(RuntimeError):
    """No writable cgroup hierarchy with the cpu controller."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            _, point, fstype, options, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                found.append((point, fstype, set(options.split(","))))
    return found


@dataclass
class Cgroup:
    """One process's cgroup: its directory and the hierarchy's version."""

    path: Path
    version: int

    def stat(self) -> dict[str, int]:
        """``cpu.stat``: ``nr_periods``, ``nr_throttled`` and the time throttled (v1
        ``throttled_time`` ns, v2 ``throttled_usec``)."""
        out = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
        return out

    def throttled_s(self) -> float:
        stat = self.stat()
        if self.version == 1:
            return stat.get("throttled_time", 0) / 1e9
        return stat.get("throttled_usec", 0) / 1e6

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]


class CpuBudget:
    """Cgroups of ``cores`` of a CPU each, one process per cgroup; :meth:`close` (or leaving
    the ``with``) moves any process still in them back to the root and removes them."""

    def __init__(self, cores: float, *, period_us: int = PERIOD_US) -> None:
        if not cores > 0:
            raise ValueError(f"a CPU budget is a share of a core, > 0; got {cores}")
        self.cores = cores
        self.period_us = period_us
        self.quota_us = max(MIN_QUOTA_US, round(cores * period_us))
        self.root, self.version = self._find_root()
        self.groups: list[Cgroup] = []
        self._prefix = f"bench-cpubudget-{os.getpid()}-{time.monotonic_ns()}"

    @staticmethod
    def _find_root() -> tuple[Path, int]:
        mounts = _mounts()
        v1 = next((Path(p) for p, t, opts in mounts if t == "cgroup" and "cpu" in opts), None)
        if v1 is not None and os.access(v1, os.W_OK):
            return v1, 1
        v2 = next((Path(p) for p, t, _ in mounts if t == "cgroup2"), None)
        if v2 is not None and os.access(v2, os.W_OK):
            controllers = (v2 / "cgroup.controllers").read_text().split()
            if "cpu" in controllers:
                return v2, 2
            why = "its cpu controller is bound to v1 or disabled"
            if v1 is not None:
                why = f"cgroup v1 {v1} is not writable and cgroup v2 {v2} has no cpu controller"
            raise BudgetUnavailable(f"no CPU budget: {why} (run as root)")
        raise BudgetUnavailable(
            "no CPU budget: no writable cgroup hierarchy with the cpu controller "
            f"(cgroup mounts: {', '.join(p for p, _, _ in mounts) or 'none'}; run as root)")

    def place(self, pid: int) -> Cgroup:
        """A new cgroup with the budget, ``pid`` (all its threads) moved into it."""
        group = Cgroup(self.root / f"{self._prefix}-{len(self.groups)}", self.version)
        try:
            if self.version == 2:
                self._enable_v2_cpu()
            group.path.mkdir()
        except OSError as e:
            raise BudgetUnavailable(f"no CPU budget: cannot create {group.path}: "
                                    f"{e.strerror}") from e
        self.groups.append(group)
        try:
            if self.version == 1:
                (group.path / "cpu.cfs_period_us").write_text(str(self.period_us))
                (group.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                (group.path / "cpu.shares").write_text(str(V1_SHARES))
            else:
                (group.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
                (group.path / "cpu.weight").write_text(str(V2_WEIGHT))
            (group.path / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise BudgetUnavailable(f"no CPU budget: cannot set up {group.path}: "
                                    f"{e.strerror}") from e
        return group

    def _enable_v2_cpu(self) -> None:
        control = self.root / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            control.write_text("+cpu")

    def close(self) -> None:
        """Move what is left in the cgroups back to the root, then remove them. A process
        that just exited may leave its cgroup a moment later: retried for up to a second."""
        for group in self.groups:
            deadline = time.monotonic() + 1.0
            while group.path.exists():
                with contextlib.suppress(OSError):
                    for pid in group.pids():
                        with contextlib.suppress(OSError):  # gone meanwhile
                            (self.root / "cgroup.procs").write_text(str(pid))
                    group.path.rmdir()
                if time.monotonic() > deadline:
                    raise BudgetUnavailable(f"could not remove {group.path}")
                time.sleep(0.02)
        self.groups.clear()

    def __enter__(self) -> CpuBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require(cores: float, prog: str) -> None:
    """Before any cell runs: exit with one line (no traceback) if budgets of ``cores`` cannot
    be set up here."""
    try:
        CpuBudget(cores)
    except (BudgetUnavailable, ValueError) as e:
        raise SystemExit(f"{prog}: --edge-core {cores:g}: {e}") from None


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--edge-core C``, as B1 and B7 take it."""
    parser.add_argument("--edge-core", type=float, default=0.0,
                        help="CPU budget of each broker edge serving process, in cores (0.25: "
                             "a quarter of one core; 0: none): each in a cgroup of its own "
                             "(bench/cpubudget.py; needs root), standing for one core of an "
                             "edge host")
