"""File helpers used by export, training and the service: one home for each.

Atomic replacement is ``tempfile`` + ``os.replace`` from the standard library: the usual package
for it (``atomicwrites``) is archived, and the stdlib primitives are all it wraps.
"""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(OSError):
    """A file could not be written; the message says where, why and what was kept."""


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None], *, mtime_ns: int | None = None) -> None:
    """``write(temp)`` beside ``path``, fsync, then rename over ``path``: a reader (the service
    listing ``*.onnx``, Triton polling its repository) sees the old file or the new, never half.
    The temporary name ends in ``.part``, so no one lists it as a model. ``mtime_ns`` dates the
    file before it appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; the server may run as another user
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # Only the write's own failures: an OSError, or the bare RuntimeError torch.save raises;
        # a caller's exception (a subclass, e.g. a failed check) passes through unchanged.
        if isinstance(exc, WriteError) or (type(exc) not in (RuntimeError,) and not isinstance(exc, OSError)):
            raise
        # A full disk surfaces from torch.save as "[enforce fail at inline_container.cc] unexpected
        # pos": say which file, that the old one is intact, and how much room is left.
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        reason = getattr(exc, "strerror", None) or exc
        raise WriteError(
            f"cannot write {path} ({reason}); {free:.0f} MiB free on its filesystem (disk full, or a "
            f"file size limit?); {kept}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
