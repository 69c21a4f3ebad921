"""A gallery of images searchable by feature vector (the paper's Figure 4), one per model file.

Stored in SQLite beside the model it belongs to, ``<weights_dir>/gallery/<version>/gallery.sqlite``
in WAL mode: one row per item (id, label, model version, when added, the vector as float32 bytes
with their SHA-256, a small PNG thumbnail). An add or a removal is one short write transaction,
never a rewrite of the gallery, and several processes (replicas on one weights directory) write
at once without losing an item: SQLite serialises their transactions. Readers never wait for a
writer (WAL), and every method here blocks: callers run them off the event loop.

The search index is each process's own, in memory: FAISS's exact ``IndexIDMap(IndexFlatL2)``:
Euclidean distance as in the paper, exact results, no training step and nothing to tune. At the
sizes a service holds in memory (4096 floats = 16 KiB per image: 100k images are 1.6 GiB) a
brute-force scan over BLAS takes tens of milliseconds (benchmarks/gallery.py); approximate
indexes (IVF, HNSW) pay off at millions. Before each search it takes in the rows added since it
last looked (item keys are AUTOINCREMENT, never reused: "key > the last seen") and the removals
logged since (``removals``, by sequence number), so an item added or removed through one process
is found, or gone, at the next search in every other.

A gallery is bound to one model file by its SHA-256 (table ``meta``): another model's vectors are
never searched against it (refused, with the reason). A database that does not open, or a vector
whose bytes do not match their SHA-256, is reported and not served. A gallery in the first
on-disk format (``service.gallery_legacy``) is migrated on first open.
"""

import hashlib
import io
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from alexnet_core.errors import StatusError
from service import gallery_legacy

FORMAT = "alexnet-serve-gallery/2"
DATABASE = "gallery.sqlite"
BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's write before a 503
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
THUMB_SIDE = 96
_SAFE_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # The blobs last: a listing reads the columns before them and never their overflow pages.
    "CREATE TABLE IF NOT EXISTS items (key INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "label TEXT, added_at TEXT NOT NULL, model_version TEXT NOT NULL, vector_sha256 TEXT NOT NULL, "
    "vector BLOB NOT NULL, thumbnail BLOB)",
    "CREATE TABLE IF NOT EXISTS removals (seq INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL)",
)
INSERT = (
    "INSERT INTO items (id, label, added_at, model_version, vector_sha256, vector, thumbnail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
Row = tuple[str, str | None, str, np.ndarray, bytes | None]  # id, label, added_at, vector, thumbnail


class GalleryError(StatusError):
    pass


class GalleryBusy(GalleryError):
    """Another process held the database's write lock for over BUSY_TIMEOUT_S: load, retry."""


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
    """One model file's gallery. Each call opens its own SQLite connection (no lock between
    readers and writers); the in-memory index has a lock (FAISS's add/remove are not safe next
    to a concurrent search)."""

    def __init__(self, directory: Path, version: str, model_sha256: str, dim: int, max_items: int) -> None:
        self.dir, self.version, self.model_sha256 = directory, version, model_sha256
        self.dim, self.max_items = dim, max_items
        self.name = f"gallery {directory.name!r}"  # in messages: never the server's paths
        self.path = directory / DATABASE
        self.index = faiss.IndexIDMap(faiss.IndexFlatL2(dim))
        self.by_key: dict[int, Item] = {}
        self.seen_key = self.seen_removal = 0
        self.broken: str | None = None
        self.ready = False
        self._index_lock = threading.Lock()
        self._open_lock = threading.Lock()
        try:
            if self._ready(create=False):
                with self._index_lock:
                    self._sync()
        except GalleryBusy:
            pass  # opened again by the next call
        except GalleryError as exc:
            self.broken = exc.detail

    # --- the database ----------------------------------------------------------------------------
    def _redact_paths(self, exc: object) -> str:
        text = str(exc)
        for path in sorted({str(self.dir.resolve()), str(self.dir.absolute())}, key=len, reverse=True):
            text = text.replace(path, self.name)
        return text

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as the client's: busy is load (503, retry), the rest a 503 naming the
        gallery; a corrupt or vanished database marks it broken (opened again on the next request)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise GalleryBusy(
                    503, f"{self.name} is busy: another process held its database over {BUSY_TIMEOUT_S:g} s"
                ) from None
            detail = f"{self.name}: its database cannot be used: {self._redact_paths(exc)}"
            if not self.path.exists():
                self.broken = detail
            raise GalleryError(503, detail) from None
        except sqlite3.DatabaseError as exc:
            self.broken = f"{self.name}: {DATABASE} is corrupt and not served: {self._redact_paths(exc)}"
            raise GalleryError(503, self.broken) from None

    @contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        # mode=rw: a database moved away is an error, never silently a new empty one.
        uri = f"{self.path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"
        with self._errors():
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                yield db
            finally:
                db.close()

    @staticmethod
    @contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")  # the write lock first: the checks and the write see one state
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _ready(self, create: bool) -> bool:
        """Whether there is a database, bound to this model file: created where ``create`` or
        where an old-format gallery is to be migrated, else (nothing stored yet) False."""
        self._check_served()
        with self._open_lock:
            if not self.ready:
                legacy = (self.dir / gallery_legacy.MANIFEST).is_file()
                if not (create or legacy or self.path.exists()):
                    return False
                self._initialise()
                self.ready = True
        return True

    def _initialise(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(503, f"{self.name} cannot be created: {self._redact_paths(exc)}") from None
        migrated = False
        with self._connect(create=True) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            with self._transaction(db):
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                meta = dict(db.execute("SELECT name, value FROM meta").fetchall()) if "meta" in tables else {}
                if not tables:  # a new database: the old format's items come in with its meta
                    for statement in SCHEMA:
                        db.execute(statement)
                    migrated = self._migrate(db)
                    meta = {"format": FORMAT, "model_sha256": self.model_sha256, "dim": str(self.dim)}
                    db.executemany(
                        "INSERT INTO meta VALUES (?, ?)", [*meta.items(), ("version", self.version)]
                    )
        if migrated:
            gallery_legacy.remove(self.dir)
        if meta.get("format") != FORMAT or "model_sha256" not in meta or "dim" not in meta:
            raise GalleryError(503, f"{self.name}: {DATABASE} is corrupt and not served: no {FORMAT} meta")
        if meta["model_sha256"] != self.model_sha256 or meta["dim"] != str(self.dim):
            raise GalleryError(
                409,
                f"{self.name} was built with another model file (SHA-256 {meta['model_sha256'][:12]}…, "
                f"{meta['dim']}-d) than the one in service ({self.model_sha256[:12]}…): its vectors "
                "are not comparable; move the directory away to start a new gallery",
            )

    def _migrate(self, db: sqlite3.Connection) -> bool:
        """An old-format gallery's items into the database (in the caller's transaction)."""
        try:
            legacy = gallery_legacy.read(self.dir, self.name, self.model_sha256, self.dim)
        except StatusError as exc:
            raise GalleryError(exc.status_code, exc.detail) from None
        if legacy is None:
            return False
        self._insert(db, [(i.id, i.label, i.added_at, i.vector, i.thumbnail) for i in legacy])
        return True

    def _insert(self, db: sqlite3.Connection, rows: Iterable[Row]) -> list[int]:
        keys = []
        for item_id, label, added_at, vector, thumb in rows:
            data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
            digest = hashlib.sha256(data).hexdigest()
            cursor = db.execute(INSERT, (item_id, label, added_at, self.version, digest, data, thumb))
            keys.append(int(cursor.lastrowid or 0))
        return keys

    def _sync(self) -> None:
        """The rows added and the removals logged since this process last looked, into its index
        (with ``_index_lock`` held)."""
        with self._connect() as db:
            db.execute("BEGIN")  # one snapshot for both reads
            rows = db.execute(
                "SELECT key, id, label, added_at, vector_sha256, vector FROM items "
                "WHERE key > ? ORDER BY key",
                (self.seen_key,),
            )
            while chunk := rows.fetchmany(1024):
                self._take_in(chunk)
            removals = db.execute(
                "SELECT seq, key FROM removals WHERE seq > ? ORDER BY seq", (self.seen_removal,)
            ).fetchall()
            db.execute("COMMIT")
        gone = [key for _, key in removals if key in self.by_key]
        if gone:
            self.index.remove_ids(np.array(gone, dtype=np.int64))
            for key in gone:
                del self.by_key[key]
        if removals:
            self.seen_removal = removals[-1][0]

    def _take_in(self, rows: list[tuple[int, str, str | None, str, str, bytes]]) -> None:
        vectors = np.empty((len(rows), self.dim), dtype=np.float32)
        for n, (_, item_id, _, _, digest, blob) in enumerate(rows):
            if len(blob) != self.dim * 4 or hashlib.sha256(blob).hexdigest() != digest:
                self.broken = f"{self.name}: the vector of {item_id!r} does not match its SHA-256 (corrupt)"
                raise GalleryError(503, self.broken)
            vectors[n] = np.frombuffer(blob, dtype=np.float32)
        keys = np.array([row[0] for row in rows], dtype=np.int64)
        self.index.add_with_ids(vectors, keys)
        self.by_key.update({key: Item(item_id, label, key, at) for key, item_id, label, at, _, _ in rows})
        self.seen_key = int(keys[-1])

    def _check_served(self) -> None:
        if self.broken is not None:
            raise GalleryError(409 if "another model" in self.broken else 503, self.broken)

    def _missing(self, item_id: str) -> GalleryError:
        return GalleryError(404, f"no gallery item {item_id!r} for model {self.version!r}")

    @staticmethod
    def valid_id(item_id: str) -> bool:
        return re.fullmatch(ID_PATTERN, item_id) is not None

    # --- operations ------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a corrupt or foreign gallery (no I/O: safe on the event loop)."""
        self._check_served()

    def entries(self) -> list[Item]:
        if not self._ready(create=False):
            return []
        with self._connect() as db:
            rows = db.execute("SELECT id, label, key, added_at FROM items ORDER BY key").fetchall()
        return [Item(*row) for row in rows]

    def add(self, item_id: str, label: str | None, vector: np.ndarray, thumb: bytes) -> Item:
        self._ready(create=True)
        added_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as db, self._transaction(db):
            if db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone():
                raise GalleryError(409, f"gallery item {item_id!r} exists: DELETE /gallery/{item_id} first")
            (count,) = db.execute("SELECT count(*) FROM items").fetchone()
            if count >= self.max_items:
                raise GalleryError(
                    409, f"gallery is full: {count} items, ALEXNET_GALLERY_MAX_ITEMS={self.max_items}"
                )
            (key,) = self._insert(db, [(item_id, label, added_at, vector, thumb)])
        return Item(item_id, label, key, added_at)

    def remove(self, item_id: str) -> Item:
        if not self._ready(create=False):
            raise self._missing(item_id)
        with self._connect() as db, self._transaction(db):
            row = db.execute("SELECT key, label, added_at FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                raise self._missing(item_id)
            db.execute("DELETE FROM items WHERE key = ?", (row[0],))
            db.execute("INSERT INTO removals (key) VALUES (?)", (row[0],))
        return Item(item_id, row[1], row[0], row[2])

    def search(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        ready = self._ready(create=False)
        with self._index_lock:
            if ready:
                self._sync()
            if not self.by_key:
                raise GalleryError(
                    404, f"the gallery of model {self.version!r} is empty: add images with POST /gallery"
                )
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            squared, keys = self.index.search(query, min(k, len(self.by_key)))
            found = [
                (self.by_key[int(key)], d) for d, key in zip(squared[0], keys[0], strict=True) if key >= 0
            ]
        return [Neighbour(item, float(np.sqrt(max(d, 0.0)))) for item, d in found]

    def thumbnail(self, item_id: str) -> bytes:
        row = None
        if self._ready(create=False):
            with self._connect() as db:
                row = db.execute("SELECT thumbnail FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise self._missing(item_id)
        if row[0] is None:
            raise GalleryError(404, f"the thumbnail of {item_id!r} is missing from {self.name}")
        return bytes(row[0])


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
