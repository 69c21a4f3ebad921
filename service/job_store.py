"""Training job records, kept in SQLite under the weights directory so that history survives
restarts. One shape: ``JobRecord``; a row is read by column name into it, and the API's
``TrainingJob`` is derived from it (``service.routers.train``)."""

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from alexnet_core.training import JobState
from service.schemas import TrainRequest

log = logging.getLogger(__name__)
STORAGE_ERRORS = (OSError, sqlite3.Error)  # what writing a record or a run's file may raise


@dataclass
class JobRecord:
    id: str
    state: JobState
    request: TrainRequest
    run_dir: Path
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None  # the trainer's
    error: str | None = None
    model_version: str | None = None
    activated: bool = False


COLUMNS = [f.name for f in fields(JobRecord)]
SQL_TYPES = {"created_at": "REAL", "started_at": "REAL", "finished_at": "REAL", "pid": "INTEGER",
             "activated": "INTEGER"}  # fmt: skip


def _to_row(job: JobRecord) -> dict[str, Any]:
    row = {name: getattr(job, name) for name in COLUMNS}
    return row | {
        "state": job.state.value,
        "request": job.request.model_dump_json(),
        "run_dir": str(job.run_dir),
        "activated": int(job.activated),
    }


def refusal(exc: BaseException, reason: str) -> tuple[int, str, int | None]:
    """Status, detail and Retry-After seconds for a job that could not be recorded: ``exc``, told
    to a client as ``reason``."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return 503, f"the job database is locked by another process ({reason}); retry shortly", 2
    return 507, f"no room to record the job ({reason}): free space on the server's state disk", None


def _from_row(row: sqlite3.Row) -> JobRecord:
    values = {name: row[name] for name in COLUMNS}
    return JobRecord(**values | {
        "state": JobState(row["state"]),
        "request": TrainRequest.model_validate_json(row["request"]),
        "run_dir": Path(row["run_dir"]),
        "activated": bool(row["activated"]),
    })  # fmt: skip


class JobStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        columns = ", ".join(f"{name} {SQL_TYPES.get(name, 'TEXT')}" for name in COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns}, PRIMARY KEY (id))")
        # A store written by an older version lacks the columns added since: add them (NULL).
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name in COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {SQL_TYPES.get(name, 'TEXT')}")

    def save(self, job: JobRecord) -> None:
        names = ", ".join(COLUMNS)
        values = ", ".join(f":{name}" for name in COLUMNS)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({names}) VALUES ({values})", _to_row(job))

    async def save_retrying(self, job: JobRecord, give_up: Callable[[], bool]) -> bool:
        """Saves ``job``, retrying (backing off to every 5 s) while the disk refuses, until it is
        written (True) or ``give_up()`` (False)."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self.save, job)
                return True
            except STORAGE_ERRORS as exc:
                if delay == 0.5 or give_up():
                    log.error("training job %s ended %s; cannot record it: %s", job.id, job.state.value, exc)
                if give_up():
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC").fetchall()
        return [_from_row(row) for row in rows]

    def close(self) -> None:
        self._db.close()
