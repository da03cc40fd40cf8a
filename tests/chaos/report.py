"""The run's report: ``report.json`` (everything), ``report.md`` (faults by kind, generations
and deliveries, violations with the seed and their timeline excerpt, recovery percentiles) and
``recovery.png`` (recovery time per fault kind)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tests.chaos.faults import LLM_MODE, Fault
from tests.chaos.load import Generation

# Faults that disturb no running viewer (they change what later generations do).
NO_RECOVERY = {*LLM_MODE, "slow_viewer", "producer_kill"}


def recovery(generations: list[Generation], timeline: list[Fault]) -> dict[str, list[float]]:
    """Per fault kind, each fault's recovery time: from the fault to the moment every viewer
    that was following a generation then had received an event again after the fault healed
    (its generation's next event, or its terminal one). Includes the wait for that next event
    (answers flush about once a second), so it is an upper bound."""
    out: dict[str, list[float]] = {}
    viewers = [v for g in generations for v in g.viewers]
    for fault in timeline:
        if fault.kind in NO_RECOVERY or "skipped" in fault.detail or "failed" in fault.detail:
            continue
        healed = fault.healed if fault.healed is not None else fault.start
        worst: float | None = None
        for v in viewers:
            if not (v.started_at and v.started_at <= fault.start < v.done_at):
                continue
            if any(a <= fault.start <= b for a, b in v.away):
                continue
            after = next((g.at for g in v.received if g.at > healed), None)
            if after is not None:
                worst = max(worst or 0.0, after - fault.start)
        if worst is not None:  # else no viewer was following anything then
            out.setdefault(fault.kind, []).append(round(worst, 3))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def percentiles(by_kind: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {kind: {"n": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90),
                   "max": max(v)} for kind, v in sorted(by_kind.items()) if v}


def counts(faults: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in faults:
        out[f["kind"]] = out.get(f["kind"], 0) + 1
    return dict(sorted(out.items()))


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"chaos {result['topology']} seed {result['seed']} ({result['minutes']} min): "
        f"{len(result['faults'])} faults, {result['created']}/{result['generations']} "
        f"generations created, {result['viewers']} viewers, {result['reconnects']} "
        f"reconnects, {result['deliveries']} deliveries checked, "
        f"{len(result['violations'])} violations",
        f"  faults: {counts(result['faults'])}",
        f"  outcomes: {result['outcomes']}",
        "  recovery (s): " + ", ".join(
            f"{k} p50 {v['p50']:.2f} max {v['max']:.2f}" for k, v in
            result["recovery_s"].items()),
    ]
    for v in result["violations"][:10]:
        lines.append(f"  VIOLATION {v['kind']} {v['generation']} {v['viewer']}: {v['detail']}")
    return "\n".join(lines)


def write(out: Path, result: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / "recovery.png")
    (out / "report.md").write_text(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    md = [f"# Chaos run: {r['topology']}, seed {r['seed']}, {r['minutes']} min", "",
          f"Reproduce: `{r['command']}` (the fault schedule follows from the seed; process "
          "timing does not, so a run reproduces the faults, not every interleaving).", "",
          f"- generations: {r['generations']} ({r['created']} created; "
          f"{len(r['create_failed'])} creates failed through an outage)",
          f"- viewers: {r['viewers']}, reconnects {r['reconnects']}, deliveries checked "
          f"{r['deliveries']}",
          f"- generation outcomes: {r['outcomes']}",
          f"- viewer outcomes: {r['viewer_outcomes']}",
          f"- longest wait of any viewer: {r['max_quiet_s']} s (bound without a fault "
          f"{r['bounds']['quiet_s']:.2f} s)",
          f"- phases (s): {r['phases_s']}",
          f"- violations: **{len(r['violations'])}**", "",
          "## Faults", "", "| kind | injected | recovery p50 (s) | p90 | max |",
          "| --- | --- | --- | --- | --- |"]
    rec = r["recovery_s"]
    for kind, n in counts(r["faults"]).items():
        p = rec.get(kind)
        cells = (f"{p['p50']:.2f} | {p['p90']:.2f} | {p['max']:.2f}" if p else "— | — | —")
        md.append(f"| {kind} | {n} | {cells} |")
    if r["faults_skipped"]:
        md += ["", f"Skipped (target busy or absent): {r['faults_skipped']}"]
    md += ["", "## Memory", "",
           "| | before | after retention |", "| --- | --- | --- |",
           f"| Redis used_memory (bytes) | {r['memory']['before']['used_memory']} | "
           f"{r['memory']['after']['used_memory']} |",
           f"| Redis used_memory_dataset (bytes) | "
           f"{r['memory']['before']['used_memory_dataset']} | "
           f"{r['memory']['after']['used_memory_dataset']} |",
           f"| Redis keys | {r['memory']['before']['keys']} | {r['memory']['after']['keys']} |",
           f"| edges' live subscriptions | {r['memory']['before']['live_subscriptions']:.0f} | "
           f"{r['memory']['after']['live_subscriptions']:.0f} |"]
    for name, kb in r["memory"]["before"]["rss_kb"].items():
        after = r["memory"]["after"]["rss_kb"].get(name)
        starts = r["memory"]["after"]["starts"].get(name)
        md.append(f"| {name} RSS (kB; started {starts}×) | {kb} | {after} |")
    md += ["", "## Violations", ""]
    if not r["violations"]:
        md.append("None.")
    for v in r["violations"]:
        md += [f"### {v['kind']}: {v['generation']} {v['viewer']}", "", v["detail"], "",
               f"Seed {r['seed']}; timeline excerpt (s from the start of the load):", "",
               "```", *(json.dumps(f) for f in v["timeline"]), "```", ""]
    return "\n".join(md) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {k: v for k, v in sorted(r["recovery"].items()) if v}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if data:
        ax.boxplot(list(data.values()), vert=False, whis=(0, 100))
        ax.set_yticks(range(1, len(data) + 1), list(data))
        for i, values in enumerate(data.values(), start=1):
            ax.plot(values, [i] * len(values), "o", alpha=0.4, color="tab:blue")
    ax.set_xlabel("fault → every viewer live again (s)")
    ax.set_title(f"chaos {r['topology']} seed {r['seed']}: recovery per fault kind")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
