"""Precision variants (model_export.precision): int8 for CPU, fp16 for CUDA.

Two kinds of evidence. With the session's random-weights model: the variant is a servable model
(metadata intact, own version, not activated by being written) whose logits stay close to fp32's.
With a model trained on scikit-learn's digits (slow): top-1 agreement and accuracy on the real
validation split, which is what decides whether a variant may be served.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from alexnet_core.session import OnnxClassifier
from model_export.precision import convert_fp16, main, quantize_int8, top1_agreement
from service.model_registry import ModelRegistry
from tests.conftest import cpu_settings

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


def crops(classifier: OnnxClassifier, images: list[bytes]) -> np.ndarray:
    """The service's preprocessing with the model's own sizes and normalisation."""
    meta = classifier.metadata
    return np.concatenate([meta.preprocess(data, max_pixels=10**8).batch for data in images])


def logits(classifier: OnnxClassifier, images: list[bytes]) -> np.ndarray:
    return classifier.logits(crops(classifier, images))


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
    reference = logits(OnnxClassifier(source, CPU, warm_up=False), images[:2])
    variant = logits(OnnxClassifier(int8, CPU, warm_up=False), images[:2])
    # Measured: max |difference| 1.7 % of the logits' spread; 5 % leaves room for other CPUs' kernels.
    assert np.max(np.abs(variant - reference)) <= 0.05 * reference.std()


def test_variants_are_not_activated_by_being_written(source: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    os.link(source, weights / source.name)  # the 233 MiB model without copying it
    assert main([str(weights / source.name), "--int8"]) == 0  # the CLI, default location
    variant = weights / "alexnet-random-int8.onnx"
    assert variant.is_file()
    assert not list(weights.glob(".*.part"))  # the atomic write left no temporary file behind
    registry = ModelRegistry(cpu_settings(weights))
    # Without ALEXNET_MODEL or an ACTIVE file the service serves the newest model: still the source.
    assert registry.available()[0].name == source.name
    assert registry.find("alexnet-random-int8") == variant  # ... and the variant can be chosen
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
                classifier.probabilities(crops(classifier, images[i : i + 16])).argmax(axis=1)
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
