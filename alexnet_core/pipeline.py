"""One image's trip after decoding, as named stages. No torch.

    bytes --images.decode--> image --center_square--> (S, S, 3) uint8 --ten_crop--> (10, 3, C, C) float32
    --model--> logits --probabilities--> (classes,) --top_k--> [(index, probability), ...]

``center_square``: shorter side to ``resize`` (bilinear, antialiased, as torchvision's preset), then the
central ``resize`` x ``resize``. ``ten_crop``: four corners and the centre of size ``crop``, then
the horizontal mirror of each, scaled to [0, 1] and normalised with the model's mean/std.
``probabilities``: the softmax of each crop, averaged over an image's ten crops (the paper's test).
A model trained without flips never saw a mirror: it gets the five crops alone (``five_crop``),
and their five softmax outputs averaged (``crops_for_training``; ``ModelMetadata.test_crops``).

A model of the ``square`` kind (``ModelMetadata.input_kind``) does the crops onwards in its
graph: for it the host stops at ``center_square`` and sends the (1, S, S, 3) uint8 square.

Training validation and the service both call these functions, so a model is validated with
exactly the pipeline it is served with.
"""

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from alexnet_core.images import decode

N_CROPS = 10  # the paper's: five crops and their mirrors
N_UNMIRRORED = 5  # the five crops alone
CROP_COUNTS = (N_UNMIRRORED, N_CROPS)


def crops_for_training(flip: bool | None) -> int:
    """Crops per image at test time for a model trained with random flips or not (None: not
    recorded, the paper's ten): a model that never saw a mirror is not asked about one."""
    return N_UNMIRRORED if flip is False else N_CROPS


@dataclass(frozen=True)
class Preprocessed:
    """One image, ready to be concatenated with others into the model's input batch."""

    batch: np.ndarray  # crops kind: (10 or 5, 3, C, C) float32; square kind: (1, S, S, 3) uint8
    decode_s: float
    preprocess_s: float

    @property
    def crops(self) -> np.ndarray:
        """The former name of ``batch`` (kept for callers written before the square kind)."""
        return self.batch


def center_square(image: Image.Image, resize: int) -> np.ndarray:
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


def cut_crops(square: np.ndarray, crop: int, mean: list[float], std: list[float], count: int) -> np.ndarray:
    """(S, S, 3) uint8 -> (count, 3, crop, crop) float32: the five crops, then (``count`` 10)
    their mirrors."""
    if count not in CROP_COUNTS:
        raise ValueError(f"crops per image must be one of {CROP_COUNTS}, not {count}")
    shift = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(3, 1, 1)
    # Divided, not multiplied by the reciprocal: training (model_export.data) does the same
    # arithmetic, so a validation crop there equals the service's to the last bit.
    scale = (np.asarray(std, dtype=np.float32) * 255.0).reshape(3, 1, 1)
    chw = np.ascontiguousarray(square.transpose(2, 0, 1))  # uint8: 4x less to move than floats
    out = np.empty((count, 3, crop, crop), dtype=np.float32)
    for i, (top, left) in enumerate(crop_offsets(square.shape[0], crop)):
        # Normalised straight into the output batch: no float copy of the whole square.
        np.subtract(chw[:, top : top + crop, left : left + crop], shift, out=out[i])
        out[i] /= scale
        if count == N_CROPS:
            out[i + 5] = out[i][:, :, ::-1]
    return out


def ten_crop(square: np.ndarray, crop: int, mean: list[float], std: list[float]) -> np.ndarray:
    """(S, S, 3) uint8 -> (10, 3, crop, crop) float32: the five crops, then their mirrors."""
    return cut_crops(square, crop, mean, std, N_CROPS)


def five_crop(square: np.ndarray, crop: int, mean: list[float], std: list[float]) -> np.ndarray:
    """(S, S, 3) uint8 -> (5, 3, crop, crop) float32: the five crops, no mirrors."""
    return cut_crops(square, crop, mean, std, N_UNMIRRORED)


def input_rows(
    square: np.ndarray,
    crop: int,
    mean: list[float],
    std: list[float],
    *,
    square_only: bool,
    crops: int = N_CROPS,
) -> np.ndarray:
    """An image's central (S, S, 3) uint8 square -> a model's input rows for it: the square itself
    (1, S, S, 3) for a model that crops in its graph (``square_only``), else its ``crops`` normalised
    crops (ten, or the five without mirrors)."""
    return square[np.newaxis] if square_only else cut_crops(square, crop, mean, std, crops)


def decode_square(data: bytes, resize: int, max_pixels: int) -> tuple[np.ndarray, float, float]:
    """bytes -> central square, with the decode's and the resize's seconds."""
    started = time.perf_counter()
    image = decode(data, resize, max_pixels)
    decoded = time.perf_counter()
    square = center_square(image, resize)
    return square, decoded - started, time.perf_counter() - decoded


def preprocess(
    data: bytes,
    *,
    resize: int,
    crop: int,
    mean: list[float],
    std: list[float],
    max_pixels: int,
    square_only: bool = False,
    crops: int = N_CROPS,
) -> Preprocessed:
    """bytes -> ``crops`` normalised crops (or, ``square_only``, the (1, S, S, 3) uint8 square for a
    model that crops in its graph), timing the decode and the rest apart."""
    started = time.perf_counter()
    square, decode_s, _ = decode_square(data, resize, max_pixels)
    batch = input_rows(square, crop, mean, std, square_only=square_only, crops=crops)
    return Preprocessed(batch, decode_s, time.perf_counter() - started - decode_s)


def probabilities(logits: np.ndarray, crops_per_image: int = N_CROPS) -> np.ndarray:
    """(n*crops, classes) logits -> (n, classes): each crop's softmax, averaged per image."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=1, keepdims=True)
    softmax = np.exp(shifted)
    softmax /= softmax.sum(axis=1, keepdims=True)
    return softmax.reshape(-1, crops_per_image, softmax.shape[1]).mean(axis=1)


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable classes of one image, most probable first (ties by index)."""
    k = min(k, probs.shape[0])
    top = np.argpartition(-probs, k - 1)[:k]
    top = top[np.argsort(-probs[top], kind="stable")]
    return [(int(i), float(probs[i])) for i in top]
