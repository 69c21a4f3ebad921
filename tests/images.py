"""Real image bytes for tests: scikit-learn's shipped photos, and made-to-order files."""

import io

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image


def photo(name: str = "china.jpg") -> Image.Image:
    """A real 640x427 photograph shipped with scikit-learn (china.jpg or flower.jpg)."""
    return Image.fromarray(load_sample_image(name))


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo_jpeg(name: str = "china.jpg", quality: int = 90) -> bytes:
    return encode(photo(name), "JPEG", quality=quality)


def big_photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP photo-like JPEG: the real photo upscaled, with sensor-like noise."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(photo().resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)
