"""The two model kinds side by side: host work after decoding, and the inference call.

    python -m benchmarks.input_kinds [--rounds 7] [--out result.json]

Exports one random torchvision-layout model of each kind (same weights) and measures, in
interleaved rounds (the machine may be shared and noisy: compare the ratios, not the absolute
figures):

- host work after decoding, one thread (its CPU time): ``center_square`` + ``ten_crop`` (crops kind) against
  ``center_square`` alone (square kind), for scikit-learn's china.jpg (640x427) and a 451x300 one;
- ``OnnxClassifier.probabilities`` at batch 1 and 8 images (square kind: the squares in, the
  graph crops; crops kind: ten float crops per image in, softmax on the host), plus the two summed.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_core.images import decode
from alexnet_core.pipeline import center_square, ten_crop
from alexnet_core.session import OnnxClassifier
from benchmarks.report import add_out_option, write_report

KINDS = ("crops", "square")


def export_pair(workdir: Path) -> dict[str, Path]:
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    paths = {}
    for kind in KINDS:
        paths[kind] = workdir / f"alexnet-{kind}.onnx"
        export_onnx(random_weights("torchvision", seed=0), paths[kind], input_kind=kind)
    return paths


def photos() -> dict[str, Image.Image]:
    from tests.images import photo

    china = photo("china.jpg")
    return {"640x427": china, "451x300": china.resize((451, 300), Image.Resampling.BICUBIC)}


def per_call_ms(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    started = clock()
    for _ in range(calls):
        fn()
    return (clock() - started) / calls * 1000


def interleaved(
    fns: dict[str, Callable[[], object]],
    calls: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """ms per call of each function, round by round, the order alternating between rounds."""
    for fn in fns.values():
        fn()  # warm
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(per_call_ms(fns[name], calls, clock))
    return times


def summary(times: dict[str, list[float]]) -> dict[str, object]:
    crops, square = times["crops"], times["square"]
    ratios = [s / c for s, c in zip(square, crops, strict=True)]
    return {
        "crops_ms_median": round(statistics.median(crops), 3),
        "square_ms_median": round(statistics.median(square), 3),
        "square_over_crops_median": round(statistics.median(ratios), 3),
        "square_over_crops_per_round": [round(r, 3) for r in ratios],
    }


def host_work(meta_crop: int, mean: list[float], std: list[float], rounds: int) -> dict[str, object]:
    out = {}
    for name, image in photos().items():
        image = decode(_jpeg(image), 256, 10**8)
        fns = {
            "crops": lambda image=image: ten_crop(center_square(image, 256), meta_crop, mean, std),
            "square": lambda image=image: center_square(image, 256)[None],
        }
        # This thread's CPU time: on a shared machine, wall time also counts others' work.
        out[name] = summary(interleaved(fns, 50, rounds, time.thread_time))
    return out


def _jpeg(image: Image.Image) -> bytes:
    from tests.images import encode

    return encode(image, "JPEG", quality=90)


def inference(models: dict[str, OnnxClassifier], rounds: int) -> dict[str, object]:
    image = decode(_jpeg(photos()["640x427"]), 256, 10**8)
    out = {}
    for images in (1, 8):
        batches = {kind: np.concatenate([prepare(m, image)] * images) for kind, m in models.items()}
        calls = 5 if images == 1 else 1
        fns = {kind: (lambda m=m, b=batches[kind]: m.probabilities(b)) for kind, m in models.items()}
        out[f"batch_{images}"] = summary(interleaved(fns, calls, rounds))
        # Host work + inference for the whole batch, as a request sees it after decoding.
        whole = {
            kind: (
                lambda m=m, n=images: m.probabilities(np.concatenate([prepare(m, image) for _ in range(n)]))
            )
            for kind, m in models.items()
        }
        out[f"batch_{images}_with_host_work"] = summary(interleaved(whole, calls, rounds))
    return out


def prepare(classifier: OnnxClassifier, image: Image.Image) -> np.ndarray:
    meta = classifier.metadata
    square = center_square(image, meta.resize_size)
    if meta.input_kind == "square":
        return square[None]
    return ten_crop(square, meta.input_size, meta.mean, meta.std)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_kinds", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default 0: all cores)")
    add_out_option(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_pair(Path(tmp))
        models = {
            kind: OnnxClassifier(path, ["CPUExecutionProvider"], args.threads) for kind, path in paths.items()
        }
        meta = models["crops"].metadata
        report = {
            "host_work_after_decode": host_work(meta.input_size, meta.mean, meta.std, args.rounds),
            "inference": inference(models, args.rounds),
        }
    write_report(json.dumps(report, indent=2), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
