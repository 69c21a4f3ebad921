"""Where the machine's CPU goes during a measurement: this process, the server, everything else.

Wall-clock numbers on a shared machine are only as good as "everything else" is small; CPU-ms per
image barely depends on it, which is why the benchmarks report both."""

import os
import resource
import sys
import time
from pathlib import Path

from benchmarks.report import Usage, rnd
from benchmarks.server import process_cpu_s

_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat (Linux), else None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait; steal counts as busy: another tenant had the CPU
    return sum(values) - idle, sum(values)


def machine_busy_pct(seconds: float) -> float | None:
    before = machine_jiffies()
    time.sleep(seconds)
    after = machine_jiffies()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def wait_until_idle(max_wait_s: float, busy_pct: float = 15.0) -> float | None:
    """Other work on the machine (tests, training) skews every number here; wait for it to stop."""
    deadline = time.monotonic() + max_wait_s
    said = 0.0
    while True:
        busy = machine_busy_pct(2.0)
        if busy is None or busy <= busy_pct or time.monotonic() >= deadline:
            return busy
        if time.monotonic() - said > 30:
            said = time.monotonic()
            log(f"machine {busy:.0f} % busy with other work; waiting, {deadline - said:.0f} s at most")


def own_cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its reaped children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU used from construction to ``read``: this process, the server process tree (if any), and
    the rest of the machine."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.wall = time.perf_counter()
        self.own = own_cpu_s()
        self.server = process_cpu_s(server_pid) if server_pid is not None else None
        self.machine = machine_jiffies()

    def read(self, images: float) -> Usage:
        wall = time.perf_counter() - self.wall
        cores = os.cpu_count() or 1
        if wall <= 0:
            return Usage()
        own = own_cpu_s() - self.own
        usage = Usage(own_cpu_pct=rnd(100 * own / wall / cores, 1))
        used = own
        server_after = process_cpu_s(self.server_pid) if self.server_pid is not None else None
        if self.server is not None and server_after is not None:
            server = server_after - self.server
            used += server
            usage.server_cpu_pct = rnd(100 * server / wall / cores, 1)
            usage.server_cpu_ms_per_image = rnd(1000 * server / images) if images else None
            usage.client_cpu_ms_per_image = rnd(1000 * own / images) if images else None
        elif self.server_pid is None:
            usage.cpu_ms_per_image = rnd(1000 * own / images) if images else None
        machine = machine_jiffies()
        if self.machine is not None and machine is not None and machine[1] > self.machine[1]:
            busy = (machine[0] - self.machine[0]) / (machine[1] - self.machine[1])
            usage.other_cpu_pct = rnd(max(0.0, 100 * busy - 100 * used / wall / cores), 1)
        return usage
