"""The tables, one definition for SQLite and PostgreSQL (SQLAlchemy Core). A migration in
``migrations/versions`` brings a database written by an earlier version to this shape."""

import re

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("state", Text),
    Column("request", Text),  # the TrainRequest as JSON
    Column("run_dir", Text),
    Column("created_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("pid", Integer),  # the trainer's, on ``host``
    Column("error", Text),
    Column("model_version", Text),
    Column("activated", Boolean(create_constraint=False)),
    Column("host", Text),  # the machine whose server runs the job: only it settles the job at start-up
)

# Which model is served: the newest row. Replicas on one PostgreSQL database follow it.
activations = Table(
    "activations",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("model_file", Text, nullable=False),
    Column("activated_at", Float, nullable=False),
    Column("by", Text, nullable=False),  # "request", "job <id>", or "pin" (kept as served)
    sqlite_autoincrement=True,
)

# A gallery per model file, named by ``gallery_name``: its meta rows bind it to the model's SHA-256.
gallery_meta = Table(
    "gallery_meta",
    metadata,
    Column("gallery", Text, primary_key=True),
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

# Keys are never reused (AUTOINCREMENT, a sequence): a reader takes in "key > the last it saw".
# The blobs last: a listing reads the columns before them and never their overflow pages.
gallery_items = Table(
    "gallery_items",
    metadata,
    Column("key", Integer, primary_key=True, autoincrement=True),
    Column("gallery", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("label", Text),
    Column("added_at", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("vector_sha256", Text, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 bytes: 4096-d is over pgvector's index limit
    Column("thumbnail", LargeBinary),
    UniqueConstraint("gallery", "id", name="gallery_items_gallery_id"),
    Index("gallery_items_gallery_key", "gallery", "key"),
    sqlite_autoincrement=True,
)

gallery_removals = Table(
    "gallery_removals",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("gallery", Text, nullable=False),
    Column("key", Integer, nullable=False),
    Index("gallery_removals_gallery_seq", "gallery", "seq"),
    sqlite_autoincrement=True,
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def gallery_name(version: str, model_sha256: str) -> str:
    """A gallery's name (and, with SQLite, its directory's): the model's version where it is a
    plain name, else the file's hash (never a path from outside)."""
    return version if _SAFE_NAME.match(version) and version not in (".", "..") else model_sha256
