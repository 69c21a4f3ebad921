"""Real image bytes for the benchmarks: scikit-learn's shipped photos, re-encoded or upscaled."""

import io
from typing import Any

import numpy as np
from PIL import Image


def photo(name: str = "china.jpg") -> Image.Image:
    """A real 640x427 photograph shipped with scikit-learn (china.jpg or flower.jpg)."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def encoded(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def big_jpeg(width: int = 4000, height: int = 3000, noise: float = 6.0) -> bytes:
    """A 12 MP JPEG made from the real photo (its central 4:3 part), upscaled with sensor-like
    noise added, so that it compresses and decodes like a camera's photo, not a smooth upscale."""
    source = photo()
    crop_width = source.height * 4 // 3
    left = (source.width - crop_width) // 2
    big = source.crop((left, 0, left + crop_width, source.height)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    rng = np.random.default_rng(0)
    pixels = np.asarray(big, dtype=np.int16) + rng.normal(0, noise, (height, width, 3)).astype(np.int16)
    return encoded(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def sample_images() -> dict[str, bytes]:
    """``small``: china.jpg (640x427) re-saved as JPEG; ``large``: the 12 MP JPEG above."""
    return {"small": encoded(photo(), "JPEG", quality=90), "large": big_jpeg()}


def digit_images(count: int) -> list[bytes]:
    """scikit-learn's handwritten digits (8x8, 0-16) as 64x64 grey PNGs: the images the digits
    model is trained and validated on, and a stand-in set of real inputs for other models."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for image in digits.images[:count]:
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize(
            (64, 64), Image.Resampling.NEAREST
        )
        out.append(encoded(grey, "PNG"))
    return out
