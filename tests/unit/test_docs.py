"""The README is the front door: it must list every setting with its env var and flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from broker.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{f.metadata['env']}` | `{flag}`" in readme, f.name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test" in readme and "bash scripts/test" in ci
