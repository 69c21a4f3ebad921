"""An exported model as a Triton Inference Server model repository (ONNX Runtime backend).

Layout written (Triton's model repository convention)::

    REPO/<name>/config.pbtxt     ModelConfig in protobuf text format
    REPO/<name>/labels.txt       one label per line, in output index order (classification extension)
    REPO/<name>/1/model.onnx     the exported file, byte for byte

For a model of the ``square`` kind (``alexnet-export --input square``, the default), Triton takes
one uint8 central square per image, (S, S, 3) RGB, and the graph does the paper's ten crops, their
mirrors, the normalisation, the softmax and the ten-crop mean (five crops and no mirrors for a
model trained without flips: ``ModelMetadata.test_crops``): a client resizes the shorter side to
S and cuts the centre (``alexnet_core.pipeline.center_square``), and gets the probabilities (and
the fc7 ``features``) without running any of our Python. Triton's classification extension
(``label_filename``) ranks the probabilities of one image.

For the ``crops`` kind, Triton serves the network only: it takes the *preprocessed* float32 tensor.
The crop preprocessing stays with the client (``alexnet_core.pipeline.preprocess`` does it);
one image is ten rows of the batch (five for a model trained without flips: no mirrors), the
client averages their softmax outputs, and Triton's classification output ranks one row's
logits, i.e. one crop. The config's comments and parameters say which.

Either way the preprocessing values are written into the config's ``parameters`` so that a client
can read them from Triton's model-configuration endpoint.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Literal

import onnx

from alexnet_core import files
from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import N_CROPS

# alexnet_core.pipeline.ten_crop: what one image costs in batch rows at most (the paper's ten
# crops; a model trained without flips takes five, ModelMetadata.rows_per_image).
CROPS_PER_IMAGE = N_CROPS
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"  # the ONNX Runtime backend's default model file name
VERSION = "1"
# Triton waits out the whole delay whenever a batch is not full, coming requests or not, so it
# gets a short one; the service's 10 ms (ALEXNET_MAX_BATCH_DELAY_MS) applies only while admitted
# images are still being decoded.
MAX_QUEUE_DELAY_US = 2000
# The export's dynamic batch dimension is bounded (model_export.export: Dim("batch", max=4096) for
# crops; max=409 squares, i.e. 4096 crops, for the square kind).
MAX_EXPORTED_BATCH = 4096
MAX_EXPORTED_SQUARES = MAX_EXPORTED_BATCH // CROPS_PER_IMAGE
# Default batch limits: 64 crop rows (6 images) for the crops kind, as before; 32 images (320 crops
# per call) for the square kind, where one row is a whole image.
DEFAULT_MAX_BATCH = {"crops": 64, "square": 32}

FEATURES = 4096  # fc7's width: the features output of a square-kind model
InstanceKind = Literal["KIND_GPU", "KIND_CPU"]
_TRITON_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


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


def _expected_tensors(metadata: ModelMetadata) -> dict[str, tuple[str, int, list[int]]]:
    """{role: (name, ONNX element type, dims after the batch)} the config will declare."""
    size, classes = metadata.input_size, metadata.num_classes
    if metadata.input_kind == "square":
        side = metadata.resize_size
        expected = {
            "input": (metadata.input_name, onnx.TensorProto.UINT8, [side, side, 3]),
            "output": (metadata.output_name, onnx.TensorProto.FLOAT, [classes]),
        }
    else:
        expected = {
            "input": (metadata.input_name, onnx.TensorProto.FLOAT, [3, size, size]),
            "output": (metadata.output_name, onnx.TensorProto.FLOAT, [classes]),
        }
    if metadata.features_output is not None:
        expected["features output"] = (metadata.features_output, onnx.TensorProto.FLOAT, [FEATURES])
    return expected


def check_model(onnx_path: Path, metadata: ModelMetadata) -> None:
    """Raise ``ValueError`` unless the file's graph has the inputs and outputs the config will
    declare: a config that disagrees with its model fails only when Triton loads it."""
    # Reads the whole file (the weights are inline), about a second for AlexNet: cheap next to
    # shipping a repository that Triton refuses.
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    found = {
        "input": {i.name: i for i in graph.input if i.name not in initializers},
        "output": {o.name: o for o in graph.output},
    }
    expected = _expected_tensors(metadata)
    for role in ("input", "output"):
        names = {name for key, (name, _, _) in expected.items() if key.endswith(role)}
        if set(found[role]) != names:
            raise ValueError(
                f"{onnx_path}: expected {role}s {sorted(names)}, the model has {sorted(found[role])}"
            )
    for role, (name, elem, dims) in expected.items():
        elem_type, shape = _tensor_shape(found[role.split()[-1]][name])
        if elem_type != elem:
            raise ValueError(f"{onnx_path}: {role} {name!r} is not {onnx.TensorProto.DataType.Name(elem)}")
        if len(shape) != len(dims) + 1 or isinstance(shape[0], int) or shape[1:] != dims:
            raise ValueError(
                f"{onnx_path}: {role} {name!r} has shape {shape}, expected [batch, "
                f"{', '.join(map(str, dims))}] with a dynamic batch dimension (does the metadata "
                "belong to this file?)"
            )


def preferred_batch_sizes(max_batch_size: int, rows_per_image: int = CROPS_PER_IMAGE) -> list[int]:
    """Batch sizes made of whole images (multiples of an image's rows: its crops, or one square):
    half the largest and the largest. The batcher waits up to the queue delay for one of them,
    then runs what it has."""
    largest = max_batch_size // rows_per_image * rows_per_image
    half = largest // 2 // rows_per_image * rows_per_image
    return sorted({size for size in (half, largest) if size > 0})


def _parameters(metadata: ModelMetadata) -> dict[str, str]:
    # Read by clients (and people), ignored by the ONNX Runtime backend, which looks up its own
    # keys only (intra_op_thread_count, execution_mode, ...): no clash with these names.
    side = metadata.resize_size
    parameters = {
        "alexnet_version": metadata.version,
        "alexnet_trained": json.dumps(metadata.trained),
        "alexnet_input_kind": metadata.input_kind,
        "preprocess_resize_size": str(side),
        "preprocess_crop_size": str(metadata.input_size),
        "preprocess_mean": json.dumps(metadata.mean),
        "preprocess_std": json.dumps(metadata.std),
    }
    ten = metadata.test_crops == N_CROPS
    if metadata.input_kind == "square":
        crops = "the ten crops, mirrors," if ten else "the five crops (without mirrors),"
        parameters["preprocess_client"] = (
            f"shorter side to {side} (bilinear, antialiased), then the central {side}x{side} square, "
            f"uint8 RGB, HWC; the model does {crops} normalisation, softmax and mean"
        )
    else:
        mirrors = "and their mirrors" if ten else "without mirrors (trained without flips)"
        parameters["preprocess_crops"] = (
            f"{metadata.test_crops}: four corners and centre of the central {side}x{side} square, "
            f"{mirrors}; average the softmax"
        )
        parameters["preprocess_scale"] = "RGB pixels / 255, then (x - mean) / std per channel, NCHW"
    return parameters


def _tensor_lines(name: str, elem: int, dims: list[int], labels: bool) -> list[str]:
    lines = [
        "  {",
        f"    name: {_quote(name)}",
        f"    data_type: {_TRITON_TYPES[elem]}",
        f"    dims: [ {', '.join(map(str, dims))} ]",
    ]
    if labels:
        lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
    return [*lines, "  },"]


def render_config(
    metadata: ModelMetadata, name: str, max_batch_size: int, instance_kind: InstanceKind
) -> str:
    expected = _expected_tensors(metadata)
    preferred = ", ".join(str(b) for b in preferred_batch_sizes(max_batch_size, metadata.rows_per_image))
    in_name, in_elem, in_dims = expected["input"]
    outputs = [
        line
        for role, (out_name, elem, dims) in expected.items()
        if role.endswith("output")
        for line in _tensor_lines(out_name, elem, dims, labels=role == "output")
    ]
    crops = "the paper's ten crops" if metadata.test_crops == N_CROPS else "five crops without mirrors"
    if metadata.input_kind == "square":
        header = [
            "# (model_export/triton.py). One batch row is one image: its uint8 central square",
            f"# ({metadata.resize_size}x{metadata.resize_size}x3 RGB). The model does {crops}",
            "# and returns their mean softmax (and the fc7 features); see the parameters below.",
        ]
    else:
        header = [
            "# (model_export/triton.py). Triton takes preprocessed float32 crops, not images: the",
            f"# preprocessing ({crops}) is the client's (alexnet_core.pipeline.preprocess), with the",
            f"# parameters below. One image = {metadata.test_crops} batch rows; average their softmax.",
        ]
    lines = [
        "# Triton Inference Server model configuration, written by alexnet-export",
        *header,
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"default_model_filename: {_quote(MODEL_FILE)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        *_tensor_lines(in_name, in_elem, in_dims, labels=False)[:-1],
        "  }",
        "]",
        "output [",
        *outputs[:-1],
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
    for key, value in _parameters(metadata).items():
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
    max_batch_size: int | None = None,
    name: str = "alexnet",
    *,
    instance_kind: InstanceKind = "KIND_GPU",
) -> Path:
    """Write ``repo/<name>/`` (version 1) for the model at ``onnx_path``; return its config.pbtxt.
    ``max_batch_size`` counts batch rows (crops, or squares: images); default ``DEFAULT_MAX_BATCH``.

    Everything is checked before anything is written, and each file is replaced atomically, the
    config last, so that a repository is never left half-updated or inconsistent with its model.
    """
    _check_name(name)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH[metadata.input_kind]
    rows = metadata.rows_per_image
    limit = MAX_EXPORTED_SQUARES if metadata.input_kind == "square" else MAX_EXPORTED_BATCH
    if not rows <= max_batch_size <= limit:
        raise ValueError(
            f"max_batch_size must be between {rows} (one image's rows) and {limit} (the exported "
            f"model's limit), got {max_batch_size}"
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
