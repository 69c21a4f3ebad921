"""A model trained without flips (digits: a mirror changes the class) is served the crops it was
trained for: the five crops without their mirrors, in both input kinds, and its final validation
scores those crops. A model without that record (pretrained, random, older files) keeps the
paper's ten. References are computed on the host: the crops by ``ten_crop``, the network in torch."""

import io
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from alexnet_core.images import decode
from alexnet_core.pipeline import center_square, ten_crop
from alexnet_core.session import OnnxClassifier
from alexnet_core.training import TrainRun
from model_export.alexnet import AlexNet
from model_export.ensemble import EnsembleError, build_ensemble
from model_export.export import export_onnx
from model_export.runlog import CancelFlag
from model_export.train import main as train_main
from model_export.triton import write_triton_repository
from model_export.validation import ten_crop_accuracy
from model_export.weights import load_checkpoint, random_weights
from tests.conftest import cpu_settings, serve
from tests.digits import DigitsFolder, write_digits
from tests.images import photo_jpeg
from tests.triton_config import parse_config

CPU = ["CPUExecutionProvider"]
SIZE, RESIZE = 64, 73


@torch.no_grad()
def fc7_of(model: AlexNet, crops: np.ndarray) -> torch.Tensor:
    """(k, 3, C, C) normalised crops -> (k, 4096): fc7 after its ReLU."""
    return model.classifier[:-1](torch.flatten(model.avgpool(model.features(torch.from_numpy(crops))), 1))


def torch_mean(model: AlexNet, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each crop's softmax and fc7 (after ReLU), averaged over the crops given: (classes,), (4096,)."""
    with torch.no_grad():
        fc7 = fc7_of(model, crops)
        probs = torch.softmax(model.classifier[-1](fc7).double(), dim=1)
    return probs.mean(dim=0).numpy(), fc7.double().mean(dim=0).numpy()


def host_crops(
    data: bytes, meta_mean: list[float], meta_std: list[float], size: int, resize: int
) -> np.ndarray:
    """The paper's ten crops of an image, cut on the host: five crops, then their mirrors."""
    square = center_square(decode(data, resize, 10**7), resize)
    return ten_crop(square, size, meta_mean, meta_std)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFolder:
    return write_digits(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture(scope="module")
def no_flip(digits: DigitsFolder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A few steps of a digits run with ``--no-flip`` (its exported square-kind model), and the
    same checkpoint exported as the crops kind with features: (checkpoint, square, crops)."""
    root = tmp_path_factory.mktemp("no-flip")
    run, weights_dir = root / "run", root / "weights"
    code = train_main([
        str(digits.root), "--out", str(run), "--weights-dir", str(weights_dir), "--no-flip",
        "--input-size", str(SIZE), "--resize-size", str(RESIZE), "--batch-size", "32", "--epochs", "1",
        "--limit-train-batches", "3", "--stats-images", "50", "--val10-max-images", "4", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    (square,) = weights_dir.glob("*.onnx")
    crops = weights_dir / "crops.onnx"
    weights = load_checkpoint(run / "checkpoint.pt")  # what `alexnet-export --source checkpoint` reads
    export_onnx(weights, crops, input_size=SIZE, resize_size=RESIZE, input_kind="crops", features=True)
    return run / "checkpoint.pt", square, crops


def test_the_model_records_that_it_never_saw_a_mirror(no_flip: tuple[Path, Path, Path]) -> None:
    _, square, crops = no_flip
    for path, rows in ((square, 1), (crops, 5)):
        meta = OnnxClassifier(path, CPU, warm_up=False).metadata
        assert (meta.train_flip, meta.test_crops, meta.rows_per_image) == (False, 5, rows)
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert json.loads(props["train_flip"]) is False and json.loads(props["test_crops"]) == 5
    graph = onnx.load(str(square), load_external_data=False).graph
    steps = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in graph.initializer}
    slices = [n for n in graph.node if n.op_type == "Slice" and len(n.input) == 5]
    assert slices and not [n for n in slices if steps.get(n.input[4]) == [-1]]  # no reversed slice: no mirror
    assert [n.op_type for n in graph.node].count("Conv") == 5  # the network once, on the five crops


@pytest.mark.parametrize("kind", ["square", "crops"])
def test_served_probabilities_average_the_five_unmirrored_crops(
    no_flip: tuple[Path, Path, Path], digits: DigitsFolder, kind: str
) -> None:
    checkpoint, square, crops = no_flip
    path = square if kind == "square" else crops
    model = load_checkpoint(checkpoint).model.eval()
    meta = OnnxClassifier(path, CPU, warm_up=False).metadata
    image = digits.held_out["7"][0].read_bytes()
    ten = host_crops(image, meta.mean, meta.std, SIZE, RESIZE)
    five_mean, _ = torch_mean(model, ten[:5])
    ten_mean, _ = torch_mean(model, ten)
    assert np.abs(five_mean - ten_mean).max() > 1e-4  # the mirrors matter for this image
    with serve(cpu_settings(path.parent, model=path.stem)) as url, httpx.Client(base_url=url) as client:
        info = client.get("/model").json()
        assert (info["version"], info["train_flip"], info["test_crops"]) == (path.stem, False, 5)
        answer = client.post("/predict", params={"top_k": 10}, files={"file": ("7.png", image)})
        assert answer.status_code == 200, answer.text
        served = np.zeros(10)
        for p in answer.json()["results"][0]["predictions"]:
            served[p["index"]] = p["probability"]
        np.testing.assert_allclose(served, five_mean, rtol=0, atol=1e-5)
        if kind == "crops":  # the Open Inference Protocol's raw tensor: five rows make one image
            tensor = {"name": "images", "datatype": "FP32", "shape": [5, 3, SIZE, SIZE]}
            body = {"inputs": [{**tensor, "data": ten[:5].ravel().tolist()}]}
            answer = client.post("/v2/models/alexnet/infer", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            (output,) = answer.json()["outputs"]
            assert output["shape"] == [1, 10]
            np.testing.assert_allclose(output["data"], five_mean, rtol=0, atol=1e-5)


def test_features_average_the_five_unmirrored_crops(
    no_flip: tuple[Path, Path, Path], digits: DigitsFolder
) -> None:
    checkpoint, square, crops = no_flip
    model = load_checkpoint(checkpoint).model.eval()
    image = digits.held_out["3"][0].read_bytes()
    for path in (square, crops):
        classifier = OnnxClassifier(path, CPU, warm_up=False)
        meta = classifier.metadata
        probs, features = torch_mean(model, host_crops(image, meta.mean, meta.std, SIZE, RESIZE)[:5])
        # Both outputs of one call, as the batcher asks for them (/embed, /similar, gallery adds).
        served, vectors = classifier.outputs(meta.preprocess(image, max_pixels=10**7).batch)
        np.testing.assert_allclose(served[0], probs, rtol=0, atol=1e-5)
        largest = np.abs(features).max()
        np.testing.assert_allclose(vectors[0] / largest, features / largest, rtol=0, atol=1e-4)


def test_final_validation_scores_the_crops_the_model_is_served_with(
    no_flip: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Images whose top-1 class differs between the five crops and the ten, labelled with the five
    crops' answer: the run's val10 accuracy is that of the model as served (all right)."""
    checkpoint, _, _ = no_flip
    weights = load_checkpoint(checkpoint)  # its record: trained without flips
    model = weights.model.eval()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(24):
        ramp = np.linspace(0, 255, RESIZE)[None, :, None] * rng.uniform(0, 1)  # left and right differ
        pixels = np.clip(ramp + rng.integers(0, 128, (RESIZE, RESIZE, 3)), 0, 255).astype(np.uint8)
        images.append(png(pixels))
    crops = np.stack(
        [host_crops(data, list(weights.mean), list(weights.std), SIZE, RESIZE) for data in images]
    )
    fc8 = model.classifier[-1]
    with torch.no_grad():
        # A few steps leave fc7 nearly the same for every crop: an fc8 on its standardised
        # deviations makes each crop's answer its own, so that some images' answers depend on
        # the mirrors.
        fc7 = fc7_of(model, crops.reshape(-1, 3, SIZE, SIZE))
        mu, sigma = fc7.mean(dim=0), fc7.std(dim=0) + 1e-6
        generator = torch.Generator().manual_seed(0)
        weight = (
            torch.randn(fc8.out_features, fc7.shape[1], generator=generator) * 3 / sigma / fc7.shape[1] ** 0.5
        )
        fc8.weight.copy_(weight)
        fc8.bias.copy_(-weight @ mu)
        probs = torch.softmax(fc8(fc7).double(), dim=1).reshape(len(images), 10, -1).numpy()
    five_top, ten_top = probs[:, :5].mean(axis=1).argmax(axis=1), probs.mean(axis=1).argmax(axis=1)
    samples: list[tuple[Path, int]] = []
    for i in np.flatnonzero(five_top != ten_top):
        (tmp_path / f"{i}.png").write_bytes(images[i])
        samples.append((tmp_path / f"{i}.png", int(five_top[i])))
    assert len(samples) >= 3, "too few images whose answer the mirrors change"
    config = TrainRun(data=tmp_path, input_size=SIZE, resize_size=RESIZE, flip=False)
    top1, _ = ten_crop_accuracy(weights, samples, config, CancelFlag())
    assert top1 == 1.0


def test_a_model_without_the_record_keeps_the_ten_crops(imagenet_model_dir: Path, tmp_path: Path) -> None:
    """Random weights (no training, so no record), and the same file with the record's keys
    removed, as a file exported before the record existed: both average the ten crops."""
    source = imagenet_model_dir / "alexnet-random.onnx"
    older = tmp_path / "older.onnx"
    proto = onnx.load(str(source))
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in ("train_flip", "test_crops")}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, kept)
    onnx.save_model(proto, str(older))
    model = random_weights("torchvision", seed=0).model.eval()
    image = photo_jpeg()
    for path in (source, older):
        classifier = OnnxClassifier(path, CPU, warm_up=False)
        meta = classifier.metadata
        assert (meta.train_flip, meta.test_crops, meta.rows_per_image) == (None, 10, 10)
        batch = meta.preprocess(image, max_pixels=10**7).batch
        assert batch.shape == (10, 3, 224, 224)
        expected, _ = torch_mean(model, host_crops(image, meta.mean, meta.std, 224, 256))
        np.testing.assert_allclose(classifier.probabilities(batch)[0], expected, rtol=0, atol=1e-5)


def relabelled(crops: Path, folder: Path) -> tuple[Path, Path]:
    """The crops-kind model copied as two other versions: one with its record, one claiming the
    paper's ten crops (as an export of the same weights without the record would)."""
    same, ten = folder / "same.onnx", folder / "ten.onnx"
    for path, update in ((same, {}), (ten, {"train_flip": None, "test_crops": 10})):
        proto = onnx.load(str(crops))
        props = {p.key: p.value for p in proto.metadata_props}
        props.update({"version": json.dumps(path.stem), **{k: json.dumps(v) for k, v in update.items()}})
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
        onnx.save_model(proto, str(path))
    return same, ten


def test_ensembles_need_one_crop_set(no_flip: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, crops = no_flip
    same, ten = relabelled(crops, tmp_path)
    with pytest.raises(EnsembleError, match="test_crops"):
        build_ensemble([crops, ten], tmp_path / "mixed.onnx")
    assert not (tmp_path / "mixed.onnx").exists()
    meta = build_ensemble([crops, same], tmp_path / "pair.onnx")
    assert (meta.test_crops, meta.rows_per_image) == (5, 5)
    assert OnnxClassifier(tmp_path / "pair.onnx", CPU).metadata.test_crops == 5


def test_triton_configs_describe_the_five_crops(no_flip: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, square, crops = no_flip
    for path in (square, crops):
        meta = OnnxClassifier(path, CPU, warm_up=False).metadata
        config = parse_config(write_triton_repository(path, meta, tmp_path / path.stem, max_batch_size=32))
        params = {key: value.string_value for key, value in config.parameters.items()}
        text = (tmp_path / path.stem / "alexnet" / "config.pbtxt").read_text()
        assert "ten crops" not in text and "mirrors" not in text.replace("without mirrors", "")
        if meta.input_kind == "crops":
            assert params["preprocess_crops"].startswith("5:")
            assert list(config.dynamic_batching.preferred_batch_size) == [15, 30]
        else:
            assert "five crops" in params["preprocess_client"]
