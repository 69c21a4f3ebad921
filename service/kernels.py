"""The first layer's kernels as a picture (the paper's Figure 3), read from the model file itself.

The service has no torch: the weights come from the ONNX initializer of the graph's first ``Conv``
node, read with the ``onnx`` package (protobuf only). Each kernel is min-max scaled on its own, as
in the figure, so that its pattern shows whatever its magnitude. For the paper layout the 96
kernels are drawn as the two GPU groups of 48, one above the other with a gap between them.
"""

import functools
import io
import math
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image

BORDER = 2  # pixels between kernels
GROUP_GAP = 12  # pixels between the paper's two GPU groups
BACKGROUND = 255  # white, as in the paper's figure
# One read at a time: each parses the whole model file and holds it, so concurrent first requests
# wait for the one read in progress and take its result from the cache instead of each reading.
_reading = threading.Lock()


class KernelError(ValueError):
    """The model file has no first convolution on RGB input to draw."""


def first_conv_weights(path: Path) -> np.ndarray:
    """(K, 3, h, w) float32: the weight initializer of the first Conv node (nodes are stored in
    topological order, so the first one met is conv1)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            weights = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            if weights.ndim == 4 and weights.shape[1] == 3:
                return weights
            raise KernelError(f"the first Conv of {path.name} takes {weights.shape[1]} channels, not RGB")
    raise KernelError(f"{path.name} has no Conv node with stored weights")


def scaled(kernel: np.ndarray) -> np.ndarray:
    """(3, h, w) -> (h, w, 3) uint8, min-max scaled over the kernel's own values."""
    low, high = float(kernel.min()), float(kernel.max())
    unit = (kernel - low) / (high - low) if high > low else np.zeros_like(kernel)
    return np.round(unit.transpose(1, 2, 0) * 255.0).astype(np.uint8)


def grid(kernels: np.ndarray, columns: int, scale: int) -> np.ndarray:
    """Kernels as tiles in rows of ``columns``, each enlarged ``scale`` times (nearest neighbour,
    so that each weight stays one visible square)."""
    count, _, height, width = kernels.shape
    tile_h, tile_w = height * scale, width * scale
    rows = math.ceil(count / columns)
    out = np.full(
        (rows * (tile_h + BORDER) + BORDER, columns * (tile_w + BORDER) + BORDER, 3), BACKGROUND, np.uint8
    )
    for i, kernel in enumerate(kernels):
        row, col = divmod(i, columns)
        top, left = BORDER + row * (tile_h + BORDER), BORDER + col * (tile_w + BORDER)
        tile = scaled(kernel).repeat(scale, axis=0).repeat(scale, axis=1)
        out[top : top + tile_h, left : left + tile_w] = tile
    return out


def kernel_image(weights: np.ndarray, layout: str, scale: int) -> np.ndarray:
    """(K, 3, h, w) -> RGB picture; the paper layout's two groups apart, one above the other."""
    count = weights.shape[0]
    if layout == "paper" and count % 2 == 0:
        half = count // 2
        columns = math.ceil(half / 3)  # 48 kernels: three rows of 16, as wide as the figure
        top, bottom = grid(weights[:half], columns, scale), grid(weights[half:], columns, scale)
        gap = np.full((GROUP_GAP, top.shape[1], 3), BACKGROUND, np.uint8)
        return np.concatenate([top, gap, bottom])
    return grid(weights, math.ceil(math.sqrt(count)), scale)


@functools.lru_cache(maxsize=4)
def cached_weights(path: Path, sha256: str) -> np.ndarray:
    """conv1 of one model file, read once (the whole protobuf is parsed to reach it); keyed by the
    file's hash, so a replaced file is read again."""
    return first_conv_weights(path)


def shared_weights(path: Path, sha256: str) -> np.ndarray:
    """``cached_weights``, read once however many requests ask for it at the same time."""
    with _reading:
        return cached_weights(path, sha256)


@functools.lru_cache(maxsize=32)
def kernels_png(path: Path, sha256: str, layout: str, scale: int) -> bytes:
    """The PNG for one model file and scale, drawn once."""
    picture = kernel_image(shared_weights(path, sha256), layout, scale)
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(buffer, "PNG", optimize=True)
    return buffer.getvalue()
