"""``curves.png``: loss and accuracy per epoch, rewritten after every epoch."""

from pathlib import Path

from alexnet_core import files
from alexnet_core.training import EpochEvent


def plot_curves(history: list[EpochEvent], path: Path) -> None:
    # The object API, not pyplot: no global figure state, no GUI backend, safe in any thread.
    from matplotlib.figure import Figure

    epochs = [h.epoch for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h.val_loss for h in history], "o-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [h.val_top1 for h in history], "o-", label="top-1")
    acc_ax.plot(epochs, [h.val_top5 for h in history], "o-", label="top-5")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation (centre crop)", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
