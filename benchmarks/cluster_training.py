"""Training on a Ray cluster: does a run on 2 Ray Train workers reach the held-out digits accuracy
of a run on 1 (target: within 2 points)? Prints JSON.

It starts a local 2-node Ray cluster (benchmarks/ray_cluster.py, one CPU per node, free ports),
then runs ``alexnet-train --ray ADDRESS --ray-workers N`` for each N with the same recipe, seed
and global batch (split between the workers), for a fixed number of epochs (no early stop), and
measures each exported model with the service's own preprocessing (ten crops) on the validation
split and on the held-out images, which neither training split contains.

    python -m benchmarks.cluster_training --epochs 10 --out benchmarks/results/cluster-training-cpu-2core.json

Without DATA it writes scikit-learn's digits (tests/digits.py, 32 px, seed 0) to a temporary folder.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alexnet_core.session import OnnxClassifier
from benchmarks.paper_digits import correct, inputs, split
from benchmarks.ray_nodes import REPO_ROOT, local_cluster
from benchmarks.report import add_out_option, write_report

RECIPE = [
    "--input-size", "64", "--resize-size", "73", "--batch-size", "64", "--no-flip", "--threads", "1",
    "--no-progress", "--log-every", "20",
]  # fmt: skip


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def accuracy(model: Path, data: Path) -> dict[str, float | int]:
    classifier = OnnxClassifier(model, ["CPUExecutionProvider"])
    scores: dict[str, float | int] = {}
    for name in ("val", "held_out"):
        images = split(data, name)
        hits = correct(classifier, inputs(classifier, images), [label for _, label in images])
        scores[f"{name}_top1"] = round(float(hits.mean()), 4)
        scores[f"{name}_images"] = len(images)
    return scores


def train(data: Path, work: Path, address: str, workers: int, epochs: int, seed: int) -> dict[str, Any]:
    run, weights = work / f"run-{workers}", work / f"weights-{workers}"
    command = [
        sys.executable, "-m", "model_export.train", str(data), "--out", str(run),
        "--weights-dir", str(weights), "--epochs", str(epochs), "--seed", str(seed),
        "--ray", address, "--ray-workers", str(workers), *RECIPE,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{workers} workers: alexnet-train exited {done.returncode}:\n{done.stderr[-3000:]}")
    rows = events(run)
    epochs_run = [r for r in rows if r["event"] == "epoch"]
    finished = rows[-1]
    return {
        "workers": workers,
        "world_size": rows[0]["world_size"],
        "epochs": len(epochs_run),
        "steps": finished["step"],
        "seconds": round(seconds, 1),
        "train_images_per_s": round(sum(e["images_per_s"] for e in epochs_run) / len(epochs_run), 1),
        "last_epoch_val_top1_centre_crop": round(epochs_run[-1]["val_top1"], 4),
        "val10_top1_exported": finished["val10_top1"],
        **accuracy(Path(finished["model"]), data),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, nargs="?", help="digits image folder (default: written here)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="worker counts to compare, the first the reference")
    add_out_option(p, Path("benchmarks/results/cluster-training-cpu-2core.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cluster-training-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from tests.digits import write_digits

            data = write_digits(work / "digits", size=32).root
        with local_cluster(nodes=2, cpus_per_node=1) as cluster:
            counts = [int(n) for n in args.workers.split(",")]
            runs = [train(data, work, cluster.address, n, args.epochs, args.seed) for n in counts]
    reference = runs[0]["held_out_top1"], runs[0]["val_top1"]
    for r in runs:
        r["val_top1_points_vs_first"] = round(100 * (r["val_top1"] - reference[1]), 1)
        r["held_out_top1_points_vs_first"] = round(100 * (r["held_out_top1"] - reference[0]), 1)
    report = {
        "runs": runs,
        "target": "2 workers within 2 points of 1 worker (val top-1, ten crops, the service's preprocessing)",
        "met": all(abs(r["val_top1_points_vs_first"]) <= 2 for r in runs),
        "note": f"python -m benchmarks.cluster_training --epochs {args.epochs} --seed {args.seed}: digits "
        "(tests/digits.py, 32 px, seed 0), 64 px crops, global batch 64, no flips, 1 thread per worker, "
        "a local 2-node Ray cluster with 1 CPU each on a 2-core machine shared with other work; "
        "held_out: 30 images",
    }
    write_report(json.dumps(report, indent=2), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
