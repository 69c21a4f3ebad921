"""Admission control and dynamic batching in front of the ONNX Runtime session.

Requests are admitted by image count (backpressure: a full queue is refused at once, before any
decoding), then their crops go to one inference thread that gathers whatever other requests are
waiting, up to ``max_batch_images``, waiting at most ``max_batch_delay`` for more and only while
admitted images are still being decoded (Triton's dynamic batcher in miniature). One thread is
enough: ONNX Runtime parallelises inside each call.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import numpy as np

from alexnet_core.session import OnnxClassifier
from service.core.metrics import Metrics
from service.image_admission import Admission, ImageAdmission, Overloaded

__all__ = ["Admission", "InferenceQueue", "InferenceResult", "Overloaded"]

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
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: _Job | None = None
        self._buffer: np.ndarray | None = None  # the last joined batch's memory, reused by the next
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

    @property
    def admitted(self) -> int:
        return self.admission.admitted.total

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def check_room(self) -> None:
        self.admission.check_room()

    def admit_within(self, images: int, timeout_s: float) -> AbstractAsyncContextManager[Admission]:
        return self.admission.admit_within(images, timeout_s)

    def submit(
        self,
        classifier: OnnxClassifier,
        batch: np.ndarray,
        images: int,
        features: bool,
        on_done: Done,
        cancelled: Callable[[], bool],
    ) -> None:
        """Queue one request's input; ``on_done`` gets its result (from the batcher's thread)."""
        self._jobs.put(_Job(classifier, batch, images, features, on_done, cancelled))

    async def infer(
        self, admission: Admission, classifier: OnnxClassifier, batch: np.ndarray, features: bool = False
    ) -> InferenceResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferenceResult] = loop.create_future()

        def on_done(value: InferenceResult | BaseException) -> None:
            loop.call_soon_threadsafe(_resolve, future, value)

        self.submit(classifier, batch, admission.images, features, on_done, future.done)
        self.admission.handed_over(admission)
        return await future

    def _next_batch(self) -> list[_Job] | None:
        first = self._held if self._held is not None else self._jobs.get()
        self._held = None
        if first is None:
            return None
        batch, images = [first], first.images
        deadline = time.monotonic() + self.max_batch_delay_s
        while self.batching and images < self.max_batch_images:
            # Wait only while admitted images are still being decoded: with none on the way (a lone
            # client) the call starts at once instead of idling for the whole delay.
            coming = self.admission.decoding.total
            remaining = deadline - time.monotonic() if coming > 0 else 0.0
            try:  # past the deadline, still take whatever is already waiting
                job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            # A job for another model (after a swap) or one that would overfill waits for the next call.
            if (
                job is None
                or job.classifier is not first.classifier
                or job.features != first.features
                or images + job.images > self.max_batch_images
            ):
                self._held = job
                break
            batch.append(job)
            images += job.images
        return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            for job in batch:
                if job.cancelled():
                    job.on_done(asyncio.CancelledError())
            batch = [job for job in batch if not job.cancelled()]
            if batch:
                self._run(batch)
        if self._held is not None:
            self._jobs.put(self._held)

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
