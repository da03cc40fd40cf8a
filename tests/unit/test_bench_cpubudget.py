"""``bench.cpubudget``: a process placed in a budget uses no more than its share of a core,
and the cgroups are gone afterwards, whether the process is still running, has exited, or
could not be placed. Skipped (saying why) where no cgroup hierarchy is writable."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench import cpubudget
from bench.cpubudget import BudgetUnavailable, CpuBudget
from bench.support import cpu_seconds


def budget_or_skip(cores: float) -> CpuBudget:
    try:
        return CpuBudget(cores)
    except BudgetUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_busy_process_uses_its_budget_and_no_more(
        spinner: subprocess.Popen[bytes]) -> None:
    budget = budget_or_skip(0.2)
    with budget:
        group = budget.place(spinner.pid)
        assert group.pids() == [spinner.pid]
        cpu_0, t_0 = cpu_seconds(spinner.pid), time.monotonic()
        time.sleep(1.5)
        cores = (cpu_seconds(spinner.pid) - cpu_0) / (time.monotonic() - t_0)
        # The cap is exact; the floor leaves room for a busy machine (the high weight gives
        # the budget first, not always all of it within 1.5 s of 10 ms ticks).
        assert 0.1 < cores < 0.25
        assert group.stat()["nr_throttled"] > 0 and group.throttled_s() > 0
    assert not group.path.exists()
    assert spinner.poll() is None  # moved back out, not killed


def test_the_cgroups_of_exited_processes_are_removed() -> None:
    budget = budget_or_skip(0.5)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        group = budget.place(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    budget.close()
    assert not group.path.exists()


def test_a_process_that_cannot_be_placed_fails_and_leaves_nothing() -> None:
    budget = budget_or_skip(0.5)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(BudgetUnavailable, match="cannot set up"), budget:
        budget.place(gone.pid)
    assert budget.groups == []
    assert not list(budget.root.glob(f"{budget._prefix}-*"))


def test_no_hierarchy_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpubudget, "_mounts", lambda: [])
    with pytest.raises(BudgetUnavailable) as raised:
        CpuBudget(0.25)
    assert "\n" not in str(raised.value) and "no CPU budget" in str(raised.value)


def test_the_option_fails_before_any_cell_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpubudget, "_mounts", lambda: [])
    with pytest.raises(SystemExit) as raised:
        cpubudget.require(0.25, "python -m bench.b1")
    message = str(raised.value.code)
    assert message.startswith("python -m bench.b1: --edge-core 0.25: no CPU budget")
    assert "\n" not in message
