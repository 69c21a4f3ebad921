"""The Triton model repository written by ``alexnet-export --triton``: well-formed, and consistent
with the model file it serves (checked against ONNX Runtime's view of that file, not against the
metadata the writer used)."""

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import preprocess
from model_export.cli import main as export_main
from model_export.export import export_onnx
from model_export.triton import CROPS_PER_IMAGE, write_triton_repository
from model_export.weights import random_weights
from tests.images import photo_jpeg
from tests.triton_config import parse_config


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_type_name(config: Any, value: int) -> str:
    return (
        config.DESCRIPTOR.fields_by_name["input"]
        .message_type.fields_by_name["data_type"]
        .enum_type.values_by_number[value]
        .name
    )


def model_metadata(path: Path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def check_repository(
    repo: Path, source: Path, name: str = "alexnet", max_batch_size: int = 64, kind: str = "KIND_GPU"
) -> Any:
    """Every property of the repository that Triton and its clients rely on, judged against
    ONNX Runtime's reading of ``source``. Returns the parsed config for further checks."""
    model_dir = repo / name
    repo_model = model_dir / "1" / "model.onnx"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        name,
        f"{name}/1",
        f"{name}/1/model.onnx",
        f"{name}/config.pbtxt",
        f"{name}/labels.txt",
    ], "unexpected files (left-over temporaries?) in the repository"
    assert sha256(repo_model) == sha256(source)

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    model_outputs = session.get_outputs()
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    square = meta.input_kind == "square"

    config = parse_config(model_dir / "config.pbtxt")
    assert config.name == name
    assert config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx"
    assert config.default_model_filename in ("", "model.onnx")
    assert config.max_batch_size == max_batch_size
    # Triton's dims leave out the batch dimension, which must be dynamic in the model.
    assert [i.name for i in config.input] == [model_input.name]
    assert [o.name for o in config.output] == [o.name for o in model_outputs]
    assert not isinstance(model_input.shape[0], int)
    assert list(config.input[0].dims) == model_input.shape[1:]
    # The square kind takes the uint8 central square; the crops kind float32 crops.
    assert model_input.type == ("tensor(uint8)" if square else "tensor(float)")
    assert data_type_name(config, config.input[0].data_type) == ("TYPE_UINT8" if square else "TYPE_FP32")
    for declared, output in zip(config.output, model_outputs, strict=True):
        assert not isinstance(output.shape[0], int)
        assert list(declared.dims) == output.shape[1:]
        assert output.type == "tensor(float)" and data_type_name(config, declared.data_type) == "TYPE_FP32"
        # Labels on the classes output only (logits, or the square kind's probabilities).
        assert declared.label_filename == ("labels.txt" if output.name == meta.output_name else "")
    if square:
        assert [o.name for o in model_outputs] == ["probabilities", "features"]
        assert list(config.output[1].dims) == [4096]

    # Dynamic batching on batches of whole images, within the batch limit.
    batching = config.dynamic_batching
    rows = 1 if square else meta.test_crops
    assert config.HasField("dynamic_batching") and batching.max_queue_delay_microseconds > 0
    assert list(batching.preferred_batch_size) == sorted(set(batching.preferred_batch_size))
    assert batching.preferred_batch_size, "no preferred batch size"
    for size in batching.preferred_batch_size:
        assert 0 < size <= max_batch_size and size % rows == 0
    kinds = {"KIND_GPU": 1, "KIND_CPU": 2}
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, kinds[kind])]

    # labels.txt: one line per output column, in index order (Triton's classification extension).
    labels = (model_dir / "labels.txt").read_text(encoding="utf-8").split("\n")
    assert labels[-1] == "", "labels.txt must end with a newline"
    assert labels[:-1] == meta.labels and len(labels) - 1 == model_outputs[0].shape[1]

    # The preprocessing a client must apply, as the model file describes it.
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert json.loads(params["preprocess_mean"]) == meta.mean
    assert json.loads(params["preprocess_std"]) == meta.std
    assert int(params["preprocess_resize_size"]) == meta.resize_size
    assert int(params["preprocess_crop_size"]) == meta.input_size
    if square:
        assert model_input.shape[1:] == [meta.resize_size, meta.resize_size, 3]
    else:
        assert meta.input_size == model_input.shape[2]
    assert params["alexnet_version"] == meta.version and params["alexnet_input_kind"] == meta.input_kind
    return config


def client_preprocess(data: bytes, config: Any, square_only: bool = False) -> np.ndarray:
    """What a client following the config's preprocessing parameters sends for one image (the
    service's own preprocessing)."""
    params = {key: value.string_value for key, value in config.parameters.items()}
    return preprocess(
        data,
        resize=int(params["preprocess_resize_size"]),
        crop=int(params["preprocess_crop_size"]),
        mean=json.loads(params["preprocess_mean"]),
        std=json.loads(params["preprocess_std"]),
        max_pixels=10**7,
        square_only=square_only,
    ).batch


def run_batch(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": batch})[0]


@pytest.fixture(scope="module")
def imagenet_repo(imagenet_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    source = imagenet_model_dir / "alexnet-random.onnx"
    repo = tmp_path_factory.mktemp("triton")
    config = write_triton_repository(source, model_metadata(source), repo)
    assert config == repo / "alexnet" / "config.pbtxt"
    return repo, source


def test_repository_matches_model(imagenet_repo: tuple[Path, Path]) -> None:
    repo, source = imagenet_repo
    config = check_repository(repo, source)
    assert list(config.output[0].dims) == [1000]


def test_repository_model_runs_a_batch_of_three(imagenet_repo: tuple[Path, Path]) -> None:
    repo, source = imagenet_repo
    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    logits = run_batch(repo / "alexnet" / "1" / "model.onnx", batch)
    assert logits.shape == (3, 1000) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, run_batch(source, batch))


def test_client_preprocessing_fits_the_config(imagenet_repo: tuple[Path, Path]) -> None:
    """A client that follows the config's parameters (with the service's own preprocessing)
    produces one request of ten crops that the config accepts and the model answers."""
    repo, _ = imagenet_repo
    config = parse_config(repo / "alexnet" / "config.pbtxt")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    crops = client_preprocess(buffer.getvalue(), config)
    assert crops.shape == (CROPS_PER_IMAGE, *config.input[0].dims) and crops.dtype == np.float32
    assert crops.shape[0] <= config.max_batch_size
    logits = run_batch(repo / "alexnet" / "1" / "model.onnx", crops)
    assert logits.shape == (CROPS_PER_IMAGE, *config.output[0].dims)


def test_cli_writes_repository(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``alexnet-export --input crops --triton`` end to end, at a non-default crop size so that
    nothing in the config can be a hard-coded 224; the instance kind is stated."""
    output, repo = tmp_path / "small.onnx", tmp_path / "triton"
    code = export_main(
        ["--source", "random", "--layout", "torchvision", "--input-size", "160", "--resize-size", "183",
         "--input", "crops", "--output", str(output), "--triton", str(repo), "--triton-instance-kind", "cpu"]
    )  # fmt: skip
    assert code == 0
    assert "instance kind KIND_CPU: --triton-instance-kind" in capsys.readouterr().out
    config = check_repository(repo, output, kind="KIND_CPU")
    assert list(config.input[0].dims) == [3, 160, 160]
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params["preprocess_resize_size"] == "183"
    batch = np.random.default_rng(2).standard_normal((3, 3, 160, 160), dtype=np.float32)
    assert run_batch(repo / "alexnet" / "1" / "model.onnx", batch).shape == (3, 1000)


def test_cli_square_repository_takes_uint8_squares(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The square kind: a client sends uint8 central squares and gets the ten-crop probabilities
    and features; the instance kind defaults to what this host has."""
    import torch

    output, repo = tmp_path / "sq.onnx", tmp_path / "triton"
    code = export_main(
        ["--source", "random", "--layout", "paper", "--input-size", "120", "--resize-size", "137",
         "--input", "square", "--output", str(output), "--triton", str(repo)]
    )  # fmt: skip
    assert code == 0
    kind = "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"
    assert f"instance kind {kind}: this host has" in capsys.readouterr().out
    config = check_repository(repo, output, max_batch_size=32, kind=kind)
    assert list(config.input[0].dims) == [137, 137, 3]
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    # A client following the parameters: the service's own central square, nothing else.
    square = client_preprocess(photo_jpeg(), config, square_only=True)
    assert square.shape == (1, *config.input[0].dims) and square.dtype == np.uint8
    session = ort.InferenceSession(
        str(repo / "alexnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    probs, features = session.run(None, {"images": np.concatenate([square] * 3)})
    assert probs.shape == (3, *config.output[0].dims) and features.shape == (3, 4096)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_other_class_count_name_and_batch_limit(tmp_path: Path) -> None:
    # The crops kind: its batch sizes must be whole images of ten rows.
    result = export_onnx(
        random_weights("paper", seed=3, num_classes=7), tmp_path / "seven.onnx", input_kind="crops"
    )
    repo = tmp_path / "repo"
    write_triton_repository(result.path, result.metadata, repo, max_batch_size=25, name="seven")
    config = check_repository(repo, result.path, name="seven", max_batch_size=25)
    assert list(config.output[0].dims) == [7]
    assert list(config.dynamic_batching.preferred_batch_size) == [10, 20]
    assert (repo / "seven" / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(7)]


def test_rewrite_replaces_in_place(imagenet_model_dir: Path, tmp_path: Path) -> None:
    """Writing again (a newer export into a live repository) replaces every file and leaves no
    temporaries behind; a stale config is overwritten, not merged."""
    source = imagenet_model_dir / "alexnet-random.onnx"
    meta = model_metadata(source)
    write_triton_repository(source, meta, tmp_path)
    (tmp_path / "alexnet" / "config.pbtxt").write_text("max_batch_size: 1\n")
    (tmp_path / "alexnet" / "1" / "model.onnx").unlink()
    (tmp_path / "alexnet" / "1" / "model.onnx").write_bytes(b"stale")
    write_triton_repository(source, meta, tmp_path, max_batch_size=32)
    check_repository(tmp_path, source, max_batch_size=32)


def test_rejects_metadata_that_does_not_fit_the_model(imagenet_model_dir: Path, tmp_path: Path) -> None:
    source = imagenet_model_dir / "alexnet-random.onnx"
    meta = model_metadata(source)
    wrong = [
        meta.model_copy(update={"labels": meta.labels[:10], "wnids": meta.wnids[:10]}),
        meta.model_copy(update={"input_size": 227}),
        meta.model_copy(update={"input_name": "input"}),
        # A square-kind description of a crops-kind file: uint8 input and two outputs missing.
        meta.model_copy(update={"input_kind": "square", "output_name": "probabilities"}),
        meta.model_copy(update={"features_output": "features"}),
    ]
    for bad in wrong:
        with pytest.raises(ValueError):
            write_triton_repository(source, bad, tmp_path / "repo")
    for kwargs in ({"max_batch_size": 9}, {"max_batch_size": 5000}, {"name": "../escape"}, {"name": ""}):
        with pytest.raises(ValueError):
            write_triton_repository(source, meta, tmp_path / "repo", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "repo").exists(), "a rejected call must write nothing"


def test_quoting_survives_odd_labels(imagenet_model_dir: Path, tmp_path: Path) -> None:
    """Labels and names with quotes and backslashes round-trip through the text format."""
    source = imagenet_model_dir / "alexnet-random.onnx"
    meta = model_metadata(source)
    labels = [f'odd "label" \\ {i}' for i in range(len(meta.labels))]
    odd = meta.model_copy(update={"labels": labels, "version": 'v"1\\'})
    write_triton_repository(source, odd, tmp_path, name='quote"d')
    config = parse_config(tmp_path / 'quote"d' / "config.pbtxt")
    assert config.name == 'quote"d'
    assert config.parameters["alexnet_version"].string_value == 'v"1\\'
    assert (tmp_path / 'quote"d' / "labels.txt").read_text().splitlines() == labels
