"""How a run talks to the outside: typed records out (``metrics.jsonl``), signals in."""

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from alexnet_core.training import Event


class MetricsLog:
    """JSON lines, flushed per record so that a process tailing the file sees each one at once.
    Without a path (ranks other than 0) it writes nothing."""

    def __init__(self, path: Path | None, append: bool) -> None:
        self.file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, event: Event) -> None:
        if self.file is not None:
            self.file.write(event.model_dump_json() + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class CancelFlag:
    """Set by SIGTERM/SIGINT; the loops look at it once per batch. A handler that raised instead
    could interrupt torch.save halfway or leave the ranks of a distributed run out of step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller there handles them
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


def ignore_signals_in_worker(worker_id: int) -> None:
    # A Ctrl-C reaches the whole process group; the main process decides when to stop and shuts
    # the workers down itself, so a worker dying first would only turn that into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
