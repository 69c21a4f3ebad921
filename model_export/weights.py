"""Where the network's weights come from: the official download, a local checkpoint, or a seed."""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from alexnet_core import files
from model_export.alexnet import AlexNet, Layout
from model_export.labels import ImageNetClasses, imagenet_classes

# torchvision's IMAGENET1K_V1 weights. As in torch.hub, the 8 hex digits in the file name are the
# start of the file's SHA-256: that prefix is the published checksum.
PRETRAINED_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
PRETRAINED_FILE = "alexnet-owt-7be5be79.pth"
PRETRAINED_SHA256_PREFIX = "7be5be79"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """A weights source that cannot be used, with a message saying what to do instead."""


@dataclass
class LoadedWeights:
    model: AlexNet
    source: str
    sha256: str | None
    trained: bool
    classes: ImageNetClasses
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict[str, object] = field(default_factory=dict)
    # Whether training mirrored its images (a checkpoint of ours records it); None where unknown.
    train_flip: bool | None = None


def download(url: str, destination: Path, sha256_prefix: str, timeout: float = 30.0) -> Path:
    """Download ``url`` to a temporary file beside ``destination`` with a progress bar, check its
    SHA-256 starts with ``sha256_prefix``, then rename it into place. Nothing is left at
    ``destination`` (or beside it) unless the whole, verified file arrived.

    Not ``torch.hub.download_url_to_file``: it reads to EOF without comparing Content-Length, so a
    cut-off transfer is reported as a hash mismatch instead of as what it is."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise WeightsError(f"download of {url} truncated: {received} of {total} bytes")
        actual = digest.hexdigest()
        if not actual.startswith(sha256_prefix.lower()):
            raise WeightsError(
                f"checksum mismatch for {url}: SHA-256 {actual} does not start with {sha256_prefix}"
            )
        os.replace(tmp, destination)
        return destination
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"download of {url} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def pretrained_file(
    weights_dir: Path, url: str = PRETRAINED_URL, sha256_prefix: str = PRETRAINED_SHA256_PREFIX
) -> Path:
    """The official weights file in ``weights_dir``: used as it is if present and verified
    (downloaded earlier, or copied there by hand on an air-gapped host), else downloaded."""
    path = weights_dir / PRETRAINED_FILE
    if path.exists():
        actual = files.sha256(path)
        if actual.startswith(sha256_prefix):
            return path
        raise WeightsError(
            f"{path} is not the official file (SHA-256 {actual}, expected {sha256_prefix}...): "
            "delete it and run again, or copy the right file there"
        )
    try:
        return download(url, path, sha256_prefix)
    except WeightsError as exc:
        raise WeightsError(
            f"{exc}\nNo network? Copy {PRETRAINED_FILE} (from {url}) into {weights_dir}/ by hand "
            "and run again, or train a model instead: `alexnet-train --help`."
        ) from exc


def load_state_dict_strict(model: AlexNet, state: dict[str, torch.Tensor], origin: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming every mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong_shape:
        classes = model.classifier[-1].out_features
        parts = [f"{origin} does not fit the {model.layout} layout with {classes} classes"]
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes: {'; '.join(wrong_shape)}")
        raise WeightsError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def load_pretrained(
    weights_dir: Path, url: str = PRETRAINED_URL, sha256_prefix: str = PRETRAINED_SHA256_PREFIX
) -> LoadedWeights:
    path = pretrained_file(weights_dir, url, sha256_prefix)
    model = AlexNet("torchvision", 1000)
    load_state_dict_strict(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return LoadedWeights(model, "pretrained:IMAGENET1K_V1", files.sha256(path), True, imagenet_classes())


def load_checkpoint(path: Path, layout: Layout | None = None) -> LoadedWeights:
    """A checkpoint written by ``alexnet-train`` (it names its layout, classes and normalisation,
    and its run's parameters: whether it flipped images) or a bare torchvision-format state dict
    (ImageNet classes and normalisation assumed, flips not recorded)."""
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run their code.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(content, dict):
        raise WeightsError(f"{path} holds a {type(content).__name__}, not a state dict or checkpoint")
    if "model" in content and isinstance(content["model"], dict):  # ours
        classes = ImageNetClasses.from_names(list(content["class_names"]))
        model = AlexNet(layout or content.get("layout", "paper"), len(classes.labels))
        load_state_dict_strict(model, content["model"], str(path))
        config = content.get("config")
        flip = config.get("flip") if isinstance(config, dict) else None
        return LoadedWeights(
            model,
            f"checkpoint:{path.name}",
            files.sha256(path),
            True,
            classes,
            tuple(content["mean"]),
            tuple(content["std"]),
            {k: content[k] for k in ("validation_top1", "validation_top5") if k in content},
            flip if isinstance(flip, bool) else None,
        )
    state = content
    head = state.get("classifier.6.weight")
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) else 1000
    model = AlexNet(layout or "torchvision", num_classes)
    load_state_dict_strict(model, state, str(path))
    classes = imagenet_classes() if num_classes == 1000 else ImageNetClasses.numbered(num_classes)
    return LoadedWeights(model, f"checkpoint:{path.name}", files.sha256(path), True, classes)


def random_weights(layout: Layout, seed: int = 0, num_classes: int = 1000) -> LoadedWeights:
    torch.manual_seed(seed)
    model = AlexNet(layout, num_classes)
    classes = imagenet_classes() if num_classes == 1000 else ImageNetClasses.numbered(num_classes)
    return LoadedWeights(model, f"random:seed={seed}", None, False, classes)
