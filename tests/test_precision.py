"""Precision variants (model_export.precision): int8 for CPU, fp16 for CUDA.

Two kinds of evidence. With the session's random-weights model: the variant is a servable model
(metadata intact, own version, not activated by being written) whose logits stay close to fp32's.
With a model trained on scikit-learn's digits (slow): top-1 agreement and accuracy on the real
validation split, which is what decides whether a variant may be served.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image

from alexnet_core.session import OnnxClassifier
from benchmarks.free_engine import default_metadata, write_free_model
from model_export.precision import (
    FP16_MAX_DELTA_P,
    FP16_MIN_TOP1,
    check_images,
    convert_fp16,
    main,
    quantize_int8,
    top1_agreement,
)
from service.model_registry import ModelRegistry, passed_fp16_variant
from tests.conftest import cpu_settings
from tests.images import model_batch

CPU = ["CPUExecutionProvider"]


def photos() -> list[bytes]:
    """scikit-learn's two sample photos (china, flower), as JPEGs."""
    from sklearn.datasets import load_sample_image

    out = []
    for name in ("china.jpg", "flower.jpg"):
        buffer = io.BytesIO()
        Image.fromarray(load_sample_image(name)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def digits(count: int) -> list[bytes]:
    from sklearn.datasets import load_digits

    from tests.digits import digit_image

    out = []
    for pixels in load_digits().images[:count]:
        buffer = io.BytesIO()
        digit_image(pixels, 64).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def logits(classifier: OnnxClassifier, images: list[bytes]) -> np.ndarray:
    return classifier.logits(model_batch(classifier, images))


def quantisation_sigma(source: Path, int8: Path, batch: np.ndarray) -> np.ndarray:
    """Per logit, the standard deviation of the error that int8 rounding adds, from what the int8
    graph stores: each quantised MatMul's per-column weight scales, and the step its dynamic
    quantisation gives the activations (the tensor's range / 255, taken from fp32's activations).

    Rounding errors are uniform in [-step/2, step/2] (variance step^2 / 12): a layer adds
    ``s_c^2 / 12 * sum_j x_j^2`` (weights) and ``step^2 / 12 * sum_j w_jc^2`` (activations) to each
    output's variance, and passes on the previous layer's variance through ``w^2`` where the ReLU
    is open. This is what int8 can promise; the machine's kernels do not enter it."""
    graph = onnx.load(int8).graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    layers = []
    for node in (n for n in graph.node if n.op_type == "MatMulInteger"):
        scale = stored[node.input[1].removesuffix("_quantized") + "_scale"].astype(np.float64)
        weights = (stored[node.input[1]].astype(np.float64) - stored[node.input[3]]) * scale
        layers.append((producer[node.input[0]].input[0], weights, scale))  # (activation, w, scale)
    reference = onnx.load(source)
    reference.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name, _, _ in layers)
    session = ort.InferenceSession(reference.SerializeToString(), providers=CPU)
    activations = session.run([name for name, _, _ in layers], {session.get_inputs()[0].name: batch})
    variance = np.zeros((len(batch), layers[0][1].shape[0]))
    for (_, weights, scale), x in zip(layers, activations, strict=True):
        x = x.reshape(len(batch), -1).astype(np.float64)
        step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
        local = scale**2 / 12 * (x**2).sum(axis=1, keepdims=True) + step**2 / 12 * (weights**2).sum(axis=0)
        variance = local + (variance * (x > 0)) @ weights**2
    return np.sqrt(variance)


@pytest.fixture(scope="module")
def source(imagenet_model_dir: Path) -> Path:
    return imagenet_model_dir / "alexnet-random.onnx"


@pytest.fixture(scope="module")
def int8(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Not beside the shared model: other tests list and serve that directory.
    return quantize_int8(source, tmp_path_factory.mktemp("int8") / "alexnet-random-int8.onnx")


def test_int8_variant_is_a_servable_model_with_its_own_version(source: Path, int8: Path) -> None:
    reference = OnnxClassifier(source, CPU, warm_up=False)
    variant = OnnxClassifier(int8, CPU)  # warms up: the quantised graph really runs
    assert variant.version == f"{reference.version}-int8"
    same = ("layout", "labels", "wnids", "input_size", "resize_size", "mean", "std", "source", "trained")
    assert {k: getattr(variant.metadata, k) for k in same} == {
        k: getattr(reference.metadata, k) for k in same
    }
    props = {p.key: p.value for p in onnx.load(int8, load_external_data=False).metadata_props}
    assert props["precision"] == '"int8"' and props["variant_of"] == f'"{reference.version}"'
    # Fully connected layers only: int8 convolutions (ConvInteger) are 3-5x slower on CPU.
    ops = {node.op_type for node in onnx.load(int8).graph.node}
    assert "MatMulInteger" in ops and "Conv" in ops and "ConvInteger" not in ops
    assert int8.stat().st_size < 0.4 * source.stat().st_size  # FC weights are ~90 % of the bytes


def test_int8_agrees_with_fp32_on_real_images(source: Path, int8: Path) -> None:
    images = photos() + digits(40)
    # Random weights give near-uniform outputs: top-1 margins are ~1e-4 of the top probability,
    # below int8's perturbation on some images, so a few near-ties flip (measured: 95-98 % agree
    # on these 42 images). 0.85 tolerates that; a broken quantisation (wrong scales, wrong
    # channel axis) agrees at about chance, 1 in 1000. The logit check below is the tight one.
    assert top1_agreement(source, int8, images) >= 0.85
    fp32 = OnnxClassifier(source, CPU, warm_up=False)
    batch = model_batch(fp32, images[:2])
    errors = np.abs(OnnxClassifier(int8, CPU, warm_up=False).logits(batch) - fp32.logits(batch))
    # In units of the error int8 rounding predicts for each of the 20 x 1000 logits: about 1 for
    # a correct quantisation (scales, zero points, channel axis); a wrong one is far beyond it, by
    # its own error. Judged on the RMS and the 99th percentile, not the maximum: CPUs without VNNI
    # saturate a few int16 sums of u8 x s8 products, rare outliers that int8 does not bound.
    relative = errors / quantisation_sigma(source, int8, batch)
    assert np.sqrt(np.mean(relative**2)) <= 1.5, np.sqrt(np.mean(relative**2))
    assert np.percentile(relative, 99) <= 4.0, np.percentile(relative, 99)


def test_variants_are_not_activated_by_being_written(tmp_path: Path) -> None:
    # A model with real metadata and a tiny graph (benchmarks.free_engine): what is checked here is
    # where the CLI writes and what the service then serves, not the quantisation itself.
    weights = tmp_path / "weights"
    source = write_free_model(default_metadata("x"), weights / "alexnet-free.onnx")
    assert main([str(source), "--int8"]) == 0  # the CLI, default location
    variant = weights / "alexnet-free-int8.onnx"
    assert variant.is_file()
    assert not list(weights.glob(".*.part"))  # the atomic write left no temporary file behind
    registry = ModelRegistry(cpu_settings(weights))
    # Without ALEXNET_MODEL or an ACTIVE file the service serves the newest model: still the source.
    assert registry.available()[0].name == source.name
    assert registry.find("alexnet-free-int8") == variant  # ... and the variant can be chosen
    assert not (weights / "ACTIVE").exists()


def test_fp16_converts_keeps_float32_io_and_runs(source: Path, tmp_path: Path) -> None:
    fp16 = convert_fp16(source, tmp_path / "alexnet-random-fp16.onnx")
    proto = onnx.load(fp16)
    elem = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [elem]  # keep_io_types
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [elem]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    try:
        variant = OnnxClassifier(fp16, CPU)
    except Exception as exc:  # fp16 is for CUDA; CPU support depends on the onnxruntime build
        pytest.skip(f"this onnxruntime cannot run the fp16 model on CPU: {exc}")
    assert variant.version.endswith("-fp16")
    images = photos()
    reference = logits(OnnxClassifier(source, CPU, warm_up=False), images)
    half = logits(variant, images)
    assert half.dtype == np.float32
    # fp16 keeps ~3 significant digits: measured max difference 0.1 % of the logits' spread.
    assert np.max(np.abs(half - reference)) <= 0.01 * reference.std()


@pytest.mark.slow
def test_int8_of_a_trained_digits_model_keeps_its_validation_accuracy(tmp_path: Path) -> None:
    """The real check: a model trained on digits (alexnet-train), quantised, compared on the
    validation split it was selected on (~360 images). Training to >= 90 % takes 1-3 minutes."""
    from tests.digits import write_digits

    folder = write_digits(tmp_path / "digits", size=32)
    weights = tmp_path / "weights"
    command = [
        sys.executable, "-m", "model_export.train", str(folder.root), "--out", str(tmp_path / "run"),
        "--weights-dir", str(weights), "--epochs", "12", "--batch-size", "64", "--input-size", "64",
        "--resize-size", "73", "--stop-at-top1", "0.9", "--no-progress",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    (model,) = weights.glob("*.onnx")
    int8 = quantize_int8(model)
    val = sorted((folder.root / "val").glob("*/*.png"))
    images = [path.read_bytes() for path in val]
    truth = np.asarray([path.parent.name for path in val])
    accuracy = {}
    for name, path in (("fp32", model), ("int8", int8)):
        classifier = OnnxClassifier(path, CPU, warm_up=False)
        labels = np.asarray(classifier.metadata.labels)
        top1 = np.concatenate(
            [
                classifier.probabilities(model_batch(classifier, images[i : i + 16])).argmax(axis=1)
                for i in range(0, len(images), 16)
            ]
        )
        accuracy[name] = float(np.mean(labels[top1] == truth))
    agreement = top1_agreement(model, int8, images)
    print(f"digits validation ({len(images)} images): top-1 {accuracy}, int8/fp32 agreement {agreement:.3f}")
    assert accuracy["fp32"] >= 0.8, accuracy  # the model did learn, so the comparison means something
    # A trained model has clear margins: int8 of the FC layers should change almost no decision.
    assert agreement >= 0.97
    assert accuracy["int8"] >= accuracy["fp32"] - 0.02, accuracy


def test_fp16_check_is_recorded_at_export_and_decides_the_default_on_cuda(
    source: Path, tmp_path: Path
) -> None:
    """The check runs at export on a stated image set and is recorded in the variant; the
    registry's default on CUDA takes the variant only where it passed."""
    weights = tmp_path / "weights"
    weights.mkdir()
    os.link(source, weights / "alexnet-random.onnx")  # same file, no copy
    model = weights / "alexnet-random.onnx"
    assert passed_fp16_variant(model) is None  # no variant at all
    images = check_images(12)
    assert len({Image.open(io.BytesIO(data)).size for data in images}) == 12  # varied sizes
    unchecked = convert_fp16(model)
    assert OnnxClassifier(unchecked, CPU, warm_up=False).metadata.precision_check is None
    assert passed_fp16_variant(model) is None  # written without a check: never the default
    checked = convert_fp16(model, check=images, image_set="twelve synthetic")
    record = OnnxClassifier(checked, CPU, warm_up=False).metadata.precision_check
    assert record is not None
    assert record["image_set"] == "twelve synthetic" and record["images"] == 12
    assert (record["min_top1_agreement"], record["max_abs_delta_p_bound"]) == (
        FP16_MIN_TOP1,
        FP16_MAX_DELTA_P,
    )
    passes = record["top1_agreement"] >= FP16_MIN_TOP1 and record["max_abs_delta_p"] <= FP16_MAX_DELTA_P
    assert record["passed"] is passes
    assert passed_fp16_variant(model) == (checked if passes else None)
    # A variant whose recorded check failed is never the default.
    proto = onnx.load(checked)
    props = {p.key: p.value for p in proto.metadata_props}
    props["precision_check"] = json.dumps({**record, "passed": False})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, checked)
    assert passed_fp16_variant(model) is None
