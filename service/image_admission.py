"""Admission by image count, for the whole server: a request holds its images' places from before
its first decode until its answer, and is refused with 503 + Retry-After when they do not fit.

The counts are tallies (``service.tallies``): this process's own in a server of one process,
shared by the fronts and the engine otherwise. ``decoding`` counts the admitted images not yet
handed to the batcher: the batcher waits for more images only while some are on their way."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from service.core.metrics import Metrics
from service.tallies import LocalTally, Tally


class ServiceUnavailable(Exception):
    """The server cannot answer this request now, through no fault of the request (shutting down,
    no decoder, no engine): 503 + Retry-After."""


class Overloaded(ServiceUnavailable):
    """Too much work in progress to take this request (images admitted, decode memory)."""


class TimedOut(ServiceUnavailable):
    """The request's work did not finish within the server's request timeout."""


@dataclass
class Admission:
    """A request's places in the queue; ``decoding`` until its inputs are handed to the batcher."""

    images: int
    decoding: bool = True


class ImageAdmission:
    def __init__(
        self, metrics: Metrics, limit: int, admitted: Tally | None = None, decoding: Tally | None = None
    ) -> None:
        self.metrics = metrics
        self.limit = limit
        self.admitted = admitted or LocalTally()
        self.decoding = decoding or LocalTally()

    def _refuse(self) -> Overloaded:
        self.metrics.rejected.labels("queue_full").inc()
        return Overloaded(f"server busy: {self.admitted.total} images in progress, limit {self.limit}")

    def check_room(self) -> None:
        """Raise ``Overloaded`` when not even one more image fits: lets a request be refused
        before its body is read (the admission itself happens in ``admit``)."""
        if self.admitted.total >= self.limit:
            raise self._refuse()

    @contextmanager
    def admit(self, images: int) -> Iterator[Admission]:
        """Hold ``images`` places for the whole request (decode, queue, inference)."""
        if not self.admitted.try_add(images, self.limit):
            raise self._refuse()
        self.decoding.add(images)
        self.metrics.queue_images.set(self.admitted.own)
        admission = Admission(images)
        try:
            yield admission
        finally:
            self.admitted.add(-images)
            if admission.decoding:  # failed or timed out before reaching the batcher
                self.decoding.add(-images)
            self.metrics.queue_images.set(self.admitted.own)

    def handed_over(self, admission: Admission) -> None:
        """The request's inputs are with the batcher: no longer worth waiting for."""
        if admission.decoding:
            admission.decoding = False
            self.decoding.add(-admission.images)

    @asynccontextmanager
    async def admit_within(self, images: int, timeout_s: float) -> AsyncIterator[Admission]:
        """``admit``, and the request's work within its time limit: past it, ``TimedOut`` (a 503
        with Retry-After)."""
        with self.admit(images) as admission:
            try:
                async with asyncio.timeout(timeout_s):
                    yield admission
            except TimeoutError:
                self.metrics.rejected.labels("timeout").inc()
                raise TimedOut(
                    f"timed out after {timeout_s:g} s waiting for inference: server overloaded"
                ) from None
