"""Real image bytes for tests: scikit-learn's shipped photos, and made-to-order files."""

import numpy as np
from PIL import Image

from benchmarks.images import encoded as encode
from benchmarks.images import photo

__all__ = ["big_photo_jpeg", "encode", "photo", "photo_jpeg"]


def photo_jpeg(name: str = "china.jpg", quality: int = 90) -> bytes:
    return encode(photo(name), "JPEG", quality=quality)


def big_photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12 MP photo-like JPEG: the real photo upscaled, with sensor-like noise."""
    rng = np.random.default_rng(0)
    pixels = np.asarray(photo().resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)
