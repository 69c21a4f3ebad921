"""The first stage of an image's trip: bytes -> upright 8-bit RGB image. No torch.

The format is read from the bytes (never the file name or content type), the pixel count is
checked from the header before any pixel is allocated, large JPEGs are decoded at a reduced scale
(draft mode), EXIF orientation is applied and every mode is converted to RGB. Every problem with
the bytes is an ``ImageInputError`` carrying the HTTP status the service answers with.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alexnet_core.errors import StatusError

# Formats read from the bytes' signature; the file name and declared content type are ignored.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class ImageInputError(StatusError, ValueError):
    """A problem with the uploaded bytes, reported to the client as ``status_code`` (raised in
    decode worker processes too, and pickled back)."""


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
        # The pixel limit is ours (``_check_pixels``, from the header). Pillow's own check only
        # warns below twice its MAX_IMAGE_PIXELS; turning that warning into an error needed
        # ``warnings.catch_warnings``, which swaps a process-wide filter list and is not thread-safe.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
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
        if image.format == "JPEG" and (target := draft_size(*image.size, resize)) is not None:
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding; draft picks the smallest result
            # that is still at least the requested size.
            image.draft("RGB", target)
        image.load()  # first frame of animations; raises on truncated data
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageInputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(422, f"corrupt or truncated image data: {exc}") from None
    except Exception as exc:
        raise ImageInputError(422, f"image could not be decoded: {type(exc).__name__}: {exc}") from None


# Bytes per pixel of Pillow's storage for each mode (RGB and the like are stored 4 bytes wide).
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_SOS = b"\xff\xda"  # start of scan: 0xFF in entropy-coded data is always followed by 0x00


@dataclass(frozen=True)
class DecodeCost:
    """What decoding an image will take, from its header alone."""

    format: str
    width: int  # at the scale it will be decoded at (JPEG draft)
    height: int
    bytes: int  # peak memory of the decode and its conversion to RGB, estimated


def draft_size(width: int, height: int, resize: int) -> tuple[int, int] | None:
    """The size requested from JPEG draft mode, or None when the image is decoded at full size."""
    shorter = min(width, height)
    if shorter < 2 * resize:
        return None
    return -(-width * resize // shorter), -(-height * resize // shorter)


def _draft_scale(width: int, height: int, resize: int) -> int:
    """libjpeg's scale denominator (1, 2, 4, 8) that draft mode will pick."""
    if (target := draft_size(width, height, resize)) is None:
        return 1
    scale = 1
    while scale < 8 and width // (scale * 2) >= target[0] and height // (scale * 2) >= target[1]:
        scale *= 2
    return scale


_SCAN_CHUNK = 1 << 20


def jpeg_scans(data: bytes) -> int:
    """How many start-of-scan markers ``data`` holds: ``data.count(_SOS)``, computed faster.

    Every upload's bytes are read through once here, before the decode is admitted: ``bytes.count``
    of a two-byte pattern stops at each 0xFF, which entropy-coded data is full of. numpy compares
    whole chunks instead; chunked so that the masks stay small whatever the upload's size."""
    a = np.frombuffer(data, np.uint8)
    first, second = _SOS
    scans = 0
    for start in range(0, max(len(a) - 1, 0), _SCAN_CHUNK):
        window = a[start : start + _SCAN_CHUNK + 1]  # one byte more: a marker across the edge
        scans += int(np.count_nonzero((window[:-1] == first) & (window[1:] == second)))
    return scans


def decode_cost(data: bytes, resize: int, max_pixels: int, max_jpeg_scans: int) -> DecodeCost:
    """Weigh an image before decoding it: its header's size and mode, the scale draft mode will
    decode a JPEG at, and the buffers the decode and RGB conversion hold at their peak. Raises
    ``ImageInputError`` for what ``decode`` would refuse from the header, and for a JPEG with more
    scans than ``max_jpeg_scans`` (each scan of a progressive JPEG re-reads the whole image)."""
    image = _open(data, max_pixels)
    width, height = image.size
    pixels = width * height
    extra = 0
    if image.format == "JPEG":
        if (scans := jpeg_scans(data)) > max_jpeg_scans:
            raise ImageInputError(
                413, f"JPEG has {scans} scans, over the limit of {max_jpeg_scans}: too costly to decode"
            )
        if image.info.get("progressive") or image.info.get("progression"):
            # A progressive decode keeps every DCT coefficient (2 bytes) of the full-size image.
            extra = pixels * len(image.getbands()) * 2
        scale = _draft_scale(width, height, resize)
        width, height = -(-width // scale), -(-height // scale)
    decoded = width * height * _STORAGE.get(image.mode, 4)
    if image.mode.startswith("I") or image.mode == "F":
        decoded += width * height * 12  # float32 copy and its scaled copy (``_to_rgb``)
    # RGB result (stored 4 bytes wide), and the same again for a mode conversion or EXIF rotation.
    return DecodeCost(image.format or "?", width, height, extra + decoded + 2 * width * height * 4)
