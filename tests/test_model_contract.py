"""Models that load but break the output contract (probabilities of shape (n, classes) for the
square kind; finite logits of one row a crop for the crops kind) are refused like corrupt files:
skipped at start-up, a 422 naming the problem at activation. Real ONNX files built with
``onnx.helper``, real servers over HTTP."""

import os
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from alexnet_core.metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from alexnet_core.session import OnnxClassifier
from tests.conftest import cpu_settings, serve
from tests.images import photo_jpeg

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLASSES = 10
SIDE = 32  # the square's side: a cheap probe
CPU = ["CPUExecutionProvider"]


def write_square_model(path: Path, output: str) -> Path:
    """A square-kind model (uint8 (n, S, S, 3) in) of ``CLASSES`` labels whose output is
    ``output``: "probabilities" (the contract), "logits" (random scores), "shifted" (rows that
    sum to 1 but leave [0, 1]), "nan", or "one-row" (one row whatever the batch)."""
    meta = ModelMetadata(
        version=path.stem, layout="paper", labels=[f"c{i}" for i in range(CLASSES)], wnids=[None] * CLASSES,
        input_size=SIDE - 4, resize_size=SIDE, mean=[0.5] * 3, std=[0.25] * 3, source="random",
        trained=False, exported_at=datetime.now(UTC), input_kind="square",
    )  # fmt: skip
    width = CLASSES
    rng = np.random.default_rng(0)
    bias = rng.normal(size=width).astype(np.float32) * 3
    if output == "nan":
        bias[3] = np.nan
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("Gemm", ["pooled", "w", "b"], ["scores" if output == "probabilities" else "raw"]),
    ]
    if output == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], [OUTPUT_NAME], axis=1))
    elif output == "shifted":  # 2p - 1/classes: still sums to 1
        nodes.append(helper.make_node("Softmax", ["raw"], ["p"], axis=1))
        nodes.append(helper.make_node("Mul", ["p", "two"], ["p2"]))
        nodes.append(helper.make_node("Sub", ["p2", "share"], [OUTPUT_NAME]))
    elif output == "one-row":
        nodes.append(helper.make_node("ReduceMean", ["raw"], ["mean"], axes=[0], keepdims=1))
        nodes.append(helper.make_node("Softmax", ["mean"], [OUTPUT_NAME], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["raw"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["n", SIDE, SIDE, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", "classes"])],
        [
            numpy_helper.from_array(rng.normal(size=(3, width)).astype(np.float32) / 100, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(2, np.float32), "two"),
            numpy_helper.from_array(np.array(1 / CLASSES, np.float32), "share"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


BROKEN = {
    "logits": "not to 1",
    "shifted": "[0, 1]",
    "nan": "not finite",
    "one-row": f"(2, {CLASSES})",
}


@pytest.mark.parametrize(("output", "named"), BROKEN.items())
def test_a_model_that_breaks_the_contract_does_not_load(tmp_path: Path, output: str, named: str) -> None:
    path = write_square_model(tmp_path / f"{output}.onnx", output)
    with pytest.raises(ValueError, match="contract") as refused:
        OnnxClassifier(path, CPU)
    assert named in str(refused.value)
    good = OnnxClassifier(write_square_model(tmp_path / "good.onnx", "probabilities"), CPU)
    assert good.probabilities(np.zeros((2, SIDE, SIDE, 3), np.uint8)).shape == (2, CLASSES)


def test_contract_breakers_are_skipped_at_start_up_and_refused_at_activation(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    write_square_model(weights / "good.onnx", "probabilities")
    os.utime(weights / "good.onnx", (1_000_000_000, 1_000_000_000))  # the oldest: tried last
    for output in BROKEN:
        write_square_model(weights / f"{output}.onnx", output)
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as api:
        assert api.get("/model").json()["version"] == "good"
        for output, named in BROKEN.items():
            response = api.post("/model/activate", json={"version": output}, headers=AUTH)
            assert response.status_code == 422, response.text
            assert "contract" in response.json()["detail"] and named in response.json()["detail"]
            assert api.get("/model").json()["version"] == "good"
        predicted = api.post("/predict", params={"top_k": CLASSES}, files={"file": ("a.jpg", photo_jpeg())})
        assert predicted.status_code == 200, predicted.text
        assert abs(sum(p["probability"] for p in predicted.json()["results"][0]["predictions"]) - 1) < 1e-4
