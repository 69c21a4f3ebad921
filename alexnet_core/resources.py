"""What this process may use of the machine: CPUs (affinity and cgroup quota) and memory (cgroup
limit, else physical RAM). Defaults sized from ``os.cpu_count()`` alone over-subscribe a container
that is given 2 of a host's 64 cores, and under-use a machine where the affinity is all that limits."""

import ctypes
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """The directories that may hold this process's limits: its own cgroup (from /proc/self/cgroup)
    and the mount root (inside a container the namespace root is the container's cgroup)."""
    dirs: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            dirs.append(root / path.lstrip("/"))
        elif controller in controllers.split(","):
            dirs.append(root / controllers / path.lstrip("/"))
    # v1 mounts cpu as "cpu,cpuacct" on most distributions, often with a "cpu" link beside it.
    return [*dirs, root, root / controller, root / f"{controller},cpuacct"]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    for directory in _cgroup_dirs(root, "cpu"):
        if (v2 := _read(directory / "cpu.max")) is not None:
            quota, _, period = v2.partition(" ")
            return None if quota == "max" else int(quota) / int(period or 100_000)
        quota_v1 = _read(directory / "cpu.cfs_quota_us")
        period_v1 = _read(directory / "cpu.cfs_period_us")
        if quota_v1 is not None and period_v1 is not None:
            return None if int(quota_v1) < 0 else int(quota_v1) / int(period_v1)
    return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota (rounded up: a
    quota of 1.5 CPUs still keeps two threads busy part of the time)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(root: Path = CGROUP_ROOT) -> int:
    """Bytes this process may use: the cgroup limit (v2 ``memory.max``, v1 ``limit_in_bytes``),
    never more than physical RAM (v1 reports "unlimited" as a huge number)."""
    ram = physical_memory()
    for directory in _cgroup_dirs(root, "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(directory / name)
            if value is not None and value.isdigit():
                return min(ram, int(value))
            if value == "max":
                return ram
    return ram


def keep_freed_memory(largest: int = 32 * 2**20, retain: int = 64 * 2**20) -> bool:
    """Make glibc reuse freed buffers instead of returning them to the system after each image.

    Every image allocates and frees the same few large buffers (decoded pixels, the 6 MB of float
    crops, a batch). glibc serves such sizes with a fresh ``mmap`` and unmaps them on free unless an
    adaptive threshold has risen past them, so which requests pay depends on what was freed before;
    a fresh mapping costs a page fault per 4 KiB (and, for numpy's huge-page-advised arrays,
    compaction) in the kernel on the next touch. Fixed thresholds (``largest`` is glibc's maximum)
    keep them in the heap, up to ``retain`` of free memory held for reuse (enough for a batch of
    ordinary images; the memory of a rare huge decode still goes back). Returns False where
    glibc is not the allocator (musl, macOS): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, largest)) and bool(libc.mallopt(m_trim_threshold, retain))
