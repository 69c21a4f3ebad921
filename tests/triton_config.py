"""Triton's ModelConfig message, to parse config.pbtxt as Triton does (shared by the Triton tests)."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

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
