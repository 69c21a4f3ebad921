"""A run's data: the samples, their colour statistics, datasets and DataLoaders (sharded per rank)."""

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Subset

from alexnet_core.training import TrainRun
from model_export.checkpoint import Checkpoint
from model_export.data import (
    ImageFolderDataset,
    PcaLighting,
    Sample,
    colour_statistics,
    find_classes,
    list_images,
    paper_normalisation,
)
from model_export.distributed import Processes
from model_export.engine import TrainingError
from model_export.runlog import ignore_signals_in_worker
from model_export.weights import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Data:
    class_names: list[str]
    val_samples: list[Sample]
    mean: list[float]
    std: list[float]
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    train_set: ImageFolderDataset
    val_set: ImageFolderDataset
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: DistributedSampler | None
    steps_per_epoch: int


def normalisation(
    config: TrainRun, train_samples: list[Sample], saved: Checkpoint | None
) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """mean, std and the PCA axes: a resumed run's own, else measured on the training images."""
    if saved is not None:
        return (
            list(saved.mean),
            list(saved.std),
            np.asarray(saved.pca_eigenvalues),
            np.asarray(saved.pca_eigenvectors),
        )
    stats = colour_statistics(train_samples, config.resize, config.stats_images, config.seed)
    if config.input_scaling == "paper":
        mean, std = paper_normalisation(stats)
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    principal = stats.lighting()
    return mean, std, principal.eigenvalues, principal.eigenvectors


def load_data(config: TrainRun, procs: Processes, workers: int, cuda: bool, saved: Checkpoint | None) -> Data:
    class_names = find_classes(config.data / "train", config.data_root)
    if saved is not None and list(saved.class_names) != class_names:
        raise TrainingError(
            f"--resume: the checkpoint's classes {saved.class_names} differ from {class_names}"
        )
    train_samples = list_images(config.data / "train", class_names, config.data_root)
    val_samples = list_images(config.data / "val", class_names, config.data_root)
    mean, std, eigenvalues, eigenvectors = normalisation(config, train_samples, saved)
    lighting = PcaLighting(eigenvalues, eigenvectors, config.pca_std) if config.pca_std > 0 else None
    common = {"resize": config.resize, "crop": config.input_size, "mean": mean, "std": std}
    train_set = ImageFolderDataset(train_samples, train=True, flip=config.flip, lighting=lighting, **common)
    val_set = ImageFolderDataset(val_samples, train=False, **common)
    if config.batch_size % procs.world_size:
        raise TrainingError(
            f"--batch-size {config.batch_size} is not divisible by {procs.world_size} processes"
        )
    local_batch = config.batch_size // procs.world_size
    sampler = None
    if procs.distributed:
        sampler = DistributedSampler(
            train_set, procs.world_size, procs.rank, shuffle=True, seed=config.seed, drop_last=True
        )
    loader_options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": cuda,
        "worker_init_fn": ignore_signals_in_worker if workers else None,
    }
    # drop_last: equal, full batches on every rank, so every rank takes the same number of steps.
    train_loader = DataLoader(
        train_set, local_batch, shuffle=sampler is None, sampler=sampler, drop_last=True, **loader_options
    )
    # Validation shards without padding (DistributedSampler would repeat images to even them out):
    # the summed counts are then exact.
    val_shard = Subset(val_set, range(procs.rank, len(val_set), procs.world_size))
    val_loader = DataLoader(val_shard, max(local_batch, 64), shuffle=False, **loader_options)
    steps = len(train_loader)
    if config.limit_train_batches is not None:
        steps = min(steps, config.limit_train_batches)
    if steps == 0:
        raise TrainingError(
            f"{len(train_set)} training images make no full batch of {local_batch} per process: "
            "lower --batch-size"
        )
    return Data(
        class_names,
        val_samples,
        mean,
        std,
        eigenvalues,
        eigenvectors,
        train_set,
        val_set,
        train_loader,
        val_loader,
        sampler,
        steps,
    )
