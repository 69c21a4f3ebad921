"""The training contract both stages share: parameters, exit codes, the events a run writes, and
what a job's progress is. No torch: the service imports this, and the trainer does too.

``TrainConfig`` holds every parameter of a run once (type, bounds, default, description). It is
the base of the service's ``TrainRequest`` (the body of ``POST /train``), the source of
``alexnet-train``'s options (``model_export.options``) and, as ``TrainRun`` with the paths a
process needs, the ``config.json`` a job's trainer runs from. Adding a parameter is one field here.
"""

import json
import time
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo

from alexnet_core.settings import CommonSettings

Layout = Literal["paper", "torchvision"]
Init = Literal["paper", "caffe", "default"]
InputScaling = Literal["paper", "imagenet"]
Device = Literal["auto", "cpu", "cuda"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
INITS: tuple[str, ...] = get_args(Init)
# The one layout the public ImageNet weights exist in: the default of every export and training.
DEFAULT_LAYOUT: Layout = "torchvision"

E = TypeVar("E")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CONFIG = "config.json"


class ExitCode(IntEnum):
    """``alexnet-train``'s exit status; the service reads a job's end from it."""

    OK = 0
    ERROR = 1  # bad dataset, checkpoint or export; the message is on stderr and in metrics.jsonl
    USAGE = 2  # bad arguments (argparse's own code)
    DIVERGED = 3  # loss NaN/inf
    CANCELLED = 130  # SIGTERM or SIGINT; the last completed epoch's checkpoint is intact


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"  # the server stopped while it ran; resumable


@dataclass(frozen=True)
class Cli:
    """How a field appears on ``alexnet-train``'s command line, where its name does not say it."""

    flag: str | None = None  # default: --<name with dashes>; booleans also get --no-<name>
    metavar: str | None = None
    group: Literal["recipe", "running"] = "recipe"
    positional: bool = False


def narrowed(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """``model``'s field ``name`` with other bounds or default (a subclass's tighter limits),
    keeping its type, description and every constraint not changed."""
    return FieldInfo.merge_field_infos(model.model_fields[name], Field(**changes))


LR_SCHEDULE_PATTERN = r"^\s*\d+:[0-9.eE+-]+(\s*,\s*\d+:[0-9.eE+-]+)*\s*$"


class TrainConfig(BaseModel):
    """Every parameter a training run is chosen by (all a job's client may set)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(90, ge=1, description="total epochs, counting resumed ones")
    batch_size: int = Field(128, ge=1, description="images per step, over all processes")
    lr: float = Field(0.01, gt=0, description="initial learning rate")
    momentum: float = Field(0.9, ge=0, le=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="L2 weight decay")
    dropout: float = Field(0.5, ge=0, lt=1, description="in fc6 and fc7")
    plateau_patience: Annotated[int, Cli(metavar="N")] = Field(
        2, ge=0, le=100, description="divide the lr by 10 after N+1 epochs without a lower validation loss"
    )
    max_lr_reductions: int = Field(3, ge=0, le=20, description="at most this many divisions by 10")
    lr_schedule: Annotated[str | None, Cli(metavar="EPOCH:LR,...")] = Field(
        None,
        max_length=500,
        pattern=LR_SCHEDULE_PATTERN,
        description='explicit per-epoch learning rates instead of the plateau rule, e.g. "0:5e-4,2:2e-4,'
        '5:5e-5": the lr from each (0-based) epoch on; lr before the first listed epoch',
    )
    init: Init = Field(
        "caffe",
        description="caffe: biases 0.1, fc6/fc7 N(0, 0.005), learns out of the box; paper: N(0, 0.01) "
        "and biases 1, as published, stays at chance (see docs/api/training.md); default: PyTorch's",
    )
    input_scaling: InputScaling = Field(
        "paper",
        description="paper: 0-255 minus the dataset's channel means; imagenet: (x/255 - mean) / std "
        "with ImageNet's mean/std",
    )
    layout: Layout = Field(DEFAULT_LAYOUT, description="network layout")
    input_size: int = Field(224, ge=64, description="crop side, 64 at least (the digits: 64)")
    resize_size: int | None = Field(
        None, ge=32, description="shorter side before cropping (default input_size x 256/224)"
    )
    flip: bool = Field(True, description="random horizontal flips (off where mirroring changes the class)")
    pca_std: float = Field(0.1, ge=0, le=10, description="std of the PCA lighting draws (0 turns it off)")
    stats_images: int = Field(1000, ge=1, description="training images sampled for channel means and PCA")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="weights, shuffling, augmentation")
    target_top1: Annotated[float | None, Cli("--stop-at-top1", "F", "running")] = Field(
        None,
        gt=0,
        le=1,
        description="stop once centre-crop validation top-1 reaches this fraction, then export",
    )
    log_every: Annotated[int, Cli(group="running")] = Field(5, ge=1, description="steps between step records")
    limit_train_batches: Annotated[int | None, Cli(metavar="N", group="running")] = Field(
        None, ge=1, description="at most N steps per epoch (quick runs, tests)"
    )
    val10_max_images: Annotated[int | None, Cli(metavar="N", group="running")] = Field(
        None, ge=1, description="test-crop validation of the exported model on at most N images (default all)"
    )
    ray_workers: Annotated[int, Cli(metavar="N", group="running")] = Field(
        1,
        ge=1,
        description="data-parallel training processes as Ray Train workers on a Ray cluster (more than 1 "
        "needs the cluster); the batch is split between them",
    )

    @property
    def resize(self) -> int:
        return self.resize_size or round(self.input_size * 256 / 224)


def _default_weights_dir() -> Path:
    return CommonSettings().weights_dir


class TrainRun(TrainConfig):
    """One trainer process: the parameters plus where it reads and writes, and how it runs. The
    command line and a job's ``config.json`` both parse into this."""

    data: Annotated[Path, Cli(positional=True)] = Field(description="dataset root holding train/ and val/")
    out: Annotated[Path | None, Cli(group="running")] = Field(
        None, description="run folder: checkpoint, metrics, curves (default runs/<data name>)"
    )
    resume: Annotated[bool, Cli(group="running")] = Field(
        False, description="continue from <out>/checkpoint.pt"
    )
    weights_dir: Annotated[Path, Cli(group="running")] = Field(
        default_factory=_default_weights_dir, description="where the ONNX model goes (ALEXNET_WEIGHTS_DIR)"
    )
    export: Annotated[bool, Cli(group="running")] = Field(True, description="export an ONNX model at the end")
    data_root: Annotated[Path | None, Cli(group="running")] = Field(
        None, description="refuse dataset symlinks that lead outside this folder (the server's data root)"
    )
    device: Annotated[Device, Cli(group="running")] = Field(
        "auto", description="auto: CUDA if torch sees one, else the CPU"
    )
    amp: Annotated[bool | None, Cli(group="running")] = Field(
        None, description="mixed precision (default: on for CUDA, never on CPU)"
    )
    workers: Annotated[int | None, Cli(group="running")] = Field(
        None, ge=0, description="DataLoader processes (default: 0 on <= 2 cores, else cores/2, <= 8)"
    )
    threads: Annotated[int | None, Cli(group="running")] = Field(
        None, ge=1, description="torch threads (default: cores / processes)"
    )
    progress: Annotated[bool, Cli(group="running")] = Field(True, description="progress bar")
    ray: Annotated[str | None, Cli(metavar="ADDRESS", group="running")] = Field(
        None,
        description="run as --ray-workers Ray Train workers on the Ray cluster at ADDRESS (host:port of its "
        "head, or auto); the data, --out and --weights-dir must be at the same path on every node",
    )

    @model_validator(mode="after")
    def _run_folder(self) -> "TrainRun":
        if self.out is None:
            self.out = Path("runs") / self.data.resolve().name
        if self.ray_workers > 1 and not self.ray:
            raise ValueError(f"{self.ray_workers} workers need a Ray cluster: pass --ray ADDRESS")
        return self

    @property
    def run_dir(self) -> Path:
        assert self.out is not None  # set by the validator
        return self.out


# --------------------------------------------------------------------------- metrics.jsonl events


class _Event(BaseModel):
    time: float = Field(default_factory=lambda: round(time.time(), 3), description="unix seconds")


class StartEvent(_Event):
    event: Literal["start"] = "start"
    epochs: int
    start_epoch: int
    steps_per_epoch: int
    total_steps: int
    train_images: int
    val_images: int
    classes: list[str]
    world_size: int
    device: str
    resumed: bool


class StepEvent(_Event):
    """Every ``log_every`` steps and on each epoch's last step; ``step`` is global, from 1."""

    event: Literal["step"] = "step"
    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    images_per_s: float


class EpochEvent(_Event):
    """``epoch`` counts from 1 and equals the checkpoint's completed epochs; accuracies are
    fractions, measured on the centre crop."""

    event: Literal["epoch"] = "epoch"
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_s: float
    seconds: float


class ExportEvent(_Event):
    event: Literal["export"] = "export"
    path: str


class DoneEvent(_Event):
    event: Literal["done"] = "done"
    model: str | None = None  # the .onnx written, or None without export
    version: str | None = None
    val10_top1: float | None = None  # the exported model through the service's crops (ten, or five)
    val10_top5: float | None = None
    val10_images: int = 0
    epochs: int
    step: int


class ErrorEvent(_Event):
    event: Literal["error"] = "error"
    message: str
    kind: Literal["diverged", "error"] = "error"


class CancelledEvent(_Event):
    event: Literal["cancelled"] = "cancelled"
    epoch: int  # completed epochs, as in the checkpoint
    step: int
    signal: int | None


Event = Annotated[
    StartEvent | StepEvent | EpochEvent | ExportEvent | DoneEvent | ErrorEvent | CancelledEvent,
    Field(discriminator="event"),
]
EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def read_events(run_dir: Path) -> list[Event]:
    """The records a run has written so far. A line being written (or one this version does not
    know) is skipped, not an error: the file is read while the trainer appends to it."""
    events: list[Event] = []
    try:
        with (run_dir / METRICS).open(encoding="utf-8") as f:
            for line in f:
                try:
                    events.append(EVENT.validate_json(line))
                except (ValidationError, json.JSONDecodeError):
                    continue
    except FileNotFoundError:
        pass
    return events


def last(events: list[Event], kind: type[E]) -> E | None:
    return next((e for e in reversed(events) if isinstance(e, kind)), None)


# --------------------------------------------------------------------------- a job's progress


class JobProgress(BaseModel):
    epoch: int | None = Field(None, description="epochs completed")
    step: int | None = None
    total_steps: int | None = None
    progress: float = Field(0.0, ge=0, le=1, description="fraction of the training steps done")
    eta_s: float | None = Field(None, description="estimated seconds to the end of training")
    loss: float | None = Field(None, description="latest training loss")
    val_top1: float | None = Field(None, description="latest validation top-1 (centre crop)")
    val_top5: float | None = None
    val10_top1: float | None = Field(None, description="final validation top-1 with the served crops")


def job_progress(events: list[Event], state: JobState) -> JobProgress:
    """Where a job is, from its events: the step against the run's total, and an ETA from the
    pace since the (latest) start, which a resumed run counts from its own first step."""
    start, step, epoch, done = (last(events, k) for k in (StartEvent, StepEvent, EpochEvent, DoneEvent))
    total = start.total_steps if start else None
    current = step.step if step else (epoch.step if epoch else None)
    fraction = min(1.0, current / total) if current and total else 0.0
    if state == JobState.succeeded:
        fraction = 1.0
    eta = None
    if state == JobState.running and fraction > 0 and start is not None and step is not None and current:
        done_steps = current - start.start_epoch * start.steps_per_epoch
        elapsed = step.time - start.time
        if done_steps > 0 and elapsed > 0:
            eta = (start.total_steps - current) * elapsed / done_steps
    return JobProgress(
        epoch=epoch.epoch if epoch else None,
        step=current,
        total_steps=total,
        progress=fraction,
        eta_s=eta,
        loss=step.loss if step else None,
        val_top1=epoch.val_top1 if epoch else None,
        val_top5=epoch.val_top5 if epoch else None,
        val10_top1=done.val10_top1 if done else None,
    )
