"""Image decoding in worker processes that can be stopped.

Decoding is the part of a request whose cost the client controls (a small file can declare a huge
canvas or hundreds of progressive scans) and it runs third-party C code on untrusted bytes. In
worker processes it runs beside the event loop instead of under its GIL (the host side then
scales with cores), a decode past its time cap or of a request that failed, timed out or was
disconnected is stopped by killing its worker (a thread cannot be stopped), and its memory goes
back to the system with it.

Why not a library pool: Pebble's (kill on timeout or cancel) and ``ProcessPoolExecutor`` hand
every task to three helper threads of the server process and through one shared pipe per
direction, so each image costs the process that runs the event loop several GIL hand-offs, and a
result waits for those threads to read it before the next one can be written. Under load that
was about a third of the server process's CPU for a small image (``benchmarks/overhead.py``).
Here each worker has its own socket, which the event loop reads and writes itself: no helper
thread, and nothing a worker sends is unpickled.

Only the central square (S x S x 3 uint8) comes back: the ten float crops are 30 times larger and
cost more to send between processes than to compute in the server.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable
from multiprocessing.process import BaseProcess
from typing import NamedTuple, Protocol

import numpy as np

from alexnet_core.images import ImageInputError  # run in the workers
from alexnet_core.resources import keep_freed_memory
from service import decode_worker as w
from service.core.metrics import Metrics
from service.decode_clock import cpu_cap

log = logging.getLogger(__name__)

# Imported by the fork server (preload), so every worker forked from it inherits the setting.
keep_freed_memory()


class DecodedSquare(NamedTuple):
    """An image's central square (the side the model resizes to) and the seconds its decode and
    its resize-and-cut took in the worker."""

    pixels: np.ndarray
    decode_s: float
    square_s: float


class Budget(Protocol):
    """What the pool reserves an image's decode memory against (``service.admission.DecodeBudget``;
    not imported: the fork server preloads this module, and the web stack has no place there)."""

    def reserve(self, amount: int) -> None: ...  # raises to refuse

    def release(self, amount: int) -> None: ...


class DecodersUnavailable(Exception):
    """No decode worker runs and none can be started: the server's state, not the image's (503)."""


class _Declined(Exception):
    """The budget refused an image the worker had weighed: the worker was told to skip it and is fine."""

    def __init__(self, reason: BaseException) -> None:
        self.reason = reason


class _NotHandedOver(Exception):
    """The worker was gone before it had the whole image: another worker may take it."""


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


class _Worker:
    """One worker process and the server's end of its socket."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self.sock, theirs = socket.socketpair()
        try:
            self.process: BaseProcess = context.Process(target=w.serve, args=(theirs,), daemon=True)  # type: ignore[attr-defined]
            self.process.start()
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.sock.setblocking(False)

    async def _reply(self) -> tuple[int, int, int, int, float, float]:
        loop = asyncio.get_running_loop()
        header = bytearray(w.REPLY.size)
        await self._fill(loop, memoryview(header))
        return w.REPLY.unpack(header)

    async def _fill(self, loop: asyncio.AbstractEventLoop, view: memoryview) -> None:
        while view:
            received = await loop.sock_recv_into(self.sock, view)
            if not received:
                raise EOFError
            view = view[received:]

    async def _refused(self, loop: asyncio.AbstractEventLoop, fields: list[int]) -> ImageInputError:
        status_code, length = fields[0], fields[1]
        if not 400 <= status_code < 500 or length > w.MAX_DETAIL:
            raise EOFError("the worker's refusal is malformed")  # treated as a dead worker
        detail = bytearray(length)
        await self._fill(loop, memoryview(detail))
        return ImageInputError(status_code, detail.decode(errors="replace"))

    async def call(
        self,
        data: bytes,
        resize: int,
        max_pixels: int,
        max_scans: int,
        reserve: Callable[[int], None],
        out: np.ndarray | None = None,
    ) -> DecodedSquare:
        """Weigh, ``reserve(cost)`` (which raises to refuse), decode (into ``out`` when given)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.sock, w.TASK.pack(w.IMAGE, len(data), resize, max_pixels, max_scans))
            await loop.sock_sendall(self.sock, data)
        except OSError as exc:  # it could not have read the image: its death is not the image's doing
            raise _NotHandedOver from exc
        kind, *fields, _, _ = await self._reply()
        if kind == w.REFUSED:
            raise await self._refused(loop, fields)
        if kind != w.COST:
            raise EOFError("the worker's reply is not a cost")
        try:
            reserve(fields[0])
        except Exception as exc:
            await loop.sock_sendall(self.sock, w.SKIP)
            raise _Declined(exc) from None
        await loop.sock_sendall(self.sock, w.GO)
        kind, *fields, decode_s, square_s = await self._reply()
        if kind == w.REFUSED:
            raise await self._refused(loop, fields)
        if kind != w.SQUARE or fields != [resize, resize, 3]:
            raise EOFError("the worker's reply is not a square")
        # Received in place (a front's shared slot, or a new array): no copy of the pixels.
        square = np.empty(fields, np.uint8) if out is None else out
        await self._fill(loop, memoryview(square).cast("B"))
        return DecodedSquare(square, decode_s, square_s)

    async def ping(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, w.TASK.pack(w.PING, 0, 0, 0, 0))
        await self._reply()

    def usable(self) -> bool:
        """Alive with nothing unread in its socket: finds an idle worker killed while it waited."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # returns: end of stream (dead) or a stray byte
        except BlockingIOError:  # nothing to read: it waits for a task
            return self.process.is_alive()
        except OSError:
            pass
        return False

    def kill(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.process.kill()

    def exit_description(self) -> str:
        self.process.join(1)  # a worker that died is reaped at once; one still alive sent nonsense
        code = self.process.exitcode
        if code is None:
            return "it sent a malformed reply"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


class DecodePool:
    def __init__(self, workers: int, timeout_s: float, metrics: Metrics) -> None:
        self.timeout_s = timeout_s  # the CPU time one image may use (see CpuCap)
        self.metrics = metrics
        self._context = _context()
        self._size = workers
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._in_progress = 0
        self._stopped = False
        self._start_error: str | None = None  # why the last start of a worker failed

    @property
    def in_progress(self) -> int:
        return self._in_progress

    @property
    def pids(self) -> set[int]:
        """The workers' process ids."""
        return {worker.process.pid for worker in self._workers if worker.process.pid is not None}

    @property
    def unavailable(self) -> str | None:
        """Why no image can be decoded now, else None."""
        why = self._start_error or "stopped"
        return None if self._workers else f"no decode worker runs and none could be started ({why})"

    def _show_live(self) -> None:
        # Set on every change (not a callback): a callback's value does not reach /metrics in a
        # server of several processes, whose metrics live in files.
        self.metrics.decode_workers_live.set(len(self._workers))

    def _count(self, step: int) -> None:
        self._in_progress += step
        self.metrics.decodes_in_progress.set(self._in_progress)

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._context)
        self._workers.add(worker)
        self._show_live()
        return worker

    async def warm_up(self, timeout_s: float = 120) -> None:
        """Start the workers and wait until each answers (a spawned worker imports Pillow and numpy)."""
        workers = [self._start_worker() for _ in range(self._size)]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(worker.ping() for worker in workers))
        except (TimeoutError, EOFError, OSError) as exc:
            raise RuntimeError(f"the decode workers did not start: {exc!r}") from None
        for worker in workers:
            self._idle.put_nowait(worker)

    def stop(self) -> None:
        """Kill the workers: what they were decoding has no one waiting for it."""
        self._stopped = True
        for worker in self._workers:
            worker.kill()
        for worker in self._workers:
            worker.process.join(10)
        self._workers.clear()
        self._show_live()

    def _replace(self, worker: _Worker, found_dead: bool = False) -> None:
        if found_dead:
            log.warning("decode worker %s found dead while idle: replaced", worker.process.pid)
        worker.kill()
        self._workers.discard(worker)
        self._show_live()
        self._top_up()

    def _top_up(self) -> None:
        """Start the workers the pool lacks. One that cannot start now (out of processes or file
        descriptors) is retried at the next image or check; meanwhile the pool serves with fewer."""
        while len(self._workers) < self._size and not self._stopped:
            try:
                worker = self._start_worker()
            except OSError as exc:
                self._start_error = f"{type(exc).__name__}: {exc}"
                log.exception("a decode worker could not be started")
                return
            self._start_error = None
            self._idle.put_nowait(worker)

    def check(self) -> int:
        """Replace idle workers found dead, start missing ones; the number of workers running."""
        for _ in range(self._idle.qsize()):
            worker = self._idle.get_nowait()
            if worker.usable():
                self._idle.put_nowait(worker)
            else:
                self._replace(worker, found_dead=True)
        self._top_up()
        return len(self._workers)

    async def _take(self) -> _Worker:
        """An idle worker that is alive; one found dead (killed while it waited) is replaced."""
        while True:
            self._top_up()
            if (reason := self.unavailable) is not None:
                self.metrics.rejected.labels("no_decoder").inc()
                raise DecodersUnavailable(f"server cannot decode images now: {reason}")
            worker = await self._idle.get()
            if worker.usable():
                return worker
            self._replace(worker, found_dead=True)

    async def decode_square(
        self,
        data: bytes,
        resize: int,
        max_pixels: int,
        max_scans: int,
        budget: Budget,
        out: np.ndarray | None = None,
    ) -> DecodedSquare:
        """Weigh and decode in a worker, its decode memory reserved against ``budget`` in between
        and held until the worker's task has really ended: done, failed, timed out or cancelled
        (then its worker is killed). A worker gone before it had the image is replaced and the
        image retried; the wait for an idle worker is bounded by the caller's (request's) timeout."""
        held = 0

        def reserve(amount: int) -> None:
            nonlocal held
            budget.reserve(amount)
            held = amount

        def call(worker: _Worker) -> Awaitable[DecodedSquare]:
            return worker.call(data, resize, max_pixels, max_scans, reserve, out)

        self._count(+1)
        try:
            for _ in range(3):
                worker = await self._take()
                try:
                    return await self._task(worker, call)
                except _NotHandedOver:
                    log.warning("decode worker %s gone before it had the image: retried", worker.process.pid)
            raise DecodersUnavailable("server cannot decode images now: its decode workers keep dying")
        finally:
            self._count(-1)
            if held:
                budget.release(held)

    async def _task(
        self, worker: _Worker, call: Callable[[_Worker], Awaitable[DecodedSquare]]
    ) -> DecodedSquare:
        """One image on ``worker``; then the worker is idle again if fine, else killed and replaced,
        on every path (a cancellation at any await too: its reply would go to the next task)."""
        fine = False
        try:
            try:
                async with cpu_cap(worker.process.pid, self.timeout_s):
                    result = await call(worker)
            except (ImageInputError, _Declined) as refused:  # by the decoder or the budget: it is fine
                fine = True
                raise refused.reason if isinstance(refused, _Declined) else refused from None
            except TimeoutError:
                self.metrics.rejected.labels("decode_time").inc()
                cap_s = self.timeout_s
                raise ImageInputError(
                    413, f"image too costly: decoding it took over {cap_s:g} s of CPU time (the server's cap)"
                ) from None
            except (EOFError, OSError):  # the decoder crashed or ran out of memory: not the server's fault
                how = await asyncio.to_thread(worker.exit_description)
                raise ImageInputError(422, f"image could not be decoded: the decoder died ({how})") from None
            fine = True
            return result
        finally:
            if fine:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)
