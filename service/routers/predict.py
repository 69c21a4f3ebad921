from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request
from pydantic import BeforeValidator

from alexnet_core.pipeline import top_k
from service.deps import EngineDep, MetricsDep, ServedDep, SettingsDep, single_file_part
from service.preparation import read_uploads
from service.schemas import (
    ImagePrediction,
    ImageUpload,
    Prediction,
    PredictResponse,
    Timings,
    error_responses,
)

router = APIRouter(tags=["predict"])

ERRORS = error_responses(
    {
        400: "no file, an empty file, or too many files",
        413: "body over the upload limit, or an image over the pixel, scan, decode memory or time limit",
        415: "not an image in a supported format (JPEG, PNG, GIF, WebP, BMP, TIFF)",
        422: "truncated or corrupt image, or a bad parameter",
        503: "no model loaded, queue, decode or upload budget full, or timed out (see Retry-After)",
    }
)


def _no_empty_parts(value: object) -> object:
    # Swagger UI's "Try it out" sends an empty `files` text field when only `file` is set.
    return [part for part in value if part != ""] if isinstance(value, list) else value


# The upload fields of the routes that take images: one as `file`, several as `files`.
OneImage = Annotated[ImageUpload | None, File(description="one image")]
SeveralImages = Annotated[
    Annotated[list[ImageUpload], BeforeValidator(_no_empty_parts)] | None,
    # default []: Swagger UI starts with no item (else it sends its "string" placeholder)
    File(description="several images", json_schema_extra={"default": []}),
]


async def image_uploads(file: OneImage = None, files: SeveralImages = None) -> list[ImageUpload]:
    """A request's images, from both fields (``file`` first)."""
    return ([file] if file is not None else []) + (files or [])


Uploads = Annotated[list[ImageUpload], Depends(image_uploads)]


def top_k_predictions(
    probabilities: np.ndarray, k: int, labels: list[str], wnids: list[str | None]
) -> list[Prediction]:
    return [
        Prediction(index=i, wnid=wnids[i], label=labels[i], probability=p) for i, p in top_k(probabilities, k)
    ]


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    dependencies=[Depends(single_file_part)],
    summary="Top-k classes of one or more images (the paper's ten-crop average)",
    description="The softmax outputs of an image's crops, averaged: the paper's ten (corners, centre "
    "and their mirrors), or the five without mirrors for a model trained without flips (its "
    "`test_crops` in `GET /model`).",
)
async def predict(
    request: Request,
    model: ServedDep,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    uploads: Uploads,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes to return per image")] = 5,
) -> PredictResponse:
    data, labels = await read_uploads(uploads, settings.max_files)
    result = await engine.run(model, data, labels, cancel_on=request)
    meta = model.metadata
    metrics.images.inc(len(data))
    results = []
    for upload, probabilities, decode_s, preprocess_s in zip(
        uploads, result.probabilities, result.decode_s, result.preprocess_s, strict=True
    ):
        metrics.decode_seconds.observe(decode_s)
        metrics.preprocess_seconds.observe(preprocess_s)
        results.append(
            ImagePrediction(
                filename=upload.filename,
                predictions=top_k_predictions(probabilities, top_k, meta.labels, meta.wnids),
                timings=Timings(
                    decode_ms=decode_s * 1000,
                    preprocess_ms=preprocess_s * 1000,
                    inference_ms=result.seconds * 1000,
                    batch_images=result.batch_images,
                ),
            )
        )
    return PredictResponse(model_version=model.version, results=results)
