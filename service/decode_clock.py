"""The decode time cap, counted in the worker's CPU time.

CPU time, not the wall clock: on a saturated host a worker waits for a core (and its answer for
the event loop to read it), and a wall-clock cap would refuse a valid image with a 413 that blames
the image for the server's load. The CPU time a decode uses is the image's own cost whatever the
load. A worker that gets no CPU at all is bounded by the request's timeout instead: a 503. The wall
clock is the fallback where a process's CPU time cannot be read (no /proc).
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_MIN_CHECK_S = 0.05  # /proc counts in ticks (10 ms): no point checking more often near the cap


def process_cpu_seconds(pid: int | None) -> float | None:
    """The CPU time process ``pid`` has used, all its threads (Linux's /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CpuCap:
    """Ends ``timer`` once process ``pid`` has used ``cap_s`` of CPU time from now on: checked
    when the cap could be used up at the earliest, and again for the rest while it is not."""

    def __init__(self, pid: int | None, cap_s: float, timer: asyncio.Timeout) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid, self.cap_s, self.timer = pid, cap_s, timer
        self.start = process_cpu_seconds(pid)
        self.handle = self.loop.call_later(cap_s, self._check)

    def _check(self) -> None:
        now = process_cpu_seconds(self.pid)
        used = None if self.start is None or now is None else now - self.start
        if used is None or used >= self.cap_s:
            self.timer.reschedule(self.loop.time())  # over the cap: the timer fires now
        else:
            self.handle = self.loop.call_later(max(self.cap_s - used, _MIN_CHECK_S), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


@asynccontextmanager
async def cpu_cap(pid: int | None, cap_s: float) -> AsyncIterator[None]:
    """Cancel the block, and raise ``TimeoutError``, once process ``pid`` has used ``cap_s`` of
    CPU time in it."""
    async with asyncio.timeout(None) as timer:
        cap = CpuCap(pid, cap_s, timer)
        try:
            yield
        finally:
            cap.cancel()
