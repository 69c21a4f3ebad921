"""The jobs table as alexnet-serve 0.1.0 wrote it into jobs.sqlite3, which it made without
Alembic: created where absent, else given the columns a store older still lacks (NULL).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

COLUMNS = (
    ("id", sa.Text),
    ("state", sa.Text),
    ("request", sa.Text),
    ("run_dir", sa.Text),
    ("created_at", sa.Float),
    ("started_at", sa.Float),
    ("finished_at", sa.Float),
    ("pid", sa.Integer),
    ("error", sa.Text),
    ("model_version", sa.Text),
    ("activated", lambda: sa.Boolean(create_constraint=False)),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("jobs"):
        op.create_table(
            "jobs", *(sa.Column(name, kind()) for name, kind in COLUMNS), sa.PrimaryKeyConstraint("id")
        )
        return
    present = {column["name"] for column in inspector.get_columns("jobs")}
    missing = [(name, kind) for name, kind in COLUMNS if name not in present]
    if missing:
        with op.batch_alter_table("jobs") as batch:
            for name, kind in missing:
                batch.add_column(sa.Column(name, kind()))


def downgrade() -> None:
    raise NotImplementedError("the jobs table is the first schema: there is nothing to go back to")
