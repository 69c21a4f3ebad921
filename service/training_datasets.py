"""Which folder a job may train on: a dataset path relative to the data root, checked before
anything runs. Every refusal is a 400 naming the path as the client gave it (relative), never
the server's own paths."""

import os
from pathlib import Path

NAME_MAX = 255  # bytes in one path component on Linux filesystems


class DatasetRefused(ValueError):
    pass


def check_dataset(data_root: Path, relative: str) -> Path:
    """The dataset folder ``relative`` names, resolved inside ``data_root``; DatasetRefused if it
    is absolute, has ``..``, a component too long for the filesystem, leads out of the root (by a
    symlink anywhere the trainer reads: the dataset, train/, val/, a class folder or an image),
    loops, or lacks train/ and val/."""
    candidate = Path(relative)
    if not relative.strip() or candidate.is_absolute() or ".." in candidate.parts or "\x00" in relative:
        raise DatasetRefused(f"dataset path {relative!r} must be relative to the data root, without '..'")
    try:
        too_long = any(len(os.fsencode(part)) > NAME_MAX for part in candidate.parts)
    except UnicodeEncodeError:  # a lone surrogate: no file can have that name
        raise DatasetRefused(f"dataset path {relative!r} is not a valid file name") from None
    if too_long:
        raise DatasetRefused(f"dataset path {relative!r} has a component over {NAME_MAX} bytes")
    try:
        root = data_root.resolve()
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise DatasetRefused(f"dataset path {relative!r} leads outside the data root")
        if not (resolved / "train").is_dir() or not (resolved / "val").is_dir():
            raise DatasetRefused(
                f"dataset {relative!r} not found: expected <data root>/{relative}/train and /val"
            )
        escape = _link_out(resolved, root)
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13), ELOOP...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a symlink loop"
        raise DatasetRefused(f"dataset path {relative!r} cannot be resolved: {reason}") from None
    if escape is not None:
        inside = escape.relative_to(resolved)
        raise DatasetRefused(f"dataset {relative!r}: {inside} is a symlink that leads outside the data root")
    return resolved


def _leads_out(path: Path, root: Path) -> bool:
    try:
        return not path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # broken or looping: the trainer could not read it either
        return True


def _link_out(dataset: Path, root: Path) -> Path | None:
    """The first symlink, among what the trainer lists (train/ and val/, their class folders and
    the files in those), that leads outside ``root``. Directory entries carry their type, so the
    walk costs one listing per folder, not a stat per image."""
    folders = []
    for split in ("train", "val"):
        path = dataset / split
        if path.is_symlink() and _leads_out(path, root):
            return path
        folders.append(path)
    for depth in (1, 2):  # class folders, then the files in them
        deeper = []
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if entry.is_symlink() and _leads_out(path, root):
                        return path
                    if depth == 1 and entry.is_dir():
                        deeper.append(path)
        folders = deeper
    return None
