"""Shared state: jobs.host, the activation history, and the galleries as tables of one schema
(a gallery file written by 0.1.0 had tables meta, items and removals of its own: its items are
copied over with their keys, then those tables dropped).

Revision ID: 0002
Revises: 0001
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_GALLERY = {"meta", "items", "removals"}
ITEM_COLUMNS = ("key", "id", "label", "added_at", "model_version", "vector_sha256", "vector", "thumbnail")


def upgrade() -> None:
    bind = op.get_bind()
    old_tables = set(sa.inspect(bind).get_table_names())
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("host", sa.Text))
    op.create_table(
        "activations",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_file", sa.Text, nullable=False),
        sa.Column("activated_at", sa.Float, nullable=False),
        sa.Column("by", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "gallery_meta",
        sa.Column("gallery", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "gallery_items",
        sa.Column("key", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("gallery", sa.Text, nullable=False),
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("added_at", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("vector_sha256", sa.Text, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("thumbnail", sa.LargeBinary),
        sa.UniqueConstraint("gallery", "id", name="gallery_items_gallery_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("gallery_items_gallery_key", "gallery_items", ["gallery", "key"])
    op.create_table(
        "gallery_removals",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("gallery", sa.Text, nullable=False),
        sa.Column("key", sa.Integer, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("gallery_removals_gallery_seq", "gallery_removals", ["gallery", "seq"])
    if old_tables >= OLD_GALLERY:
        _adopt_gallery(bind)


def _gallery_name(version: str, model_sha256: str) -> str:
    # The rule of service.database.schema.gallery_name when this revision was written.
    safe = re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", version) and version not in (".", "..")
    return version if safe else model_sha256


def _adopt_gallery(bind: sa.Connection) -> None:
    """The rows of a 0.1.0 gallery file into the new tables. Its removal log is not copied: it
    names items already gone, and a reader that starts on the new tables never saw them."""
    old_meta = sa.table("meta", sa.column("name"), sa.column("value"))
    meta = {name: value for name, value in bind.execute(sa.select(old_meta.c.name, old_meta.c.value))}
    gallery = _gallery_name(meta.get("version", ""), meta.get("model_sha256", ""))
    new_meta = sa.table("gallery_meta", sa.column("gallery"), sa.column("name"), sa.column("value"))
    if meta:
        bind.execute(
            new_meta.insert(), [{"gallery": gallery, "name": n, "value": v} for n, v in meta.items()]
        )
    old_items = sa.table("items", *(sa.column(name) for name in ITEM_COLUMNS))
    new_items = sa.table("gallery_items", sa.column("gallery"), *(sa.column(name) for name in ITEM_COLUMNS))
    bind.execute(
        new_items.insert().from_select(
            ["gallery", *ITEM_COLUMNS],
            sa.select(sa.literal(gallery), *(old_items.c[name] for name in ITEM_COLUMNS)).order_by(
                old_items.c.key
            ),
        )
    )
    for table in ("removals", "items", "meta"):
        op.drop_table(table)


def downgrade() -> None:
    raise NotImplementedError("galleries are not moved back into per-gallery tables")
