"""Training jobs: each one an ``alexnet-train`` process, its record in SQLite.

The server never trains in its own process: it starts ``python -m model_export.train`` (torch is
imported there, not here), follows the run through the ``metrics.jsonl`` the trainer writes, and
cancels it with SIGTERM (the trainer stops within one batch and keeps its last checkpoint). One job
runs at a time; a second request while one is running gets 409 rather than waiting in a queue, so
that a client always knows at once whether its job started.
"""

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.model_registry import ModelRegistry
from service.schemas import JobState, TrainRequest

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.queued, JobState.running)
EXIT_CANCELLED = 130
INTERRUPTED = "the server stopped while this job ran; POST /train/{id}/resume continues it"


class JobError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass
class JobRecord:
    id: str
    state: JobState
    request: TrainRequest
    run_dir: Path
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    error: str | None = None
    model_version: str | None = None
    activated: bool = False


def resolve_dataset(data_root: Path, relative: str) -> Path:
    """``relative`` inside ``data_root``, or 400. Absolute paths, ``..`` and symlinks that lead
    out of the root are refused before anything runs."""
    candidate = Path(relative)
    if not relative.strip() or candidate.is_absolute() or ".." in candidate.parts or "\x00" in relative:
        raise JobError(400, f"dataset path {relative!r} must be relative to the data root, without '..'")
    root = data_root.resolve()
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise JobError(400, f"dataset path {relative!r} leads outside the data root")
    if not (resolved / "train").is_dir() or not (resolved / "val").is_dir():
        raise JobError(400, f"dataset {relative!r} not found: expected <data root>/{relative}/train and /val")
    return resolved


class JobStore:
    """SQLite under the weights directory: job history survives restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT, request TEXT, run_dir TEXT,"
            " created_at REAL, started_at REAL, finished_at REAL, pid INTEGER, error TEXT,"
            " model_version TEXT, activated INTEGER)"
        )

    def save(self, job: JobRecord) -> None:
        row = (
            job.id,
            job.state.value,
            job.request.model_dump_json(),
            str(job.run_dir),
            job.created_at,
            job.started_at,
            job.finished_at,
            job.pid,
            job.error,
            job.model_version,
            int(job.activated),
        )
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)

    def _record(self, row: tuple[Any, ...]) -> JobRecord:
        return JobRecord(
            id=row[0],
            state=JobState(row[1]),
            request=TrainRequest.model_validate_json(row[2]),
            run_dir=Path(row[3]),
            created_at=row[4],
            started_at=row[5],
            finished_at=row[6],
            pid=row[7],
            error=row[8],
            model_version=row[9],
            activated=bool(row[10]),
        )

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._record(row) if row else None

    def all(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC").fetchall()
        return [self._record(row) for row in rows]

    def close(self) -> None:
        self._db.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer's records so far; a line being written is skipped, not an error."""
    records = []
    try:
        with (run_dir / "metrics.jsonl").open() as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return records


def _is_trainer(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"model_export.train" in cmdline and str(run_dir).encode() in cmdline


class TrainingManager:
    def __init__(self, weights_dir: Path, data_root: Path, registry: ModelRegistry) -> None:
        self.weights_dir = weights_dir
        self.data_root = data_root
        self.registry = registry
        self.runs_dir = weights_dir / "runs"
        self.store = JobStore(weights_dir / "jobs.sqlite3")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._shutting_down = False
        self._mark_interrupted()

    def _mark_interrupted(self) -> None:
        """After a restart no job of ours is running: a job recorded as running was cut off."""
        for job in self.store.all():
            if job.state in ACTIVE_STATES:
                if job.pid is not None and _is_trainer(job.pid, job.run_dir):
                    os.kill(job.pid, signal.SIGTERM)  # an orphan from a server that was killed
                job.state = JobState.interrupted
                job.error = INTERRUPTED
                job.finished_at = time.time()
                self.store.save(job)

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job is None:
            raise JobError(404, f"no training job {job_id!r}")
        return job

    def _check_can_start(self) -> None:
        if importlib.util.find_spec("torch") is None:
            raise JobError(
                501,
                "training needs the export extra on the server: pip install -c constraints.txt '.[export]'",
            )
        running = [j.id for j in self.store.all() if j.state in ACTIVE_STATES]
        if running:
            raise JobError(409, f"job {running[0]} is running; one job runs at a time (cancel it or wait)")

    def submit(self, request: TrainRequest) -> JobRecord:
        dataset = resolve_dataset(self.data_root, request.dataset)
        self._check_can_start()
        job_id = uuid.uuid4().hex[:12]
        job = JobRecord(job_id, JobState.queued, request, self.runs_dir / job_id, time.time())
        job.run_dir.mkdir(parents=True)
        self.store.save(job)
        self._start(job, dataset, resume=False)
        return job

    def resume(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state not in (JobState.interrupted, JobState.failed, JobState.cancelled):
            raise JobError(409, f"job {job_id} is {job.state.value}; only a stopped job can be resumed")
        if not (job.run_dir / "checkpoint.pt").is_file():
            raise JobError(
                409, f"job {job_id} has no checkpoint to resume from (it stopped in its first epoch)"
            )
        if job.pid is not None and _is_trainer(job.pid, job.run_dir):
            # The trainer of a server that was killed, told to stop at start-up and still
            # finishing its batch: a second one on the same run folder would race it.
            raise JobError(409, f"job {job_id}: its last trainer is still stopping; retry in a few seconds")
        dataset = resolve_dataset(self.data_root, job.request.dataset)
        self._check_can_start()
        job.state, job.error, job.finished_at = JobState.queued, None, None
        self.store.save(job)
        self._start(job, dataset, resume=True)
        return job

    def _command(self, job: JobRecord, dataset: Path, resume: bool) -> list[str]:
        r = job.request
        command = [
            sys.executable,
            "-m",
            "model_export.train",
            str(dataset),
            "--out",
            str(job.run_dir),
            "--weights-dir",
            str(self.weights_dir),
            "--epochs",
            str(r.epochs),
            "--batch-size",
            str(r.batch_size),
            "--lr",
            repr(r.lr),
            "--layout",
            r.layout,
            "--init",
            r.init,
            "--input-scaling",
            r.input_scaling,
            "--input-size",
            str(r.input_size),
            "--resize-size",
            str(r.resize_size or round(r.input_size * 256 / 224)),
            "--seed",
            str(r.seed),
            "--no-progress",
        ]
        if r.lr_schedule:
            command += ["--lr-schedule", r.lr_schedule]
        if r.target_top1 is not None:
            command += ["--stop-at-top1", repr(r.target_top1)]
        if not r.flip:
            command.append("--no-flip")
        if resume:
            command.append("--resume")
        return command

    def _start(self, job: JobRecord, dataset: Path, resume: bool) -> None:
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, dataset, resume))

    async def _run(self, job: JobRecord, dataset: Path, resume: bool) -> None:
        with (job.run_dir / "train.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *self._command(job, dataset, resume),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                # The trainer needs no API key: keep it out of its environment (/proc/<pid>/environ).
                env={k: v for k, v in os.environ.items() if k != "ALEXNET_API_KEY"},
            )
        self._processes[job.id] = process
        job.state, job.pid, job.started_at = JobState.running, process.pid, job.started_at or time.time()
        self.store.save(job)
        code = await process.wait()
        self._processes.pop(job.id, None)
        self._tasks.pop(job.id, None)
        records = await asyncio.to_thread(read_metrics, job.run_dir)
        done = next((r for r in reversed(records) if r.get("event") == "done"), None)
        job.finished_at = time.time()
        if code == 0 and done is not None:
            job.state, job.model_version = JobState.succeeded, done.get("version")
            if job.request.activate and job.model_version:
                try:
                    await asyncio.to_thread(self.registry.activate, job.model_version)
                    job.activated = True
                except Exception as exc:  # the served model stays as it was
                    job.error = f"trained and exported, but activation failed: {exc}"
        elif code in (EXIT_CANCELLED, -signal.SIGTERM):
            # By DELETE, or by our own shutdown (then it is resumable). -SIGTERM: the signal came
            # before the trainer had installed its handler (still importing torch).
            job.state = JobState.interrupted if self._shutting_down else JobState.cancelled
            if self._shutting_down:
                job.error = INTERRUPTED
        else:
            error = next((r.get("message") for r in reversed(records) if r.get("event") == "error"), None)
            job.state = JobState.failed
            if error is None and code < 0:  # killed: no record of its own says why
                name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
                hint = " (out of memory, or killed by hand)" if -code == signal.SIGKILL else ""
                error = f"trainer killed by {name}{hint}; POST /train/{job.id}/resume continues it"
            job.error = error or f"trainer exited with code {code}; see {job.run_dir / 'train.log'}"
        self.store.save(job)
        log.info("training job %s %s", job.id, job.state.value)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        process = self._processes.get(job_id)
        if job.state not in ACTIVE_STATES or process is None:
            raise JobError(409, f"job {job_id} is {job.state.value}, not running")
        process.send_signal(signal.SIGTERM)
        return job

    async def shutdown(self) -> None:
        """Stop running trainers (each keeps its last checkpoint); their jobs become resumable."""
        self._shutting_down = True
        for process in list(self._processes.values()):
            process.send_signal(signal.SIGTERM)
        for task in list(self._tasks.values()):
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
        self.store.close()
