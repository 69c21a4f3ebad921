"""Helpers for the tests that need real processes: the server as a subprocess (the one helper in
benchmarks/server.py), waiting on conditions by polling, and what /proc says about a process."""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.server import ServerProcess, rss_mb, server_process

__all__ = [
    "ServerProcess",
    "alive",
    "fd_count",
    "link_model",
    "rss_mb",
    "run_report",
    "server_subprocess",
    "wait_until",
]
REPO_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server_subprocess(
    weights: Path, tmp: Path, data_root: Path | None = None, *, wait_for: str = "/health", **settings: object
) -> Iterator[ServerProcess]:
    """``alexnet-serve``'s entry point in a subprocess: the way it runs in production, and a
    process a test may signal or kill (it is killed on exit if still running). Its TMPDIR is a
    fresh folder (to show nothing is left there); ``settings`` are Settings field names."""
    workdir = Path(tempfile.mkdtemp(dir=tmp, prefix="server-"))
    values: dict[str, object] = {"weights_dir": weights, "log_level": "info", **settings}
    if data_root is not None:
        values["data_root"] = data_root
    with server_process(values, workdir=workdir, wait_for=wait_for, graceful=False) as server:
        yield server


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent that is gone to reap it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def link_model(source_dir: Path, weights: Path, name: str = "alexnet-random.onnx") -> Path:
    weights.mkdir(parents=True, exist_ok=True)
    os.link(source_dir / "alexnet-random.onnx", weights / name)  # same file, no 240 MB copy
    return weights / name


def run_report(
    module: str, args: list[str], tmp: Path, timeout: float, codes: tuple[int, ...] = (0,)
) -> tuple["subprocess.CompletedProcess[str]", Any]:
    """``python -m <module> <args>`` (a benchmark program) from the repository root, its report
    written into ``tmp``: the finished process, its exit status one of ``codes``, and the report."""
    out = tmp / f"{module.rsplit('.', 1)[-1]}.json"
    command = [sys.executable, "-m", module, *args, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode in codes, done.stderr[-3000:]
    return done, json.loads(out.read_text())
