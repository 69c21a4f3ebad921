"""An exported model as a Triton Inference Server model repository (ONNX Runtime backend).

Layout written (Triton's model repository convention)::

    REPO/<name>/config.pbtxt     ModelConfig in protobuf text format
    REPO/<name>/labels.txt       one label per line, in output index order (classification extension)
    REPO/<name>/1/model.onnx     the exported file, byte for byte

Triton serves the network only: it takes the *preprocessed* float32 tensor, not an image. The
paper's ten-crop preprocessing (resize, centre square, four corners + centre and their mirrors,
normalisation) stays with the client (``alexnet_core.pipeline.preprocess`` does it); the values it
needs are written into the config's ``parameters`` so that a client can read them from Triton's
model-configuration endpoint. One image is ten rows of the batch, and the client averages the
ten softmax outputs; Triton's own classification output (``label_filename``) ranks one row's
logits, i.e. one crop.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import onnx

from alexnet_core import files
from alexnet_core.metadata import ModelMetadata

CROPS_PER_IMAGE = 10  # alexnet_core.pipeline.ten_crop: what one image costs in batch rows
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"  # the ONNX Runtime backend's default model file name
VERSION = "1"
# Triton waits out the whole delay whenever a batch is not full, coming requests or not, so it
# gets a short one; the service's 10 ms (ALEXNET_MAX_BATCH_DELAY_MS) applies only while admitted
# images are still being decoded.
MAX_QUEUE_DELAY_US = 2000
# The export's dynamic batch dimension is bounded (model_export.export: Dim("batch", max=4096)).
MAX_EXPORTED_BATCH = 4096

InstanceKind = Literal["KIND_GPU", "KIND_CPU"]


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _check_name(name: str) -> None:
    # The name is both a directory and Triton's model name: one plain path component.
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(f"invalid Triton model name {name!r}: use one plain directory name")


def _tensor_shape(value_info: onnx.ValueInfoProto) -> tuple[int, list[int | str]]:
    tensor = value_info.type.tensor_type
    dims: list[int | str] = [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim
    ]
    return tensor.elem_type, dims


def check_model(onnx_path: Path, metadata: ModelMetadata) -> None:
    """Raise ``ValueError`` unless the file's graph has the input and output the config will
    declare: a config that disagrees with its model fails only when Triton loads it."""
    # Reads the whole file (the weights are inline), about a second for AlexNet: cheap next to
    # shipping a repository that Triton refuses.
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    size, classes = metadata.input_size, metadata.num_classes
    expected = {
        "input": (inputs, metadata.input_name, [3, size, size]),
        "output": (outputs, metadata.output_name, [classes]),
    }
    for kind, (found, name, dims) in expected.items():
        if set(found) != {name}:
            raise ValueError(f"{onnx_path}: expected one {kind} {name!r}, the model has {sorted(found)}")
        elem_type, shape = _tensor_shape(found[name])
        if elem_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"{onnx_path}: {kind} {name!r} is not float32")
        if len(shape) != len(dims) + 1 or isinstance(shape[0], int) or shape[1:] != dims:
            raise ValueError(
                f"{onnx_path}: {kind} {name!r} has shape {shape}, expected [batch, "
                f"{', '.join(map(str, dims))}] with a dynamic batch dimension (does the metadata "
                "belong to this file?)"
            )


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes made of whole images (multiples of ten crops): half the largest and the largest.
    The batcher waits up to the queue delay for one of them, then runs what it has."""
    largest = max_batch_size // CROPS_PER_IMAGE * CROPS_PER_IMAGE
    half = largest // 2 // CROPS_PER_IMAGE * CROPS_PER_IMAGE
    return sorted({size for size in (half, largest) if size > 0})


def render_config(
    metadata: ModelMetadata, name: str, max_batch_size: int, instance_kind: InstanceKind
) -> str:
    size = metadata.input_size
    dims = f"[ 3, {size}, {size} ]"
    preferred = ", ".join(str(b) for b in preferred_batch_sizes(max_batch_size))
    # Read by clients (and people), ignored by the ONNX Runtime backend, which looks up its own
    # keys only (intra_op_thread_count, execution_mode, ...): no clash with these names.
    parameters = {
        "alexnet_version": metadata.version,
        "alexnet_trained": json.dumps(metadata.trained),
        "preprocess_resize_size": str(metadata.resize_size),
        "preprocess_crop_size": str(size),
        "preprocess_crops": f"{CROPS_PER_IMAGE}: four corners and centre of the central "
        f"{metadata.resize_size}x{metadata.resize_size} square, and their mirrors; average the softmax",
        "preprocess_mean": json.dumps(metadata.mean),
        "preprocess_std": json.dumps(metadata.std),
        "preprocess_scale": "RGB pixels / 255, then (x - mean) / std per channel, NCHW",
    }
    lines = [
        "# Triton Inference Server model configuration, written by alexnet-export",
        "# (model_export/triton.py). Triton takes preprocessed float32 crops, not images: the",
        "# ten-crop preprocessing is the client's (alexnet_core.pipeline.preprocess), with the",
        "# parameters below. One image = 10 batch rows; average their softmax outputs.",
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"default_model_filename: {_quote(MODEL_FILE)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_quote(metadata.input_name)}",
        "    data_type: TYPE_FP32",
        "    format: FORMAT_NCHW",
        f"    dims: {dims}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quote(metadata.output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {metadata.num_classes} ]",
        f"    label_filename: {_quote(LABELS_FILE)}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]",
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}",
        "}",
        "# KIND_GPU needs a GPU build of Triton on a GPU host; KIND_CPU runs anywhere (slowly).",
        "instance_group [",
        "  {",
        f"    kind: {instance_kind}",
        "    count: 1",
        "  }",
        "]",
    ]
    for key, value in parameters.items():
        lines.append(f"parameters {{ key: {_quote(key)} value {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def _place_model(source: Path, destination: Path) -> None:
    """Hard-link the model where possible (no second 230 MB copy; the export replaces its files by
    rename, never in place, so the link cannot change under Triton), else copy it."""
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not allowed: copy
        files.atomic_write(destination, lambda part: shutil.copyfile(source, part))
        return
    try:
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


def write_triton_repository(
    onnx_path: Path,
    metadata: ModelMetadata,
    repo: Path,
    max_batch_size: int = 64,
    name: str = "alexnet",
    *,
    instance_kind: InstanceKind = "KIND_GPU",
) -> Path:
    """Write ``repo/<name>/`` (version 1) for the model at ``onnx_path``; return its config.pbtxt.

    Everything is checked before anything is written, and each file is replaced atomically, the
    config last, so that a repository is never left half-updated or inconsistent with its model.
    """
    _check_name(name)
    if not CROPS_PER_IMAGE <= max_batch_size <= MAX_EXPORTED_BATCH:
        raise ValueError(
            f"max_batch_size must be between {CROPS_PER_IMAGE} (one image's ten crops) and "
            f"{MAX_EXPORTED_BATCH} (the exported model's limit), got {max_batch_size}"
        )
    if instance_kind not in ("KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance_kind must be KIND_GPU or KIND_CPU, got {instance_kind!r}")
    bad = [label for label in metadata.labels if "\n" in label or "\r" in label or not label.strip()]
    if bad:
        raise ValueError(f"labels must be single, non-empty lines for {LABELS_FILE}: {bad[:3]!r}")
    check_model(onnx_path, metadata)

    model_dir = repo / name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    _place_model(onnx_path, version_dir / MODEL_FILE)
    files.write_text(model_dir / LABELS_FILE, "".join(f"{label}\n" for label in metadata.labels))
    config = model_dir / "config.pbtxt"
    files.write_text(config, render_config(metadata, name, max_batch_size, instance_kind))
    return config
