"""The benchmark harness still works end to end: ``python -m bench --quick`` at small sizes.

Not a performance test (no figure is asserted but correctness: every scenario checks
exactly-once, in-order delivery or exact texts, and exits 1 otherwise). It keeps the one
benchmark command from rotting as the product changes. The Nchan cells need nginx, which
the test machine does not install; B1 and B3 run their broker and naive cells.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmarks_pass_their_own_checks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only",
         "b2,b4,b5,direct,b6,b7,b8,producers,overload,create",
         "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=280, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("b2", "b4", "b5", "direct", "b6", "b7", "b8", "producers", "overload", "create"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert "failure" not in data, (name, data["failure"])
    assert (tmp_path / "b4_storm.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "B2: worker publish = 1 round trip" in summary
    assert "B6: no text waits beyond the bound" in summary
    assert "producers: Python direct producer vs the worker" in summary
    assert "overload G=20 on one worker: every generation completes" in summary
    assert "create: ≤ 2 ms CPU per generation" in summary
    assert (tmp_path / "b6_quality.png").stat().st_size > 0
    # B7: viewers came and went through HAProxy, every answer exactly once to its end.
    b7 = json.loads((tmp_path / "b7.json").read_text())["cells"]
    assert [c["deliveries"] for c in b7] == [20 * 2 * 3 // 2 * 10] * len(b7)
    assert (tmp_path / "b7_cost.png").stat().st_size > 0

    for scenario in ("b1", "b3"):
        done = subprocess.run(
            [sys.executable, "-m", f"bench.{scenario}", "--impls", "broker,naive",
             "--viewers", "20" if scenario == "b1" else "50",
             *(["--messages", "10"] if scenario == "b1" else []),
             "--results", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        cells = json.loads((tmp_path / f"{scenario}.json").read_text())["cells"]
        assert {c["impl"] for c in cells} == {"broker", "naive"}


def test_b1_with_a_cpu_budget_per_edge_process(tmp_path: Path) -> None:
    from bench.cpubudget import BudgetUnavailable, CpuBudget

    try:
        root = CpuBudget(0.2).root
    except BudgetUnavailable as e:
        pytest.skip(str(e))
    before = set(root.glob("bench-cpubudget-*"))
    done = subprocess.run(
        [sys.executable, "-m", "bench.b1", "--impls", "broker", "--viewers", "20",
         "--messages", "10", "--edge-procs", "1,2", "--edge-core", "0.2",
         "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = json.loads((tmp_path / "b1.json").read_text())["cells"]
    assert [c["edge_processes"] for c in cells] == [1, 2]
    for c in cells:
        assert c["edge_core_budget"] == 0.2
        assert len(c["edge_process_cores"]) == c["edge_processes"]
        assert sum(c["edge_process_connections"]) == 20  # every viewer on a serving process
    assert set(root.glob("bench-cpubudget-*")) == before  # the cgroups are gone
