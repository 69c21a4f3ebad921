"""An image's trip from uploaded bytes to the model's input, for every route that takes images
(/predict, the Open Inference Protocol's BYTES input): weighed from its header, reserved against
the server-wide decode budget, decoded in a killable worker process, cut into the model's input.
A request's work is cancelled with the request (a failure, a timeout, a client gone away)."""

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException, Request, UploadFile, status

from alexnet_core.images import ImageInputError
from alexnet_core.metadata import ModelMetadata
from service.admission import DecodeBudget
from service.core.config import Settings
from service.core.metrics import Metrics
from service.decoding import DecodedSquare, DecodePool, DecodersUnavailable
from service.image_admission import ServiceUnavailable

T = TypeVar("T")


async def read_uploads(uploads: list[UploadFile], max_files: int) -> tuple[list[bytes], list[str]]:
    """A request's uploaded images (1 to ``max_files``, else 400) as bytes, and the prefix that
    names each one in an error. The uploads are already in memory: reading them is no I/O."""
    if not uploads:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "no image: send one as form field `file` or several as `files`"
        )
    if len(uploads) > max_files:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"too many files: {len(uploads)}, at most {max_files} per request"
        )
    data = [await upload.read() for upload in uploads]
    labels = [f"file {upload.filename!r}: " if upload.filename else "" for upload in uploads]
    return data, labels


class Preparation:
    """One request's images on their way to the batcher: weighed from their headers and decoded
    in a worker, their decode memory reserved against the budget in between, cut into the model's
    input. They run as one task group, so the first failure cancels the others (and kills their
    decodes)."""

    def __init__(self, settings: Settings, pool: Executor, decoder: DecodePool, budget: DecodeBudget) -> None:
        self.settings, self.pool, self.decoder, self.budget = settings, pool, decoder, budget

    async def decoded_square(
        self, meta: ModelMetadata, data: bytes, label: str = "", out: np.ndarray | None = None
    ) -> DecodedSquare:
        """The image's central square (into ``out`` when given), with its decode and square seconds.
        ``label`` prefixes an error's detail (which file of the request it was)."""
        settings = self.settings
        try:
            return await self.decoder.decode_square(
                data, meta.resize_size, settings.max_pixels, settings.max_jpeg_scans, self.budget, out=out
            )
        except ImageInputError as exc:
            raise ImageInputError(exc.status_code, label + exc.detail) from None
        except DecodersUnavailable as exc:  # the server's state: 503 + Retry-After
            raise ServiceUnavailable(str(exc)) from None

    async def model_input(self, meta: ModelMetadata, squares: list[np.ndarray]) -> np.ndarray:
        """``input_batch``; a crops-kind model's crops cut in the pool's threads (numpy lets go of
        the GIL), a square-kind's batch made here (a view: not worth a thread hand-off)."""
        if meta.input_kind == "square":
            return input_batch(meta, squares)
        return await asyncio.get_running_loop().run_in_executor(self.pool, input_batch, meta, squares)

    async def decoded_squares(
        self, meta: ModelMetadata, images: list[bytes], labels: list[str], outs: list[np.ndarray | None]
    ) -> list[DecodedSquare]:
        """All of a request's squares (each decoded into its ``outs`` where given: a front's shared
        slots), with their decode and square seconds, as one task group: the first failure cancels
        the others (and kills their decodes)."""
        work = [self.decoded_square(meta, *args) for args in zip(images, labels, outs, strict=True)]
        return await together(work)


def input_batch(meta: ModelMetadata, squares: list[np.ndarray]) -> np.ndarray:
    """The model's input batch for these central squares: the squares themselves for a model that
    crops in its graph (a view for one image), else each one's normalised crops."""
    if meta.input_kind == "square":
        return squares[0][None] if len(squares) == 1 else np.stack(squares)
    return np.concatenate([meta.model_input(square) for square in squares])


async def together(work: "list[Coroutine[Any, Any, T]]") -> list[T]:
    """The results of ``work``, run as one task group: the first failure cancels the others."""
    if len(work) == 1:  # nothing to cancel beside it: no task to create
        return [await work[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in work]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: "asyncio.Task[T]", metrics: Metrics) -> T:
    """``work``'s result, or ``work`` cancelled (and a 499) once the client has gone away."""
    watcher = asyncio.create_task(disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        metrics.rejected.labels("disconnected").inc()
        raise HTTPException(499, "client closed the request: its work was cancelled")
    return work.result()
