"""Where a server's CPU and memory go, by kind of process: ``alexnet-serve`` names each of its
processes (``front 3``, ``engine cpu``, ``decode``, ``supervisor``); this reads them from /proc."""

import os
from collections import defaultdict
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
KINDS = ("supervisor", "front", "engine", "decode")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(fields[1])].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def kind(pid: int) -> str:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if title.startswith("alexnet-serve: "):
        name = title.removeprefix("alexnet-serve: ").split()[0]
        return name if name in KINDS else "other"
    return "other"  # a fork server, a resource tracker, a single-process server


def cpu_by_kind(root: int) -> dict[int, tuple[str, float]]:
    """Each live process's kind and CPU seconds so far (its own, not its children's)."""
    out = {}
    for pid in tree(root):
        fields = _stat(pid)
        if fields is not None:
            out[pid] = (kind(pid), (int(fields[11]) + int(fields[12])) * TICK_S)
    return out


def cpu_ms_per_image(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], images: int
) -> dict[str, float]:
    """CPU milliseconds per image that each kind spent between two readings."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        spent[name] += seconds - before.get(pid, (name, 0.0))[1]
    return {name: round(1000 * s / images, 3) for name, s in sorted(spent.items())} if images else {}


def memory_mb_by_kind(root: int) -> dict[str, dict[str, float]]:
    """RSS and PSS (shared pages split between the processes sharing them) by kind, in MB."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0})
    for pid in tree(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        values = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
        row = totals[kind(pid)]
        row["processes"] += 1
        row["rss_mb"] += values.get("Rss", 0) / 1024
        row["pss_mb"] += values.get("Pss", 0) / 1024
    return {name: {k: round(v, 1) for k, v in row.items()} for name, row in sorted(totals.items())}
