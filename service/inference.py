"""Admission control and dynamic batching in front of the ONNX Runtime session.

Requests are admitted by image count (backpressure: a full queue is refused at once, before any
decoding), then their crops go to one inference thread that gathers whatever other requests are
waiting, up to ``max_batch_images``, waiting at most ``max_batch_delay`` for more and only while
admitted images are still being decoded (Triton's dynamic batcher in miniature). One thread is
enough: ONNX Runtime parallelises inside each call.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import numpy as np

from alexnet_core.session import OnnxClassifier
from service.core.metrics import Metrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the client should retry later."""


@dataclass
class InferenceResult:
    probabilities: np.ndarray  # (images, classes)
    seconds: float  # the inference call this request was part of
    batch_images: int  # images in that call, this request's and others'


@dataclass
class Admission:
    """A request's places in the queue; ``decoding`` until its crops are handed to the batcher."""

    images: int
    decoding: bool = True


@dataclass
class _Job:
    classifier: OnnxClassifier
    batch: np.ndarray  # the model's input for this request's images
    images: int
    future: "asyncio.Future[InferenceResult]"
    loop: asyncio.AbstractEventLoop


def _resolve(future: "asyncio.Future[InferenceResult]", value: InferenceResult | BaseException) -> None:
    if future.done():  # the request timed out or its client went away meanwhile
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _answer(job: _Job, value: InferenceResult | BaseException) -> None:
    """From the batcher thread: resolve ``job``'s future on its event loop."""
    with contextlib.suppress(RuntimeError):  # its loop is closed: no one waits for the answer
        job.loop.call_soon_threadsafe(_resolve, job.future, value)


# The stop signal in the job queue: an object of its own, so that "stop" can never be mistaken
# for "nothing held" (None) while the batcher's window is open.
_STOP = object()


class InferenceQueue:
    def __init__(
        self,
        metrics: Metrics,
        *,
        batching: bool,
        max_batch_images: int,
        max_batch_delay_s: float,
        max_queue_images: int,
    ) -> None:
        self.metrics = metrics
        self.batching = batching
        self.max_batch_images = max_batch_images
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_images = max_queue_images
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._held: _Job | None = None  # taken in a window but left for the next call
        self._stopping = False  # set under the lock: no job is queued after the stop signal
        self._gathered: list[_Job] = []  # the batch in hand when the stop signal came
        self._admitted = 0
        self._decoding = 0  # admitted images not yet handed to the batcher: the ones worth waiting for
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None  # the last joined batch's memory, reused by the next
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

    @property
    def admitted(self) -> int:
        return self._admitted

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the batcher: what has not run yet is answered 503 (shutting down), at once."""
        with self._lock:
            self._stopping = True
            self._jobs.put(_STOP)
        if not self._thread.is_alive():  # never started, or ended: no one else will answer them
            self._fail_pending()
            return
        self._thread.join(timeout=30)  # at most the inference call in progress
        if self._thread.is_alive():
            log.warning("the inference thread is still in an inference call; not waiting for it")

    def _refuse(self) -> Overloaded:
        self.metrics.rejected.labels("queue_full").inc()
        return Overloaded(f"server busy: {self._admitted} images in progress, limit {self.max_queue_images}")

    def check_room(self) -> None:
        """Raise ``Overloaded`` when not even one more image fits: lets a request be refused
        before its body is read (the admission itself happens in ``admit``)."""
        if self._admitted >= self.max_queue_images:
            raise self._refuse()

    @contextmanager
    def admit(self, images: int) -> Iterator[Admission]:
        """Hold ``images`` places in the queue for the whole request (decode, queue, inference)."""
        with self._lock:
            if self._admitted + images > self.max_queue_images:
                raise self._refuse()
            self._admitted += images
            self._decoding += images
            self.metrics.queue_images.set(self._admitted)
        admission = Admission(images)
        try:
            yield admission
        finally:
            with self._lock:
                self._admitted -= images
                if admission.decoding:  # failed or timed out before reaching the batcher
                    self._decoding -= images
                self.metrics.queue_images.set(self._admitted)

    @asynccontextmanager
    async def admit_within(self, images: int, timeout_s: float) -> AsyncIterator[Admission]:
        """``admit``, and the request's work within its time limit: past it, ``Overloaded`` (a 503
        with Retry-After), counted as a timeout."""
        with self.admit(images) as admission:
            try:
                async with asyncio.timeout(timeout_s):
                    yield admission
            except TimeoutError:
                self.metrics.rejected.labels("timeout").inc()
                raise Overloaded(
                    f"timed out after {timeout_s:g} s waiting for inference: server overloaded"
                ) from None

    async def infer(
        self, admission: Admission, classifier: OnnxClassifier, batch: np.ndarray
    ) -> InferenceResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResult] = loop.create_future()
        with self._lock:  # queued and no longer decoding in one step, as the batcher sees it
            if self._stopping:
                raise Overloaded("server shutting down: retry on another replica")
            self._jobs.put(_Job(classifier, batch, admission.images, future, loop))
            self._decoding -= admission.images
            admission.decoding = False
        return await future

    def _get(self, deadline: float | None) -> _Job | None:
        """The next job whose request still waits for it, or None for the stop signal; past
        ``deadline`` (None: wait for ever), ``queue.Empty``."""
        while True:
            if deadline is None:
                item = self._jobs.get()
            else:  # past the deadline, still take whatever is already waiting
                remaining = deadline - time.monotonic()
                item = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            if not isinstance(item, _Job):  # the stop signal
                return None
            if not item.future.done():  # else its request timed out or went away: drop it
                return item

    def _next_batch(self) -> list[_Job] | None:
        """The next call's jobs; None once the stop signal is read (what was gathered is then
        answered by ``_fail_pending``)."""
        first = self._held if self._held is not None else self._get(None)
        self._held = None
        if first is None:
            return None
        batch, images = [first], first.images
        deadline = time.monotonic() + self.max_batch_delay_s
        while self.batching and images < self.max_batch_images:
            # Wait only while admitted images are still being decoded: with none on the way (a lone
            # client) the call starts at once instead of idling for the whole delay.
            with self._lock:
                coming = self._decoding
            try:
                job = self._get(deadline if coming > 0 else 0.0)
            except queue.Empty:
                break
            if job is None:
                self._gathered = batch
                return None
            # A job for another model (after a swap) or one that would overfill waits for the next call.
            if job.classifier is not first.classifier or images + job.images > self.max_batch_images:
                self._held = job
                break
            batch.append(job)
            images += job.images
        return batch

    def _serve(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                batch = [job for job in batch if not job.future.done()]
                if batch:
                    self._run(batch)
        except Exception:  # logged here; the requests waiting are answered below
            log.exception("the inference thread failed")
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        """Answer every job not run (gathered, held or queued) with a 503: the batcher has stopped."""
        with self._lock:
            self._stopping = True  # also when the thread ended on an error: refuse what comes next
        pending: list[_Job | object | None] = [*self._gathered, self._held]
        self._gathered, self._held = [], None
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if isinstance(job, _Job):
                _answer(job, Overloaded("server shutting down: retry on another replica"))

    def _joined(self, parts: list[np.ndarray]) -> np.ndarray:
        """The requests' inputs as one array, in a buffer kept between calls: a batch is up to
        tens of MB, which a fresh allocation would map and fault in again for every call. Safe to
        reuse: the session has returned (and its outputs are new arrays) before the next call."""
        if len(parts) == 1:
            return parts[0]
        rows, tail, dtype = sum(len(p) for p in parts), parts[0].shape[1:], parts[0].dtype
        buffer = self._buffer
        if buffer is None or buffer.shape[1:] != tail or buffer.dtype != dtype or len(buffer) < rows:
            buffer = self._buffer = np.empty((rows, *tail), dtype)
        return np.concatenate(parts, out=buffer[:rows])

    def _run(self, batch: list[_Job]) -> None:
        classifier = batch[0].classifier
        images = sum(job.images for job in batch)
        started = time.perf_counter()
        try:
            probabilities = classifier.probabilities(self._joined([job.batch for job in batch]))
        except Exception as exc:
            log.exception("inference failed for a batch of %d images", images)
            for job in batch:
                _answer(job, RuntimeError(f"inference failed: {exc}"))
            return
        seconds = time.perf_counter() - started
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_images.observe(images)
        offset = 0
        for job in batch:
            result = InferenceResult(probabilities[offset : offset + job.images], seconds, images)
            offset += job.images
            _answer(job, result)
