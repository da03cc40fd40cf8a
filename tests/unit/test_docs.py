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


ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_architecture_names_every_script_of_the_wire_contract():
    from broker.core import protocol

    scripts = [name for name in vars(protocol) if name.endswith("_SCRIPT")]
    assert len(scripts) >= 6
    missing = [name for name in scripts if f"`{name}`" not in ARCHITECTURE]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_architecture_lists_every_meta_field_the_code_writes():
    """The meta row of the wire-contract table names every field a script or ``new_meta``
    writes (HSET field names are the quoted words after HSET's key)."""
    import re

    from broker.core import protocol

    source = (ROOT / "broker" / "core" / "protocol.py").read_text()
    written = set(protocol.new_meta("m", "producer-id"))
    written |= set(protocol.external_meta_fields(
        protocol.ExternalCreate(model="m", producer="p", metadata="{}")))
    for hset in re.findall(r"'HSET', (?:meta|KEYS\[1\]), (.*?)\)\n", source, re.S):
        written |= {field.strip().strip("'") for field in hset.split(",")[::2]
                    if field.strip().startswith("'")}  # (a variable: fields written above)
    meta_row = next(line for line in ARCHITECTURE.splitlines()
                    if line.startswith("| `{gen:<id>}:meta`"))
    assert {"status", "seq", "owner", "lease", "lease_ttl", "updated", "producer"} <= written
    missing = sorted(f for f in written if f"`{f}`" not in meta_row and f != "created")
    assert not missing, f"the meta row of docs/architecture.md lacks {missing}"
    assert "`created`" in meta_row


def test_every_metric_is_documented_and_every_documented_metric_exists():
    import re

    from broker.core.metrics import Metrics

    exported = set()
    for metric in Metrics().registry.collect():
        kind = metric.type
        exported.add(metric.name + ("_total" if kind == "counter" else ""))
    documented = set(re.findall(r"^\| `(broker_[a-z_]+)`", (ROOT / "docs" / "metrics.md")
                                .read_text(), re.M))
    assert exported == documented


def test_every_module_the_docs_name_exists():
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"\b((?:broker|worker)/[a-z_/]+\.(?:py|js|html|css))\b",
                               doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
