"""scikit-learn's handwritten digits (1797 8x8 images, bundled with the package: no download)
written as an image-folder dataset that ``alexnet-train`` and the service can read:

    <root>/train/<digit>/<n>.png    stratified 80 % of what is left after the held-out images
    <root>/val/<digit>/<n>.png      the other 20 %
    <root>/held_out/<digit>/<n>.png a few images per class that neither split contains

Grey PNGs, ink bright on black, upscaled from 8x8 with bilinear interpolation. Deterministic
for a given (size, seed, held_out_per_class); writing all of them takes well under a second.

Usable from the command line too: ``python tests/digits.py ROOT [--size 32]``.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsFolder:
    root: Path
    train: int
    val: int
    held_out: dict[str, list[Path]]  # class name -> files under <root>/held_out/<class>/


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """(8, 8) values 0..16 -> size x size grey image."""
    grey = np.clip(np.round(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BILINEAR)


def write_digits(
    root: Path, size: int = 32, seed: int = 0, held_out_per_class: int = 3, val_fraction: float = 0.2
) -> DigitsFolder:
    digits = load_digits()
    images, labels = digits.images, digits.target
    indices = np.arange(len(labels))
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for digit in range(10):
        held.extend(rng.choice(indices[labels == digit], size=held_out_per_class, replace=False).tolist())
    rest = np.setdiff1d(indices, held)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_fraction, stratify=labels[rest], random_state=seed
    )
    held_out: dict[str, list[Path]] = {name: [] for name in CLASS_NAMES}
    for split, chosen in (("train", train_idx), ("val", val_idx), ("held_out", np.asarray(held))):
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in sorted(int(i) for i in chosen):
            path = root / split / str(labels[i]) / f"{i:04d}.png"
            digit_image(images[i], size).save(path)
            if split == "held_out":
                held_out[str(labels[i])].append(path)
    return DigitsFolder(root, len(train_idx), len(val_idx), held_out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--size", type=int, default=32, help="side of the written PNGs (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=int, default=3, help="held-out images per class (default 3)")
    args = p.parse_args(argv)
    folder = write_digits(args.root, args.size, args.seed, args.held_out)
    print(f"{folder.root}: {folder.train} train, {folder.val} val, {args.held_out * 10} held out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
