"""Image-folder datasets for ``alexnet-train``, with the paper's augmentation.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``; the class names are
the training folder names, sorted, and a class's index is its position in that list.

Every image goes through the service's own ``decode`` + ``center_square`` (shorter side to
``resize``, central square), so training sees the pixels that serving sees. Then:

- training: a random ``crop``x``crop`` window of the square, a horizontal flip with probability 1/2
  (switchable off) and the paper's PCA colour ("lighting") noise;
- validation: the centre crop, at the offset the service's ten-crop uses for its centre crop.

Normalisation is stated on the [0, 1] pixel scale as the service's metadata states it:
``x = (pixel / 255 - mean) / std``. The paper's own scaling, 0–255 minus the per-channel mean, is
``mean = dataset channel means``, ``std = 1/255``.

PCA lighting, in the 0–255 pixel scale: with p_i, lambda_i the eigenvectors and eigenvalues of the
3x3 covariance of RGB pixel values, each image gets ``[p1 p2 p3] [a1 s1, a2 s2, a3 s3]^T`` added to
every pixel, a_i ~ N(0, 0.1) drawn once per image. We take ``s_i = sqrt(lambda_i)``, the standard
deviation along p_i, instead of lambda_i itself: an eigenvalue is a variance (pixel²), and in the
0–255 scale 0.1 * lambda_1 is a shift of hundreds of grey levels (thousands on the digits). With
the square root the shift is 10 % of the colour spread along each axis, whatever the pixel scale.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from alexnet_core.images import ImageInputError, decode
from alexnet_core.pipeline import center_square, crop_offsets

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
MAX_PIXELS = 64_000_000  # the service's default limit: an image it would refuse is no use here
PCA_ALPHA_STD = 0.1  # the paper's standard deviation of the a_i


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on, with a message naming the problem."""


Sample = tuple[Path, int]


def confined(path: Path, root: Path | None) -> Path:
    """``path``, unless it is a symlink leading outside ``root`` (the server's data root, for a
    job): refused then, so that a dataset cannot make the trainer read files elsewhere."""
    if root is not None and path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # broken, or a loop
            raise DatasetError(f"{path}: a symlink that cannot be followed ({exc})") from None
        if not target.is_relative_to(root.resolve()):
            raise DatasetError(f"{path} is a symlink that leads outside the data root")
    return path


def _folders(split_dir: Path, root: Path | None) -> list[Path]:
    confined(split_dir, root)
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} is not a folder: expected <root>/train/<class>/<images>")
    return [
        confined(p, root) for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]


def find_classes(split_dir: Path, root: Path | None = None) -> list[str]:
    names = sorted(p.name for p in _folders(split_dir, root))
    if not names:
        raise DatasetError(f"{split_dir} has no class folders")
    return names


def list_images(split_dir: Path, class_names: Sequence[str], root: Path | None = None) -> list[Sample]:
    """(path, class index) of every image under ``split_dir``, in a fixed order. A class folder
    may be missing (a validation split without that class), an unknown one is an error. With
    ``root``, a symlink anywhere on the way that leads outside it is refused."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(p.name for p in _folders(split_dir, root) if p.name not in index)
    if unknown:
        raise DatasetError(f"{split_dir} has class folders that train/ lacks: {', '.join(unknown)}")
    samples: list[Sample] = []
    for name in class_names:
        folder = split_dir / name
        if folder.is_dir():
            samples.extend(
                (confined(path, root), index[name])
                for path in sorted(folder.iterdir())
                if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
            )
    if not samples:
        raise DatasetError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples


def load_square(path: Path, resize: int) -> np.ndarray:
    """The service's decode + center_square: (resize, resize, 3) uint8."""
    try:
        return center_square(decode(path.read_bytes(), resize, MAX_PIXELS), resize)
    except ImageInputError as exc:
        raise DatasetError(f"{path}: {exc.detail}") from None


@dataclass(frozen=True)
class PcaLighting:
    """The paper's colour augmentation; see the module docstring for the scale."""

    eigenvalues: np.ndarray  # (3,) variances along the principal axes, in pixel² (0–255 scale)
    eigenvectors: np.ndarray  # (3, 3), column i is p_i
    alpha_std: float = PCA_ALPHA_STD

    def shift(self, alphas: np.ndarray) -> np.ndarray:
        """The per-channel (R, G, B) offset, in grey levels, for the draws ``alphas`` (3,)."""
        stds = np.sqrt(np.clip(self.eigenvalues, 0.0, None))
        return (self.eigenvectors @ (alphas * stds)).astype(np.float32)

    def random_shift(self) -> np.ndarray:
        # torch's generator, not numpy's: DataLoader seeds torch in every worker, numpy it does not.
        alphas = torch.randn(3, dtype=torch.float64).numpy() * self.alpha_std
        return self.shift(alphas)


@dataclass(frozen=True)
class ColourStatistics:
    mean: np.ndarray  # (3,) per-channel mean on the [0, 1] scale
    covariance: np.ndarray  # (3, 3) covariance of RGB values on the 0–255 scale
    images: int

    def lighting(self, alpha_std: float = PCA_ALPHA_STD) -> PcaLighting:
        eigenvalues, eigenvectors = np.linalg.eigh(self.covariance)
        order = np.argsort(eigenvalues)[::-1]  # largest first, as the paper lists them
        return PcaLighting(eigenvalues[order], eigenvectors[:, order], alpha_std)


def colour_statistics(
    samples: Sequence[Sample], resize: int, max_images: int = 1000, seed: int = 0
) -> ColourStatistics:
    """Channel means and RGB covariance of (a seeded random sample of) the training images, over
    the same central squares that training crops from. Sums are accumulated in float64, so the
    sample's size costs time, not memory."""
    if not samples:
        raise DatasetError("no images to estimate colour statistics from")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(max_images, len(samples)), replace=False)
    total = np.zeros(3)
    products = np.zeros((3, 3))
    count = 0
    for i in sorted(chosen):
        pixels = load_square(samples[i][0], resize).reshape(-1, 3).astype(np.float64)
        total += pixels.sum(axis=0)
        products += pixels.T @ pixels
        count += pixels.shape[0]
    mean = total / count
    covariance = products / count - np.outer(mean, mean)
    return ColourStatistics(mean / 255.0, covariance, len(chosen))


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """(path, label) samples -> ((3, crop, crop) float32 normalised tensor, label)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        resize: int,
        crop: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        flip: bool = True,
        lighting: PcaLighting | None = None,
    ) -> None:
        if crop > resize:
            raise DatasetError(f"crop size {crop} is larger than the resize size {resize}")
        self.samples = list(samples)
        self.resize = resize
        self.crop = crop
        self.train = train
        self.flip = flip
        self.lighting = lighting
        # The same arithmetic as alexnet_core.pipeline.ten_crop, so that a validation centre crop
        # here equals the service's centre crop to the last bit.
        self.mean255 = np.asarray(mean, dtype=np.float32) * 255.0
        self.std255 = np.asarray(std, dtype=np.float32) * 255.0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_square(path, self.resize)), label

    def transform(self, square: np.ndarray) -> torch.Tensor:
        """(resize, resize, 3) uint8 square -> (3, crop, crop) float32."""
        if self.train:
            top, left = torch.randint(0, self.resize - self.crop + 1, (2,)).tolist()
        else:
            top, left = crop_offsets(self.resize, self.crop)[4]
        pixels = square[top : top + self.crop, left : left + self.crop].astype(np.float32)
        if self.train and self.flip and torch.rand(()).item() < 0.5:
            pixels = pixels[:, ::-1]
        if self.train and self.lighting is not None:
            pixels = pixels + self.lighting.random_shift()  # no clipping: the paper adds, that is all
        normalised = (pixels - self.mean255) / self.std255
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def paper_normalisation(stats: ColourStatistics) -> tuple[list[float], list[float]]:
    """0–255 minus the per-channel mean, written as mean/std on the [0, 1] scale."""
    return [float(m) for m in stats.mean], [1.0 / 255.0] * 3
