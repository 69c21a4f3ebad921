"""Request and response models of the HTTP API (shared by routers, tests and OpenAPI)."""

from datetime import datetime
from typing import Annotated, Any

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, computed_field

from alexnet_core.metadata import ModelMetadata
from alexnet_core.training import JobProgress, JobState, TrainConfig, narrowed

__all__ = ["JobState"]  # re-exported: the job states are alexnet_core.training's

# An uploaded file as OpenAPI 3.1 and Swagger UI 5 both read it: pydantic 2 describes one by
# contentMediaType only, and Swagger UI offers a file picker only for `format: binary`.
ImageUpload = Annotated[
    UploadFile,
    WithJsonSchema({"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}),
]


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


Responses = dict[int | str, dict[str, Any]]
# Error answers shared by several routes, for `error_responses`.
KEYED: dict[int, str | None] = {401: None, 403: None}  # the API key gate's refusals
BODY: dict[int, str | None] = {400: "a body that is not JSON", 413: "body over the upload limit"}


def error_responses(codes: dict[int, str | None]) -> Responses:
    """A route's documented errors (FastAPI ``responses``): each code answers ``ErrorResponse``
    (422: ``ValidationErrorResponse``, the app's validation shape), described where a text is given."""
    return {
        code: {"model": ValidationErrorResponse if code == 422 else ErrorResponse}
        | ({"description": text} if text is not None else {})
        for code, text in codes.items()
    }


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output")
    wnid: str | None = Field(description="WordNet ID (ImageNet classes)")
    label: str
    probability: float = Field(
        ge=0, le=1, description="mean of the crops' softmax outputs (ten, or five for a model without flips)"
    )


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


class ModelInfo(ModelMetadata):
    """The model in service: the metadata its file carries (less the full label lists) and what
    the server made of it."""

    model_config = ConfigDict(protected_namespaces=())
    # The full lists (1000 entries for ImageNet) stay out of the answer: see labels_sample.
    labels: list[str] = Field(exclude=True)
    wnids: list[str | None] = Field(exclude=True)
    sha256: str = Field(description="SHA-256 of the ONNX file in service")
    file: str
    integrity: str = Field(
        description="verified: the file matches the SHA-256 recorded at export; unverified: no record"
    )
    providers_requested: list[str]
    providers: list[str] = Field(description="what the ONNX Runtime session really runs on")
    available_versions: list[str] = Field(description="models in the weights directory (by file stem)")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def labels_sample(self) -> list[str]:
        """The first ten class labels."""
        return self.labels[:10]


class ActivateRequest(BaseModel):
    version: str = Field(description="a model version (file stem) in the weights directory", max_length=255)


def _api(name: str, **changes: object) -> Any:
    return narrowed(TrainConfig, name, **changes)


class TrainRequest(TrainConfig):
    """``POST /train``: the training parameters (``alexnet_core.training.TrainConfig``), a dataset
    under the data root, and whether to serve the result. The bounds here are the API's, tighter
    than the trainer's, so that one request cannot ask for days of work or gigabytes of memory."""

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
    epochs: int = _api("epochs", default=10, le=500)
    batch_size: int = _api("batch_size", le=1024)
    lr: float = _api("lr", le=1)
    plateau_patience: int = _api("plateau_patience", le=100)
    input_size: int = _api("input_size", le=512)
    resize_size: int | None = _api("resize_size", le=1024)
    stats_images: int = _api("stats_images", le=100_000)
    seed: int = _api("seed", le=2**31 - 1)
    ray_workers: int = _api(
        "ray_workers",
        le=256,
        description="data-parallel training processes as Ray Train workers (the batch is split between "
        "them); more than 1 needs a server configured with a Ray cluster (ALEXNET_TRAIN_ON_RAY)",
    )
    activate: bool = Field(False, description="serve the model when the job succeeds")


class TrainingJob(JobProgress):
    id: str
    state: JobState
    url: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request: TrainRequest
    epochs: int
    error: str | None = None
    model_version: str | None = None
    activated: bool = False
    curves_url: str | None = None


class TrainingMetrics(BaseModel):
    id: str
    epochs: list[dict[str, float | int | None]] = Field(description="one record per epoch")
    steps: list[dict[str, float | int | None]] = Field(description="training loss and lr every few steps")
