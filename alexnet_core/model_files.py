"""An exported model file on disk: its SHA-256 manifest (written at export, checked before the
file is served) and its metadata read without loading the network."""

import functools
import io
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO

from alexnet_core import files
from alexnet_core.metadata import ModelMetadata

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".sha256"  # `<model>.onnx.sha256`, in `sha256sum` format: `sha256sum -c` checks it
_DIGEST = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class IntegrityError(ValueError):
    """A model file that does not match the SHA-256 recorded for it at export."""


def manifest_path(model: Path) -> Path:
    return model.with_name(model.name + MANIFEST_SUFFIX)


def write_manifest(model: Path) -> str:
    """Records ``model``'s SHA-256 beside it (atomically); the service serves the file only while
    it matches. Call it once the model file is in place."""
    digest = files.sha256(model)
    files.write_text(manifest_path(model), f"{digest}  {model.name}\n")
    return digest


def recorded_sha256(model: Path) -> str | None:
    """The SHA-256 recorded for ``model`` at export; None when it has no manifest."""
    manifest = manifest_path(model)
    try:
        text = manifest.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"cannot read {manifest.name}: {exc}") from None
    # The name in the line is not compared: a model renamed with its manifest stays the same file.
    match = _DIGEST.match(text)
    if match is None:
        raise IntegrityError(f"{manifest.name} is not a `sha256sum` line: export the model again")
    return match.group(1)


def verify(model: Path, digest: str) -> bool:
    """True if ``digest`` (of ``model``'s bytes) is the one recorded at export, False if none was
    recorded (a file exported before manifests, or copied without one); raises if they differ."""
    recorded = recorded_sha256(model)
    if recorded is None:
        return False
    if recorded != digest:
        raise IntegrityError(
            f"{model.name} does not match the SHA-256 recorded at export in {manifest_path(model).name} "
            "(altered or damaged since): restore the file or export it again"
        )
    return True


# ModelProto field numbers (onnx.proto) and protobuf wire types.
_METADATA_PROPS, _KEY, _VALUE = 14, 1, 2
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MAX_ENTRY = 16 * 2**20  # a metadata entry is a few KB; more means this is no ONNX model


def _varint(stream: BinaryIO) -> int | None:
    value = shift = 0
    while byte := stream.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            break
    return None


def _fields(stream: BinaryIO, end: int, keep: set[int]) -> dict[int, list[bytes]]:
    """The length-delimited fields ``keep`` of a protobuf message; the others are skipped by
    seeking (in a model: the graph, which holds the whole weight payload)."""
    found: dict[int, list[bytes]] = {}
    while stream.tell() < end:
        tag = _varint(stream)
        if tag is None:
            raise ValueError("truncated")
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _varint(stream)
        elif wire in (_FIXED64, _FIXED32):
            stream.seek(8 if wire == _FIXED64 else 4, os.SEEK_CUR)
        elif wire == _LENGTH and (length := _varint(stream)) is not None:
            if number in keep:
                if length > _MAX_ENTRY:
                    raise ValueError("oversized entry")
                found.setdefault(number, []).append(stream.read(length))
            else:
                stream.seek(length, os.SEEK_CUR)
        else:
            raise ValueError(f"wire type {wire}")
    return found


def read_props(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props``, read by skipping over the graph: a few KB read from a
    file of any size. (``onnx.load`` parses the whole file, and the service does not install onnx.)"""
    props: dict[str, str] = {}
    with path.open("rb") as stream:
        size = path.stat().st_size
        for entry in _fields(stream, size, {_METADATA_PROPS}).get(_METADATA_PROPS, []):
            parts = _fields(io.BytesIO(entry), len(entry), {_KEY, _VALUE})
            key, value = parts.get(_KEY, [b""])[0], parts.get(_VALUE, [b""])[0]
            props[key.decode("utf-8")] = value.decode("utf-8")
    return props


@functools.lru_cache(maxsize=256)
def _metadata(path: Path, mtime_ns: int, size: int) -> ModelMetadata | None:
    try:
        return ModelMetadata.from_props(read_props(path))
    except (OSError, ValueError) as exc:  # pydantic's ValidationError and UnicodeError are ValueErrors
        log.debug("%s is not an alexnet-serve model: %s", path.name, exc)
        return None


def read_metadata(path: Path) -> ModelMetadata | None:
    """``path``'s alexnet-serve metadata, or None for a file that carries none (cached per file
    version: listing the weights directory reads each model file once)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _metadata(path, stat.st_mtime_ns, stat.st_size)
