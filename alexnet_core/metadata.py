"""What an exported model file says about itself, in the ONNX ``metadata_props``.

Written by the export stage, read by the service: one schema for both sides, so that a model
file is all the service needs to serve it correctly (labels, sizes, normalisation, provenance).
Each field is stored under its own key as JSON, readable in Netron or ``onnx.load``.
"""

import json
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from alexnet_core.pipeline import N_CROPS, Preprocessed, input_rows, preprocess

FORMAT = "alexnet-serve/1"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ModelMetadata(BaseModel):
    format: str = FORMAT
    version: str = Field(description="unique name of this export; also the file's stem")
    layout: str = Field(description="'paper' or 'torchvision'")
    labels: list[str]
    wnids: list[str | None] = Field(description="WordNet ID of each class, where it has one")
    input_size: int = Field(224, description="side of the square crops the network takes")
    resize_size: int = Field(256, description="shorter side before the central square is cut")
    mean: list[float] = Field(description="per-channel mean, on pixel values scaled to [0, 1]")
    std: list[float] = Field(description="per-channel std, on pixel values scaled to [0, 1]")
    source: str = Field(description="where the weights came from: pretrained, checkpoint, random")
    source_sha256: str | None = Field(None, description="SHA-256 of the weights file, if any")
    trained: bool = Field(description="false for random weights: predictions are meaningless")
    exported_at: datetime
    validation_top1: float | None = None
    validation_top5: float | None = None
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_kind: Literal["crops", "square"] = Field(
        "crops",
        description="crops: float32 (N*test_crops, 3, C, C) normalised crops in, logits out; square: "
        "uint8 (N, S, S, 3) central squares in, the crops' mean probabilities (N, classes) out",
    )
    train_flip: bool | None = Field(
        None,
        description="whether training mirrored its images at random; null where not recorded "
        "(pretrained or random weights, files exported before the record)",
    )
    test_crops: Literal[5, 10] = Field(
        N_CROPS,
        description="crops averaged per image: 10, the paper's four corners and centre and their "
        "mirrors; 5, the same without mirrors, for a model trained without flips (train_flip false)",
    )
    features_output: str | None = Field(
        None, description="name of the output holding each image's 4096-d feature vector, if any"
    )
    precision_check: dict[str, Any] | None = Field(
        None,
        description="for a precision variant checked at export: its agreement with its source (top-1, "
        "largest |delta p|, the bounds, the image set, passed)",
    )
    members: list[str] = Field(
        default_factory=list, description="for an ensemble: the versions whose probabilities it averages"
    )

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def rows_per_image(self) -> int:
        """Rows of the model's input batch one image takes: its crops (ten or five), or one square."""
        return 1 if self.input_kind == "square" else self.test_crops

    def model_input(self, square: np.ndarray) -> np.ndarray:
        """An image's central (S, S, 3) uint8 square -> this model's input rows for it: the square
        itself for a model that crops in its graph, else its normalised crops (ten, or five)."""
        return input_rows(
            square,
            self.input_size,
            self.mean,
            self.std,
            square_only=self.input_kind == "square",
            crops=self.test_crops,
        )

    def preprocess(self, data: bytes, *, max_pixels: int) -> Preprocessed:
        """Image bytes -> what this model's input takes for one image, with its own sizes and
        normalisation: its crops, or the central square for a model that crops in its graph.
        ``.batch`` of several images concatenate along axis 0 into one input batch."""
        return preprocess(
            data,
            resize=self.resize_size,
            crop=self.input_size,
            mean=self.mean,
            std=self.std,
            max_pixels=max_pixels,
            square_only=self.input_kind == "square",
            crops=self.test_crops,
        )

    def to_props(self) -> dict[str, str]:
        return {key: json.dumps(value) for key, value in self.model_dump(mode="json").items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        if json.loads(props.get("format", "null")) != FORMAT:
            raise ValueError(
                "the model file carries no alexnet-serve metadata (labels, sizes, normalisation); "
                "export it with `alexnet-export`"
            )
        return cls.model_validate({k: json.loads(v) for k, v in props.items() if k in cls.model_fields})
