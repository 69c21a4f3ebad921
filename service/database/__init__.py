"""The server's shared state in one SQLAlchemy schema: training job records, the activation
history and the galleries. PostgreSQL where ``ALEXNET_DATABASE_URL`` names one, else SQLite files
in the state directory; Alembic migrates either to the current schema when it is opened."""

from service.database.engine import (
    Database,
    DatabaseError,
    open_database,
    sqlite_database,
    unavailable_detail,
)

__all__ = ["Database", "DatabaseError", "open_database", "sqlite_database", "unavailable_detail"]
