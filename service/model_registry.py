"""Which model is in service: chosen at start-up, swapped atomically on activation."""

import logging
import threading
from pathlib import Path

from alexnet_core import files
from alexnet_core.session import OnnxClassifier
from service.core.config import Settings

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE"  # holds the file name of the activated model, so a restart keeps it
NO_MODEL_HINT = (
    "export one with `alexnet-export --source pretrained` (or `--source random` for a smoke test) "
    "or train one with POST /train, then restart or POST /model/activate"
)


class ModelNotFound(LookupError):
    pass


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.weights_dir = settings.weights_dir
        self.current: OnnxClassifier | None = None
        self.not_ready_reason = "model not loaded yet"
        self._activation = threading.Lock()

    def available(self) -> list[Path]:
        """Model files in the weights directory, newest first."""
        if not self.weights_dir.is_dir():
            return []
        # A symlink that leads out of the directory is not a model of it (as for /train datasets).
        root = self.weights_dir.resolve()
        files = [
            p for p in self.weights_dir.glob("*.onnx") if p.is_file() and p.resolve().is_relative_to(root)
        ]
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def find(self, version: str) -> Path:
        """The file whose stem or name is ``version``. Matched against the directory listing, so
        no client string is ever joined into a path."""
        for path in self.available():
            if version in (path.stem, path.name):
                return path
        raise ModelNotFound(f"no model {version!r} in the weights directory")

    def _load(self, path: Path) -> OnnxClassifier:
        return OnnxClassifier(path, self.settings.providers, self.settings.intra_op_threads)

    def load_at_startup(self) -> None:
        candidates = self.available()
        preferred: list[Path] = []
        try:
            if self.settings.model:
                preferred = [self.find(self.settings.model)]
            elif (pointer := self.weights_dir / ACTIVE_FILE).is_file():
                preferred = [self.find(pointer.read_text().strip())]
        except ModelNotFound as exc:
            log.error("%s; trying the other models", exc)
        for path in preferred + [p for p in candidates if p not in preferred]:
            try:
                self.current = self._load(path)
                return
            except Exception as exc:
                log.error("cannot load %s: %s", path.name, exc)
        found = f"{len(candidates)} *.onnx files found"
        self.not_ready_reason = f"no loadable model in {self.weights_dir}/ ({found}): {NO_MODEL_HINT}"
        log.warning(self.not_ready_reason)

    def activate(self, version: str) -> OnnxClassifier:
        """Load and warm the new model fully, then swap: requests already holding the old one
        finish on it. Any failure leaves the served model as it was."""
        with self._activation:
            path = self.find(version)
            classifier = self._load(path)
            self.current = classifier
            files.write_text(self.weights_dir / ACTIVE_FILE, path.name)
            log.info("activated model %s", classifier.version)
            return classifier

    def follow_pointer(self) -> OnnxClassifier | None:
        """Serve the model the ACTIVE file names when another process sharing the weights
        directory (a replica, or its training job) activated it. Never writes the file: a replica
        that lags behind must not undo a later activation. None when it names the model served."""
        with self._activation:
            try:
                name = (self.weights_dir / ACTIVE_FILE).read_text().strip()
            except FileNotFoundError:
                return None
            current = self.current
            if not name or (current is not None and current.path.name == name):
                return None
            classifier = self._load(self.find(name))
            self.current = classifier
            log.info("following the ACTIVE file: now serving %s", classifier.version)
            return classifier


class PointerWatcher:
    """Replicas that agree: polls the ACTIVE file's status once a second (one stat call; works on
    every filesystem a volume can be, including NFS, where inotify sees no other host's writes)
    and, when it changed, swaps to the model it names through ``ModelRegistry.follow_pointer``,
    which loads and warms the new model before the swap: no request fails meanwhile."""

    def __init__(self, registry: ModelRegistry, interval_s: float = 1.0) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="active-pointer", daemon=True)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = (self.registry.weights_dir / ACTIVE_FILE).stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def start(self) -> None:
        # Changes from now on: a model chosen at start-up (ALEXNET_MODEL) is not overridden.
        self._last = self._stamp()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            stamp = self._stamp()
            if stamp == self._last:
                continue
            self._last = stamp
            try:
                self.registry.follow_pointer()
            except Exception as exc:  # a bad or missing model: keep serving, log, wait for the next change
                log.error("cannot follow the ACTIVE file: %s", exc)
