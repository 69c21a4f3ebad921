"""The Triton model repository written by ``alexnet-export --triton``: well-formed, and consistent
with the model file it serves (checked against ONNX Runtime's view of that file, not against the
metadata the writer used)."""

import hashlib
import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message
from PIL import Image

from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import preprocess
from model_export.cli import main as export_main
from model_export.export import export_onnx
from model_export.triton import CROPS_PER_IMAGE, write_triton_repository
from model_export.weights import random_weights

# ---------------------------------------------------------------------------------------------
# Triton's ModelConfig schema. Triton parses config.pbtxt with protobuf's text format into this
# message, so parsing with the same message rejects what Triton would reject: unknown fields,
# misspelt enum values, wrong types. The official generated module ships in the `tritonclient`
# wheel (pip install --no-deps tritonclient: it needs only protobuf); it is loaded by file path
# because importing the tritonclient.grpc package would require grpcio. Without it, a transcription
# of the fields this project writes (field numbers and types from Triton's model_config.proto) is
# used, and test_fallback_schema_matches_triton checks that transcription whenever both exist.
# ---------------------------------------------------------------------------------------------

F = descriptor_pb2.FieldDescriptorProto
_FALLBACK: dict[str, list[tuple[str, int, int, int, str]]] = {
    # message: [(field, number, type, label, type_name)]
    "ModelParameter": [("string_value", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, "")],
    "ModelInput": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("data_type", 2, F.TYPE_ENUM, F.LABEL_OPTIONAL, ".inference.DataType"),
        ("format", 3, F.TYPE_ENUM, F.LABEL_OPTIONAL, ".inference.ModelInput.Format"),
        ("dims", 4, F.TYPE_INT64, F.LABEL_REPEATED, ""),
    ],
    "ModelOutput": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("data_type", 2, F.TYPE_ENUM, F.LABEL_OPTIONAL, ".inference.DataType"),
        ("dims", 3, F.TYPE_INT64, F.LABEL_REPEATED, ""),
        ("label_filename", 4, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
    ],
    "ModelInstanceGroup": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("count", 2, F.TYPE_INT32, F.LABEL_OPTIONAL, ""),
        ("kind", 4, F.TYPE_ENUM, F.LABEL_OPTIONAL, ".inference.ModelInstanceGroup.Kind"),
    ],
    "ModelDynamicBatching": [
        ("preferred_batch_size", 1, F.TYPE_INT32, F.LABEL_REPEATED, ""),
        ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, F.LABEL_OPTIONAL, ""),
    ],
    "ModelConfig": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("platform", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("max_batch_size", 4, F.TYPE_INT32, F.LABEL_OPTIONAL, ""),
        ("input", 5, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".inference.ModelDynamicBatching"),
        ("parameters", 14, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelConfig.ParametersEntry"),
        ("backend", 17, F.TYPE_STRING, F.LABEL_OPTIONAL, ""),
    ],
}
_DATA_TYPES = [
    "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
    "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
    "TYPE_BF16",
]  # fmt: skip
_NESTED_ENUMS = {
    "ModelInput": ("Format", ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]),
    "ModelInstanceGroup": ("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]),
}


def _fallback_model_config() -> type[Message]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="alexnet_serve_test/model_config_subset.proto", package="inference", syntax="proto3"
    )
    enum = proto.enum_type.add(name="DataType")
    for number, value in enumerate(_DATA_TYPES):
        enum.value.add(name=value, number=number)
    for message_name, fields in _FALLBACK.items():
        message = proto.message_type.add(name=message_name)
        for name, number, type_, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=type_, label=label)
            if type_name:
                field.type_name = type_name
        if message_name in _NESTED_ENUMS:
            nested_name, values = _NESTED_ENUMS[message_name]
            nested = message.enum_type.add(name=nested_name)
            for number, value in enumerate(values):
                nested.value.add(name=value, number=number)
        if message_name == "ModelConfig":  # map<string, ModelParameter> parameters
            entry = message.nested_type.add(name="ParametersEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
            entry.field.add(
                name="value",
                number=2,
                type=F.TYPE_MESSAGE,
                label=F.LABEL_OPTIONAL,
                type_name=".inference.ModelParameter",
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def _official_module() -> ModuleType | None:
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


OFFICIAL = _official_module()
ModelConfig: type[Message] = OFFICIAL.ModelConfig if OFFICIAL is not None else _fallback_model_config()


def parse_config(path: Path) -> Any:
    """config.pbtxt as Triton reads it; raises text_format.ParseError where Triton would fail."""
    return text_format.Parse(path.read_text(encoding="utf-8"), ModelConfig())


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


def check_repository(repo: Path, source: Path, name: str = "alexnet", max_batch_size: int = 64) -> Any:
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
    (model_output,) = session.get_outputs()
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)

    config = parse_config(model_dir / "config.pbtxt")
    assert config.name == name
    assert config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx"
    assert config.default_model_filename in ("", "model.onnx")
    assert config.max_batch_size == max_batch_size
    # Triton's dims leave out the batch dimension, which must be dynamic in the model.
    assert [i.name for i in config.input] == [model_input.name]
    assert [o.name for o in config.output] == [model_output.name]
    assert not isinstance(model_input.shape[0], int) and not isinstance(model_output.shape[0], int)
    assert list(config.input[0].dims) == model_input.shape[1:]
    assert list(config.output[0].dims) == model_output.shape[1:]
    assert model_input.type == model_output.type == "tensor(float)"
    assert data_type_name(config, config.input[0].data_type) == "TYPE_FP32"
    assert data_type_name(config, config.output[0].data_type) == "TYPE_FP32"
    assert config.output[0].label_filename == "labels.txt"

    # Dynamic batching on batches of whole images, within the batch limit.
    batching = config.dynamic_batching
    assert config.HasField("dynamic_batching") and batching.max_queue_delay_microseconds > 0
    assert list(batching.preferred_batch_size) == sorted(set(batching.preferred_batch_size))
    assert batching.preferred_batch_size, "no preferred batch size"
    for size in batching.preferred_batch_size:
        assert 0 < size <= max_batch_size and size % CROPS_PER_IMAGE == 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, 1)]  # KIND_GPU = 1

    # labels.txt: one line per output column, in index order (Triton's classification extension).
    labels = (model_dir / "labels.txt").read_text(encoding="utf-8").split("\n")
    assert labels[-1] == "", "labels.txt must end with a newline"
    assert labels[:-1] == meta.labels and len(labels) - 1 == model_output.shape[1]

    # The preprocessing a client must apply, as the model file describes it.
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert json.loads(params["preprocess_mean"]) == meta.mean
    assert json.loads(params["preprocess_std"]) == meta.std
    assert int(params["preprocess_resize_size"]) == meta.resize_size
    assert int(params["preprocess_crop_size"]) == meta.input_size == model_input.shape[2]
    assert params["alexnet_version"] == meta.version
    return config


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
    params = {key: value.string_value for key, value in config.parameters.items()}
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    crops = preprocess(
        buffer.getvalue(),
        resize=int(params["preprocess_resize_size"]),
        crop=int(params["preprocess_crop_size"]),
        mean=json.loads(params["preprocess_mean"]),
        std=json.loads(params["preprocess_std"]),
        max_pixels=10**7,
    ).batch
    assert crops.shape == (CROPS_PER_IMAGE, *config.input[0].dims) and crops.dtype == np.float32
    assert crops.shape[0] <= config.max_batch_size
    logits = run_batch(repo / "alexnet" / "1" / "model.onnx", crops)
    assert logits.shape == (CROPS_PER_IMAGE, *config.output[0].dims)


def test_cli_writes_repository(tmp_path: Path) -> None:
    """``alexnet-export --triton`` end to end, at a non-default crop size so that nothing in the
    config can be a hard-coded 224."""
    output, repo = tmp_path / "small.onnx", tmp_path / "triton"
    code = export_main(
        ["--source", "random", "--layout", "torchvision", "--input-size", "160", "--resize-size", "183",
         "--output", str(output), "--triton", str(repo)]
    )  # fmt: skip
    assert code == 0
    config = check_repository(repo, output)
    assert list(config.input[0].dims) == [3, 160, 160]
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params["preprocess_resize_size"] == "183"
    batch = np.random.default_rng(2).standard_normal((3, 3, 160, 160), dtype=np.float32)
    assert run_batch(repo / "alexnet" / "1" / "model.onnx", batch).shape == (3, 1000)


def test_other_class_count_name_and_batch_limit(tmp_path: Path) -> None:
    result = export_onnx(random_weights("paper", seed=3, num_classes=7), tmp_path / "seven.onnx")
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


def _repeated(field: Any) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED


@pytest.mark.skipif(
    OFFICIAL is None, reason="tritonclient not installed (pip install --no-deps tritonclient)"
)
def test_fallback_schema_matches_triton() -> None:
    """The transcribed subset agrees with Triton's own model_config.proto, field by field."""
    assert OFFICIAL is not None
    official = OFFICIAL.DESCRIPTOR
    ours = _fallback_model_config().DESCRIPTOR.file
    for message_name in _FALLBACK:
        theirs_message = official.message_types_by_name[message_name]
        for field in ours.message_types_by_name[message_name].fields:
            theirs = theirs_message.fields_by_name[field.name]
            assert (theirs.number, theirs.type, _repeated(theirs)) == (
                field.number,
                field.type,
                _repeated(field),
            ), f"{message_name}.{field.name}"
            if field.message_type is not None:
                assert theirs.message_type.full_name == field.message_type.full_name
            if field.enum_type is not None:
                assert [(v.name, v.number) for v in theirs.enum_type.values] == [
                    (v.name, v.number) for v in field.enum_type.values
                ]
