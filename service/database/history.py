"""The activation history: every activation, in the state database."""

import time
from typing import Any

from sqlalchemy import select

from service.database.engine import Database
from service.database.schema import activations


class ActivationHistory:
    """Every activation: which model file, when, by what (``request``, ``job <id>``, ``pin``).
    The newest row is the activated model where the database is shared (PostgreSQL)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def record(self, model_file: str, by: str) -> int:
        with self.database.write() as db:
            row = {"model_file": model_file, "activated_at": time.time(), "by": by}
            return int(db.execute(activations.insert().values(row)).inserted_primary_key[0])

    def latest(self) -> tuple[int, str] | None:
        """The newest activation's sequence number and model file, or None."""
        query = (
            select(activations.c.seq, activations.c.model_file).order_by(activations.c.seq.desc()).limit(1)
        )
        with self.database.read() as db:
            row = db.execute(query).first()
        return (int(row[0]), str(row[1])) if row else None

    def entries(self, limit: int = 100) -> list[dict[str, Any]]:
        query = select(activations).order_by(activations.c.seq.desc()).limit(limit)
        with self.database.read() as db:
            return [dict(row) for row in db.execute(query).mappings()]
