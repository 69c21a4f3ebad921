"""Where the server writes its state (job records, runs, galleries, ``ACTIVE``): the state
directory (``ALEXNET_STATE_DIR``, default the weights directory), and what is disabled when it
cannot be written (a read-only volume of models)."""

import logging
import tempfile
from pathlib import Path

from service.core.config import Settings
from service.model_registry import ModelRegistry
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


def start_training(
    settings: Settings, registry: ModelRegistry, read_only: str | None
) -> TrainingManager | None:
    """The job manager on the state directory (None where it is read-only)."""
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
    )
