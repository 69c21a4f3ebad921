"""A short real training run's curves, as JSON for ``benchmarks.plots``: scikit-learn's digits
(``tests/digits.py``: no download) trained by ``alexnet-train`` in a subprocess, then every record
of its ``metrics.jsonl`` (start, step, epoch, done) copied into one document with the command.

    python -m benchmarks.training_curve [--epochs 10] [--seed 0] [--out FILE]

The recipe is the digits ensemble members' (paper layout, 64 px crops, no flips, batch 64) without
the export. Needs the ``export`` and ``test`` extras (torch, scikit-learn). 190 steps at 10 epochs:
a few minutes on 2 idle cores, several times that when they are shared. Exit status 1 when the
trainer fails (its own message is on stderr above).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alexnet_core.training import METRICS, read_events
from benchmarks.report import add_out_option, write_report
from benchmarks.server import REPO_ROOT

RECIPE = [
    "--layout", "paper", "--input-size", "64", "--resize-size", "73",
    "--batch-size", "64", "--no-flip", "--no-export", "--no-progress",
]  # fmt: skip


def train(data: Path, run: Path, epochs: int, seed: int) -> list[str]:
    """Runs the trainer; returns its command line as a user would type it."""
    args = [str(data), "--out", str(run), "--seed", str(seed), "--epochs", str(epochs), *RECIPE]
    subprocess.run([sys.executable, "-m", "model_export.train", *args], check=True, cwd=REPO_ROOT)
    return ["alexnet-train", "DATA", *args[1:2], "RUN", *args[3:]]


def measure(epochs: int, seed: int, command_line: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.digits import write_digits  # the test suite's dataset writer: one definition

    started, started_at = time.perf_counter(), datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="training-curve-") as tmp:
        data = write_digits(Path(tmp) / "data", size=32, seed=0, held_out_per_class=20)
        command = train(data.root, Path(tmp) / "run", epochs, seed)
        events = read_events(Path(tmp) / "run")
    return {
        "meta": {
            "started_at": started_at,
            "command": command_line,
            "trainer": " ".join(command),
            "data": f"python tests/digits.py DATA --held-out 20 ({data.train} train, {data.val} val)",
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, {platform.system()}",
            "total_s": round(time.perf_counter() - started, 1),
        },
        "events": [e.model_dump(mode="json") for e in events],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    add_out_option(p, Path("benchmarks/results/training-digits-cpu-2core.json"))
    args = p.parse_args(argv)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = measure(args.epochs, args.seed, f"python -m benchmarks.training_curve {shown}".strip())
    except subprocess.CalledProcessError as exc:
        print(f"error: the trainer exited with status {exc.returncode}", file=sys.stderr)
        return 1
    write_report(json.dumps(report, indent=2), args.out)
    print(f"events from {METRICS}: {len(report['events'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
