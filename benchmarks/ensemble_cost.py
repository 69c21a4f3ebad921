"""Inference cost per image of one model against an ensemble of three (one ONNX graph), on random
weights (the cost does not depend on the values). Prints JSON.

    python -m benchmarks.ensemble_cost [--dir /tmp/ensemble-cost]
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from alexnet_core.session import OnnxClassifier
from benchmarks.inference import median_ms
from model_export.ensemble import build_ensemble
from model_export.export import export_onnx
from model_export.weights import random_weights

SIZE, RESIZE, CLASSES, BATCH = 64, 73, 10, 8


def ms_per_image(path: Path, repeats: int) -> float:
    classifier = OnnxClassifier(path, ["CPUExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((BATCH * 10, 3, SIZE, SIZE), dtype=np.float32)
    return median_ms(lambda: classifier.probabilities(batch), repeats, per=BATCH)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ensemble-cost"))
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    members = [args.dir / f"r{seed}.onnx" for seed in (1, 2, 3)]
    for seed, path in zip((1, 2, 3), members, strict=True):
        if not path.exists():
            weights = random_weights("paper", seed=seed, num_classes=CLASSES)
            export_onnx(weights, path, input_size=SIZE, resize_size=RESIZE, input_kind="crops")
    ensemble = args.dir / "ensemble.onnx"
    started = time.perf_counter()
    if not ensemble.exists():
        build_ensemble(members, ensemble, "ensemble")
    build_s = time.perf_counter() - started
    result = {
        "batch_images": BATCH,
        "crop": SIZE,
        "build_s": round(build_s, 1),
        "member_ms_per_image": ms_per_image(members[0], args.repeats),
        "ensemble_of_3_ms_per_image": ms_per_image(ensemble, args.repeats),
        "member_bytes": members[0].stat().st_size,
        "ensemble_bytes": ensemble.stat().st_size,
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
