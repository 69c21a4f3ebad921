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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alexnet_core.session import OnnxClassifier
from service.core.metrics import Metrics
from service.image_admission import Admission, ImageAdmission, ServiceUnavailable

__all__ = ["Admission", "InferenceQueue", "InferenceResult", "ServiceUnavailable"]

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    probabilities: np.ndarray  # (images, classes)
    seconds: float  # the inference call this request was part of
    batch_images: int  # images in that call, this request's and others'
    features: np.ndarray | None = None  # (images, dim) when asked for


Done = Callable[[InferenceResult | BaseException], None]


@dataclass
class _Job:
    classifier: OnnxClassifier
    batch: np.ndarray  # the model's input for this request's images
    images: int
    features: bool  # both outputs (one call gives both), else the probabilities only
    on_done: Done  # called once, from the batcher's thread: the result, or why there is none
    cancelled: Callable[[], bool]  # skipped if true when its batch is gathered


def _resolve(future: "asyncio.Future[InferenceResult]", value: InferenceResult | BaseException) -> None:
    if future.done():  # the request timed out or its client went away meanwhile
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable("server shutting down: retry on another replica")


# The stop signal in the job queue: an object of its own, so that "stop" can never be mistaken
# for "nothing held" (None) while the batcher's window is open.
_STOP = object()


class InferenceQueue:
    def __init__(
        self,
        metrics: Metrics,
        admission: ImageAdmission,
        *,
        batching: bool,
        max_batch_images: int,
        max_batch_delay_s: float,
    ) -> None:
        self.metrics = metrics
        self.admission = admission
        self.batching = batching
        self.max_batch_images = max_batch_images
        self.max_batch_delay_s = max_batch_delay_s
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._held: _Job | None = None  # taken in a window but left for the next call
        self._stopping = False  # set under the lock: no job is queued after the stop signal
        self._gathered: list[_Job] = []  # the batch in hand when the stop signal came
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None  # the last joined batch's memory, reused by the next
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

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

    def submit(
        self,
        classifier: OnnxClassifier,
        batch: np.ndarray,
        images: int,
        features: bool,
        on_done: Done,
        cancelled: Callable[[], bool],
    ) -> None:
        """Queue one request's input; ``on_done`` gets its result once (from the batcher's thread,
        or at once, here, when the batcher has stopped)."""
        with self._lock:
            if not self._stopping:
                self._jobs.put(_Job(classifier, batch, images, features, on_done, cancelled))
                return
        on_done(shutting_down())

    async def infer(
        self, admission: Admission, classifier: OnnxClassifier, batch: np.ndarray, features: bool = False
    ) -> InferenceResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResult] = loop.create_future()

        def on_done(value: InferenceResult | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: no one waits for it
                loop.call_soon_threadsafe(_resolve, future, value)

        self.submit(classifier, batch, admission.images, features, on_done, future.done)
        self.admission.handed_over(admission)
        return await future

    def _get(self, deadline: float | None) -> _Job | None:
        """The next job whose request still waits for it, or None for the stop signal; past
        ``deadline`` (None: wait for ever), ``queue.Empty``. A cancelled job is answered so."""
        while True:
            if deadline is None:
                item = self._jobs.get()
            else:  # past the deadline, still take whatever is already waiting
                remaining = deadline - time.monotonic()
                item = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            if not isinstance(item, _Job):  # the stop signal
                return None
            if not item.cancelled():
                return item
            item.on_done(asyncio.CancelledError())  # its request timed out or went away

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
            coming = self.admission.decoding.total
            try:
                job = self._get(deadline if coming > 0 else 0.0)
            except queue.Empty:
                break
            if job is None:
                self._gathered = batch
                return None
            # A job for another model (after a swap), of other outputs, or one that would overfill
            # waits for the next call.
            if (
                job.classifier is not first.classifier
                or job.features != first.features
                or images + job.images > self.max_batch_images
            ):
                self._held = job
                break
            batch.append(job)
            images += job.images
        return batch

    def _serve(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                running = []
                for job in batch:  # one look at each: a job is answered exactly once
                    if job.cancelled():
                        job.on_done(asyncio.CancelledError())
                    else:
                        running.append(job)
                if running:
                    self._run(running)
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
                job.on_done(shutting_down())

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
        classifier, features = batch[0].classifier, batch[0].features
        inputs = self._joined([job.batch for job in batch])
        images = sum(job.images for job in batch)
        started = time.perf_counter()
        vectors = None
        try:
            if features:
                probabilities, vectors = classifier.outputs(inputs)
            else:
                probabilities = classifier.probabilities(inputs)
        except Exception as exc:
            log.exception("inference failed for a batch of %d images", images)
            for job in batch:
                job.on_done(RuntimeError(f"inference failed: {exc}"))
            return
        seconds = time.perf_counter() - started
        self.metrics.inference_seconds.observe(seconds)
        self.metrics.batch_images.observe(images)
        offset = 0
        for job in batch:
            rows = slice(offset, offset + job.images)
            job.on_done(
                InferenceResult(
                    probabilities[rows], seconds, images, None if vectors is None else vectors[rows]
                )
            )
            offset += job.images
