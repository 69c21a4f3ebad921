"""The square input kind (``alexnet-export --input square``): the ten crops, the normalisation, the
softmax and the ten-crop mean in the graph. Checked against the crops kind with the same weights
(the host pipeline), against torch, and served over real HTTP."""

from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch

from alexnet_core.images import decode
from alexnet_core.pipeline import center_square, ten_crop
from alexnet_core.session import OnnxClassifier
from model_export.cli import main as export_cli
from model_export.export import ExportError, export_onnx
from model_export.weights import random_weights
from tests.conftest import cpu_settings, random_model_dir, serve
from tests.images import big_photo_jpeg, encode, model_batch, photo, photo_jpeg

CPU = ["CPUExecutionProvider"]


def real_photos() -> list[bytes]:
    """Both shipped photos, a portrait crop of one (other aspect ratio) and a 12 MP JPEG."""
    portrait = encode(photo("flower.jpg").crop((100, 0, 400, 427)), "PNG")
    return [photo_jpeg("china.jpg"), photo_jpeg("flower.jpg"), portrait, big_photo_jpeg()]


@pytest.fixture(scope="module")
def square_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's crops-kind model's weights (torchvision layout, seed 0), as the square kind."""
    return random_model_dir(tmp_path_factory.mktemp("square"), "square")


@pytest.fixture(scope="module")
def square(square_dir: Path) -> OnnxClassifier:
    return OnnxClassifier(square_dir / "alexnet-random.onnx", CPU)


@pytest.fixture(scope="module")
def crops(imagenet_model_dir: Path) -> OnnxClassifier:
    classifier = OnnxClassifier(imagenet_model_dir / "alexnet-random.onnx", CPU, warm_up=False)
    assert classifier.metadata.input_kind == "crops"
    return classifier


def test_metadata_and_graph_describe_the_square_kind(square: OnnxClassifier) -> None:
    meta = square.metadata
    assert (meta.input_kind, meta.input_name, meta.output_name) == ("square", "images", "probabilities")
    assert meta.features_output == "features" and meta.rows_per_image == 1
    inputs = {i.name: i for i in square.session.get_inputs()}
    assert inputs["images"].type == "tensor(uint8)" and inputs["images"].shape[1:] == [256, 256, 3]
    assert isinstance(inputs["images"].shape[0], str)  # dynamic batch
    outputs = {o.name: o.shape for o in square.session.get_outputs()}
    assert outputs["probabilities"][1:] == [1000] and outputs["features"][1:] == [4096]
    one = square.metadata.preprocess(photo_jpeg(), max_pixels=10**8)
    assert one.batch.shape == (1, 256, 256, 3) and one.batch.dtype == np.uint8
    with pytest.raises(ValueError, match="probabilities only"):
        square.logits(one.batch)


def test_graph_crops_with_slices_not_loops(square_dir: Path) -> None:
    graph = onnx.load(str(square_dir / "alexnet-random.onnx"), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert not {"Loop", "Scan", "If", "Gather"} & set(ops)
    assert ops.count("Conv") == 5 and ops.count("Gemm") == 3  # the network once, on all crops
    steps = {
        i.name: onnx.numpy_helper.to_array(i).tolist() for i in graph.initializer if i.name.startswith("val_")
    }
    flips = [
        n for n in graph.node if n.op_type == "Slice" and len(n.input) == 5 and steps.get(n.input[4]) == [-1]
    ]
    assert len(flips) == 1  # the five mirrors: one reversed slice of the stacked crops
    # The uint8 square is transposed before the cast: a quarter of the bytes to move.
    assert ops[:4] == ["Transpose", "Cast", "Sub", "Div"]


def test_square_kind_agrees_with_the_host_pipeline(square: OnnxClassifier, crops: OnnxClassifier) -> None:
    images = real_photos()
    expected = crops.probabilities(model_batch(crops, images))
    actual = square.probabilities(model_batch(square, images))
    assert actual.shape == expected.shape == (len(images), 1000)
    assert np.max(np.abs(actual - expected)) <= 1e-5
    # Random weights give nearly uniform probabilities, so also relative to each value.
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    for a, e in zip(actual, expected, strict=True):
        assert list(np.argsort(-a, kind="stable")[:5]) == list(np.argsort(-e, kind="stable")[:5])


def test_features_are_fc7_ten_crop_mean_from_torch(square: OnnxClassifier) -> None:
    model = random_weights("torchvision", seed=0).model.eval()
    images = real_photos()[:2]
    expected = []
    for data in images:
        square_pixels = center_square(decode(data, 256, 10**8), 256)
        x = torch.from_numpy(ten_crop(square_pixels, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        with torch.no_grad():
            hidden = torch.flatten(model.avgpool(model.features(x)), 1)
            fc7 = torch.relu(model.classifier[4](torch.relu(model.classifier[1](hidden))))
        expected.append(fc7.mean(dim=0).numpy())
    probs, features = square.outputs(model_batch(square, images))
    assert features.shape == (2, 4096) and features.dtype == np.float32 and probs.shape == (2, 1000)
    np.testing.assert_allclose(features, np.stack(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(square.features(model_batch(square, images)), features)
    assert (features >= 0).all() and features.max() > 0  # after the ReLU, not all dead


def test_crops_kind_without_features_says_so(crops: OnnxClassifier) -> None:
    with pytest.raises(ValueError, match="no features output"):
        crops.features(model_batch(crops, real_photos()[:1]))


def test_predict_serves_both_kinds_with_the_same_top5(square_dir: Path, client: httpx.Client) -> None:
    files = [("files", (f"{i}.img", data)) for i, data in enumerate(real_photos())]
    reference = client.post("/predict", files=files)
    assert reference.status_code == 200, reference.text
    with serve(cpu_settings(square_dir)) as url, httpx.Client(base_url=url, timeout=60) as square_client:
        response = square_client.post("/predict", files=files)
        assert response.status_code == 200, response.text
        # Bad input is still the same clear 4xx with this kind.
        bad = square_client.post("/predict", files={"file": ("x.jpg", b"\xff\xd8\xffnot a jpeg")})
        assert bad.status_code == 422 and "corrupt" in bad.json()["detail"]
    got, want = response.json()["results"], reference.json()["results"]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert [p["index"] for p in g["predictions"]] == [p["index"] for p in w["predictions"]]
        for pg, pw in zip(g["predictions"], w["predictions"], strict=True):
            assert pg["probability"] == pytest.approx(pw["probability"], rel=1e-5)


def test_cli_input_option_and_parity_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sq.onnx"
    args = ["--source", "random", "--layout", "paper", "--resize-size", "100", "--input-size", "88"]
    assert export_cli([*args, "--input", "square", "--output", str(out)]) == 0
    assert "max abs probability difference" in capsys.readouterr().out
    classifier = OnnxClassifier(out, CPU)  # warms up with a (1, 100, 100, 3) square
    assert classifier.metadata.input_kind == "square" and classifier.metadata.layout == "paper"
    probs = classifier.probabilities(np.zeros((3, 100, 100, 3), dtype=np.uint8))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_failed_square_parity_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model_export.export as export_module

    monkeypatch.setattr(export_module, "PROBABILITY_TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="host pipeline"):
        export_onnx(
            random_weights("paper"), tmp_path / "m.onnx", input_kind="square", resize_size=80, input_size=64
        )
    assert list(tmp_path.iterdir()) == []


def test_precision_variants_of_the_square_kind(
    square_dir: Path, square: OnnxClassifier, tmp_path: Path
) -> None:
    """fp16 keeps the uint8 input, normalises and averages in float32; int8 quantises the FC layers."""
    from model_export.precision import convert_fp16, quantize_int8

    source = square_dir / "alexnet-random.onnx"
    images = real_photos()[:2]
    reference = square.outputs(model_batch(square, images))
    half = convert_fp16(source, tmp_path / "alexnet-random-fp16.onnx")
    graph = onnx.load(str(half)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    for op in ("Sub", "Div", "Softmax", "ReduceMean"):
        for node in (n for n in graph.node if n.op_type == op):
            for name in node.input:  # every float operand really is float32, not an fp16 round trip
                while name in producers and producers[name].op_type == "Identity":
                    name = producers[name].input[0]
                if name in initializers:
                    assert initializers[name].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
                else:
                    node_in = producers[name]
                    assert not (
                        node_in.op_type == "Cast" and node_in.attribute[0].i == onnx.TensorProto.FLOAT16
                    )
    for path, rtol in ((half, 1e-3), (quantize_int8(source, tmp_path / "alexnet-random-int8.onnx"), 1e-2)):
        variant = OnnxClassifier(path, CPU)
        assert variant.metadata.input_kind == "square"
        probs, features = variant.outputs(model_batch(variant, images))
        assert probs.dtype == features.dtype == np.float32
        np.testing.assert_allclose(probs, reference[0], rtol=rtol)
        assert np.abs(features - reference[1]).max() <= 2 * rtol * reference[1].max()
