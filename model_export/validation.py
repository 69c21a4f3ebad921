"""The end of a run: the test-time accuracy of the final weights, measured through the service's
own pipeline with the crops the exported model will be served (the paper's ten, or the five
without mirrors for a run without flips), then one export that carries it in the metadata."""

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import torch

from alexnet_core.pipeline import crops_for_training, preprocess, probabilities
from alexnet_core.training import DoneEvent, ExportEvent, TrainRun
from model_export.data import MAX_PIXELS, Sample
from model_export.engine import Cancelled
from model_export.export import export_onnx, make_version
from model_export.runlog import CancelFlag, MetricsLog
from model_export.weights import LoadedWeights, load_checkpoint


@torch.no_grad()
def ten_crop_accuracy(
    weights: LoadedWeights, samples: list[Sample], config: TrainRun, cancel: CancelFlag, per_call: int = 8
) -> tuple[float, float]:
    """Top-1/top-5 of ``weights``, each image read from disk as bytes and put through the
    service's stages (decode, central square, crops, averaged softmax) on the CPU, with the crops
    the export will serve (``crops_for_training(weights.train_flip)``: ten, or five without
    mirrors). The network runs in torch here; export checks that ONNX Runtime gives the same
    logits (within 1e-4), so this is the accuracy the exported file has, measured before it exists."""
    model = weights.model.eval()
    crops_per_image = crops_for_training(weights.train_flip)
    options = {
        "resize": config.resize,
        "crop": config.input_size,
        "max_pixels": MAX_PIXELS,
        "mean": list(weights.mean),
        "std": list(weights.std),
        "crops": crops_per_image,
    }
    k = min(5, len(weights.classes.labels))
    correct1 = correct5 = 0
    for start in range(0, len(samples), per_call):
        if cancel:
            raise Cancelled
        chunk = samples[start : start + per_call]
        crops = np.concatenate([preprocess(path.read_bytes(), **options).batch for path, _ in chunk])
        logits = model(torch.from_numpy(crops)).numpy()
        top = np.argsort(-probabilities(logits, crops_per_image), axis=1, kind="stable")[:, :k]
        labels = np.asarray([label for _, label in chunk])
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(axis=1).sum())
    return correct1 / len(samples), correct5 / len(samples)


def export_validated(
    config: TrainRun, val_samples: list[Sample], cancel: CancelFlag, log: MetricsLog, epochs: int, step: int
) -> DoneEvent:
    """Measure the final checkpoint's test-time accuracy, then export it once with that accuracy
    in its metadata: the file appears in the weights dir (atomically) already validated. The
    checkpoint records this run's flips, so the accuracy and the export use the same crops."""
    weights = load_checkpoint(config.run_dir / "checkpoint.pt")  # the same loader alexnet-export uses
    weights = replace(weights, source=f"trained:{config.run_dir.resolve().name}", extra={})
    version = make_version(weights.model.layout, weights.source, datetime.now(UTC))
    final = config.weights_dir / f"{version}.onnx"
    log.write(ExportEvent(path=str(final)))
    subset = val_samples
    if config.val10_max_images is not None and config.val10_max_images < len(val_samples):
        rng = np.random.default_rng(config.seed)
        subset = [
            val_samples[i]
            for i in sorted(rng.choice(len(val_samples), config.val10_max_images, replace=False))
        ]
    top1, top5 = ten_crop_accuracy(weights, subset, config, cancel)
    export_onnx(
        weights,
        final,
        input_size=config.input_size,
        resize_size=config.resize,
        version=version,
        validation={"validation_top1": top1, "validation_top5": top5},
    )
    return DoneEvent(
        model=str(final),
        version=version,
        val10_top1=top1,
        val10_top5=top5,
        val10_images=len(subset),
        epochs=epochs,
        step=step,
    )
