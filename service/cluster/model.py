"""The model in service as an HTTP front replica knows it: no session (the engine replicas hold
it), only what the routes need to prepare inputs and shape answers. Which model that is comes
from the Serve application's config (``user_config``); activating one updates that config."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alexnet_core import files
from alexnet_core.metadata import ModelMetadata
from service.core.config import Settings
from service.model_registry import ModelRegistry, StateReadOnly

log = logging.getLogger(__name__)


@dataclass
class FrontModel:
    """An ``OnnxClassifier`` as the routes read it, described by the engine replica that loaded it."""

    path: Path
    metadata: ModelMetadata
    sha256: str
    providers: list[str]
    feature_width: int | None  # None: the model has no features output
    verified: bool

    @property
    def version(self) -> str:
        return self.metadata.version


@dataclass
class Description:
    """What an engine replica says of a model it has loaded (sent over Ray: plain fields)."""

    file: str
    props: dict[str, str]
    sha256: str
    providers: list[str]
    feature_width: int | None
    verified: bool


class ClusterRegistry(ModelRegistry):
    """A front's registry: the model files are listed from the weights directory (the same path on
    every node: a shared volume), the model in service is the one the app's config names, and
    activation checks the model on an engine replica, then updates the app's config."""

    def __init__(
        self,
        settings: Settings,
        check: Callable[[str], Description],
        update_config: Callable[[str], None],
    ) -> None:
        super().__init__(settings)
        self.not_ready_reason = "waiting for the engine replicas to load the model"
        self._check, self._update_config = check, update_config

    def load_at_startup(self) -> None:
        """Nothing to load here: ``show`` sets the model when the app's config arrives."""

    def follow_pointer(self) -> None:
        """The app's config is what every replica follows, not the ACTIVE file."""
        return None

    def show(self, described: Description) -> FrontModel:
        model = FrontModel(
            self.weights_dir / described.file,
            ModelMetadata.from_props(described.props),
            described.sha256,
            described.providers,
            described.feature_width,
            described.verified,
        )
        self.current = model  # type: ignore[assignment]
        return model

    def is_verified(self, path: Path) -> bool:
        current = self.current
        return current is not None and current.path == path and bool(getattr(current, "verified", False))

    def activate(self, version: str, by: str = "request") -> FrontModel:  # type: ignore[override]
        """Load the model on an engine replica first (a model that cannot be loaded changes
        nothing), record it in the ACTIVE file (the next deployment starts with it), then update
        the app's config: every replica reconfigures in place, and this returns once they have.
        ``by`` (a request, a training job) goes into the activation history."""
        if self.read_only:
            raise StateReadOnly(f"activation is disabled: {self.read_only}")
        with self._activation:
            path = self.find(version)
            described = self._check(path.name)
            served = self.current
            files.write_text(self.pointer, path.name)
            try:
                self._update_config(path.name)
            except BaseException:  # the cluster still serves the model before: so says the file
                if served is not None:
                    files.write_text(self.pointer, served.path.name)
                raise
            self._log_in_history(path.name, by)
            log.info("activated model %s across the cluster", described.file)
            return self.show(described)
