"""``alexnet-train``: train AlexNet from scratch on an image folder, then export it to ONNX.

    alexnet-train data/digits --out runs/digits --epochs 10 --batch-size 64 \\
        --input-size 64 --resize-size 73
    alexnet-train data/digits --out runs/digits --epochs 20 --resume
    torchrun --standalone --nproc_per_node=2 -m model_export.train data/digits --out runs/ddp

The dataset is ``<data>/train/<class>/*`` and ``<data>/val/<class>/*`` (see model_export.data).

Recipe: the paper's (SGD, batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 when the
validation loss stops improving, at most three times; dropout 0.5; random crops, flips and PCA
lighting), with two defaults changed so that a run learns out of the box: the reference Caffe
model's initialisation (biases 0.1, fc6/fc7 weights N(0, 0.005)) and the paper's input scaling
(0–255 minus the per-channel mean). The paper's constants (N(0, 0.01), biases 1) stay at chance
on these machines. ``--init paper`` and ``--input-scaling imagenet`` select the alternatives.

Files in ``--out`` (only rank 0 writes):

- ``checkpoint.pt``: after every epoch, atomically (temp file + os.replace). A dict with "model",
  "optimizer", "scheduler", "scaler" (state dicts), "epoch" (completed epochs), "global_step", "layout",
  "class_names", "mean", "std" ([0, 1] scale), "input_size", "resize_size", "pca_eigenvalues",
  "pca_eigenvectors", "config" (the arguments), "history" (the epoch records),
  "validation_top1", "validation_top5" (centre crop, fractions). model_export.weights.load_checkpoint
  reads it; ``alexnet-export --source checkpoint`` exports it.
- ``metrics.jsonl``: one JSON object per line, flushed as written; appended to on --resume.
  Every record has "event" and "time" (unix seconds). Accuracies are fractions in [0, 1];
  "epoch" counts from 1 (an epoch record's "epoch" equals the checkpoint's completed epochs).

    {"event": "start", "epochs", "start_epoch", "steps_per_epoch", "total_steps", "train_images",
     "val_images", "classes", "world_size", "device", "resumed": bool}
    {"event": "step", "epoch", "step" (global, from 1), "total_steps", "loss", "lr", "images_per_s"}
        every --log-every steps and on each epoch's last step
    {"event": "epoch", "epoch", "step", "train_loss", "val_loss", "val_top1", "val_top5" (centre
     crop), "lr" (the epoch's), "images_per_s", "seconds"}
    {"event": "export", "path"} when the ONNX export starts
    {"event": "done", "model" (path of the .onnx, or null with --no-export), "version",
     "val10_top1", "val10_top5", "val10_images", "epochs", "step"}
    {"event": "error", "message", "kind": "diverged" | "error"}
    {"event": "cancelled", "epoch" (completed epochs, as in the checkpoint), "step", "signal"}

- ``curves.png``: loss and accuracy per epoch, rewritten after every epoch.

The exported model goes to ``<weights-dir>/<version>.onnx`` and appears there atomically, already
validated: its metadata carries the ten-crop accuracy measured on the validation set through the
service's own preprocessing and ONNX Runtime (``validation_top1/5``).

Exit codes: 0 done; 1 error (bad dataset, checkpoint or export; message on stderr); 2 bad
arguments; 3 training diverged (loss NaN/inf); 130 cancelled by SIGTERM or SIGINT (the last
completed epoch's checkpoint is left intact).

Under torchrun (RANK/WORLD_SIZE set) it trains data-parallel: gloo on CPU, NCCL on GPU. On a GPU
it runs in mixed precision (bf16 where supported, else fp16 with a gradient scaler).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from alexnet_core.metadata import ModelMetadata
from alexnet_core.session import OnnxClassifier
from model_export.alexnet import INITS, LAYOUTS, AlexNet
from model_export.data import (
    MAX_PIXELS,
    PCA_ALPHA_STD,
    DatasetError,
    ImageFolderDataset,
    PcaLighting,
    Sample,
    colour_statistics,
    find_classes,
    list_images,
    paper_normalisation,
)
from model_export.export import ExportError, export_onnx, make_version
from model_export.weights import IMAGENET_MEAN, IMAGENET_STD, WeightsError, load_checkpoint

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_CANCELLED = 130
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


class TrainingError(RuntimeError):
    """A run that cannot go on, with a message saying what to change."""


class Diverged(TrainingError):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Progress:
    """Where the run is, kept up to date by ``train`` for the records main writes when it stops."""

    epochs: int = 0  # completed, i.e. in the checkpoint
    step: int = 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-train",
        description="Train AlexNet from scratch on <data>/train/<class>/* (validated on <data>/val), "
        "checkpoint every epoch, then export a validated ONNX model that alexnet-serve can serve.",
        epilog=__doc__.split("\n\n", 1)[1].split("Files in", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", type=Path, help="dataset root holding train/ and val/")
    p.add_argument("--out", type=Path,
                   help="run folder: checkpoint, metrics, curves (default runs/<data name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--weights-dir", type=Path, default=Path("weights"),
                   help="where the ONNX model goes (default weights)")
    p.add_argument("--no-export", action="store_true", help="stop after training: no ONNX model")
    g = p.add_argument_group("recipe (defaults: the paper's, except --init and --input-scaling)")
    g.add_argument("--epochs", type=int, default=90, help="total epochs, counting resumed ones (default 90)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="images per step, over all processes (default 128)")
    g.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default 0.01)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)")
    g.add_argument("--dropout", type=float, default=0.5, help="in fc6 and fc7 (default 0.5)")
    g.add_argument("--plateau-patience", type=int, default=2, metavar="N",
                   help="divide the lr by 10 after N+1 evaluations (epochs) without a lower validation "
                   "loss (default 2)")
    g.add_argument("--max-lr-reductions", type=int, default=3,
                   help="at most this many divisions by 10 (default 3)")
    g.add_argument("--lr-schedule", metavar="EPOCH:LR,...",
                   help='explicit schedule instead of the plateau rule, e.g. "0:5e-4,2:2e-4,5:5e-5": the lr '
                   "from each (0-based) epoch on; --lr before the first listed epoch")
    g.add_argument("--init", choices=INITS, default="caffe",
                   help="caffe (default): biases 0.1, fc6/fc7 N(0, 0.005), learns; paper: N(0, 0.01) and "
                   "biases 1, as published, stays at chance here; default: PyTorch's")
    g.add_argument("--input-scaling", choices=("paper", "imagenet"), default="paper",
                   help="paper (default): 0–255 minus the dataset's channel means; imagenet: "
                   "(x/255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)")
    g.add_argument("--layout", choices=LAYOUTS, default="paper", help="network layout (default paper)")
    g.add_argument("--input-size", type=int, default=224,
                   help="crop side (default 224; small images such as the digits: 64 with --resize-size 73)")
    g.add_argument("--resize-size", type=int, default=256, help="shorter side before cropping (default 256)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g.add_argument("--pca-std", type=float, default=PCA_ALPHA_STD,
                   help="std of the PCA lighting draws (default 0.1; 0 turns it off)")
    g.add_argument("--stats-images", type=int, default=1000,
                   help="training images sampled for channel means and colour PCA (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="weights, shuffling, augmentation (default 0)")
    r = p.add_argument_group("running")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): CUDA if torch sees one, else the CPU")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA, never on CPU)")
    r.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: 0 on <= 2 cores, else cores/2, <= 8)")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: cores / processes)")
    r.add_argument("--log-every", type=int, default=5, help="steps between step records (default 5)")
    r.add_argument("--limit-train-batches", type=int, default=None, metavar="N",
                   help="at most N steps per epoch (quick runs, tests)")
    r.add_argument("--stop-at-top1", type=float, default=None, metavar="F",
                   help="stop once centre-crop validation top-1 reaches F (a fraction), then export")
    r.add_argument("--val10-max-images", type=int, default=None, metavar="N",
                   help="ten-crop validation of the ONNX model on at most N images (default all)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch lines stay)")
    return p


# ---------------------------------------------------------------------------------------------
# Small pieces the loop uses: metrics file, cancellation flag, processes, schedule, plots.


class MetricsLog:
    """JSON lines, flushed per record so that a process tailing the file sees each one at once."""

    def __init__(self, path: Path | None, append: bool) -> None:
        self.file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, **fields, "time": round(time.time(), 3)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class CancelFlag:
    """Set by SIGTERM/SIGINT; the loops look at it once per batch. A handler that raised instead
    could interrupt torch.save halfway or leave the ranks of a distributed run out of step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller there handles them
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes_from_env() -> Processes:
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Processes()
    return Processes(
        int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
    )


def all_reduce_sum(values: list[float], device: torch.device, procs: Processes) -> list[float]:
    """Sum over processes (identity for one). Each training step calls it once with the loss and
    the cancel flag, so that every rank stops, or raises, at the same step."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if procs.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def parse_lr_schedule(text: str) -> list[tuple[int, float]]:
    try:
        pairs = (part.split(":") for part in text.split(",") if part.strip())
        points = sorted((int(epoch), float(lr)) for epoch, lr in pairs)
    except ValueError:
        raise TrainingError(
            f'--lr-schedule {text!r}: expected "EPOCH:LR,EPOCH:LR,...", e.g. "0:0.01,30:0.001"'
        ) from None
    if not points or any(e < 0 or not lr > 0 for e, lr in points):
        raise TrainingError(f"--lr-schedule {text!r}: epochs must be >= 0 and rates > 0")
    return points


def make_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    if args.lr_schedule:
        points = parse_lr_schedule(args.lr_schedule)

        def factor(epoch: int) -> float:
            lr = args.lr
            for start, value in points:
                if epoch >= start:
                    lr = value
            return lr / args.lr

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # min_lr caps the number of reductions: lr * 0.1**k is where the plateau rule stops dividing.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=args.plateau_patience,
        min_lr=args.lr * 0.1**args.max_lr_reductions,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` then rename over ``path``: a reader sees the old file or the new, never half."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; the service may run as another user
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # A full disk surfaces from torch.save as "[enforce fail at inline_container.cc] unexpected
        # pos": say which file, that the old one is intact, and how much room is left.
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise TrainingError(
            f"cannot write {path} ({exc}); {free:.0f} MiB free on its filesystem (disk full, or a file "
            f"size limit?); {kept}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    # The object API, not pyplot: no global figure state, no GUI backend, safe in any thread.
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [h["val_top1"] for h in history], "o-", label="top-1")
    acc_ax.plot(epochs, [h["val_top5"] for h in history], "o-", label="top-5")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation (centre crop)", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def ignore_signals_in_worker(worker_id: int) -> None:
    # A Ctrl-C reaches the whole process group; the main process decides when to stop and shuts
    # the workers down itself, so a worker dying first would only turn that into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Evaluation: centre crop during training, ten crops through the service's path at the end.


@dataclass(frozen=True)
class Evaluation:
    loss: float
    top1: float
    top5: float
    images: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    procs: Processes,
    cancel: CancelFlag,
) -> Evaluation:
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels in loader:
        if cancel:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(labels)
    # Every rank sums its shard here, even one that stopped early: the ranks stay in step.
    loss_sum, correct1, correct5, count, cancelled = all_reduce_sum(
        [loss_sum, correct1, correct5, count, float(bool(cancel))], device, procs
    )
    if cancelled:
        raise Cancelled
    model.train()
    return Evaluation(loss_sum / count, correct1 / count, correct5 / count, int(count))


def ten_crop_accuracy(
    model_path: Path, samples: list[Sample], cancel: CancelFlag, images_per_call: int = 8
) -> tuple[float, float]:
    """Top-1/top-5 of an exported file, each image read from disk as bytes and put through the
    service's preprocessing with the normalisation the file carries (ten crops) and
    OnnxClassifier (averaged softmax), on the CPU."""
    classifier = OnnxClassifier(model_path, providers=["CPUExecutionProvider"], warm_up=False)
    meta = classifier.metadata
    k = min(5, meta.num_classes)
    correct1 = correct5 = 0
    for start in range(0, len(samples), images_per_call):
        if cancel:
            raise Cancelled
        chunk = samples[start : start + images_per_call]
        crops = np.concatenate(
            [meta.preprocess(path.read_bytes(), max_pixels=MAX_PIXELS).batch for path, _ in chunk]
        )
        top = np.argsort(-classifier.probabilities(crops), axis=1, kind="stable")[:, :k]
        labels = np.asarray([label for _, label in chunk])
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(axis=1).sum())
    return correct1 / len(samples), correct5 / len(samples)


def export_validated(
    checkpoint_path: Path, args: argparse.Namespace, val_samples: list[Sample], cancel: CancelFlag,
    log: MetricsLog,
) -> dict[str, Any]:
    """Export the checkpoint to a private temporary file, measure its ten-crop accuracy, write that
    into its metadata and only then move it into the weights dir: the service, which watches that
    folder, never sees an unvalidated model."""
    weights = load_checkpoint(checkpoint_path)  # the same loader alexnet-export uses
    weights = replace(weights, source=f"trained:{args.out.resolve().name}", extra={})
    version = make_version(weights.model.layout, weights.source, datetime.now(UTC))
    final = args.weights_dir / f"{version}.onnx"
    final.parent.mkdir(parents=True, exist_ok=True)
    log.write("export", path=str(final))
    subset = val_samples
    if args.val10_max_images is not None and args.val10_max_images < len(val_samples):
        pick = np.random.default_rng(args.seed).choice(len(val_samples), args.val10_max_images, replace=False)
        subset = [val_samples[i] for i in sorted(pick)]
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".export-") as tmp:
        candidate = Path(tmp) / f"{version}.onnx"
        export_onnx(
            weights, candidate, input_size=args.input_size, resize_size=args.resize_size, version=version
        )
        top1, top5 = ten_crop_accuracy(candidate, subset, cancel)
        proto = onnx.load(candidate)
        props = {p.key: p.value for p in proto.metadata_props}
        metadata = ModelMetadata.from_props(props).model_copy(
            update={"validation_top1": top1, "validation_top5": top5}
        )
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, metadata.to_props())
        atomic_write(final, lambda path: onnx.save_model(proto, path))
    return {"model": str(final), "version": version, "val10_top1": top1, "val10_top5": top5,
            "val10_images": len(subset)}


# ---------------------------------------------------------------------------------------------
# The run, top to bottom.


def train(
    args: argparse.Namespace, procs: Processes, log: MetricsLog, cancel: CancelFlag, progress: Progress
) -> dict[str, Any]:
    out: Path = args.out
    checkpoint_path = out / CHECKPOINT

    # --- device, threads, precision ------------------------------------------------------------
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but torch sees no CUDA device")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{procs.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    cores = max(1, (os.cpu_count() or 1) // procs.local_world_size)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it; respect a choice made outside
        torch.set_num_threads(cores)
    # Workers decode on cores the model also uses: with two cores or fewer they slow steps down.
    workers = args.workers if args.workers is not None else (0 if cores <= 2 else min(8, cores // 2))
    amp = use_cuda if args.amp is None else args.amp
    if amp and not use_cuda:
        raise TrainingError("--amp needs a CUDA device")
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16

    def autocast() -> AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=amp_dtype) if amp else nullcontext()

    # --- data --------------------------------------------------------------------------------------
    resumed: dict[str, Any] | None = None
    if args.resume:
        if not checkpoint_path.is_file():
            raise TrainingError(f"--resume: {checkpoint_path} does not exist")
        try:  # weights_only: data, never code; a pickle that wants to run something is refused
            resumed = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            saved = resumed["config"]
        except Exception as exc:
            raise TrainingError(f"--resume: {checkpoint_path} is not a readable checkpoint: {exc}") from exc
        if (saved.get("lr_schedule") or None) != (args.lr_schedule or None):
            raise TrainingError(
                f"--resume: the run used --lr-schedule {saved.get('lr_schedule')!r}; pass the same"
            )
        # What the saved weights and statistics were made for wins over the command line.
        for key in ("layout", "input_size", "resize_size", "input_scaling"):
            setattr(args, key, saved[key])
    class_names = find_classes(args.data / "train")
    if resumed is not None and list(resumed["class_names"]) != class_names:
        raise TrainingError(
            f"--resume: the checkpoint's classes {resumed['class_names']} differ from {class_names}"
        )
    train_samples = list_images(args.data / "train", class_names)
    val_samples = list_images(args.data / "val", class_names)
    if resumed is not None:
        mean, std = list(resumed["mean"]), list(resumed["std"])
        eigenvalues = np.asarray(resumed["pca_eigenvalues"])
        eigenvectors = np.asarray(resumed["pca_eigenvectors"])
    else:
        stats = colour_statistics(train_samples, args.resize_size, args.stats_images, args.seed)
        if args.input_scaling == "paper":
            mean, std = paper_normalisation(stats)
        else:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        principal = stats.lighting()
        eigenvalues, eigenvectors = principal.eigenvalues, principal.eigenvectors
    lighting = PcaLighting(eigenvalues, eigenvectors, args.pca_std) if args.pca_std > 0 else None
    common = {"resize": args.resize_size, "crop": args.input_size, "mean": mean, "std": std}
    train_set = ImageFolderDataset(
        train_samples, train=True, flip=not args.no_flip, lighting=lighting, **common
    )
    val_set = ImageFolderDataset(val_samples, train=False, **common)
    if args.batch_size % procs.world_size:
        raise TrainingError(
            f"--batch-size {args.batch_size} is not divisible by {procs.world_size} processes"
        )
    local_batch = args.batch_size // procs.world_size
    train_sampler = (
        DistributedSampler(
            train_set, procs.world_size, procs.rank, shuffle=True, seed=args.seed, drop_last=True
        )
        if procs.distributed
        else None
    )
    loader_options: dict[str, Any] = {
        "num_workers": workers, "pin_memory": use_cuda,
        "worker_init_fn": ignore_signals_in_worker if workers else None,
    }
    # drop_last: equal, full batches on every rank, so every rank takes the same number of steps.
    train_loader = DataLoader(train_set, local_batch, shuffle=train_sampler is None, sampler=train_sampler,
                              drop_last=True, **loader_options)
    # Validation shards without padding (DistributedSampler would repeat images to even them out):
    # the summed counts are then exact.
    val_shard = Subset(val_set, range(procs.rank, len(val_set), procs.world_size))
    val_loader = DataLoader(val_shard, max(local_batch, 64), shuffle=False, **loader_options)
    steps_per_epoch = len(train_loader)
    if args.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, args.limit_train_batches)
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(train_set)} training images make no full batch of {local_batch} per process: "
            "lower --batch-size"
        )

    # --- model, optimiser, schedule -------------------------------------------------------------
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = AlexNet(args.layout, len(class_names), args.dropout, args.init).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler = make_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    start_epoch, global_step, history = 0, 0, []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("scaler"):  # empty when saved by a run without fp16 (e.g. on a CPU)
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, global_step = resumed["epoch"], resumed["global_step"]
        history = list(resumed["history"])
        del resumed  # the optimizer state is a second copy of the weights' size
    progress.epochs, progress.step = start_epoch, global_step
    raw_model = model
    if procs.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    total_steps = args.epochs * steps_per_epoch
    log.write("start", epochs=args.epochs, start_epoch=start_epoch, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, train_images=len(train_set), val_images=len(val_set),
              classes=class_names, world_size=procs.world_size, device=str(device),
              resumed=args.resume)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    # --- the loop -----------------------------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        # Seeding per (seed, epoch, rank) makes an epoch's shuffling, crops and dropout the same
        # whether or not the run was resumed before it.
        torch.manual_seed((args.seed * 1_000_003 + epoch) * 1009 + procs.rank)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        epoch_started = interval_started = time.perf_counter()
        loss_sum, interval_images = 0.0, 0
        batches: Iterator = iter(train_loader)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
                   disable=args.no_progress or not procs.main, dynamic_ncols=True)
        for step_in_epoch in range(steps_per_epoch):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            # One all-reduce per step carries the loss (for the log and the divergence check) and
            # the cancel flag, so that all ranks stop or raise together.
            loss_total, cancelled = all_reduce_sum([loss.item(), float(bool(cancel))], device, procs)
            loss_value = loss_total / procs.world_size
            if not math.isfinite(loss_value):
                raise Diverged(
                    f"training diverged at epoch {epoch + 1} step {global_step + 1}: loss {loss_value}; "
                    f"lower --lr (now {current_lr(optimizer):g}) or check --init / --input-scaling"
                )
            if cancelled:
                raise Cancelled
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            progress.step = global_step
            loss_sum += loss_value
            interval_images += len(labels) * procs.world_size
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{current_lr(optimizer):.2g}")
            if global_step % args.log_every == 0 or step_in_epoch == steps_per_epoch - 1:
                now = time.perf_counter()
                log.write("step", epoch=epoch + 1, step=global_step, total_steps=total_steps, loss=loss_value,
                          lr=current_lr(optimizer), images_per_s=interval_images / (now - interval_started))
                interval_started, interval_images = now, 0
        del batches  # shuts the workers down before evaluation starts its own
        bar.close()
        train_seconds = time.perf_counter() - epoch_started
        # The bare model: DDP's wrapper is for gradient sync, and evaluation has no gradients.
        val = evaluate(raw_model, val_loader, device, autocast, procs, cancel)
        lr_used = current_lr(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val.loss)
        else:
            scheduler.step()
        record = {
            "epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / steps_per_epoch,
            "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5, "lr": lr_used,
            "images_per_s": steps_per_epoch * args.batch_size / train_seconds,
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        if procs.main:
            checkpoint = {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "global_step": global_step, "layout": args.layout,
                "class_names": class_names, "mean": mean, "std": std,
                "input_size": args.input_size, "resize_size": args.resize_size,
                "pca_eigenvalues": [float(v) for v in eigenvalues],
                "pca_eigenvectors": [[float(v) for v in row] for row in eigenvectors],
                "config": config, "history": history,
                "validation_top1": val.top1, "validation_top5": val.top5,
            }
            atomic_write(checkpoint_path, lambda tmp, c=checkpoint: torch.save(c, tmp))
            log.write("epoch", **record)
            plot_curves(history, out / CURVES)
            tqdm.write(
                f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}, val loss "
                f"{val.loss:.4f}, top-1 {val.top1:.1%}, top-5 {val.top5:.1%}, lr {lr_used:g}, "
                f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f} s",
                file=sys.stderr,
            )
        progress.epochs = epoch + 1
        if args.stop_at_top1 is not None and val.top1 >= args.stop_at_top1:
            break

    # --- export ------------------------------------------------------------------------------------
    result: dict[str, Any] = {"model": None, "version": None, "val10_top1": None, "val10_top5": None,
                              "val10_images": 0, "epochs": len(history), "step": global_step}
    if procs.main and not args.no_export and history:
        result |= export_validated(checkpoint_path, args, val_samples, cancel, log)
        print(f"wrote {result['model']}: ten-crop top-1 {result['val10_top1']:.1%}, "
              f"top-5 {result['val10_top5']:.1%}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out = args.out or Path("runs") / args.data.resolve().name
    warnings.filterwarnings("ignore", category=FutureWarning)
    procs = processes_from_env()
    if not args.resume and (args.out / CHECKPOINT).exists():
        print(f"alexnet-train: error: {args.out / CHECKPOINT} exists: pass --resume to continue it, "
              "or choose another --out", file=sys.stderr)
        return EXIT_ERROR
    if procs.distributed:
        nccl = args.device != "cpu" and torch.cuda.is_available()
        if nccl:  # NCCL binds each rank to the current device when the group is made
            torch.cuda.set_device(procs.local_rank)
        dist.init_process_group("nccl" if nccl else "gloo")
    log = MetricsLog(args.out / METRICS if procs.main else None, append=args.resume)
    cancel = CancelFlag()
    cancel.install()
    progress = Progress()
    try:
        result = train(args, procs, log, cancel, progress)
        log.write("done", **result)
        return EXIT_OK
    except Cancelled:
        log.write("cancelled", epoch=progress.epochs, step=progress.step, signal=cancel.signal)
        print(f"alexnet-train: cancelled at step {progress.step}; {args.out / CHECKPOINT} holds "
              f"{progress.epochs} completed epochs", file=sys.stderr)
        return EXIT_CANCELLED
    except Diverged as exc:
        log.write("error", kind="diverged", message=str(exc))
        print(f"alexnet-train: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (TrainingError, DatasetError, WeightsError, ExportError) as exc:
        log.write("error", kind="error", message=str(exc))
        print(f"alexnet-train: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        log.write("error", kind="error", message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        cancel.restore()
        log.close()
        if procs.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
