"""Image decoding in worker processes that can be stopped.

Decoding is the part of a request whose cost the client controls (a small file can declare a huge
canvas or hundreds of progressive scans) and it runs third-party C code on untrusted bytes. In
worker processes it runs beside the event loop instead of under its GIL (the host side then
scales with cores), a decode past its time cap or of a request that failed, timed out or was
disconnected is stopped by killing its worker (a thread cannot be stopped), and its memory goes
back to the system with it. Pebble's pool does the per-task timeout, the kill on cancel and the
replacement of a killed worker, which ``concurrent.futures.ProcessPoolExecutor`` cannot.

Only the central square (S x S x 3 uint8) comes back: the ten float crops are 30 times larger and
cost more to send between processes than to compute in the server.
"""

import asyncio
import multiprocessing
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from pebble import ProcessExpired, ProcessPool

from alexnet_core.images import ImageInputError
from alexnet_core.pipeline import decode_square  # run in the workers
from alexnet_core.resources import keep_freed_memory
from service.core.metrics import Metrics

# Imported by the fork server (preload), so every worker forked from it inherits the setting.
keep_freed_memory()


def _die_on_sigterm() -> None:
    """In a worker: SIGTERM ends it at once. Pebble's own handler is Python code, which runs only
    between bytecodes, so a worker inside a long decode (one C call) lived on until Pebble's
    SIGKILL, 3 s later, for each worker in turn, while the pool dispatched nothing."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The fork server listens on a Unix socket under TMPDIR, whose path must fit sockaddr_un (107 bytes).
_SOCKET_PATH_ROOM = 107 - len("/pymp-xxxxxxxx/listener-xxxxxxxx")


def _context() -> multiprocessing.context.BaseContext:
    """Workers are forked from a fork server that has imported the decoders: forking this process,
    which runs ONNX Runtime's and uvicorn's threads, would be unsafe, and spawning a fresh
    interpreter to replace each killed worker leaves the pool short for a while. Spawn where the
    fork server cannot listen (a TMPDIR path too long for a Unix socket)."""
    if len(tempfile.gettempdir()) > _SOCKET_PATH_ROOM:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["service.decoding"])
    return context


class DecodePool:
    def __init__(self, workers: int, timeout_s: float, metrics: Metrics) -> None:
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._pool = ProcessPool(max_workers=workers, context=_context(), initializer=_die_on_sigterm)
        self._lock = threading.Lock()
        self._in_progress = 0

    @property
    def in_progress(self) -> int:
        return self._in_progress

    def _count(self, step: int) -> None:
        with self._lock:
            self._in_progress += step
            self.metrics.decodes_in_progress.set(self._in_progress)

    def warm_up(self) -> None:
        """Start the workers (a spawned worker imports Pillow and numpy) before the first request."""
        self._pool.schedule(time.sleep, (0,)).result()

    def stop(self) -> None:
        self._pool.stop()  # kills the workers: what they were decoding has no one waiting for it
        self._pool.join(timeout=10)

    async def square(
        self, data: bytes, resize: int, max_pixels: int, finished: Callable[[], None]
    ) -> tuple[np.ndarray, float, float]:
        """Decode in a worker. ``finished`` is called once the worker's task has really ended:
        done, failed, timed out or cancelled (a running task is cancelled by killing its worker,
        which is what cancelling the awaiting coroutine does)."""
        future: Future = self._pool.schedule(
            decode_square, (data, resize, max_pixels), timeout=self.timeout_s
        )
        self._count(+1)

        def done(_: Future) -> None:
            self._count(-1)
            finished()

        future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        except TimeoutError:
            self.metrics.rejected.labels("decode_time").inc()
            raise ImageInputError(
                413, f"image too costly: decoding it took over {self.timeout_s:g} s (the server's cap)"
            ) from None
        except ProcessExpired as exc:  # the decoder crashed or ran out of memory: not the server's fault
            raise ImageInputError(422, f"image could not be decoded: the decoder died ({exc})") from None
