"""A short seeded chaos run (``tests/chaos``, what ``bash scripts/chaos`` runs for longer) so the
machinery cannot rot: the small topology (one Redis with AOF, one edge, one worker) under load
and a fault schedule drawn from a fixed seed, judged by the exactly-once checker. Every
violation the long runs found has a deterministic test of its own in this directory; this
one proves the harness still injects faults, checks deliveries and finds nothing wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SEED = 12  # 16 faults of 13 kinds in 36 s: see tests/chaos/results/<run>/schedule.json
MINUTES = "0.6"
RUN_TIMEOUT = 200  # 36 s of faults, then healing, the viewers' drain and the retention (30 s)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_a_short_seeded_chaos_run_finds_no_violation(tmp_path: Path):
    out = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--topology", "small", "--seed", str(SEED),
         "--minutes", MINUTES, "--mean-gap", "3", "--retention", "30", "--margin", "3",
         "--out", str(out)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    print(run.stdout[-3000:], run.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["violations"] == [], (out / "report.md").read_text()
    assert run.returncode == 0
    kinds = {fault["kind"] for fault in report["faults"]}
    assert len(kinds) >= 4, kinds  # a mixed schedule, not one kind over and over
    assert report["created"] >= 25 and report["deliveries"] >= 300, report
    assert report["reconnects"] > 0  # faults made viewers resume
    assert (out / "recovery.png").stat().st_size > 0
