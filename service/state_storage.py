"""Where the server writes its state: the state directory (``ALEXNET_STATE_DIR``, default the
weights directory) for runs and, by default, the SQLite files of job records, the activation
history and galleries and the ``ACTIVE`` file; or, where ``ALEXNET_DATABASE_URL`` is set, a
PostgreSQL database for the records. And what is disabled when they cannot be written."""

import logging
import tempfile
from pathlib import Path

from service.core.config import Settings
from service.database import Database, open_database, sqlite_database
from service.database.history import ActivationHistory
from service.job_store import JOB_DATABASE, JobStore
from service.model_registry import HistoryWatcher, ModelRegistry, PointerWatcher
from service.training_jobs import TrainingManager

log = logging.getLogger(__name__)


def unwritable(directory: Path) -> str | None:
    """Why nothing can be created in ``directory`` (made if missing), or None. A real attempt:
    file modes do not stop root, and only the mount knows it is read-only."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".write-probe-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def read_only_reason(settings: Settings) -> str | None:
    if settings.state_dir is None and (problem := unwritable(settings.weights_dir)):
        return (
            f"the weights directory cannot be written ({problem}) and no ALEXNET_STATE_DIR is set: "
            "set ALEXNET_STATE_DIR to a writable directory for job records, galleries and ACTIVE"
        )
    if settings.state_dir is not None and (problem := unwritable(settings.state_dir)):
        return f"ALEXNET_STATE_DIR cannot be written ({problem}): make it writable or choose another"
    return None


def open_state_database(settings: Settings, read_only: str | None) -> Database | None:
    """The database of job records, activations and (shared) galleries, migrated to the current
    schema: PostgreSQL where configured, else the state directory's SQLite file (None where that
    directory is read-only)."""
    if settings.database_url is not None:
        database = open_database(settings.database_url.get_secret_value())
        log.info("state in %s", database.name)
        return database
    if read_only is not None:
        return None
    return sqlite_database(settings.state_path / JOB_DATABASE, "the job database")


def open_state(settings: Settings, registry: ModelRegistry) -> tuple[Database | None, PointerWatcher]:
    """The state database, given to the registry for its activation history, and what follows
    activations made by other servers (not started): the shared history, else the ACTIVE file."""
    database = open_state_database(settings, registry.read_only)
    if database is not None:
        registry.history, registry.follows_history = ActivationHistory(database), database.shared
    if registry.follows_history:
        return database, HistoryWatcher(registry, settings.database_poll_s)
    return database, PointerWatcher(registry)


def start_training(
    settings: Settings, registry: ModelRegistry, database: Database | None
) -> TrainingManager | None:
    """The job manager on the state directory (None where it is read-only)."""
    read_only = registry.read_only
    if read_only is not None:
        log.warning("training, galleries and activation are disabled: %s", read_only)
        return None
    exports = unwritable(settings.weights_dir) if settings.state_dir is not None else None
    return TrainingManager(
        settings.weights_dir,
        settings.data_root,
        registry,
        state_dir=settings.state_path,
        ray_address=settings.train_on_ray,
        models_read_only=exports
        and f"the weights directory, where a job's model goes, cannot be written ({exports})",
        store=JobStore(database) if database is not None else None,
    )
