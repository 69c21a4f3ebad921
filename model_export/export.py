"""PyTorch AlexNet -> one self-describing ONNX file, checked against torch before it is kept."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from alexnet_core import files, model_files
from alexnet_core.metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from alexnet_core.pipeline import crops_for_training, cut_crops, probabilities
from model_export.features import add_features_output
from model_export.tencrop import FEATURES_NAME, PROBABILITIES_NAME, TenCropModel
from model_export.weights import LoadedWeights

OPSET = 18
PARITY_TOLERANCE = 1e-4  # logits of the crops kind against torch
PROBABILITY_TOLERANCE = 1e-5  # the square kind's probabilities against the host pipeline + torch
FEATURE_TOLERANCE = 1e-4  # relative to the largest feature value
InputKind = Literal["crops", "square"]
INPUT_KINDS: tuple[str, ...] = ("crops", "square")
# Measured on the 2-core CPU host (benchmarks/input_kinds.py): host work after decoding about half,
# inference no slower; on a GPU host the square is also 30x fewer bytes to copy per image.
DEFAULT_INPUT_KIND: InputKind = "square"


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    max_abs_diff: float  # crops: logits; square: probabilities
    seconds: float
    bytes: int
    max_feature_diff: float | None = None  # square: relative difference of the features output


def make_version(layout: str, source: str, when: datetime) -> str:
    kind = source.split(":", 1)[0]
    return f"alexnet-{layout}-{kind}-{when:%Y%m%d-%H%M%S-%f}"


def _to_model_proto(model: torch.nn.Module, input_size: int) -> onnx.ModelProto:
    example = torch.randn(2, 3, input_size, input_size)
    return _export(model, example, [OUTPUT_NAME], {"x": {0: torch.export.Dim("batch", min=1, max=4096)}})


def _square_proto(model: TenCropModel, resize_size: int) -> onnx.ModelProto:
    example = torch.randint(0, 256, (2, resize_size, resize_size, 3), dtype=torch.uint8)
    # At most ten crops per image: the same bound on crops per call as the crops kind.
    batch = torch.export.Dim("batch", min=1, max=4096 // 10)
    return _export(model, example, [PROBABILITIES_NAME, FEATURES_NAME], {"images": {0: batch}})


def _export(
    model: torch.nn.Module, example: torch.Tensor, outputs: list[str], dynamic: dict[str, dict[int, object]]
) -> onnx.ModelProto:
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=outputs,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes=dynamic,
    )
    return program.model_proto


def check_parity(model: torch.nn.Module, onnx_path: Path, input_size: int, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch logits on a random batch."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(4, 3, input_size, input_size, generator=generator)
    with torch.no_grad():
        expected = model(batch).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    return float(np.max(np.abs(actual - expected)))


def check_square_parity(model: TenCropModel, onnx_path: Path, metadata: ModelMetadata) -> tuple[float, float]:
    """The square kind against the host pipeline: the model's crops cut on the host, torch on
    them, the host's softmax and mean. Returns the max abs probability difference and the max feature
    difference relative to the largest feature."""
    size = metadata.resize_size
    rng = np.random.default_rng(0)
    # Noise on a gradient: every crop and mirror differs, so a wrong offset or flip shows.
    ramp = np.linspace(0, 160, size, dtype=np.float32)
    squares = np.clip(ramp[None, :, None, None] + rng.integers(0, 96, (3, size, size, 3)), 0, 255)
    squares = squares.astype(np.uint8)
    count = metadata.test_crops
    crops = np.concatenate(
        [cut_crops(square, metadata.input_size, metadata.mean, metadata.std, count) for square in squares]
    )
    with torch.no_grad():
        batch = torch.from_numpy(crops)
        expected_probs = probabilities(model.net(batch).numpy(), count)
        expected_features = model.fc7(batch).numpy().reshape(len(squares), count, -1).mean(axis=1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probs, features = session.run([PROBABILITIES_NAME, FEATURES_NAME], {INPUT_NAME: squares})
    prob_diff = float(np.max(np.abs(probs - expected_probs)))
    largest = max(1.0, float(np.abs(expected_features).max()))
    feature_diff = float(np.max(np.abs(features - expected_features))) / largest
    return prob_diff, feature_diff


def _metadata(
    weights: LoadedWeights,
    version: str,
    input_size: int,
    resize_size: int,
    input_kind: InputKind,
    validation: dict[str, float] | None,
) -> ModelMetadata:
    """What the exported file says about itself (``alexnet_core.metadata``)."""
    model, square = weights.model, input_kind == "square"
    return ModelMetadata(
        version=version,
        layout=model.layout,
        labels=weights.classes.labels,
        wnids=weights.classes.wnids,
        input_size=input_size,
        resize_size=resize_size,
        mean=list(weights.mean),
        std=list(weights.std),
        source=weights.source,
        source_sha256=weights.sha256,
        trained=weights.trained,
        exported_at=datetime.now(UTC),
        input_kind=input_kind,
        train_flip=weights.train_flip,
        test_crops=crops_for_training(weights.train_flip),
        output_name=PROBABILITIES_NAME if square else OUTPUT_NAME,
        features_output=FEATURES_NAME if square else None,
        **(validation or weights.extra),
    )


def export_onnx(
    weights: LoadedWeights,
    output: Path,
    *,
    input_size: int = 224,
    resize_size: int = 256,
    version: str | None = None,
    validation: dict[str, float] | None = None,
    input_kind: InputKind = DEFAULT_INPUT_KIND,
    features: bool = False,
) -> ExportResult:
    """Export, write the metadata, check parity, then move the file into place atomically: the
    service never sees a half-written or unchecked model at ``output``.

    ``input_kind``: ``square`` takes uint8 central squares and does the crops, normalisation,
    softmax and mean over the crops in the graph (model_export.tencrop), with a ``features``
    output; ``crops`` takes the host's normalised float crops and returns logits.

    The crops are the paper's ten, or the five without mirrors for weights trained without flips
    (``weights.train_flip`` False); the metadata records both (``train_flip``, ``test_crops``)."""
    if input_kind not in INPUT_KINDS:
        raise ExportError(f"unknown input kind {input_kind!r}; choose one of {INPUT_KINDS}")
    started = time.perf_counter()
    model = weights.model.eval()
    square = input_kind == "square"
    metadata = _metadata(weights, version or output.stem, input_size, resize_size, input_kind, validation)
    if square:
        wrapper = TenCropModel(
            model, resize_size, input_size, weights.mean, weights.std, metadata.test_crops
        ).eval()
        proto = _square_proto(wrapper, resize_size)
    else:
        proto = _to_model_proto(model, input_size)
    onnx.helper.set_model_props(proto, metadata.to_props())
    if features and not square:  # fc7 after ReLU as a second output (the square kind has it)
        metadata = add_features_output(proto, metadata)
    diff, feature_diff = 0.0, None

    def write_checked(tmp: Path) -> None:
        nonlocal diff, feature_diff
        onnx.save_model(proto, tmp)
        if square:
            diff, feature_diff = check_square_parity(wrapper, tmp, metadata)
            if not (diff <= PROBABILITY_TOLERANCE and feature_diff <= FEATURE_TOLERANCE):
                raise ExportError(
                    "ONNX Runtime and the host pipeline + torch disagree: max abs probability "
                    f"difference {diff:.3g} (limit {PROBABILITY_TOLERANCE}), relative feature "
                    f"difference {feature_diff:.3g} (limit {FEATURE_TOLERANCE})"
                )
            return
        diff = check_parity(model, tmp, input_size)
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"ONNX Runtime and torch disagree: max abs logit difference {diff:.3g} > {PARITY_TOLERANCE}"
            )

    try:  # parity is checked on the temporary file: the service never sees an unchecked model
        files.atomic_write(output, write_checked)
        model_files.write_manifest(output)  # the SHA-256 the service checks before serving it
    except files.WriteError as exc:  # disk full (ENOSPC), a file size limit (EFBIG), permissions
        cause = exc.__cause__
        reason = getattr(cause, "strerror", None) or cause or exc
        raise ExportError(f"cannot write the model into {output.parent}/: {reason}") from exc
    seconds = time.perf_counter() - started
    return ExportResult(output, metadata, diff, seconds, output.stat().st_size, feature_diff)
