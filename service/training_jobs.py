"""Training jobs: each one an ``alexnet-train`` process, its record in the state database.

The server never trains in its own process: it writes the job's ``TrainRun`` to ``<run
dir>/config.json``, starts ``python -m model_export.train --config`` on it (torch is imported
there; on a Ray cluster it drives the job's workers), follows the events it writes to
``metrics.jsonl``, and cancels it with SIGTERM (it stops within one batch, keeping its checkpoint).
One job runs at a time (cluster-wide on a shared database); another request meanwhile gets 409.

A job belongs to the server process that started it: that process holds an exclusive ``flock`` on
``<run dir>/owner.lock`` while the job is queued or running, which the kernel drops when the
process ends, however it ends. Another server finds the lock held and leaves the job alone; a
server starting after the owner died settles the job (succeeded if its trainer finished, else
interrupted); on a shared database, only a server on the job's host does.
"""

import asyncio
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from alexnet_core import files
from alexnet_core.errors import StatusError
from alexnet_core.training import (
    CHECKPOINT,
    CONFIG,
    DoneEvent,
    ErrorEvent,
    ExitCode,
    JobState,
    TrainConfig,
    TrainRun,
    last,
    read_events,
)
from service.job_store import JOB_DATABASE, STORAGE_ERRORS, JobRecord, JobStore, refusal
from service.model_registry import ModelRegistry
from service.schemas import TrainRequest
from service.training_cluster import check_cluster
from service.training_datasets import DatasetRefused, check_dataset

__all__ = ["JobError", "JobRecord", "JobStore", "TrainingManager", "read_metrics"]

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.queued, JobState.running)
OWNER_LOCK = "owner.lock"


class JobError(StatusError):
    def __init__(self, status_code: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(status_code, detail)
        self.retry_after_s = retry_after_s  # a Retry-After header: the condition passes by itself


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The trainer's records so far, as dicts; a line being written is skipped, not an error."""
    return [event.model_dump() for event in read_events(run_dir)]


def resumable(job: JobRecord) -> bool:
    return (job.run_dir / CHECKPOINT).is_file()


def stopped_message(job: JobRecord, why: str) -> str:
    """``why``, and what to do next: resume only where there is a checkpoint to resume from."""
    if resumable(job):
        return f"{why}; POST /train/{job.id}/resume continues it from its last completed epoch"
    return f"{why} before its first epoch ended (no checkpoint); start it again with POST /train"


def interrupted_message(job: JobRecord) -> str:
    return stopped_message(job, "the server stopped while this job ran")


def claim(run_dir: Path) -> int | None:
    """An open descriptor holding the job's owner lock, or None while another process holds it."""
    fd = os.open(run_dir / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _log_failure(task: "asyncio.Task[None]") -> None:
    """Done-callback of every job task: an exception that escaped it is logged, never lost."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed", task.get_name(), exc_info=exc)


def _is_trainer(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # --config <run dir>/config.json; a trainer started by an older server had --out <run dir>.
    paths = {str(run_dir / CONFIG).encode(), str(run_dir).encode()}
    return b"model_export.train" in cmdline and not paths.isdisjoint(cmdline)


class TrainingManager:
    """Records and runs in ``state_dir`` (default: the weights directory); models are exported
    into the weights directory: where it is read-only, ``models_read_only`` says why."""

    def __init__(self, weights_dir: Path, data_root: Path, registry: ModelRegistry,
                 state_dir: Path | None = None, models_read_only: str | None = None,
                 store: JobStore | None = None, ray_address: str | None = None) -> None:  # fmt: skip
        self.weights_dir = weights_dir
        self.ray_address = ray_address
        self.data_root = data_root
        self.registry = registry
        self.state_dir = state_dir or weights_dir
        self.models_read_only = models_read_only
        self.runs_dir = self.state_dir / "runs"
        self.store = store or JobStore(self.state_dir / JOB_DATABASE)
        self.host = socket.gethostname()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unsaved: dict[str, JobRecord] = {}  # ended, their record waiting for room on disk
        self._starting = asyncio.Lock()  # one check-and-record at a time
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._owned: dict[str, int] = {}  # job id -> descriptor holding its owner lock
        self._cancelled: set[str] = set()  # cancelled while queued: their trainer must not start
        self._shutting_down = False
        self._settle_orphans()

    def _settle_orphans(self) -> None:
        """Jobs recorded as queued or running whose owner is gone (its lock is free): a trainer
        that finished while no server watched it succeeded; any other was cut off."""
        for job in self.store.all():
            if job.state not in ACTIVE_STATES or job.host not in (None, self.host):
                continue  # ended, or run by a server on another machine (a shared database)
            try:
                fd = claim(job.run_dir)
            except OSError:  # its run folder is gone: nothing runs there
                fd = None
            else:
                if fd is None:
                    continue  # another live server owns it: not ours to stop or relabel
            try:
                self._settle(job)
            finally:
                if fd is not None:
                    os.close(fd)

    def _settle(self, job: JobRecord) -> None:
        done = last(read_events(job.run_dir), DoneEvent)
        if done is not None:
            job.state, job.model_version, job.finished_at, job.error = (
                JobState.succeeded, done.version, done.time, None,
            )  # fmt: skip
            if job.request.activate and done.version:
                self._activate(job)
        else:
            if job.pid is not None and _is_trainer(job.pid, job.run_dir):
                os.kill(job.pid, signal.SIGTERM)  # an orphan from a server that was killed
            job.state, job.error, job.finished_at = (
                JobState.interrupted,
                interrupted_message(job),
                time.time(),
            )
        self.store.save(job)
        log.info("training job %s found %s at start-up", job.id, job.state.value)

    def _activate(self, job: JobRecord) -> None:
        assert job.model_version is not None
        try:
            self.registry.activate(job.model_version, by=f"job {job.id}")
            job.activated = True
        except Exception as exc:  # the served model stays as it was
            job.error = f"trained and exported, but activation failed: {exc}"

    def get(self, job_id: str) -> JobRecord:
        job = self._unsaved.get(job_id) or self.store.get(job_id)
        if job is None:
            raise JobError(404, f"no training job {job_id!r}")
        return job

    def all(self) -> list[JobRecord]:
        """Every job, newest first; an ended job whose record is not written yet as it ended."""
        return [self._unsaved.get(job.id, job) for job in self.store.all()]

    def _check_can_start(self) -> None:
        if importlib.util.find_spec("torch") is None:
            raise JobError(
                501,
                "training needs the export extra on the server: pip install -c constraints.txt '.[export]'",
            )
        if self.models_read_only:
            raise JobError(503, f"training is disabled: {self.models_read_only}")
        running = [j.id for j in self.all() if j.state in ACTIVE_STATES]
        if running:
            raise JobError(409, f"job {running[0]} is running; one job runs at a time (cancel it or wait)")

    async def _dataset(self, request: TrainRequest) -> Path:
        check_cluster(self.ray_address, request.ray_workers)
        try:
            return await asyncio.to_thread(check_dataset, self.data_root, request.dataset)
        except DatasetRefused as exc:
            raise JobError(400, str(exc)) from None

    async def submit(self, request: TrainRequest) -> JobRecord:
        dataset = await self._dataset(request)
        async with self._starting:  # check and record with no other start in between
            await asyncio.to_thread(self._check_can_start)
            job_id, now = uuid.uuid4().hex[:12], time.time()
            job = JobRecord(job_id, JobState.queued, request, self.runs_dir / job_id, now, host=self.host)
            await asyncio.to_thread(self._prepare, job, dataset, False)
            self._launch(job)
        return job

    async def resume(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state not in (JobState.interrupted, JobState.failed, JobState.cancelled):
            raise JobError(409, f"job {job_id} is {job.state.value}; only a stopped job can be resumed")
        if not resumable(job):
            raise JobError(409, f"job {job_id} has no checkpoint to resume from (it stopped in epoch 1)")
        if job_id in self._tasks:
            raise JobError(409, f"job {job_id} has ended but its record is not written yet; retry shortly")
        if job.pid is not None and _is_trainer(job.pid, job.run_dir):
            # The trainer of a server that was killed, told to stop at start-up and still
            # finishing its batch: a second one on the same run folder would race it.
            raise JobError(409, f"job {job_id}: its last trainer is still stopping; retry in a few seconds")
        dataset = await self._dataset(job.request)
        async with self._starting:
            await asyncio.to_thread(self._check_can_start)
            job = await asyncio.to_thread(self.get, job_id)  # as recorded now, after the wait
            job.state, job.error, job.finished_at, job.host = JobState.queued, None, None, self.host
            await asyncio.to_thread(self._prepare, job, dataset, True)
            self._launch(job)
        return job

    def _config(self, job: JobRecord, dataset: Path, resume: bool) -> TrainRun:
        return TrainRun.model_validate(
            job.request.model_dump(include=set(TrainConfig.model_fields))
            | {"data": dataset, "out": job.run_dir, "weights_dir": self.weights_dir, "resume": resume,
               "data_root": self.data_root, "progress": False, "ray": self.ray_address}
        )  # fmt: skip

    def _prepare(self, job: JobRecord, dataset: Path, resume: bool) -> None:
        """Claims the job, writes its trainer's config and records it queued (file and database
        I/O: called in a thread). A failure leaves nothing behind: no record, no lock held, and
        for a new job no run folder."""
        try:
            if not resume:
                job.run_dir.mkdir(parents=True)
            fd = claim(job.run_dir)
            if fd is None:
                raise JobError(409, f"job {job.id} is owned by another server process")
            self._owned[job.id] = fd
            config = self._config(job, dataset, resume)
            files.write_text(job.run_dir / CONFIG, config.model_dump_json(indent=2))
            self.store.save(job)
        except BaseException as exc:
            with contextlib.suppress(KeyError, OSError):
                os.close(self._owned.pop(job.id))
            if not resume:
                shutil.rmtree(job.run_dir, ignore_errors=True)
            if isinstance(exc, STORAGE_ERRORS):
                raise JobError(*refusal(exc, self._reason(exc), self.store.name)) from exc
            raise

    def _reason(self, exc: BaseException) -> str:
        """``exc`` for a client: no path of the server's."""
        if isinstance(exc, OSError) and exc.strerror:
            return f"{type(exc).__name__}: {exc.strerror}"
        return self.registry.redact_paths(exc)

    def _launch(self, job: JobRecord) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run(job, job.run_dir / CONFIG), name=f"training job {job.id}"
        )
        task.add_done_callback(_log_failure)
        self._tasks[job.id] = task

    async def _run(self, job: JobRecord, config: Path) -> None:
        """Runs the job to its end and records that end, whatever fails on the way; its owner
        lock is held until the record is written (or the server stops)."""
        try:
            try:
                # The served model becomes the recorded choice before this job's model can appear:
                # else, with nothing ever activated, the next start-up would serve the newest file,
                # this one's. (In a thread: it waits for an activation in progress.)
                await asyncio.to_thread(self.registry.pin_current)
                code = await self._execute(job, config)
                await asyncio.to_thread(self._conclude, job, code)
            except Exception as exc:
                log.exception("training job %s: the server could not run it", job.id)
                await self._stop_trainer(job)
                job.state, job.finished_at = JobState.failed, time.time()
                job.error = f"the server could not run this job ({self._reason(exc)}); see the server's log"
            await self._record_end(job)
        finally:
            self._processes.pop(job.id, None)
            self._tasks.pop(job.id, None)
            self._cancelled.discard(job.id)
            with contextlib.suppress(KeyError, OSError):
                os.close(self._owned.pop(job.id))

    async def _execute(self, job: JobRecord, config: Path) -> int:
        if job.id in self._cancelled:  # cancelled before its trainer started: nothing to stop
            return ExitCode.CANCELLED
        with (job.run_dir / "train.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "model_export.train", "--config", str(config),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                # The trainer needs no API key: keep it out of its environment (/proc/<pid>/environ).
                env={k: v for k, v in os.environ.items() if k != "ALEXNET_API_KEY"},
            )  # fmt: skip
        self._processes[job.id] = process
        if job.id in self._cancelled:  # cancelled while the trainer was being started
            process.send_signal(signal.SIGTERM)
        job.state, job.pid, job.started_at = JobState.running, process.pid, job.started_at or time.time()
        try:
            await asyncio.to_thread(self.store.save, job)
        except STORAGE_ERRORS as exc:  # the trainer runs on; its end is recorded with retries
            log.warning("training job %s: cannot record it running: %s", job.id, exc)
        return await process.wait()

    async def _stop_trainer(self, job: JobRecord) -> None:
        process = self._processes.get(job.id)
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _record_end(self, job: JobRecord) -> None:
        """Saves the ended job, shown as ended meanwhile; a server that stops before there is
        room leaves it to the next start-up, which settles it."""
        self._unsaved[job.id] = job
        if await self.store.save_retrying(job, lambda: self._shutting_down):
            self._unsaved.pop(job.id, None)
            log.info("training job %s %s", job.id, job.state.value)

    def _conclude(self, job: JobRecord, code: int) -> None:
        """The job's end, from its trainer's exit code and events (not saved here)."""
        events = read_events(job.run_dir)
        done = last(events, DoneEvent)
        job.finished_at = time.time()
        if code == ExitCode.OK and done is not None:
            job.state, job.model_version = JobState.succeeded, done.version
            if job.request.activate and job.model_version:
                self._activate(job)
        elif code in (ExitCode.CANCELLED, -signal.SIGTERM):
            # By DELETE, or by our own shutdown (then it is resumable). -SIGTERM: the signal came
            # before the trainer had installed its handler (still importing torch).
            job.state = JobState.interrupted if self._shutting_down else JobState.cancelled
            if self._shutting_down:
                job.error = interrupted_message(job)
        else:
            error = last(events, ErrorEvent)
            job.state = JobState.failed
            message = error.message if error else None
            if message is None and code < 0:  # killed: no record of its own says why
                name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
                hint = " (out of memory, or killed by hand)" if -code == signal.SIGKILL else ""
                message = stopped_message(job, f"trainer killed by {name}{hint}")
            job.error = message or f"trainer exited with code {code}; see its train.log"

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        process = self._processes.get(job_id)
        if job.state in ACTIVE_STATES and job_id not in self._owned:
            raise JobError(
                409, f"job {job_id} is run by another server on this weights directory; cancel it there"
            )
        if job.state not in ACTIVE_STATES:
            raise JobError(409, f"job {job_id} is {job.state.value}, not running")
        self._cancelled.add(job_id)  # for a queued job: its trainer never starts, or is stopped at once
        if process is not None:
            process.send_signal(signal.SIGTERM)
        return job

    async def shutdown(self) -> None:
        """Stop running trainers (each keeps its last checkpoint); their jobs become resumable."""
        self._shutting_down = True
        self._cancelled.update(self._tasks)  # queued ones must not start a trainer now
        for process in list(self._processes.values()):
            process.send_signal(signal.SIGTERM)
        for task in list(self._tasks.values()):
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=30)
        self.store.close()
