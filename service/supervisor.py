"""``alexnet-serve``'s processes: N front processes on one listening socket and one engine process
that owns the model session, the batcher and the server's state; this process starts them,
replaces any that dies, and stops them in order (fronts first, so that their requests finish on
the engine) on SIGTERM or Ctrl-C.

Why not uvicorn's ``--workers`` supervisor: its workers are interchangeable copies of one app,
built from an import string; here the engine is a process of another kind, and each front must
be handed its place in the shared tallies (cleared when it is replaced, so that a dead front's
admissions do not stay counted) and the prometheus files of a dead process marked as such.
gunicorn would do the same with more moving parts and no engine either.
"""

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from service.core.config import Settings
from service.shared_state import ENGINE_ROW, SharedState, front_row, runtime_dir_root
from service.tallies import SharedTallies

log = logging.getLogger("service")
PR_SET_PDEATHSIG = 1


def name_process(title: str) -> None:
    """``alexnet-serve: front 3`` in ps and top, as gunicorn and Ray name theirs."""
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(f"alexnet-serve: {title}")


def end_with_parent(parent: int) -> None:
    """End this process when the supervisor dies without stopping it (SIGKILL, a crash): the
    kernel sends SIGKILL then (Linux's PR_SET_PDEATHSIG), so no front or engine outlives its
    server, and the server ends as one process would: at once, its locks released, a training
    job's process left for the next start to settle. A stop asked of the supervisor (SIGTERM)
    is graceful: it stops its processes in order before it exits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def engine_main(settings: Settings, shared: SharedState, parent: int) -> None:
    end_with_parent(parent)
    import uvicorn

    from service.core.http import server_config
    from service.main import create_app

    name_process("engine")
    _logging(settings)
    config = server_config(create_app(settings, shared), settings, uds=str(shared.primary_socket))
    uvicorn.Server(config).run()


def front_main(
    settings: Settings, shared: SharedState, index: int, listener: socket.socket, parent: int
) -> None:
    end_with_parent(parent)
    import uvicorn

    from service.core.http import server_config
    from service.front import create_front_app

    name_process(f"front {index}")
    _logging(settings)
    uvicorn.Server(server_config(create_front_app(settings, shared, index), settings)).run([listener])


class Supervisor:
    def __init__(self, settings: Settings, shared: SharedState, listener: socket.socket) -> None:
        self.settings, self.shared, self.listener = settings, shared, listener
        self.context = multiprocessing.get_context("spawn")
        self.stopping = threading.Event()
        self.engine: BaseProcess | None = None
        self.fronts: list[BaseProcess | None] = [None] * shared.fronts
        self.started_at: dict[str, float] = {}  # by process name: when it was last started
        self.backoff: dict[str, float] = {}
        self.retry_at: dict[str, float] = {}

    def _start_engine(self) -> None:
        self.started_at["engine"] = time.monotonic()
        self.shared.tallies.clear_row(ENGINE_ROW)
        self.engine = self.context.Process(  # type: ignore[attr-defined]
            target=engine_main, args=(self.settings, self.shared, os.getpid()), name="alexnet-engine"
        )
        self.engine.start()

    def _start_front(self, index: int) -> None:
        self.started_at[f"front {index}"] = time.monotonic()
        self.shared.tallies.clear_row(front_row(index))
        process = self.context.Process(  # type: ignore[attr-defined]
            target=front_main,
            args=(self.settings, self.shared, index, self.listener, os.getpid()),
            name=f"alexnet-front-{index}",
        )
        process.start()
        self.fronts[index] = process

    def _forget(self, process: BaseProcess) -> None:
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid, str(self.shared.metrics_dir))

    def watch(self) -> None:
        """Replace whatever dies until asked to stop."""
        self._start_engine()
        for index in range(self.shared.fronts):
            self._start_front(index)
        while not self.stopping.wait(0.1):
            if self.engine is not None and not self.engine.is_alive() and self._due("engine", self.engine):
                log.error("the engine process ended (exit code %s); starting another", self.engine.exitcode)
                self._forget(self.engine)
                self._start_engine()
            for index, front in enumerate(self.fronts):
                if front is not None and not front.is_alive() and self._due(f"front {index}", front):
                    log.error("front %d ended (exit code %s); starting another", index, front.exitcode)
                    self._forget(front)
                    self._start_front(index)

    def _due(self, name: str, process: BaseProcess) -> bool:
        """Whether a process that ended may be started again now. One that keeps ending soon
        after it starts (a broken install, no memory) is restarted after 1, 2, 4... up to 30 s,
        not ten times a second."""
        now = time.monotonic()
        if name not in self.retry_at:
            started = self.started_at.get(name, 0.0)
            quick = now - started < 10
            self.backoff[name] = min(30.0, 2 * self.backoff.get(name, 0.5)) if quick else 0.0
            self.retry_at[name] = now + self.backoff[name]
            if quick:
                log.error(
                    "%s ended %.1f s after it started; next start in %.0f s",
                    name,
                    now - started,
                    self.backoff[name],
                )
        if now < self.retry_at[name]:
            return False
        del self.retry_at[name]
        return True

    def stop(self) -> None:
        """Fronts first (uvicorn lets their requests finish), then the engine; each within the
        grace period, then killed."""
        grace = self.settings.request_timeout_s + 5
        # The port refuses new connections at once (each front closes its own copy as it stops);
        # kept open here, the kernel would queue connections that no one will ever answer.
        self.listener.close()
        fronts = [front for front in self.fronts if front is not None]
        _terminate(fronts, grace)
        if self.engine is not None:
            _terminate([self.engine], grace)


def _terminate(processes: list[BaseProcess], grace_s: float) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("%s did not stop within %.0f s; killing it", process.name, grace_s)
            process.kill()
            process.join(5)


def _bind(settings: Settings) -> socket.socket:
    import uvicorn

    config = uvicorn.Config(app=None, host=settings.host, port=settings.port, backlog=settings.backlog)
    return config.bind_socket()


def serve_with_fronts(settings: Settings) -> int:
    name_process("supervisor")
    assert settings.workers
    # Named for this process: an operator (or a test) can tell whose it is.
    runtime = Path(tempfile.mkdtemp(prefix=f"alexnet-serve-{os.getpid()}-", dir=runtime_dir_root()))
    context = multiprocessing.get_context("spawn")
    shared = SharedState(runtime, SharedTallies(1 + settings.workers, context), settings.workers)
    shared.metrics_dir.mkdir()
    # Read by prometheus_client when the processes import it: one /metrics for the whole server.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared.metrics_dir)
    listener = _bind(settings)
    supervisor = Supervisor(settings, shared, listener)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    log.info(
        "alexnet-serve on http://%s:%d: %d front processes and one engine process",
        settings.host,
        settings.port,
        settings.workers,
    )
    try:
        supervisor.watch()
    finally:
        supervisor.stop()
        listener.close()
        shutil.rmtree(runtime, ignore_errors=True)
    return 0
