"""A gallery of images searchable by feature vector (the paper's Figure 4), one per model file.

Stored in the state database's gallery tables (``service.database.schema``): one row per item with
its vector as float32 bytes and their SHA-256, and a small PNG thumbnail. By default each gallery
is its own SQLite file, ``<state_dir>/gallery/<version>/gallery.sqlite`` (WAL: readers never wait
for a writer); with ``ALEXNET_DATABASE_URL``, the shared PostgreSQL database. An add or a removal
is one short write transaction; processes writing at once lose nothing: SQLite serialises them,
and on PostgreSQL each takes the gallery's meta row FOR UPDATE first, so that one gallery's keys
are committed in the order they are taken. Every method blocks: callers run them off the loop.

The search index is each process's own, in memory: FAISS's exact ``IndexIDMap(IndexFlatL2)``
(Euclidean, as in the paper; 4096-d is beyond pgvector's index limit; 100k images scan in tens of
milliseconds, benchmarks/gallery.py). Before each search it takes in the rows added since it last
looked (keys are never reused: "key > the last seen") and the removals logged since, so an item
added or removed through one process is found, or gone, at the next search in every other.

A gallery is bound to one model file by its SHA-256 (its meta rows): another model's vectors are
never searched against it (409). A database that does not open or cannot be reached, or a vector
whose bytes do not match their SHA-256, is reported (503) and not served. A gallery in the first
on-disk format (``service.gallery_legacy``) is migrated on first open.
"""

import hashlib
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Connection, Row, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from alexnet_core.errors import StatusError
from service import gallery_legacy
from service.database import Database, sqlite_database, unavailable_detail
from service.database.engine import RETRY_AFTER_S
from service.database.schema import gallery_items, gallery_meta, gallery_name, gallery_removals
from service.gallery_items import ID_PATTERN, GalleryBusy, GalleryError, Item, Neighbour

FORMAT = "alexnet-serve-gallery/2"
DATABASE = "gallery.sqlite"
BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's write before a 503
NewItem = tuple[str, str | None, str, np.ndarray, bytes | None]  # id, label, added_at, vector, thumbnail


class Gallery:
    """One model file's gallery, in ``database`` (shared) or else its own SQLite file in
    ``directory``. Readers and writers take no lock of this process; the in-memory index has one
    (FAISS's add/remove are not safe next to a concurrent search)."""

    def __init__(self, directory: Path, version: str, model_sha256: str, dim: int, max_items: int,
                 database: Database | None = None) -> None:  # fmt: skip
        self.dir, self.version, self.model_sha256 = directory, version, model_sha256
        self.dim, self.max_items = dim, max_items
        self.gallery = gallery_name(version, model_sha256)  # its rows' key
        self.name = f"gallery {self.gallery!r}"  # in messages: never the server's paths
        self.path = directory / DATABASE
        self.shared = database
        self.database: Database | None = None  # once open
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
        except GalleryError as exc:
            if exc.retry_after_s is None:  # else (busy, unreachable) opened again by the next call
                self.broken = exc.detail

    # --- the database ----------------------------------------------------------------------------
    def _redact_paths(self, exc: object) -> str:
        text = str(exc)
        for path in sorted({str(self.dir.resolve()), str(self.dir.absolute())}, key=len, reverse=True):
            text = text.replace(path, self.name)
        return text

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The database's errors as the client's: busy is load (503, retry), an unreachable
        database a 503 naming it (retry), the rest a 503 naming the gallery; a corrupt or vanished
        SQLite file marks it broken (opened again on the next request)."""
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error) as exc:
            original = exc.orig if isinstance(exc, DBAPIError) else exc
            if isinstance(original, sqlite3.OperationalError):
                if "locked" in str(original) or "busy" in str(original):
                    raise GalleryBusy(
                        503,
                        f"{self.name} is busy: another process held its database over {BUSY_TIMEOUT_S:g} s",
                    ) from None
                detail = f"{self.name}: its database cannot be used: {self._redact_paths(original)}"
                if not self.path.exists():
                    self.broken = detail
                raise GalleryError(503, detail) from None
            if isinstance(original, sqlite3.DatabaseError):
                why = self._redact_paths(original)
                self.broken = f"{self.name}: {DATABASE} is corrupt and not served: {why}"
                raise GalleryError(503, self.broken) from None
            if self.shared and (detail := unavailable_detail(exc, self.shared.name)):
                raise GalleryError(503, f"{self.name}: {detail}", RETRY_AFTER_S) from None
            raise

    def _ready(self, create: bool) -> bool:
        """Whether there is a gallery, bound to this model file: created where ``create`` or
        where an old-format gallery is to be migrated, else (nothing stored yet) False."""
        self._check_served()
        with self._open_lock:
            if not self.ready:
                create = create or (self.dir / gallery_legacy.MANIFEST).is_file()
                with self._errors():
                    if self.shared is None:
                        if not self.path.exists():
                            if not create:
                                return False
                            self._create_file()
                        self.database = sqlite_database(self.path, self.name, BUSY_TIMEOUT_S, create=False)
                        meta = self._meta(self.database, create=False)[0] or {}  # none: corrupt
                    else:
                        self.database = self.shared
                        meta, migrated = self._meta(self.database, create)
                        if meta is None:
                            return False
                        if migrated:
                            gallery_legacy.remove(self.dir)
                self._check_meta(meta)
                self.ready = True
        return True

    def _create_file(self) -> None:
        """A new SQLite gallery, made whole (schema, meta, an old-format gallery's items) under a
        temporary name and then linked into place: no process ever opens it half made. Where
        another process linked its own first, that one is used."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(503, f"{self.name} cannot be created: {self._redact_paths(exc)}") from None
        temporary = self.dir / f".{DATABASE}.{uuid.uuid4().hex}"
        try:
            database = sqlite_database(temporary, self.name, BUSY_TIMEOUT_S)
            try:
                migrated = self._meta(database, create=True)[1]
            finally:
                database.close()
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                return
            if migrated:
                gallery_legacy.remove(self.dir)
        finally:
            for suffix in ("", "-wal", "-shm"):
                temporary.with_name(temporary.name + suffix).unlink(missing_ok=True)

    def _meta(self, database: Database, create: bool) -> tuple[dict[str, str] | None, bool]:
        """The gallery's meta rows, written (with an old-format gallery's items) where there are
        none and ``create``, else None; and whether old-format items were copied."""
        meta_of = select(gallery_meta.c.name, gallery_meta.c.value).where(
            gallery_meta.c.gallery == self.gallery
        )
        for attempt in range(2):
            try:
                with database.write() as db:
                    meta = {name: value for name, value in db.execute(meta_of)}
                    if meta or not create:
                        return meta or None, False
                    migrated = self._migrate(db)  # its items come in with the new meta
                    meta = {"format": FORMAT, "model_sha256": self.model_sha256, "dim": str(self.dim)}
                    rows = [{"gallery": self.gallery, "name": n, "value": v} for n, v in meta.items()]
                    db.execute(
                        gallery_meta.insert(), [*rows, rows[0] | {"name": "version", "value": self.version}]
                    )
                return meta, migrated
            except IntegrityError:  # another server created it at that moment: read theirs
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _check_meta(self, meta: dict[str, str]) -> None:
        if meta.get("format") != FORMAT or "model_sha256" not in meta or "dim" not in meta:
            raise GalleryError(503, f"{self.name}: {DATABASE} is corrupt and not served: no {FORMAT} meta")
        if meta["model_sha256"] != self.model_sha256 or meta["dim"] != str(self.dim):
            raise GalleryError(
                409,
                f"{self.name} was built with another model file (SHA-256 {meta['model_sha256'][:12]}…, "
                f"{meta['dim']}-d) than the one in service ({self.model_sha256[:12]}…): its vectors "
                "are not comparable; move it away to start a new gallery",
            )

    def _migrate(self, db: Connection) -> bool:
        """An old-format gallery's items into the database (in the caller's transaction)."""
        try:
            legacy = gallery_legacy.read(self.dir, self.name, self.model_sha256, self.dim)
        except StatusError as exc:
            raise GalleryError(exc.status_code, exc.detail) from None
        if legacy is None:
            return False
        self._insert(db, [(i.id, i.label, i.added_at, i.vector, i.thumbnail) for i in legacy])
        return True

    def _insert(self, db: Connection, rows: Iterable[NewItem]) -> list[int]:
        keys = []
        for item_id, label, added_at, vector, thumb in rows:
            data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
            row = {"gallery": self.gallery, "id": item_id, "label": label, "added_at": added_at,
                   "model_version": self.version, "vector_sha256": hashlib.sha256(data).hexdigest(),
                   "vector": data, "thumbnail": thumb}  # fmt: skip
            keys.append(int(db.execute(gallery_items.insert().values(row)).inserted_primary_key[0]))
        return keys

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction holding the gallery's lock: its meta row, FOR UPDATE (on SQLite the
        write lock is the database's already): keys are committed in the order they are taken."""
        assert self.database is not None
        with self._errors(), self.database.write() as db:
            db.execute(
                select(gallery_meta.c.value)
                .where(gallery_meta.c.gallery == self.gallery, gallery_meta.c.name == "format")
                .with_for_update()
            )
            yield db

    def _sync(self) -> None:
        """The rows added and the removals logged since this process last looked, into its index
        (with ``_index_lock`` held). Items are read before removals: an item removed in between
        is taken in, then dropped."""
        assert self.database is not None
        items = (
            select(gallery_items.c["key", "id", "label", "added_at", "vector_sha256", "vector"])
            .where(gallery_items.c.gallery == self.gallery, gallery_items.c.key > self.seen_key)
            .order_by(gallery_items.c.key)
        )
        removed = (
            select(gallery_removals.c.seq, gallery_removals.c.key)
            .where(gallery_removals.c.gallery == self.gallery, gallery_removals.c.seq > self.seen_removal)
            .order_by(gallery_removals.c.seq)
        )
        with self._errors(), self.database.read() as db:
            for chunk in db.execute(items, execution_options={"yield_per": 1024}).partitions():
                self._take_in(chunk)
            removals = db.execute(removed).all()
        gone = [key for _, key in removals if key in self.by_key]
        if gone:
            self.index.remove_ids(np.array(gone, dtype=np.int64))
            for key in gone:
                del self.by_key[key]
        if removals:
            self.seen_removal = removals[-1][0]

    def _take_in(self, rows: "list[Row[tuple[int, str, str | None, str, str, bytes]]]") -> None:
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
        assert self.database is not None
        query = (
            select(gallery_items.c["id", "label", "key", "added_at"])
            .where(gallery_items.c.gallery == self.gallery)
            .order_by(gallery_items.c.key)
        )
        with self._errors(), self.database.read() as db:
            return [Item(*row) for row in db.execute(query)]

    def _find(self, db: Connection, item_id: str) -> Row[tuple[int, str | None, str]] | None:
        query = select(gallery_items.c["key", "label", "added_at"]).where(
            gallery_items.c.gallery == self.gallery, gallery_items.c.id == item_id
        )
        return db.execute(query).first()

    def add(self, item_id: str, label: str | None, vector: np.ndarray, thumb: bytes) -> Item:
        self._ready(create=True)
        added_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._writing() as db:
            if self._find(db, item_id) is not None:
                raise GalleryError(409, f"gallery item {item_id!r} exists: DELETE /gallery/{item_id} first")
            count = db.execute(
                select(func.count()).select_from(gallery_items).where(gallery_items.c.gallery == self.gallery)
            ).scalar_one()
            if count >= self.max_items:
                raise GalleryError(
                    409, f"gallery is full: {count} items, ALEXNET_GALLERY_MAX_ITEMS={self.max_items}"
                )
            (key,) = self._insert(db, [(item_id, label, added_at, vector, thumb)])
        return Item(item_id, label, key, added_at)

    def remove(self, item_id: str) -> Item:
        if not self._ready(create=False):
            raise self._missing(item_id)
        with self._writing() as db:
            row = self._find(db, item_id)
            if row is None:
                raise self._missing(item_id)
            db.execute(gallery_items.delete().where(gallery_items.c.key == row.key))
            db.execute(gallery_removals.insert().values(gallery=self.gallery, key=row.key))
        return Item(item_id, row.label, row.key, row.added_at)

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
            assert self.database is not None
            query = select(gallery_items.c.thumbnail).where(
                gallery_items.c.gallery == self.gallery, gallery_items.c.id == item_id
            )
            with self._errors(), self.database.read() as db:
                row = db.execute(query).first()
        if row is None:
            raise self._missing(item_id)
        if row[0] is None:
            raise GalleryError(404, f"the thumbnail of {item_id!r} is missing from {self.name}")
        return bytes(row[0])

    def close(self) -> None:
        """Its own SQLite file's connections (a shared database stays open)."""
        if self.database is not None and self.shared is None:
            self.database.close()


class Galleries:
    """The gallery of each model file, opened on first use: in ``database`` where one is shared,
    else each in its own SQLite file under ``<state_dir>/gallery``."""

    def __init__(self, state_dir: Path, max_items: int, database: Database | None = None) -> None:
        self.root = state_dir / "gallery"
        self.max_items = max_items
        self.database = database
        self._open: dict[tuple[str, str], Gallery] = {}
        self._lock = threading.Lock()

    def directory(self, version: str, model_sha256: str) -> Path:
        return self.root / gallery_name(version, model_sha256)

    def get(self, version: str, model_sha256: str, dim: int) -> Gallery:
        with self._lock:
            gallery = self._open.get((version, model_sha256))
            if gallery is None or gallery.broken is not None:
                # A broken gallery is opened again on the next request: once its directory is
                # repaired or moved away, it serves without a restart.
                if gallery is not None:
                    gallery.close()
                gallery = Gallery(self.directory(version, model_sha256), version, model_sha256, dim,
                                  self.max_items, self.database)  # fmt: skip
                self._open[(version, model_sha256)] = gallery
            return gallery
