"""Request and response models of the HTTP API (shared by routers, tests and OpenAPI)."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    detail: str = Field(
        examples=["not a supported image: the bytes are none of JPEG, PNG, GIF, WEBP, BMP, TIFF"]
    )


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


class ActivateRequest(BaseModel):
    version: str = Field(description="a model version (file stem) in the weights directory", max_length=255)
