"""A model file with a real model's metadata and an engine that costs almost nothing.

The graph takes exactly the input the metadata's ``input_kind`` describes and returns the output
of the right name and shape, so the service decodes, resizes, crops, batches and answers exactly
as for the real network; only the network's own arithmetic is gone. That leaves what the serving
path itself costs per image (HTTP, multipart, decode, resize, crops, copies, JSON): the host work
that a GPU would not hide.
"""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from alexnet_core.metadata import ModelMetadata

OPSET = 17
IR_VERSION = 8


def _head(
    pooled: str, meta: ModelMetadata, probabilities: bool
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """(N, 3) channel means -> (N, classes) through one tiny MatMul (and a softmax)."""
    weights = np.random.default_rng(0).standard_normal((3, meta.num_classes)).astype(np.float32)
    initializers = [numpy_helper.from_array(weights, "head_weights")]
    output = "head_logits" if probabilities else meta.output_name
    nodes = [helper.make_node("MatMul", [pooled, "head_weights"], [output])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["head_logits"], [meta.output_name], axis=1))
    return nodes, initializers


def free_graph(meta: ModelMetadata) -> onnx.ModelProto:
    """crops: float32 (N, 3, C, C) -> a few pixels -> channel means -> (N, classes) logits.
    square: uint8 (N, S, S, 3) -> a few pixels -> channel means -> (N, classes) probabilities."""
    crops = meta.input_kind == "crops"
    if crops:
        shape, dtype, space = ["N", 3, meta.input_size, meta.input_size], TensorProto.FLOAT, [2, 3]
    else:
        shape, dtype, space = ["N", meta.resize_size, meta.resize_size, 3], TensorProto.UINT8, [1, 2]
    # Slice first: a reduction over the whole input would cost as much as a copy of it.
    initializers = [
        numpy_helper.from_array(np.asarray([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.asarray([2, 2], np.int64), "ends"),
        numpy_helper.from_array(np.asarray(space, np.int64), "axes"),
    ]
    nodes = [helper.make_node("Slice", [meta.input_name, "starts", "ends", "axes"], ["corner"])]
    if not crops:
        nodes.append(helper.make_node("Cast", ["corner"], ["corner_float"], to=TensorProto.FLOAT))
    source = "corner" if crops else "corner_float"
    nodes.append(helper.make_node("ReduceMean", [source], ["pooled"], axes=space, keepdims=0))
    head_nodes, head_initializers = _head("pooled", meta, probabilities=not crops)
    graph = helper.make_graph(
        nodes + head_nodes,
        "free-engine",
        [helper.make_tensor_value_info(meta.input_name, dtype, shape)],
        [helper.make_tensor_value_info(meta.output_name, TensorProto.FLOAT, ["N", meta.num_classes])],
        initializers + head_initializers,
    )
    # An IR version every supported onnxruntime reads (onnx writes its newest by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def default_metadata(version: str, input_kind: str = "crops") -> ModelMetadata:
    """The metadata of a random-weights torchvision-layout export (1000 ImageNet classes), without
    importing torch: what ``alexnet-export --source random`` writes."""
    from model_export.labels import imagenet_classes

    classes = imagenet_classes()
    return ModelMetadata.model_validate(
        {
            "version": version,
            "layout": "torchvision",
            "labels": classes.labels,
            "wnids": classes.wnids,
            "mean": [0.485, 0.456, 0.406],  # torchvision's ImageNet normalisation
            "std": [0.229, 0.224, 0.225],
            "source": "random",
            "trained": False,
            "exported_at": datetime.now(UTC),
            "input_kind": input_kind,
        }
    )


def write_free_model(meta: ModelMetadata, path: Path) -> Path:
    """Write the free engine for ``meta`` to ``path`` (its stem becomes the version)."""
    meta = meta.model_copy(update={"version": path.stem, "source": "free-engine benchmark", "trained": False})
    model = free_graph(meta)
    helper.set_model_props(model, meta.to_props())
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path
