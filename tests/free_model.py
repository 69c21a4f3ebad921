"""A model file that costs (almost) nothing to run: the real metadata and input/output names and
shapes, but a graph of one ReduceMean and one Gemm, so the server's own work is all that is left."""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from alexnet_core.metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata


def write_free_model(path: Path, classes: int = 1000) -> Path:
    meta = ModelMetadata(
        version=path.stem,
        layout="torchvision",
        labels=[f"class {i}" for i in range(classes)],
        wnids=[None] * classes,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        source="random",
        trained=False,
        exported_at=datetime.now(UTC),
    )
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [INPUT_NAME], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("Gemm", ["pooled", "w"], [OUTPUT_NAME]),
        ],
        "free",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", 3, 224, 224])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
