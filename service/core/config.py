"""Settings from the environment (prefix ``ALEXNET_``); every one is listed in the README."""

import os
from functools import cache
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import NoDecode

from alexnet_core.settings import CommonSettings


def _split(value: object) -> object:
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


CommaList = Annotated[list[str], NoDecode]


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class Settings(CommonSettings):
    # Model (weights_dir and data_root: CommonSettings, shared with the export and training CLIs)
    model: str | None = Field(
        None,
        description="version (file stem) or file name in weights_dir to serve; default: the "
        "activated one, else the newest *.onnx",
    )
    providers: CommaList = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference (comma-separated)",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per call; 0 = one per core")

    # Input limits
    max_upload_mb: float = Field(20.0, gt=0, description="largest request body, checked while reading")
    max_pixels: int = Field(64_000_000, gt=0, description="largest image (width x height) decoded")
    max_files: int = Field(16, ge=1, description="most images in one /predict request")

    # Concurrency, batching, backpressure
    preprocess_threads: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        description="threads that decode and crop images (off the event loop)",
    )
    batching: bool = Field(True, description="gather concurrent requests into one inference call")
    max_batch_images: int = Field(8, ge=1, description="most images (x10 crops) in one inference call")
    max_batch_delay_ms: float = Field(
        10.0, ge=0, description="longest wait for more images to batch, while admitted ones still decode"
    )
    max_queue_images: int = Field(
        64,
        ge=1,
        description="images admitted (decoding, queued or running) before 503 + Retry-After",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for its result")

    # Training and model management
    api_key: SecretStr | None = Field(
        None,
        description="bearer key for /train and /model/activate; unset = those answer 403",
    )

    # Feature search (/embed, /gallery, /similar)
    gallery_max_items: int = Field(
        10_000, ge=1, description="most images in one model's gallery (16 KiB of vector each in memory)"
    )

    # HTTP
    host: str = Field("127.0.0.1", description="alexnet-serve bind address")
    port: int = Field(8000, description="alexnet-serve port")
    cors_origins: CommaList = Field([], description="origins allowed by CORS; empty = CORS off")
    # A closed list: anything else failed at start-up with "Unknown level" from logging.
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        "info", description="debug, info, warning, error"
    )

    @model_validator(mode="before")
    @classmethod
    def _comma_lists(cls, data: dict[str, object]) -> dict[str, object]:
        for key in ("providers", "cors_origins"):
            if key in data:
                data[key] = _split(data[key])
        return data

    @model_validator(mode="after")
    def _limits_fit(self) -> "Settings":
        if self.max_files > self.max_queue_images:
            raise ValueError("max_files must not exceed max_queue_images, or such requests never fit")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@cache
def get_settings() -> Settings:
    return Settings()
