"""Training job records in the state database (``service.database``: SQLite under the state
directory by default, PostgreSQL where configured), so that history survives restarts and, on
PostgreSQL, every server sees every job. One shape: ``JobRecord``; a row is read by column name
into it, and the API's ``TrainingJob`` is derived from it (``service.routers.train``)."""

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import RowMapping, select
from sqlalchemy.exc import SQLAlchemyError

from alexnet_core.training import JobState
from service.database import Database, sqlite_database, unavailable_detail
from service.database.schema import jobs
from service.schemas import TrainRequest

log = logging.getLogger(__name__)
# What writing a record or a run's file may raise.
STORAGE_ERRORS = (OSError, sqlite3.Error, SQLAlchemyError)
JOB_DATABASE = "jobs.sqlite3"
LOCKED_RETRY_S = 2


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
    host: str | None = None  # the machine running it (None: recorded before hosts were)


COLUMNS = [f.name for f in fields(JobRecord)]


def _to_row(job: JobRecord) -> dict[str, Any]:
    row = {name: getattr(job, name) for name in COLUMNS}
    return row | {
        "state": job.state.value,
        "request": job.request.model_dump_json(),
        "run_dir": str(job.run_dir),
    }


def _from_row(row: RowMapping) -> JobRecord:
    values = {name: row[name] for name in COLUMNS}
    return JobRecord(**values | {
        "state": JobState(row["state"]),
        "request": TrainRequest.model_validate_json(row["request"]),
        "run_dir": Path(row["run_dir"]),
        "activated": bool(row["activated"]),
    })  # fmt: skip


def refusal(
    exc: BaseException, reason: str, database: str = "the job database"
) -> tuple[int, str, int | None]:
    """Status, detail and Retry-After seconds for a job that could not be recorded: ``exc``, told
    to a client as ``reason``."""
    original = getattr(exc, "orig", None) or exc
    if isinstance(original, sqlite3.OperationalError) and "locked" in str(original):
        return 503, f"the job database is locked by another process ({reason}); retry shortly", LOCKED_RETRY_S
    if not isinstance(original, sqlite3.Error) and (detail := unavailable_detail(exc, database)):
        return 503, f"the job was not recorded: {detail}", LOCKED_RETRY_S
    return 507, f"no room to record the job ({reason}): free space on the server's state disk", None


class JobStore:
    """The job records of ``database`` (a path: that SQLite file)."""

    def __init__(self, database: Database | Path) -> None:
        self.database = (
            database if isinstance(database, Database) else sqlite_database(database, "the job database")
        )

    @property
    def name(self) -> str:
        return self.database.name

    def save(self, job: JobRecord) -> None:
        row = _to_row(job)
        with self.database.write() as db:
            if db.execute(jobs.update().where(jobs.c.id == job.id).values(row)).rowcount == 0:
                db.execute(jobs.insert().values(row))

    async def save_retrying(self, job: JobRecord, give_up: Callable[[], bool]) -> bool:
        """Saves ``job``, retrying (backing off to every 5 s) while the disk or the database
        refuses, until it is written (True) or ``give_up()`` (False)."""
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
        with self.database.read() as db:
            row = db.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return _from_row(row) if row else None

    def all(self) -> list[JobRecord]:
        with self.database.read() as db:
            rows = db.execute(select(jobs).order_by(jobs.c.created_at.desc())).mappings().all()
        return [_from_row(row) for row in rows]

    def close(self) -> None:
        self.database.close()
