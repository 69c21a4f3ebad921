"""``checkpoint.pt``: everything a run needs to continue, and ``alexnet-export`` to export it.

Saved as a plain dict of tensors, lists and numbers (``torch.load(..., weights_only=True)``
reads it: data, never code), with the keys ``model_export.weights.load_checkpoint`` reads:
"model", "optimizer", "scheduler", "scaler" (state dicts), "epoch" (completed epochs),
"global_step", "layout", "class_names", "mean", "std" ([0, 1] scale), "input_size",
"resize_size", "pca_eigenvalues", "pca_eigenvectors", "config" (the run's parameters),
"history" (the epoch records), "validation_top1", "validation_top5" (centre crop, fractions).
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from alexnet_core import files
from alexnet_core.training import EpochEvent


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int
    global_step: int
    layout: str
    class_names: list[str]
    mean: list[float]
    std: list[float]
    input_size: int
    resize_size: int
    pca_eigenvalues: list[float]
    pca_eigenvectors: list[list[float]]
    config: dict[str, Any]
    history: list[EpochEvent] = field(default_factory=list)
    validation_top1: float | None = None
    validation_top5: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every tensor of the state dicts.
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        content["history"] = [h.model_dump(exclude={"event", "time"}) for h in self.history]
        return content

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> "Checkpoint":
        names = cls.__dataclass_fields__
        values = {k: v for k, v in content.items() if k in names}
        values["history"] = [EpochEvent.model_validate(h) for h in content.get("history", [])]
        return cls(**values)

    def save(self, path: Path) -> None:
        """Atomically: a reader (a resume, ``alexnet-export``) sees the previous checkpoint or this
        one; on a full disk the previous one is kept (``files.WriteError`` says so)."""
        content = self.to_dict()
        files.atomic_write(path, lambda tmp: torch.save(content, tmp))

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        if not path.is_file():
            raise CheckpointError(f"--resume: {path} does not exist")
        try:  # weights_only: data, never code; a pickle that wants to run something is refused
            return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"--resume: {path} is not a readable checkpoint: {exc}") from exc
