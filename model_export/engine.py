"""One epoch of training and one evaluation, as in torchvision's reference scripts."""

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from alexnet_core.training import StepEvent
from model_export.distributed import Processes, all_reduce_sum
from model_export.runlog import CancelFlag, MetricsLog
from model_export.schedule import current_lr

Autocast = Callable[[], AbstractContextManager]


class TrainingError(RuntimeError):
    """A run that cannot go on, with a message saying what to change."""


class Diverged(TrainingError):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Position:
    """Where the run is, kept up to date for the record written when it stops."""

    epochs: int = 0  # completed, i.e. in the checkpoint
    step: int = 0


@dataclass(frozen=True)
class Evaluation:
    loss: float
    top1: float
    top5: float
    images: int


@dataclass
class Stepper:
    """What one training step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast: Autocast
    procs: Processes


@dataclass(frozen=True)
class EpochPlan:
    epoch: int  # 0-based
    steps: int
    total_steps: int
    batch_size: int  # over all processes
    log_every: int
    progress_bar: bool


def train_one_epoch(
    s: Stepper, loader: DataLoader, plan: EpochPlan, position: Position, cancel: CancelFlag, log: MetricsLog
) -> float:
    """``plan.steps`` steps; returns the mean training loss. Raises Diverged on a non-finite loss
    and Cancelled once the flag is set, on every rank at the same step."""
    s.model.train()
    interval_started, interval_images, loss_sum = time.perf_counter(), 0, 0.0
    batches: Iterator = iter(loader)
    bar = tqdm(
        total=plan.steps,
        desc=f"epoch {plan.epoch + 1}/{plan.total_steps // plan.steps}",
        unit="step",
        leave=False,
        disable=not plan.progress_bar or not s.procs.main,
        dynamic_ncols=True,
    )
    for step_in_epoch in range(plan.steps):
        images, labels = next(batches)
        images, labels = images.to(s.device, non_blocking=True), labels.to(s.device, non_blocking=True)
        with s.autocast():
            logits = s.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        # One all-reduce per step carries the loss (for the log and the divergence check) and
        # the cancel flag, so that all ranks stop or raise together.
        loss_total, cancelled = all_reduce_sum([loss.item(), float(bool(cancel))], s.device, s.procs)
        loss_value = loss_total / s.procs.world_size
        if not math.isfinite(loss_value):
            raise Diverged(
                f"training diverged at epoch {plan.epoch + 1} step {position.step + 1}: loss {loss_value}; "
                f"lower --lr (now {current_lr(s.optimizer):g}) or check --init / --input-scaling"
            )
        if cancelled:
            raise Cancelled
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        position.step += 1
        loss_sum += loss_value
        interval_images += len(labels) * s.procs.world_size
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{current_lr(s.optimizer):.2g}")
        if position.step % plan.log_every == 0 or step_in_epoch == plan.steps - 1:
            now = time.perf_counter()
            log.write(
                StepEvent(
                    epoch=plan.epoch + 1,
                    step=position.step,
                    total_steps=plan.total_steps,
                    loss=loss_value,
                    lr=current_lr(s.optimizer),
                    images_per_s=interval_images / (now - interval_started),
                )
            )
            interval_started, interval_images = now, 0
    del batches  # shuts the workers down before evaluation starts its own
    bar.close()
    return loss_sum / plan.steps


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Autocast,
    procs: Processes,
    cancel: CancelFlag,
) -> Evaluation:
    """Centre-crop loss and top-1/top-5 over the validation shards of all ranks."""
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
