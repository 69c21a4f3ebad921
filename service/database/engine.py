"""Opening the state database: a SQLAlchemy engine, migrated to the current schema by Alembic
(its scripts ship in this package), and the errors a client is told when it cannot be used."""

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.pool import QueuePool

from alexnet_core.errors import StatusError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
RETRY_AFTER_S = 2
CONNECT_TIMEOUT_S = 5  # a database host that does not answer: a 503 after this, not a hung request
# Alembic's ``context`` and ``op`` are module-level proxies: one migration at a time in a process.
_MIGRATING = threading.Lock()


class DatabaseError(StatusError):
    """The database cannot be used now (down, refusing, locked): 503 with Retry-After."""

    def __init__(self, detail: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(503, detail)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type["DatabaseError"], tuple[str, int]]:  # type: ignore[override]
        return type(self), (self.detail, self.retry_after_s)


@dataclass
class Database:
    """An engine and how messages name it. ``shared``: a PostgreSQL database that replicas on
    other hosts use too (the activation history is then what they follow)."""

    engine: Engine
    name: str
    shared: bool

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it takes the write lock first (BEGIN IMMEDIATE), so that
        what it reads and what it writes see one state."""
        with self.engine.connect().execution_options(write=True) as connection, connection.begin():
            yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            yield connection

    def unavailable(self, exc: BaseException) -> DatabaseError | None:
        detail = unavailable_detail(exc, self.name)
        return DatabaseError(detail) if detail else None

    def close(self) -> None:
        self.engine.dispose()


def unavailable_detail(exc: BaseException, name: str) -> str | None:
    """What to tell a client when ``exc`` says the database cannot be reached or used, else None."""
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"{name} cannot be used now ({lines[0] if lines else type(exc).__name__}); retry shortly"
    return None


def _sqlite_engine(path: Path, busy_timeout_s: float, create: bool) -> Engine:
    # mode=rw: a database moved away is an error, never silently a new empty one.
    uri = f"{path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False,
                               isolation_level=None)  # fmt: skip

    # A URL without a file would make SQLAlchemy choose SingletonThreadPool (one connection per
    # thread, closed under other threads past its size): a queue of whole connections instead.
    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=QueuePool, max_overflow=-1)

    # SQLAlchemy's documented recipe for pysqlite: SQLAlchemy, not the driver, begins transactions,
    # and a write transaction takes the write lock at once rather than on its first write.
    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("write")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def sqlite_database(path: Path, name: str, busy_timeout_s: float = 5.0, create: bool = True) -> Database:
    """The SQLite file at ``path`` (made where ``create``), in WAL mode (readers never wait for a
    writer) and migrated to the current schema."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    database = Database(_sqlite_engine(path, busy_timeout_s, create), name, shared=False)
    try:
        raw = database.engine.raw_connection()
        try:
            if raw.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                raw.execute("PRAGMA journal_mode=WAL")
        finally:
            raw.close()
        upgrade(database)
    except BaseException:
        database.close()
        raise
    if create:  # from now on the file must stay where it is
        database.engine.dispose()
        database.engine = _sqlite_engine(path, busy_timeout_s, create=False)
    return database


def open_database(url: str) -> Database:
    """The PostgreSQL database ``url`` names (``postgresql+psycopg://user:password@host/db``),
    migrated to the current schema; several servers may start on it at once."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"ALEXNET_DATABASE_URL names a {parsed.get_backend_name()} database: it must be PostgreSQL "
            "(postgresql+psycopg://user:password@host/db); without it, the state is kept in SQLite files"
        )
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
    # pre_ping: a connection the server dropped (a restart) is replaced before it is used.
    engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    name = f"the database {parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database}"
    database = Database(engine, name, shared=True)
    try:
        upgrade(database)
    except OperationalError as exc:
        database.close()
        raise RuntimeError(
            f"{unavailable_detail(exc, name)}: check ALEXNET_DATABASE_URL and that the database server is up"
        ) from None
    except BaseException:
        database.close()
        raise
    return database


def upgrade(database: Database, attempts: int = 5) -> None:
    """Alembic's upgrade to head, in one write transaction. Servers starting at once on a new
    PostgreSQL database race to create the tables: the loser's transaction is rolled back and it
    tries again, finding them made."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    for attempt in range(attempts):
        try:
            with _MIGRATING, database.write() as connection:
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            return
        except (IntegrityError, ProgrammingError) as exc:
            if attempt == attempts - 1:
                raise
            log.info("%s: another server was migrating it (%s); trying again", database.name, exc.orig)
            time.sleep(0.5)
