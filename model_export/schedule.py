"""Learning-rate schedules: the paper's plateau rule, or explicit rates by epoch."""

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from alexnet_core.training import TrainConfig

Scheduler = LRScheduler | ReduceLROnPlateau


class ScheduleError(ValueError):
    pass


def parse_lr_schedule(text: str) -> list[tuple[int, float]]:
    try:
        pairs = (part.split(":") for part in text.split(",") if part.strip())
        points = sorted((int(epoch), float(lr)) for epoch, lr in pairs)
    except ValueError:
        raise ScheduleError(
            f'--lr-schedule {text!r}: expected "EPOCH:LR,EPOCH:LR,...", e.g. "0:0.01,30:0.001"'
        ) from None
    if not points or any(e < 0 or not lr > 0 for e, lr in points):
        raise ScheduleError(f"--lr-schedule {text!r}: epochs must be >= 0 and rates > 0")
    return points


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Scheduler:
    if config.lr_schedule:
        points = parse_lr_schedule(config.lr_schedule)

        def factor(epoch: int) -> float:
            lr = config.lr
            for start, value in points:
                if epoch >= start:
                    lr = value
            return lr / config.lr

        return LambdaLR(optimizer, factor)
    # min_lr caps the number of reductions: lr * 0.1**k is where the plateau rule stops dividing.
    return ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=0.1,
        patience=config.plateau_patience,
        min_lr=config.lr * 0.1**config.max_lr_reductions,
    )


def step(scheduler: Scheduler, val_loss: float) -> None:
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
