"""``alexnet-train``: train AlexNet from scratch on an image folder, then export it to ONNX.

    alexnet-train data/digits --out runs/digits --epochs 10 --batch-size 64 \\
        --input-size 64 --resize-size 73
    alexnet-train data/digits --out runs/digits --epochs 20 --resume
    alexnet-train --config runs/digits/config.json
    torchrun --standalone --nproc_per_node=2 -m model_export.train data/digits --out runs/ddp
    alexnet-train /shared/data/digits --out /shared/runs/ray --ray head-host:6379 --ray-workers 2

The dataset is ``<data>/train/<class>/*`` and ``<data>/val/<class>/*`` (see model_export.data).

Recipe: the paper's (SGD, batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 when the
validation loss stops improving, at most three times; dropout 0.5; random crops, flips and PCA
lighting), with two defaults changed so that a run learns out of the box: the reference Caffe
model's initialisation (biases 0.1, fc6/fc7 weights N(0, 0.005)) and the paper's input scaling
(0–255 minus the per-channel mean). The paper's constants (N(0, 0.01), biases 1) stay at chance
on these machines. ``--init paper`` and ``--input-scaling imagenet`` select the alternatives.
The parameters, their defaults and bounds are ``alexnet_core.training.TrainRun``'s fields.

Files in ``--out`` (only rank 0 writes): ``checkpoint.pt`` after every epoch, atomically
(model_export.checkpoint); ``metrics.jsonl``, one event per line, flushed as written, appended to
on --resume (the events are ``alexnet_core.training``'s models: start, step, epoch, export, done,
error, cancelled); ``curves.png``, loss and accuracy per epoch.

The exported model goes to ``<weights-dir>/<version>.onnx`` and appears there atomically, already
validated: its metadata carries the ten-crop accuracy measured on the validation set through the
service's own preprocessing (``validation_top1/5``).

Exit codes (``alexnet_core.training.ExitCode``): 0 done; 1 error (bad dataset, checkpoint or
export; message on stderr); 2 bad arguments; 3 training diverged (loss NaN/inf); 130 cancelled by
SIGTERM or SIGINT (the last completed epoch's checkpoint is left intact).

Under torchrun (RANK/WORLD_SIZE set) it trains data-parallel: gloo on CPU, NCCL on GPU. With
``--ray ADDRESS --ray-workers N`` the same code runs as N Ray Train workers on a Ray cluster
(model_export.ray_train; ``pip install '.[cluster]'``), this process only driving them. On a GPU
it runs in mixed precision (bf16 where supported, else fp16 with a gradient scaler).
"""

import argparse
import os
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from alexnet_core.files import WriteError
from alexnet_core.training import (
    CHECKPOINT,
    CURVES,
    METRICS,
    CancelledEvent,
    DoneEvent,
    EpochEvent,
    ErrorEvent,
    ExitCode,
    StartEvent,
    TrainRun,
)
from model_export import distributed, options
from model_export.alexnet import AlexNet
from model_export.checkpoint import Checkpoint, CheckpointError
from model_export.data import DatasetError
from model_export.distributed import Processes
from model_export.engine import (
    Cancelled,
    Diverged,
    EpochPlan,
    Position,
    Stepper,
    TrainingError,
    evaluate,
    train_one_epoch,
)
from model_export.export import ExportError
from model_export.loaders import Data, load_data
from model_export.plots import plot_curves
from model_export.runlog import CancelFlag, MetricsLog
from model_export.schedule import ScheduleError, Scheduler, current_lr, make_scheduler
from model_export.schedule import step as schedule_step
from model_export.validation import export_validated
from model_export.weights import WeightsError

# Kept under these names for callers of the former module constants.
EXIT_OK, EXIT_ERROR, EXIT_DIVERGED, EXIT_CANCELLED = (
    ExitCode.OK,
    ExitCode.ERROR,
    ExitCode.DIVERGED,
    ExitCode.CANCELLED,
)
EXPECTED_ERRORS = (
    TrainingError,
    DatasetError,
    WeightsError,
    ExportError,
    CheckpointError,
    ScheduleError,
    WriteError,
)


def parser() -> argparse.ArgumentParser:
    return options.parser(
        prog="alexnet-train",
        description="Train AlexNet from scratch on <data>/train/<class>/* (validated on <data>/val), "
        "checkpoint every epoch, then export a validated ONNX model that alexnet-serve can serve.",
        epilog=__doc__.split("\n\n", 1)[1].split("Files in", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    cuda: bool
    amp: bool
    amp_dtype: torch.dtype
    workers: int

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype) if self.amp else nullcontext()


def runtime(config: TrainRun, procs: Processes) -> Runtime:
    """Device, threads, DataLoader workers and precision."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but torch sees no CUDA device")
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{procs.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    cores = max(1, (os.cpu_count() or 1) // procs.local_world_size)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it; respect a choice made outside
        torch.set_num_threads(cores)
    # Workers decode on cores the model also uses: with two cores or fewer they slow steps down.
    workers = config.workers if config.workers is not None else (0 if cores <= 2 else min(8, cores // 2))
    amp = cuda if config.amp is None else config.amp
    if amp and not cuda:
        raise TrainingError("--amp needs a CUDA device")
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(device, cuda, amp, amp_dtype, workers)


def resumed_checkpoint(config: TrainRun) -> tuple[TrainRun, Checkpoint | None]:
    """The checkpoint to continue from (with --resume), and the parameters it fixes: what the
    saved weights and statistics were made for wins over the command line."""
    if not config.resume:
        return config, None
    saved = Checkpoint.load(config.run_dir / CHECKPOINT)
    if (saved.config.get("lr_schedule") or None) != (config.lr_schedule or None):
        raise TrainingError(
            f"--resume: the run used --lr-schedule {saved.config.get('lr_schedule')!r}; pass the same"
        )
    fixed = {
        "layout": saved.layout,
        "input_size": saved.input_size,
        "resize_size": saved.resize_size,
        "input_scaling": saved.config["input_scaling"],
    }
    return config.model_copy(update=fixed), saved


@dataclass
class Model:
    stepper: Stepper
    raw: AlexNet  # without DDP's wrapper: what is saved and evaluated
    scheduler: Scheduler
    start_epoch: int
    start_step: int
    history: list[EpochEvent]


def build_model(
    config: TrainRun, data: Data, rt: Runtime, procs: Processes, saved: Checkpoint | None
) -> Model:
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    raw = AlexNet(config.layout, len(data.class_names), config.dropout, config.init).to(rt.device)
    optimizer = torch.optim.SGD(
        raw.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp and rt.amp_dtype == torch.float16)
    start_epoch, step, history = 0, 0, []
    if saved is not None:
        raw.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        if saved.scaler:  # empty when saved by a run without fp16 (e.g. on a CPU)
            scaler.load_state_dict(saved.scaler)
        start_epoch, step, history = saved.epoch, saved.global_step, list(saved.history)
    model: torch.nn.Module = raw
    if procs.distributed:
        model = DistributedDataParallel(raw, device_ids=[rt.device.index] if rt.cuda else None)
    stepper = Stepper(model, optimizer, scaler, rt.device, rt.autocast, procs)
    return Model(stepper, raw, scheduler, start_epoch, step, history)


def save_checkpoint(config: TrainRun, data: Data, m: Model, position: Position, epoch: EpochEvent) -> None:
    s = m.stepper
    Checkpoint(
        model=m.raw.state_dict(),
        optimizer=s.optimizer.state_dict(),
        scheduler=m.scheduler.state_dict(),
        scaler=s.scaler.state_dict(),
        epoch=epoch.epoch,
        global_step=position.step,
        layout=config.layout,
        class_names=data.class_names,
        mean=data.mean,
        std=data.std,
        input_size=config.input_size,
        resize_size=config.resize,
        pca_eigenvalues=[float(v) for v in data.eigenvalues],
        pca_eigenvectors=[[float(v) for v in row] for row in data.eigenvectors],
        config=config.model_dump(mode="json"),
        history=m.history,
        validation_top1=epoch.val_top1,
        validation_top5=epoch.val_top5,
    ).save(config.run_dir / CHECKPOINT)


def fit(
    config: TrainRun,
    data: Data,
    m: Model,
    rt: Runtime,
    procs: Processes,
    log: MetricsLog,
    cancel: CancelFlag,
    position: Position,
) -> None:
    """The epochs from where the checkpoint left off: train, evaluate, schedule, checkpoint."""
    for epoch in range(m.start_epoch, config.epochs):
        # Seeding per (seed, epoch, rank) makes an epoch's shuffling, crops and dropout the same
        # whether or not the run was resumed before it.
        torch.manual_seed((config.seed * 1_000_003 + epoch) * 1009 + procs.rank)
        if data.train_sampler is not None:
            data.train_sampler.set_epoch(epoch)
        started = time.perf_counter()
        plan = EpochPlan(
            epoch,
            data.steps_per_epoch,
            config.epochs * data.steps_per_epoch,
            config.batch_size,
            config.log_every,
            config.progress,
        )
        train_loss = train_one_epoch(m.stepper, data.train_loader, plan, position, cancel, log)
        train_seconds = time.perf_counter() - started
        # The bare model: DDP's wrapper is for gradient sync, and evaluation has no gradients.
        val = evaluate(m.raw, data.val_loader, rt.device, rt.autocast, procs, cancel)
        lr_used = current_lr(m.stepper.optimizer)
        schedule_step(m.scheduler, val.loss)
        record = EpochEvent(
            epoch=epoch + 1,
            step=position.step,
            train_loss=train_loss,
            val_loss=val.loss,
            val_top1=val.top1,
            val_top5=val.top5,
            lr=lr_used,
            images_per_s=plan.steps * config.batch_size / train_seconds,
            seconds=time.perf_counter() - started,
        )
        m.history.append(record)
        if procs.main:
            save_checkpoint(config, data, m, position, record)
            log.write(record)
            plot_curves(m.history, config.run_dir / CURVES)
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, val loss {val.loss:.4f}, "
                f"top-1 {val.top1:.1%}, top-5 {val.top5:.1%}, lr {lr_used:g}, "
                f"{record.images_per_s:.0f} img/s, {record.seconds:.1f} s",
                file=sys.stderr,
            )
        position.epochs = epoch + 1
        if config.target_top1 is not None and val.top1 >= config.target_top1:
            break


def train(
    config: TrainRun, procs: Processes, log: MetricsLog, cancel: CancelFlag, position: Position
) -> DoneEvent:
    rt = runtime(config, procs)
    config, saved = resumed_checkpoint(config)
    data = load_data(config, procs, rt.workers, rt.cuda, saved)
    m = build_model(config, data, rt, procs, saved)
    del saved  # the optimizer state is a second copy of the weights' size
    position.epochs, position.step = m.start_epoch, m.start_step
    log.write(
        StartEvent(
            epochs=config.epochs,
            start_epoch=m.start_epoch,
            steps_per_epoch=data.steps_per_epoch,
            total_steps=config.epochs * data.steps_per_epoch,
            train_images=len(data.train_set),
            val_images=len(data.val_set),
            classes=data.class_names,
            world_size=procs.world_size,
            device=str(rt.device),
            resumed=config.resume,
        )
    )
    fit(config, data, m, rt, procs, log, cancel, position)
    done = DoneEvent(epochs=len(m.history), step=position.step)
    if procs.main and config.export and m.history:
        done = export_validated(config, data.val_samples, cancel, log, len(m.history), position.step)
        print(
            f"wrote {done.model}: top-1 {done.val10_top1:.1%}, top-5 {done.val10_top5:.1%} with the "
            "crops it is served with",
            file=sys.stderr,
        )
    return done


def run(config: TrainRun, procs: Processes, cancel: CancelFlag) -> int:
    """One process of a run, from the process group to its exit code: the whole of a plain or
    torchrun launch, and what each Ray Train worker calls (model_export.ray_train)."""
    distributed.init(procs, config.device)
    log = MetricsLog(config.run_dir / METRICS if procs.main else None, append=config.resume)
    position = Position()
    try:
        log.write(train(config, procs, log, cancel, position))
        return ExitCode.OK
    except Cancelled:
        log.write(CancelledEvent(epoch=position.epochs, step=position.step, signal=cancel.signal))
        print(
            f"alexnet-train: cancelled at step {position.step}; {config.run_dir / CHECKPOINT} holds "
            f"{position.epochs} completed epochs",
            file=sys.stderr,
        )
        return ExitCode.CANCELLED
    except Diverged as exc:
        log.write(ErrorEvent(kind="diverged", message=str(exc)))
        print(f"alexnet-train: error: {exc}", file=sys.stderr)
        return ExitCode.DIVERGED
    except EXPECTED_ERRORS as exc:
        log.write(ErrorEvent(message=str(exc)))
        print(f"alexnet-train: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except Exception as exc:
        log.write(ErrorEvent(message=f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        log.close()
        distributed.close(procs)


def main(argv: list[str] | None = None) -> int:
    config = options.parse(argv, parser())
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not config.resume and (config.run_dir / CHECKPOINT).exists():
        print(
            f"alexnet-train: error: {config.run_dir / CHECKPOINT} exists: pass --resume to continue it, "
            "or choose another --out",
            file=sys.stderr,
        )
        return ExitCode.ERROR
    if config.ray:  # this process drives the Ray Train workers (Ray is imported only there)
        try:
            from model_export.ray_train import drive
        except ImportError as exc:
            print(f"alexnet-train: error: --ray needs the cluster extra: pip install '.[cluster]' ({exc})",
                  file=sys.stderr)  # fmt: skip
            return ExitCode.ERROR
        return drive(config)
    cancel = CancelFlag()
    cancel.install()
    try:
        return run(config, distributed.processes_from_env(), cancel)
    finally:
        cancel.restore()


if __name__ == "__main__":
    raise SystemExit(main())
