"""Tensors of the Open Inference Protocol (KServe v2) over HTTP/REST, as Triton speaks it.

A request or response is a JSON object, optionally followed by raw tensor bytes (Triton's binary
tensor data extension, which ``tritonclient`` uses by default): the header
``Inference-Header-Content-Length`` gives the JSON's length, and each tensor whose
``parameters.binary_data_size`` is set takes that many bytes of the rest, in order. Numbers are
little-endian, row-major; a ``BYTES`` element is a 4-byte little-endian length and its bytes.
Written here rather than taken from ``tritonclient``: the service must not depend on a client
library (and its gevent stack), and the format is these few lines.
"""

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
MAX_ELEMENTS = 1 << 28  # shapes beyond this are refused before any allocation
# ASCII digits only, and few enough for int(): str.isdigit() also accepts "²" and digit strings
# longer than int() converts.
LENGTH = re.compile(r"[0-9]{1,18}")


class ProtocolError(Exception):
    """A request the protocol cannot accept: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]  # numbers reshaped to ``shape``; BYTES as a flat list


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[dict[str, Any]] | None  # None: every output
    binary_output: bool  # the default for outputs that do not say
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad(f"{what} must be a JSON object")
    return value


def _shape(spec: dict[str, Any], name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad(f"input {name!r}: shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise bad(f"input {name!r}: negative dimension in shape {shape}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise bad(f"input {name!r}: shape {shape} is too large")
    return shape


def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """``count`` length-prefixed BYTES elements, exactly filling ``raw``."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise bad(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad(f"input {name!r}: BYTES element of {length} bytes runs past the data")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise bad(f"input {name!r}: {len(raw) - offset} bytes left after {count} BYTES elements")
    return items


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _json_bytes(data: Any, count: int, name: str, base64_encoded: bool) -> list[bytes]:
    flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else None
    if flat is None or len(flat) != count or not all(isinstance(x, str) for x in flat):
        raise bad(f"input {name!r}: data must be a list of {count} strings")
    if not base64_encoded:
        return [x.encode() for x in flat]
    try:
        return [base64.b64decode(x, validate=True) for x in flat]
    except binascii.Error:
        raise bad(f"input {name!r}: content_type is base64 but the data is not valid base64") from None


def _tensor(spec: dict[str, Any], binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    name = spec.get("name")
    if not isinstance(name, str):
        raise bad("every input needs a string `name`")
    datatype = spec.get("datatype")
    if datatype != "BYTES" and datatype not in NUMERIC:
        raise bad(f"input {name!r}: unknown datatype {datatype!r}")
    shape = _shape(spec, name)
    count = math.prod(shape)
    parameters = _object(spec.get("parameters", {}), f"input {name!r} parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise bad(f"input {name!r}: binary_data_size {size!r} does not fit the binary data sent")
        raw = bytes(binary[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            return InputTensor(name, datatype, shape, decode_bytes(raw, count, name)), offset
        dtype = np.dtype(NUMERIC[datatype])
        if size != count * dtype.itemsize:
            raise bad(f"input {name!r}: {size} bytes for shape {shape} of {datatype}")
        return InputTensor(name, datatype, shape, np.frombuffer(raw, dtype).reshape(shape)), offset
    if "data" not in spec:
        raise bad(f"input {name!r} has neither data nor binary_data_size")
    if datatype == "BYTES":
        b64 = parameters.get("content_type") == "base64"
        return InputTensor(name, datatype, shape, _json_bytes(spec["data"], count, name, b64)), offset
    try:
        array = np.asarray(spec["data"], dtype=np.dtype(NUMERIC[datatype]))
    except (ValueError, TypeError, OverflowError):
        raise bad(f"input {name!r}: data is not a list of {datatype} numbers") from None
    if array.size != count:
        raise bad(f"input {name!r}: {array.size} values for shape {shape}")
    return InputTensor(name, datatype, shape, array.reshape(shape)), offset


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        if not LENGTH.fullmatch(header_length) or int(header_length) > len(body):
            raise bad(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        head, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    try:
        request = _object(json.loads(head), "the request")
    except (ValueError, UnicodeDecodeError):
        raise bad(
            "the request is not JSON (binary tensors need the Inference-Header-Content-Length header)"
        ) from None
    except RecursionError:
        raise bad("the request's JSON is nested too deeply (send tensor data as a flat list)") from None
    specs = request.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise bad("the request needs a non-empty list `inputs`")
    inputs, offset = [], 0
    for spec in specs:
        tensor, offset = _tensor(_object(spec, "every input"), binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    parameters = _object(request.get("parameters", {}), "parameters")
    outputs = request.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs)
    ):
        raise bad("`outputs` must be a list of objects")
    request_id = request.get("id")
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        binary_output=bool(parameters.get("binary_data_output", False)),
        id=request_id if isinstance(request_id, str) else None,
        parameters=parameters,
    )


@dataclass
class OutputTensor:
    name: str
    datatype: str
    value: np.ndarray  # numbers, or an object array of bytes for BYTES
    binary: bool


def encode_response(header: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    chunks, entries = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.value.shape)}
        flat = out.value.reshape(-1)
        if out.binary:
            if out.datatype == "BYTES":
                raw = encode_bytes(list(flat))
            else:
                raw = np.ascontiguousarray(flat, dtype=np.dtype(NUMERIC[out.datatype])).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif out.datatype == "BYTES":
            entry["data"] = [item.decode() for item in flat]
        else:
            entry["data"] = flat.tolist()
        entries.append(entry)
    head = json.dumps({**header, "outputs": entries}).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
