"""Real image bytes for tests: scikit-learn's shipped photos, and made-to-order files; and the
forms a test sends them in (a model's input batch, a v2 BYTES input)."""

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from alexnet_core.session import OnnxClassifier
from benchmarks.images import encoded as encode
from benchmarks.images import photo

__all__ = [
    "base64_input",
    "big_photo_jpeg",
    "encode",
    "many_scans_jpeg",
    "model_batch",
    "photo",
    "photo_jpeg",
]


def photo_jpeg(name: str = "china.jpg", quality: int = 90) -> bytes:
    return encode(photo(name), "JPEG", quality=quality)


def big_photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP photo-like JPEG: the real photo upscaled, with sensor-like noise."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(photo().resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def model_batch(classifier: OnnxClassifier, images: list[bytes]) -> np.ndarray:
    """The model's input for ``images``: the service's preprocessing with the model's own sizes
    and normalisation."""
    meta = classifier.metadata
    return np.concatenate([meta.preprocess(data, max_pixels=10**8).batch for data in images])


def base64_input(images: list[bytes]) -> dict[str, Any]:
    """The images as the v2 protocol's ``image_bytes`` input in plain JSON (base64 strings)."""
    return {
        "name": "image_bytes",
        "datatype": "BYTES",
        "shape": [len(images)],
        "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(data).decode() for data in images],
    }


def many_scans_jpeg(scans: int) -> bytes:
    """A valid progressive JPEG whose smallest scan is repeated: libjpeg decodes every one of them
    (each a full pass over the image) and only warns about the repeated progression."""
    buffer = io.BytesIO()
    photo().save(buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    segments = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    smallest = min(segments, key=len)
    return data[:-2] + smallest * (scans - len(segments)) + b"\xff\xd9"
