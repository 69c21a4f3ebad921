"""Which decoder takes an image, and whether this server may decode on the GPU at all.

The GPU path (``service.device_decode``: nvImageCodec, batches, resize and cut on the device) takes
baseline JPEGs in YCbCr or grey with no EXIF rotation; everything else (PNG, WebP, progressive,
CMYK/YCCK, rotated, unreadable headers) takes the CPU decode workers, which handle every case and
name every fault. The choice is made from the header alone: no GPU library is imported here, so
the chooser runs and is tested on any host.
"""

import importlib.util
import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from alexnet_core.images import sniff_format
from alexnet_core.session import probe_providers

CUDA = "CUDAExecutionProvider"
DEVICE_DECODER = "nvidia.nvimgcodec"
ORIENTATION = 0x0112  # EXIF tag
# The modes Pillow gives a JPEG whose components nvJPEG converts to RGB itself.
DEVICE_MODES = ("RGB", "L")
DecodeDevice = Literal["cpu", "cuda"]


class DeviceDecodeUnavailable(RuntimeError):
    """``decode_device=cuda`` asked for and not possible here: the server does not start."""


@dataclass(frozen=True)
class Route:
    """Where one image is decoded: on the device (``cpu_reason`` None) or by the CPU workers."""

    cpu_reason: str | None
    width: int = 0  # from the header (0 when it is not read)
    height: int = 0

    @property
    def device(self) -> bool:
        return self.cpu_reason is None


def route(data: bytes) -> Route:
    """The path for ``data``, from its signature and header (no pixel is decoded)."""
    if sniff_format(data) != "JPEG":
        return Route("not a JPEG")
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        orientation = image.getexif().get(ORIENTATION, 1)
    except Exception:  # the CPU path names the fault in its 4xx
        return Route("JPEG header unreadable")
    width, height = image.size
    if image.info.get("progressive") or image.info.get("progression"):
        return Route("progressive JPEG", width, height)
    if image.mode not in DEVICE_MODES:
        return Route(f"{image.mode} JPEG", width, height)
    if orientation != 1:
        return Route(f"EXIF orientation {orientation}", width, height)
    return Route(None, width, height)


def decoder_installed() -> bool:
    try:
        return importlib.util.find_spec(DEVICE_DECODER) is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace at all
        return False


def missing_for_device_decode(providers: list[str], workers: int) -> list[str]:
    """What this server lacks to decode on the GPU (empty: nothing)."""
    missing = []
    got = probe_providers(providers)
    if CUDA not in got:
        missing.append(
            f"ONNX Runtime's {CUDA} (sessions here run on {got}: no GPU visible, {CUDA} not in "
            "ALEXNET_PROVIDERS, or the CUDA 13 / cuDNN 9 libraries not found)"
        )
    if not decoder_installed():
        missing.append(f"nvImageCodec ({DEVICE_DECODER}): pip install 'alexnet-serve[gpu]'")
    if workers:
        missing.append(
            f"one process (ALEXNET_WORKERS=0; now {workers}): with fronts, images are decoded in "
            "the fronts' CPU workers"
        )
    return missing


def decode_device(setting: str, providers: list[str], workers: int) -> DecodeDevice:
    """The decode device for ``setting`` (auto, cpu, cuda): cuda where asked or possible; raises
    ``DeviceDecodeUnavailable`` naming what is missing when cuda is asked and not possible."""
    if setting == "cpu":
        return "cpu"
    missing = missing_for_device_decode(providers, workers)
    if not missing:
        return "cuda"
    if setting == "cuda":
        raise DeviceDecodeUnavailable(
            "ALEXNET_DECODE_DEVICE=cuda, but this server lacks "
            + "; ".join(missing)
            + " (ALEXNET_DECODE_DEVICE=auto falls back to the CPU decode workers)"
        )
    return "cpu"
