"""What the processes of one server share, made by the supervisor and handed to each process it
starts: the runtime folder (the engine's sockets, the fronts' slots, the metrics' files) and the
server-wide tallies, one row per process."""

import os
from dataclasses import dataclass
from pathlib import Path

from service.tallies import SharedTallies

ENGINE_ROW = 0


def runtime_dir_root() -> Path | None:
    """/dev/shm when it is there and writable (memory, not a disk that would write pages back)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def front_row(index: int) -> int:
    return 1 + index


@dataclass(frozen=True)
class SharedState:
    runtime_dir: Path
    tallies: SharedTallies
    fronts: int

    @property
    def engine_socket(self) -> Path:
        """Where the engine takes the fronts' images."""
        return self.runtime_dir / "engine.sock"

    @property
    def primary_socket(self) -> Path:
        """Where the engine's own app answers every other request (HTTP over a Unix socket)."""
        return self.runtime_dir / "primary.sock"

    @property
    def metrics_dir(self) -> Path:
        return self.runtime_dir / "metrics"

    def slots_path(self, index: int) -> Path:
        return self.runtime_dir / f"front-{index}.slots"
