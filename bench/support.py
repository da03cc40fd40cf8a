"""What the benchmark orchestrator measures processes with: /proc, Redis INFO, percentiles."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Sequence
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / CLOCK_TICKS


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``); 0 when absent."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def redis_cpu(info: dict[str, Any]) -> float:
    """Seconds of CPU Redis used (``INFO cpu``: system + user, all its threads)."""
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_calls(commandstats: dict[str, Any]) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}. Commands that scripts run count too."""
    calls: dict[str, int] = {}
    for key, value in commandstats.items():
        name = key.removeprefix("cmdstat_")
        calls[name] = int(value["calls"]) if isinstance(value, dict) else 0
    return calls


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls made between two snapshots, without the ``info`` calls that took them."""
    delta = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in sorted(delta.items()) if n and name != "info"}


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (e.g. nginx's workers under its master)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:  # field 4: the parent
            children.append(int(entry))
    return children


def established_by_pid(pids: Sequence[int], port: int) -> dict[int, int]:
    """Established TCP connections to local ``port`` each process holds (its fds matched with
    ``/proc/net/tcp{,6}`` by socket inode): how SO_REUSEPORT spread the viewers over the
    processes of one port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)  # the header
                for line in f:
                    fields = line.split()
                    # local_address is HEX_IP:HEX_PORT; state 01 is ESTABLISHED.
                    if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue  # no IPv6
    counts = {}
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:[") and link[8:-1] in inodes:
                held += 1
        counts[pid] = held
    return counts
