import asyncio
import functools
import time
from concurrent.futures import Executor
from typing import Annotated, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile, status
from pydantic import BeforeValidator

from alexnet_core.images import ImageInputError, decode_cost
from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import Preprocessed, ten_crop, top_k
from service.admission import DecodeBudget
from service.core.config import Settings
from service.core.metrics import Metrics
from service.decoding import DecodePool
from service.deps import (
    ClassifierDep,
    DecodeBudgetDep,
    DecoderDep,
    MetricsDep,
    PoolDep,
    QueueDep,
    SettingsDep,
    single_file_part,
)
from service.inference import InferenceResult
from service.schemas import (
    ErrorResponse,
    ImagePrediction,
    ImageUpload,
    Prediction,
    PredictResponse,
    Timings,
    ValidationErrorResponse,
)

router = APIRouter(tags=["predict"])
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ValidationErrorResponse if code == 422 else ErrorResponse, "description": text}
    for code, text in {
        400: "no file, an empty file, or too many files",
        413: "body over the upload limit, or an image over the pixel, scan, decode memory or time limit",
        415: "not an image in a supported format (JPEG, PNG, GIF, WebP, BMP, TIFF)",
        422: "truncated or corrupt image, or a bad parameter",
        503: "no model loaded, queue, decode or upload budget full, or timed out (see Retry-After)",
    }.items()
}


def _no_empty_parts(value: object) -> object:
    # Swagger UI's "Try it out" sends an empty `files` text field when only `file` is set.
    return [part for part in value if part != ""] if isinstance(value, list) else value


def top_k_predictions(
    probabilities: np.ndarray, k: int, labels: list[str], wnids: list[str | None]
) -> list[Prediction]:
    return [
        Prediction(index=i, wnid=wnids[i], label=labels[i], probability=p) for i, p in top_k(probabilities, k)
    ]


def model_batch(meta: ModelMetadata, square: np.ndarray) -> np.ndarray:
    """A central square -> what the model takes: itself, or the ten normalised crops."""
    if meta.input_kind == "square":
        return square[None]
    return ten_crop(square, meta.input_size, meta.mean, meta.std)


class Preparation:
    """One request's images on their way to the batcher: weighed from their headers, reserved
    against the decode budget, decoded in a worker, cut into the model's input. They run as one
    task group, so the first failure cancels the others (and kills their decodes)."""

    def __init__(
        self,
        meta: ModelMetadata,
        settings: Settings,
        pool: Executor,
        decoder: DecodePool,
        budget: DecodeBudget,
    ) -> None:
        self.meta, self.settings, self.pool, self.decoder, self.budget = meta, settings, pool, decoder, budget

    async def one(self, upload: UploadFile) -> Preprocessed:
        data = await upload.read()
        loop = asyncio.get_running_loop()
        resize, max_pixels = self.meta.resize_size, self.settings.max_pixels
        try:
            cost = await loop.run_in_executor(
                self.pool, decode_cost, data, resize, max_pixels, self.settings.max_jpeg_scans
            )
            self.budget.reserve(cost.bytes)
            # Reserved until the worker's task really ends, which may be after this coroutine's.
            release = functools.partial(self.budget.release, cost.bytes)
            square, decode_s, square_s = await self.decoder.square(data, resize, max_pixels, release)
        except ImageInputError as exc:
            name = f"file {upload.filename!r}: " if upload.filename else ""
            raise ImageInputError(exc.status_code, name + exc.detail) from None
        started = time.perf_counter()
        batch = await loop.run_in_executor(self.pool, model_batch, self.meta, square)
        return Preprocessed(batch, decode_s, square_s + time.perf_counter() - started)

    async def all(self, uploads: list[UploadFile]) -> list[Preprocessed]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.one(upload)) for upload in uploads]
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


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    dependencies=[Depends(single_file_part)],
    summary="Top-k classes of one or more images (the paper's ten-crop average)",
)
async def predict(
    request: Request,
    classifier: ClassifierDep,
    settings: SettingsDep,
    inference: QueueDep,
    pool: PoolDep,
    metrics: MetricsDep,
    decoder: DecoderDep,
    budget: DecodeBudgetDep,
    file: Annotated[ImageUpload | None, File(description="one image")] = None,
    files: Annotated[
        Annotated[list[ImageUpload], BeforeValidator(_no_empty_parts)] | None,
        # default []: Swagger UI starts with no item (else it sends its "string" placeholder)
        File(description="several images", json_schema_extra={"default": []}),
    ] = None,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes to return per image")] = 5,
) -> PredictResponse:
    uploads = ([file] if file is not None else []) + (files or [])
    if not uploads:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "no image: send one as form field `file` or several as `files`"
        )
    if len(uploads) > settings.max_files:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"too many files: {len(uploads)}, at most {settings.max_files} per request",
        )
    meta = classifier.metadata
    preparation = Preparation(meta, settings, pool, decoder, budget)

    async def work() -> tuple[list[Preprocessed], InferenceResult]:
        with inference.admit(len(uploads)) as admission:
            try:
                async with asyncio.timeout(settings.request_timeout_s):
                    images = await preparation.all(uploads)
                    batch = images[0].batch if len(images) == 1 else np.concatenate([i.batch for i in images])
                    return images, await inference.infer(admission, classifier, batch)
            except TimeoutError:
                metrics.rejected.labels("timeout").inc()
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"timed out after {settings.request_timeout_s:g} s waiting for inference: "
                    "server overloaded",
                    headers={"Retry-After": "1"},
                ) from None

    images, result = await unless_disconnected(request, asyncio.create_task(work()), metrics)
    metrics.images.inc(len(images))
    results = []
    for upload, image, probabilities in zip(uploads, images, result.probabilities, strict=True):
        metrics.decode_seconds.observe(image.decode_s)
        metrics.preprocess_seconds.observe(image.preprocess_s)
        results.append(
            ImagePrediction(
                filename=upload.filename,
                predictions=top_k_predictions(probabilities, top_k, meta.labels, meta.wnids),
                timings=Timings(
                    decode_ms=image.decode_s * 1000,
                    preprocess_ms=image.preprocess_s * 1000,
                    inference_ms=result.seconds * 1000,
                    batch_images=result.batch_images,
                ),
            )
        )
    return PredictResponse(model_version=classifier.version, results=results)
