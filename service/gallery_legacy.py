"""Reading a gallery stored in the first on-disk format, to migrate it into the SQLite store on
first open (``service.gallery``). That format was a directory of

    manifest.json         model file hash, vector size, items (id, label, key), index file + hash
    index-<gen>.faiss     faiss.serialize_index bytes of an IndexIDMap2(IndexFlatL2)
    thumbs/<key>.png      a small copy of each image

A manifest or index that does not load, or whose hash or ids disagree, is refused (503), and one
built with another model file too (409): nothing is migrated then, and the files stay as they are.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from alexnet_core.errors import StatusError

FORMAT = "alexnet-serve-gallery/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LegacyItem:
    id: str
    label: str | None
    added_at: str
    vector: np.ndarray
    thumbnail: bytes | None  # None where its file is missing


def read(directory: Path, name: str, model_sha256: str, dim: int) -> list[LegacyItem] | None:
    """The items of the old-format gallery in ``directory`` in the order they were added, or None
    where there is none; ``name`` names the gallery in errors (never a server path)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        items = [(str(i["id"]), i["label"], int(i["key"]), str(i["added_at"])) for i in manifest["items"]]
        index_path = directory / Path(manifest["index_file"]).name  # a name in this directory only
        found_sha256, found_dim = manifest["model_sha256"], manifest["dim"]
        index_sha256 = manifest["index_sha256"]
        data = index_path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        detail = f"{type(exc).__name__}: {exc}".replace(str(directory), name)
        raise StatusError(503, f"{name} (old format) is corrupt and not served: {detail}") from None
    if found_sha256 != model_sha256 or found_dim != dim:
        raise StatusError(
            409,
            f"{name} was built with another model file (SHA-256 {str(found_sha256)[:12]}…, "
            f"{found_dim}-d) than the one in service ({model_sha256[:12]}…): its vectors "
            "are not comparable; move the directory away to start a new gallery",
        )
    if hashlib.sha256(data).hexdigest() != index_sha256:
        raise StatusError(503, f"{name}: {index_path.name} does not match its recorded SHA-256 (corrupt)")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        keys = faiss.vector_to_array(index.id_map)
    except (RuntimeError, AttributeError) as exc:
        raise StatusError(503, f"{name}: {index_path.name} is not a FAISS ID-mapped index: {exc}") from None
    if index.d != dim or sorted(keys.tolist()) != sorted(key for _, _, key, _ in items):
        raise StatusError(503, f"{name}: the index and the manifest list different vectors")
    return [
        LegacyItem(item_id, label, added_at, index.reconstruct(key), _thumbnail(directory, key))
        for item_id, label, key, added_at in sorted(items, key=lambda i: i[2])
    ]


def _thumbnail(directory: Path, key: int) -> bytes | None:
    try:
        return (directory / "thumbs" / f"{key}.png").read_bytes()
    except OSError:
        return None


def remove(directory: Path) -> None:
    """The old files, once their items are committed to the new store (which is never migrated
    twice: what a crash midway leaves here is not read again)."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for path in directory.glob("index-*.faiss"):
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / "thumbs", ignore_errors=True)
