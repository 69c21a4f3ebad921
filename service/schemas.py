"""Request and response models of the HTTP API (shared by routers, tests and OpenAPI)."""

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    detail: str = Field(
        examples=["not a supported image: the bytes are none of JPEG, PNG, GIF, WEBP, BMP, TIFF"]
    )


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path, then field names or indices")
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    """422: ``detail`` as for every error, plus the structured list for a request that failed
    validation (absent when the request was well-formed but its content was refused)."""

    errors: list[ValidationIssue] = Field(default_factory=list)


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output")
    wnid: str | None = Field(description="WordNet ID (ImageNet classes)")
    label: str
    probability: float = Field(ge=0, le=1, description="mean of the ten crops' softmax outputs")


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    inference_ms: float = Field(description="the inference call this image was part of")
    batch_images: int = Field(description="images in that call (dynamic batching gathers requests)")


class ImagePrediction(BaseModel):
    filename: str | None
    predictions: list[Prediction]
    timings: Timings


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "alexnet-torchvision-pretrained-20261123-101500-000000",
                    "results": [
                        {
                            "filename": "cat.jpg",
                            "predictions": [
                                {"index": 281, "wnid": "n02123045", "label": "tabby", "probability": 0.61},
                                {
                                    "index": 282,
                                    "wnid": "n02123159",
                                    "label": "tiger cat",
                                    "probability": 0.22,
                                },
                                {
                                    "index": 285,
                                    "wnid": "n02124075",
                                    "label": "Egyptian cat",
                                    "probability": 0.13,
                                },
                                {"index": 287, "wnid": "n02127052", "label": "lynx", "probability": 0.01},
                                {
                                    "index": 761,
                                    "wnid": "n04074963",
                                    "label": "remote control",
                                    "probability": 0.004,
                                },
                            ],
                            "timings": {
                                "decode_ms": 2.1,
                                "preprocess_ms": 1.6,
                                "inference_ms": 74.0,
                                "batch_images": 1,
                            },
                        }
                    ],
                }
            ]
        }
    )
    model_version: str
    results: list[ImagePrediction]


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    providers: list[str] = []
    reason: str | None = Field(None, description="why not ready, and what to do")


class ModelInfo(BaseModel):
    version: str
    layout: str
    num_classes: int
    labels_sample: list[str] = Field(description="the first ten class labels")
    source: str
    source_sha256: str | None
    trained: bool
    sha256: str = Field(description="SHA-256 of the ONNX file in service")
    file: str
    input_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    exported_at: datetime
    validation_top1: float | None
    validation_top5: float | None
    providers_requested: list[str]
    providers: list[str] = Field(description="what the ONNX Runtime session really runs on")
    available_versions: list[str]
    members: list[str] = Field(
        default_factory=list, description="for an ensemble: the versions whose softmax outputs it averages"
    )


class ActivateRequest(BaseModel):
    version: str = Field(description="a model version (file stem) in the weights directory", max_length=255)


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"  # the server stopped while it ran; resumable


class TrainRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"dataset": "digits", "epochs": 10, "batch_size": 64, "input_size": 64, "activate": True}
            ]
        },
    )
    dataset: str = Field(
        min_length=1,
        max_length=255,
        description="image folder relative to ALEXNET_DATA_ROOT (with train/ and val/)",
    )
    epochs: int = Field(10, ge=1, le=500)
    batch_size: int = Field(128, ge=1, le=1024)
    lr: float = Field(0.01, gt=0, le=1)
    lr_schedule: str | None = Field(
        None,
        max_length=500,
        pattern=r"^\s*\d+:[0-9.eE+-]+(\s*,\s*\d+:[0-9.eE+-]+)*\s*$",
        description="explicit per-epoch learning rates, e.g. 0:5e-4,2:2e-4,5:5e-5 "
        "(default: divide by 10 on plateau)",
    )
    layout: Literal["paper", "torchvision"] = "paper"
    init: Literal["paper", "caffe", "default"] = Field(
        "caffe", description="caffe learns out of the box; paper (bias 1) stays at chance, see README"
    )
    input_scaling: Literal["paper", "imagenet"] = Field(
        "paper", description="paper: 0-255 minus the channel mean; imagenet: mean/std normalised"
    )
    input_size: int = Field(224, ge=64, le=512, description="crop side (64 at least)")
    resize_size: int | None = Field(
        None, ge=32, le=1024, description="shorter side before cropping; default input_size x 256/224"
    )
    flip: bool = Field(True, description="random horizontal flips (off where mirroring changes the class)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    target_top1: float | None = Field(
        None, gt=0, le=1, description="stop early once validation top-1 (centre crop) reaches this fraction"
    )
    activate: bool = Field(False, description="serve the model when the job succeeds")


class TrainingJob(BaseModel):
    id: str
    state: JobState
    url: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: TrainRequest
    epoch: int | None = Field(None, description="epochs completed")
    epochs: int
    step: int | None = None
    total_steps: int | None = None
    progress: float = Field(0.0, ge=0, le=1, description="fraction of the training steps done")
    eta_s: float | None = Field(None, description="estimated seconds to the end of training")
    loss: float | None = Field(None, description="latest training loss")
    val_top1: float | None = Field(None, description="latest validation top-1 (centre crop)")
    val_top5: float | None = None
    val10_top1: float | None = Field(None, description="final validation top-1 with the service's ten crops")
    error: str | None = None
    model_version: str | None = None
    activated: bool = False
    curves_url: str | None = None


class TrainingMetrics(BaseModel):
    id: str
    epochs: list[dict[str, float | int | None]] = Field(description="one record per epoch")
    steps: list[dict[str, float | int | None]] = Field(description="training loss and lr every few steps")
