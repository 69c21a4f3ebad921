"""Image bytes -> the paper's ten crops, as one float32 batch. No torch.

decode (format from the bytes, JPEG draft mode) -> EXIF orientation -> RGB -> shorter side to
``resize`` (bilinear, antialiased, as torchvision's preset) -> central ``resize``x``resize`` ->
ten ``crop``x``crop`` crops: four corners, centre, and the horizontal mirror of each -> scaled to
[0, 1] and normalised with the model's mean/std -> (10, 3, crop, crop).

Training (model_export) and the service both use these functions, so that a model is validated
with exactly the preprocessing it is served with.
"""

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats read from the bytes' signature; the file name and declared content type are ignored.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
N_CROPS = 10
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class ImageInputError(ValueError):
    """A problem with the uploaded bytes, reported to the client as ``status_code``."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class Preprocessed:
    crops: np.ndarray  # (10, 3, crop, crop) float32
    decode_s: float
    preprocess_s: float


def sniff_format(data: bytes) -> str | None:
    """The format the leading bytes claim, so that a broken file of a known format is reported
    as corrupt (422) rather than as an unsupported format (415)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES.items() if data.startswith(magic)), None)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageInputError(
            413, f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageInputError(400, "empty file: the upload has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(413, f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        if (claimed := sniff_format(data)) is not None:
            raise ImageInputError(422, f"corrupt {claimed} file: its header cannot be read") from None
        raise ImageInputError(
            415, f"not a supported image: the bytes are none of {', '.join(FORMATS)}"
        ) from None
    except Exception as exc:  # a malformed header can raise almost anything from a plugin
        raise ImageInputError(422, f"corrupt image header: {exc}") from None
    _check_pixels(image.size, max_pixels)  # from the header, before any pixel is allocated
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparent pixels go onto white (their stored colour is
    often arbitrary); 16-bit and float images are scaled into 8 bits instead of being clipped."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode == "F":
            top = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, resize: int, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image whose shorter side is at least ``resize`` where the original's
    was (JPEGs are decoded at a reduced scale when they are much larger: draft mode)."""
    image = _open(data, max_pixels)
    try:
        if image.format == "JPEG":
            width, height = image.size
            shorter = min(width, height)
            if shorter >= 2 * resize:
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding; draft picks the smallest
                # result that is still at least the requested size.
                image.draft("RGB", (-(-width * resize // shorter), -(-height * resize // shorter)))
        image.load()  # first frame of animations; raises on truncated data
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(422, f"corrupt or truncated image data: {exc}") from None
    except Exception as exc:
        raise ImageInputError(422, f"image could not be decoded: {type(exc).__name__}: {exc}") from None


def resize_center(image: Image.Image, resize: int) -> np.ndarray:
    """Shorter side to ``resize`` (torchvision's Resize), then the central square (CenterCrop).
    Returns (resize, resize, 3) uint8.

    Only the source region that lands in the square is resampled (Pillow's ``box``), at the same
    scale and pixel centres as the full resize; the filter still reads source pixels just outside
    the box, so the square matches resize-then-crop (within 1 grey level from the box's float
    coordinates). This skips the discarded sides: a third of the work for a 3:2 photo, and for an
    extreme aspect ratio the difference between 256x256 and a 118-byte 1x20000 PNG becoming
    256x5,120,000 (5 GB)."""
    width, height = image.size
    if width <= height:
        new_size = (resize, max(resize, int(resize * height / width)))
    else:
        new_size = (max(resize, int(resize * width / height)), resize)
    left = round((new_size[0] - resize) / 2.0)
    top = round((new_size[1] - resize) / 2.0)
    sx, sy = width / new_size[0], height / new_size[1]
    box = (left * sx, top * sy, (left + resize) * sx, (top + resize) * sy)
    return np.asarray(image.resize((resize, resize), Image.Resampling.BILINEAR, box=box))


def crop_offsets(resize: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the five crops: top-left, top-right, bottom-left, bottom-right, centre."""
    far = resize - crop
    centre = round(far / 2.0)  # torchvision's CenterCrop rounding
    return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def ten_crop(square: np.ndarray, crop: int, mean: list[float], std: list[float]) -> np.ndarray:
    """(S, S, 3) uint8 -> (10, 3, crop, crop) float32: the five crops, then their mirrors."""
    shift = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(3, 1, 1)
    # Divided, not multiplied by the reciprocal: training (model_export.data) does the same
    # arithmetic, so a validation crop there equals the service's to the last bit.
    scale = (np.asarray(std, dtype=np.float32) * 255.0).reshape(3, 1, 1)
    chw = np.ascontiguousarray(square.transpose(2, 0, 1))  # uint8: 4x less to move than floats
    out = np.empty((N_CROPS, 3, crop, crop), dtype=np.float32)
    for i, (top, left) in enumerate(crop_offsets(square.shape[0], crop)):
        # Normalised straight into the output batch: no float copy of the whole square.
        np.subtract(chw[:, top : top + crop, left : left + crop], shift, out=out[i])
        out[i] /= scale
        out[i + 5] = out[i][:, :, ::-1]
    return out


def preprocess(
    data: bytes, *, resize: int, crop: int, mean: list[float], std: list[float], max_pixels: int
) -> Preprocessed:
    started = time.perf_counter()
    image = decode(data, resize, max_pixels)
    decoded = time.perf_counter()
    crops = ten_crop(resize_center(image, resize), crop, mean, std)
    return Preprocessed(crops, decoded - started, time.perf_counter() - decoded)
