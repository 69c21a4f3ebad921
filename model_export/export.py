"""PyTorch AlexNet -> one self-describing ONNX file, checked against torch before it is kept."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from alexnet_core import files
from alexnet_core.metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from model_export.features import add_features_output
from model_export.weights import LoadedWeights

OPSET = 18
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ModelMetadata
    max_abs_diff: float
    seconds: float
    bytes: int


def make_version(layout: str, source: str, when: datetime) -> str:
    kind = source.split(":", 1)[0]
    return f"alexnet-{layout}-{kind}-{when:%Y%m%d-%H%M%S-%f}"


def _to_model_proto(model: torch.nn.Module, input_size: int) -> onnx.ModelProto:
    example = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"x": {0: batch}},
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


def export_onnx(
    weights: LoadedWeights,
    output: Path,
    *,
    input_size: int = 224,
    resize_size: int = 256,
    version: str | None = None,
    validation: dict[str, float] | None = None,
    features: bool = False,
) -> ExportResult:
    """Export, write the metadata, check parity, then move the file into place atomically: the
    service never sees a half-written or unchecked model at ``output``."""
    started = time.perf_counter()
    model = weights.model.eval()
    now = datetime.now(UTC)
    metadata = ModelMetadata(
        version=version or output.stem,
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
        exported_at=now,
        **(validation or weights.extra),
    )
    proto = _to_model_proto(model, input_size)
    onnx.helper.set_model_props(proto, metadata.to_props())
    if features:  # fc7 after ReLU as a second output, for /embed and /similar (model_export.features)
        metadata = add_features_output(proto, metadata)
    diff = 0.0

    def write_checked(tmp: Path) -> None:
        nonlocal diff
        onnx.save_model(proto, tmp)
        diff = check_parity(model, tmp, input_size)
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(
                f"ONNX Runtime and torch disagree: max abs logit difference {diff:.3g} > {PARITY_TOLERANCE}"
            )

    try:  # parity is checked on the temporary file: the service never sees an unchecked model
        files.atomic_write(output, write_checked)
    except files.WriteError as exc:  # disk full (ENOSPC), a file size limit (EFBIG), permissions
        cause = exc.__cause__
        reason = getattr(cause, "strerror", None) or cause or exc
        raise ExportError(f"cannot write the model into {output.parent}/: {reason}") from exc
    return ExportResult(output, metadata, diff, time.perf_counter() - started, output.stat().st_size)
