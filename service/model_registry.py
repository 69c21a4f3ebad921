"""Which model is in service: chosen at start-up, swapped atomically on activation. Each activation
is recorded in the activation history; replicas agree on the activated model through the ``ACTIVE``
file in the state directory, or, on a shared (PostgreSQL) database, through that history."""

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from alexnet_core import files, model_files
from alexnet_core.metadata import ModelMetadata
from alexnet_core.session import OnnxClassifier
from service.core.config import Settings
from service.database.history import ActivationHistory

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE"  # holds the file name of the activated model, so a restart keeps it
NO_MODEL_HINT = (
    "export one with `alexnet-export --source pretrained` (or `--source random` for a smoke test) "
    "or train one with POST /train, then restart or POST /model/activate"
)


CUDA = "CUDAExecutionProvider"
FP16_SUFFIX = "-fp16"


def passed_fp16_variant(path: Path) -> Path | None:
    """The fp16 variant beside ``path`` whose recorded agreement check passed, else None."""
    variant = path.with_name(f"{path.stem}{FP16_SUFFIX}.onnx")
    if not variant.is_file():
        return None
    import onnx  # here only: a CPU server never gets this far

    try:
        props = {p.key: p.value for p in onnx.load(variant, load_external_data=False).metadata_props}
        check = ModelMetadata.from_props(props).precision_check
    except Exception as exc:
        log.warning("cannot read %s's metadata: %s", variant.name, exc)
        return None
    return variant if check is not None and check.get("passed") is True else None


class ModelNotFound(LookupError):
    pass


class StateReadOnly(RuntimeError):
    """Activation is disabled: there is no writable place for the ACTIVE file."""


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.weights_dir = settings.weights_dir
        self.state_dir = settings.state_path  # where the ACTIVE file is written
        self.read_only: str | None = None  # why nothing can be written there, when so
        self._current: OnnxClassifier | None = None
        self.not_ready_reason = "model not loaded yet"
        # Told of every change of the model in service (the engine tells the front processes).
        self.listeners: list[Callable[[OnnxClassifier | None], None]] = []
        self._activation = threading.Lock()
        self._verified: set[Path] = set()  # files whose SHA-256 matched their export manifest
        self.history: ActivationHistory | None = None  # where the state database can be written
        self.follows_history = False  # the history, not the ACTIVE file, says what is activated

    @property
    def current(self) -> OnnxClassifier | None:
        return self._current

    @current.setter
    def current(self, classifier: OnnxClassifier | None) -> None:
        self._current = classifier
        for listener in list(self.listeners):
            listener(classifier)

    def onnx_files(self) -> list[Path]:
        """``*.onnx`` files in the weights directory, newest first."""
        if not self.weights_dir.is_dir():
            return []
        # A symlink that leads out of the directory is not a model of it (as for /train datasets).
        root = self.weights_dir.resolve()
        found = [
            p for p in self.weights_dir.glob("*.onnx") if p.is_file() and p.resolve().is_relative_to(root)
        ]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def available(self) -> list[Path]:
        """The model files: ``*.onnx`` files that carry alexnet-serve metadata, newest first."""
        return [p for p in self.onnx_files() if model_files.read_metadata(p) is not None]

    def find(self, version: str) -> Path:
        """The file whose stem or name is ``version``. Matched against the directory listing, so
        no client string is ever joined into a path."""
        for path in self.onnx_files():
            if version in (path.stem, path.name):
                return path
        raise ModelNotFound(f"no model {version!r} in the weights directory")

    def is_verified(self, path: Path) -> bool:
        return path in self._verified

    def redact_paths(self, message: object) -> str:
        """``message`` with the server's paths to the weights and state directories removed: clients
        see file names relative to them, never where the server keeps its files."""
        text = str(message)
        roots: dict[str, str] = {}  # the weights directory's name wins where the two are one
        for directory, name in ((self.weights_dir, "weights"), (self.state_dir, "state")):
            for root in (str(directory.resolve()), str(directory.absolute())):
                roots.setdefault(root, f"the {name} directory")
        for root, name in sorted(roots.items(), key=lambda item: len(item[0]), reverse=True):
            text = text.replace(root + "/", "").replace(root, name)
        return text

    @property
    def pointer(self) -> Path:
        return self.state_dir / ACTIVE_FILE

    def recorded_choice(self) -> Path | None:
        """The ACTIVE file to follow at start-up: the state directory's; else one shipped in the
        weights directory (a read-only volume may come with its choice made)."""
        for pointer in dict.fromkeys((self.pointer, self.weights_dir / ACTIVE_FILE)):
            if pointer.is_file():
                return pointer
        return None

    def _load(self, path: Path) -> OnnxClassifier:
        classifier = OnnxClassifier(path, self.settings.providers, self.settings.intra_op_threads)
        # The session has hashed the file it loaded: an altered one raises here, never served.
        if model_files.verify(path, classifier.sha256):
            self._verified.add(path)
        else:
            self._verified.discard(path)
            log.warning(
                "%s has no SHA-256 manifest (%s): served unverified; export it again to record one",
                path.name,
                model_files.manifest_path(path).name,
            )
        return classifier

    def chosen(self) -> Path | None:
        """The model chosen for start-up: ALEXNET_MODEL, else the recorded activation (the shared
        history, or the ACTIVE file); None where none is. Raises ModelNotFound for a missing one."""
        if self.settings.model:
            return self.find(self.settings.model)
        if self.follows_history and self.history and (latest := self.history.latest()):
            return self.find(latest[1])
        if not self.follows_history and (pointer := self.recorded_choice()):
            return self.find(pointer.read_text().strip())
        return None

    def load_at_startup(self) -> None:
        candidates = self.onnx_files()
        preferred: list[Path] = []
        try:
            preferred = [chosen] if (chosen := self.chosen()) else []
        except ModelNotFound as exc:
            log.error("%s; trying the other models", exc)
        problems = []
        for path in preferred + [p for p in candidates if p not in preferred]:
            try:
                self.current = self._load(path)
                if not preferred:  # the default choice: on CUDA, its checked fp16 variant
                    self._prefer_fp16(path)
                return
            except Exception as exc:
                log.error("cannot load %s: %s", path.name, exc)
                problems.append(f"{path.name}: {self.redact_paths(exc)}")
        found = "; ".join([f"{len(candidates)} *.onnx files found", *problems[:3]])
        # Names relative to the weights directory: /ready answers anyone.
        self.not_ready_reason = f"no loadable model in the weights directory ({found}): {NO_MODEL_HINT}"
        log.warning("%s (weights directory: %s)", self.not_ready_reason, self.weights_dir)

    def _prefer_fp16(self, path: Path) -> None:
        """Serve ``path``'s fp16 variant instead where the session runs on CUDA and the variant's
        agreement check, recorded at export (``model_export.precision``), passed."""
        current = self.current
        if not self.settings.prefer_fp16 or current is None or CUDA not in current.providers:
            return
        variant = passed_fp16_variant(path)
        if variant is None:
            return
        try:
            self.current = self._load(variant)
        except Exception as exc:
            log.error("cannot load the fp16 variant %s: %s; serving %s", variant.name, exc, path.name)
            return
        log.info("serving the fp16 variant %s on CUDA: its export check passed", variant.stem)

    def activate(self, version: str, by: str = "request") -> OnnxClassifier:
        """Load and warm the new model fully, record it (the ACTIVE file, or the shared history),
        then swap: requests already holding the old one finish on it. Any failure (a model that
        cannot be loaded, a record that cannot be written) leaves the served model and the record
        as they were. ``by``: what activated it, for the history."""
        if self.read_only and not self.follows_history:
            raise StateReadOnly(f"activation is disabled: {self.read_only}")
        with self._activation:
            path = self.find(version)
            classifier = self._load(path)
            if self.follows_history and self.history:
                try:
                    self.history.record(path.name, by)
                except SQLAlchemyError as exc:  # down or refusing: a 503 naming it
                    raise self.history.database.unavailable(exc) or exc from None
            else:
                files.write_text(self.pointer, path.name)
                self._log_in_history(path.name, by)
            self.current = classifier
            log.info("activated model %s", classifier.version)
            return classifier

    def close(self) -> None:
        """Release the served model's session (hundreds of MB) at shutdown, whoever still holds
        the app object afterwards (an embedding server, a test that served several apps)."""
        with self._activation:
            self.current = None
            self.not_ready_reason = "the server is shutting down"
            if self.history is not None:
                self.history.database.close()

    def pin_current(self) -> None:
        """Record the served model as the activated one where nothing is recorded yet. Called
        before a training job starts: a model that appears later (the job's, not to be activated)
        must not become, as the newest file, what the next start-up serves."""
        with self._activation:
            if self.current is None:
                return
            if self.follows_history and self.history:
                if self.history.latest() is None:
                    self.history.record(self.current.path.name, "pin")
            elif not self.pointer.exists():
                files.write_text(self.pointer, self.current.path.name)

    def _log_in_history(self, model_file: str, by: str) -> None:
        """Beside the ACTIVE file, which decides: a history that cannot be written (a database
        locked by a backup) is logged, and the activation stands."""
        if self.history is not None:
            try:
                self.history.record(model_file, by)
            except Exception as exc:
                log.warning("activation of %s not recorded in the history: %s", model_file, exc)

    def follow_pointer(self) -> OnnxClassifier | None:
        """Serve the model the ACTIVE file (or the shared history) names when another process
        (a replica, or its training job) activated it. Never writes it: a replica that lags
        behind must not undo a later activation. None when it names the model served."""
        with self._activation:
            if self.follows_history and self.history:
                latest = self.history.latest()
                name = latest[1] if latest else ""
            else:
                try:
                    name = self.pointer.read_text().strip()
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
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="active-pointer", daemon=True)

    def _stamp(self) -> tuple[int, ...] | None:
        try:
            st = self.registry.pointer.stat()
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
            try:
                stamp = self._stamp()
            except Exception as exc:  # the database is down: keep serving, look again next time
                if not self._failing:
                    log.warning("cannot read the activation history: %s", exc)
                self._failing = True
                continue
            if self._failing:
                log.info("the activation history can be read again")
            self._failing = False
            if stamp == self._last:
                continue
            self._last = stamp
            try:
                self.registry.follow_pointer()
            except Exception as exc:  # a bad or missing model: keep serving, log, wait for the next change
                log.error("cannot follow the ACTIVE file: %s", exc)


class HistoryWatcher(PointerWatcher):
    """Replicas on one PostgreSQL database agree through its activation history: polled every
    ``interval_s`` (one indexed read of the newest row), the model loaded and warmed before the
    swap. A replica serves an activation made elsewhere within ``interval_s`` plus the model's
    load time."""

    def _stamp(self) -> tuple[int, ...] | None:
        assert self.registry.history is not None
        latest = self.registry.history.latest()
        return (latest[0],) if latest else None
