"""A gallery of images searchable by feature vector (the paper's Figure 4), one per model file.

The index is FAISS's exact ``IndexIDMap2(IndexFlatL2)`` (the ID map that can also give a vector
back, to undo a removal whose save failed): Euclidean distance as in the paper, with exact
results, no training step and nothing to tune. At the sizes a service holds in memory (4096
floats = 16 KiB per image: 100k images are 1.6 GiB) a brute-force scan over BLAS takes tens of
milliseconds (benchmarks/gallery.py); approximate indexes (IVF, HNSW) pay off at millions.

On disk, beside the model it belongs to: ``<weights_dir>/gallery/<version>/``

    manifest.json         model file hash, vector size, items (id, label, key), index file + hash
    index-<gen>.faiss     faiss.serialize_index bytes
    thumbs/<key>.png      a small copy of each image, for the page

Every file is written with ``atomic_write``; the manifest is written last and names the index file
it goes with, so a crash leaves the previous pair intact. A gallery is bound to one model file by
its SHA-256: another model's vectors are never searched against it (refused, with the reason).
A manifest or index that does not load, or whose hash or ids disagree, is reported and not served.
"""

import hashlib
import io
import json
import re
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from alexnet_core import files
from alexnet_core.errors import StatusError

FORMAT = "alexnet-serve-gallery/1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
THUMB_SIDE = 96
_SAFE_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class GalleryError(StatusError):
    pass


@dataclass(frozen=True)
class Item:
    id: str
    label: str | None
    key: int  # the int64 id FAISS holds for this vector
    added_at: str


@dataclass(frozen=True)
class Neighbour:
    item: Item
    distance: float  # Euclidean (FAISS returns its square)


def thumbnail(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, "PNG")
    return buffer.getvalue()


class Gallery:
    """One model file's gallery; every method holds the lock (FAISS's add/remove are not safe
    next to a concurrent search)."""

    def __init__(self, directory: Path, version: str, model_sha256: str, dim: int, max_items: int) -> None:
        self.dir, self.version, self.model_sha256 = directory, version, model_sha256
        self.dim, self.max_items = dim, max_items
        self.items: dict[str, Item] = {}
        self.index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        self.generation, self.next_key = 0, 0
        self.broken: str | None = None
        self._lock = threading.Lock()
        try:
            self._load()
        except GalleryError as exc:
            self.broken = exc.detail

    # --- loading and saving ----------------------------------------------------------------------
    def _load(self) -> None:
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            return
        where = f"gallery {manifest_path.parent}"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            items = [Item(**raw) for raw in manifest["items"]]
            model_sha256, dim, index_sha256 = (
                manifest["model_sha256"],
                manifest["dim"],
                manifest["index_sha256"],
            )
            generation, next_key = int(manifest["generation"]), int(manifest["next_key"])
            index_path = self.dir / Path(manifest["index_file"]).name  # a name in this directory only
            data = index_path.read_bytes()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GalleryError(
                503, f"{where} is corrupt and not served: {type(exc).__name__}: {exc}"
            ) from None
        if model_sha256 != self.model_sha256 or dim != self.dim:
            raise GalleryError(
                409,
                f"{where} was built with another model file (SHA-256 {str(model_sha256)[:12]}…, "
                f"{dim}-d) than the one in service ({self.model_sha256[:12]}…): its vectors "
                "are not comparable; move the directory away to start a new gallery",
            )
        if hashlib.sha256(data).hexdigest() != index_sha256:
            raise GalleryError(
                503, f"{where}: {index_path.name} does not match its recorded SHA-256 (corrupt)"
            )
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            keys = faiss.vector_to_array(index.id_map)
        except (RuntimeError, AttributeError) as exc:
            raise GalleryError(
                503, f"{where}: {index_path.name} is not a FAISS ID-mapped index: {exc}"
            ) from None
        if index.d != self.dim or sorted(keys.tolist()) != sorted(i.key for i in items):
            raise GalleryError(503, f"{where}: the index and the manifest list different vectors")
        self.index = index
        self.items = {i.id: i for i in items}
        self.generation, self.next_key = generation, next_key

    def _save(self) -> None:
        """New index file, then the manifest that names it (the commit), then the old index goes."""
        data = faiss.serialize_index(self.index)  # a uint8 array: written and hashed without a copy
        generation = self.generation + 1
        index_name = f"index-{generation}.faiss"
        files.atomic_write(self.dir / index_name, data.tofile)
        manifest = {
            "format": FORMAT,
            "model_version": self.version,
            "model_sha256": self.model_sha256,
            "dim": self.dim,
            "generation": generation,
            "index_file": index_name,
            "index_sha256": hashlib.sha256(data).hexdigest(),
            "next_key": self.next_key,
            "items": [asdict(i) for i in self.items.values()],
        }
        files.write_text(self.dir / "manifest.json", json.dumps(manifest, indent=1))
        (self.dir / f"index-{self.generation}.faiss").unlink(missing_ok=True)
        self.generation = generation

    def _check_served(self) -> None:
        if self.broken is not None:
            raise GalleryError(409 if "another model" in self.broken else 503, self.broken)

    @staticmethod
    def valid_id(item_id: str) -> bool:
        return re.fullmatch(ID_PATTERN, item_id) is not None

    # --- operations ------------------------------------------------------------------------------
    def entries(self) -> list[Item]:
        with self._lock:
            self._check_served()
            return list(self.items.values())

    def add(self, item_id: str, label: str | None, vector: np.ndarray, thumb: bytes) -> Item:
        with self._lock:
            self._check_served()
            if item_id in self.items:
                raise GalleryError(409, f"gallery item {item_id!r} exists: DELETE /gallery/{item_id} first")
            if len(self.items) >= self.max_items:
                raise GalleryError(
                    409,
                    f"gallery is full: {len(self.items)} items, ALEXNET_GALLERY_MAX_ITEMS={self.max_items}",
                )
            item = Item(item_id, label, self.next_key, datetime.now(UTC).isoformat(timespec="seconds"))
            files.atomic_write(self.thumb_path(item), lambda tmp: tmp.write_bytes(thumb))
            self.index.add_with_ids(vector.reshape(1, -1), np.array([item.key], dtype=np.int64))
            self.items[item_id] = item
            self.next_key += 1
            try:
                self._save()
            except Exception:  # the files on disk are the previous state: so is memory again
                self.index.remove_ids(np.array([item.key], dtype=np.int64))
                del self.items[item_id]
                raise
            return item

    def _item(self, item_id: str) -> Item:
        """An item of the gallery of the model in service (call with the lock held)."""
        self._check_served()
        item = self.items.get(item_id)
        if item is None:
            raise GalleryError(404, f"no gallery item {item_id!r} for model {self.version!r}")
        return item

    def remove(self, item_id: str) -> Item:
        with self._lock:
            item = self._item(item_id)
            vector = self.index.reconstruct(item.key)
            self.index.remove_ids(np.array([item.key], dtype=np.int64))
            del self.items[item_id]
            try:
                self._save()
            except Exception:
                self.index.add_with_ids(vector.reshape(1, -1), np.array([item.key], dtype=np.int64))
                self.items[item_id] = item
                raise
            self.thumb_path(item).unlink(missing_ok=True)
            return item

    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        with self._lock:
            self._check_served()
            if not self.items:
                raise GalleryError(
                    404, f"the gallery of model {self.version!r} is empty: add images with POST /gallery"
                )
            squared, keys = self.index.search(vector.reshape(1, -1), min(k, len(self.items)))
            by_key = {i.key: i for i in self.items.values()}
            return [
                Neighbour(by_key[int(key)], float(np.sqrt(max(d, 0.0))))
                for d, key in zip(squared[0], keys[0], strict=True)
                if key >= 0
            ]

    def thumb_path(self, item: Item) -> Path:
        return self.dir / "thumbs" / f"{item.key}.png"

    def thumbnail(self, item_id: str) -> bytes:
        with self._lock:
            path = self.thumb_path(self._item(item_id))
        try:
            return path.read_bytes()
        except OSError:
            raise GalleryError(404, f"the thumbnail of {item_id!r} is missing from {path.parent}") from None


class Galleries:
    """The gallery of each model file, opened on first use."""

    def __init__(self, weights_dir: Path, max_items: int) -> None:
        self.root = weights_dir / "gallery"
        self.max_items = max_items
        self._open: dict[tuple[str, str], Gallery] = {}
        self._lock = threading.Lock()

    def directory(self, version: str, model_sha256: str) -> Path:
        # The version comes from the model's own metadata: used as a directory name only when
        # it is a plain name, else the file hash names it (never a path from outside).
        return self.root / (
            version if _SAFE_DIR.match(version) and version not in (".", "..") else model_sha256
        )

    def get(self, version: str, model_sha256: str, dim: int) -> Gallery:
        with self._lock:
            gallery = self._open.get((version, model_sha256))
            if gallery is None or gallery.broken is not None:
                # A broken gallery is opened again on the next request: once its directory is
                # repaired or moved away, it serves without a restart.
                gallery = Gallery(
                    self.directory(version, model_sha256), version, model_sha256, dim, self.max_items
                )
                self._open[(version, model_sha256)] = gallery
            return gallery
