"""One command for a GPU host: what the engine and the service really do there, as one JSON.

    python -m benchmarks.gpu_check [--quick] [--providers LIST] [--out FILE]

Exports random-weight torchvision-layout models of both input kinds (``square``: uint8 central
squares in, the ten crops in the graph; ``crops``: float crops in) and an fp16 variant of each
(``model_export.precision``), then:

1. engine: ``OnnxClassifier.probabilities`` (the call the service makes: for the crops kind it
   includes the host-side softmax) at 1, 8 and 32 images per call, on the requested providers;
2. service: ``alexnet-serve`` in a subprocess on the same providers, ``POST /predict`` over
   loopback HTTP with a 640x427 JPEG at concurrency 1, 16 and 64 (images/s, latency, refusals).

The JSON (stdout; progress on stderr) records the providers each ONNX Runtime session really got
(``session.get_providers()``: ORT falls back to the CPU silently when CUDA libraries are missing)
and the device (``nvidia-smi``, else the CPU model). ``--quick`` (for CPU-only hosts and CI): the
square kind's fp16 variant only, 1 and 8 images, concurrency 1 and 16, few requests.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_core.session import OnnxClassifier
from benchmarks.load import Upload, run_load
from benchmarks.report import add_out_option, write_report
from benchmarks.server import server_process

Json = dict[str, Any]


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def device_info() -> Json:
    """The GPU as nvidia-smi names it, else the CPU model (this script also runs without a GPU)."""
    info: Json = {"host": platform.node(), "cpus": len(os.sched_getaffinity(0))}
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        info["gpus"] = [
            line.strip() for line in out.stdout.splitlines() if line.strip()
        ] or out.stderr.strip()
    else:
        info["gpus"] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        info["cpu"] = names[0] if names else None
    return info


def export_models(workdir: Path, quick: bool) -> dict[str, Path]:
    from model_export.export import export_onnx
    from model_export.precision import convert_fp16
    from model_export.weights import random_weights

    models: dict[str, Path] = {}
    for kind in ("square", "crops"):
        path = workdir / f"alexnet-{kind}.onnx"
        started = time.perf_counter()
        export_onnx(random_weights("torchvision", seed=0), path, input_kind=kind)
        models[kind] = path
        log(f"exported {kind} kind in {time.perf_counter() - started:.1f} s")
        if kind == "square" or not quick:
            models[f"{kind}-fp16"] = convert_fp16(path)
    return models


def random_batch(classifier: OnnxClassifier, images: int) -> np.ndarray:
    meta = classifier.metadata
    rng = np.random.default_rng(images)
    if meta.input_kind == "square":
        return rng.integers(0, 256, (images, meta.resize_size, meta.resize_size, 3), dtype=np.uint8)
    return rng.standard_normal((images * 10, 3, meta.input_size, meta.input_size), dtype=np.float32)


def bench_engine(path: Path, providers: list[str], batches: tuple[int, ...], budget_s: float) -> Json:
    started = time.perf_counter()
    classifier = OnnxClassifier(path, providers)  # warms up with one image
    out: Json = {
        "providers": classifier.session.get_providers(),
        "load_s": round(time.perf_counter() - started, 2),
        "batches": [],
    }
    for images in batches:
        batch = random_batch(classifier, images)
        first = time.perf_counter()
        classifier.probabilities(batch)  # first call at this shape: allocation, cuDNN search
        first_s = time.perf_counter() - first
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            t = time.perf_counter()
            classifier.probabilities(batch)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        out["batches"].append(
            {
                "images": images,
                "calls": len(times),
                "first_call_ms": round(first_s * 1000, 2),
                "ms_per_call_median": round(median * 1000, 2),
                "ms_per_call_min": round(min(times) * 1000, 2),
                "images_per_s": round(images / median, 1),
            }
        )
        log(f"engine {path.stem} {images} images: {median * 1000:.1f} ms/call")
    return out


@contextmanager
def server(model: Path, providers: list[str]) -> Iterator[tuple[str, Json]]:
    """``alexnet-serve`` in a subprocess (benchmarks/server.py) on these providers, until /ready:
    its URL and its /ready answer."""
    settings = {
        "ALEXNET_WEIGHTS_DIR": str(model.parent),
        "ALEXNET_MODEL": model.stem,
        "ALEXNET_PROVIDERS": ",".join(providers),
    }
    with server_process(settings) as process:
        yield process.url, process.ready


def load_point(url: str, upload: Upload, concurrency: int, requests: int) -> Json:
    """``requests`` POST /predict from ``concurrency`` closed-loop clients (the shared load
    generator), bounded by the count only: an hour is no bound for a point."""
    outcomes, wall = run_load(url, upload, concurrency, max_requests=requests, duration_s=3600)
    statuses = Counter(str(o.status) for o in outcomes)
    ms = sorted(o.seconds * 1000 for o in outcomes if o.status == 200)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "statuses": dict(sorted(statuses.items())),
        "images_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(ms[len(ms) // 2], 1) if ms else None,
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 1) if ms else None,
    }


def bench_http(model: Path, providers: list[str], concurrencies: tuple[int, ...], requests: int) -> Json:
    from tests.images import photo_jpeg

    upload = Upload.of(photo_jpeg("china.jpg"), "photo.jpg")
    with server(model, providers) as (url, ready):
        load_point(url, upload, max(concurrencies), max(concurrencies))  # warm every batch size
        points = []
        for concurrency in concurrencies:
            points.append(load_point(url, upload, concurrency, max(requests, 2 * concurrency)))
            log(f"http {model.stem} concurrency {concurrency}: {points[-1]['images_per_s']} images/s")
    return {
        "server_providers": ready.get("providers"),
        "model_version": ready.get("model_version"),
        "points": points,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU-only host (see above)")
    p.add_argument(
        "--providers",
        default="CUDAExecutionProvider,CPUExecutionProvider",
        help="ONNX Runtime providers in order of preference (default: CUDA, then CPU)",
    )
    p.add_argument("--requests", type=int, help="requests per concurrency level (default 200, quick 16)")
    add_out_option(p)
    args = p.parse_args(argv)
    providers = [name.strip() for name in args.providers.split(",") if name.strip()]
    batches = (1, 8) if args.quick else (1, 8, 32)
    concurrencies = (1, 16) if args.quick else (1, 16, 64)
    requests = args.requests or (16 if args.quick else 200)
    started = time.perf_counter()
    import onnxruntime as ort

    report: Json = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "requested_providers": providers,
        "available_providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "device": device_info(),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        models = export_models(Path(tmp), args.quick)
        report["engine"] = {
            name: bench_engine(path, providers, batches, 1.0 if args.quick else 3.0)
            for name, path in models.items()
        }
        http_models = ("square",) if args.quick else ("square", "crops")
        report["http"] = {
            name: bench_http(models[name], providers, concurrencies, requests) for name in http_models
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(json.dumps(report, indent=2), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
