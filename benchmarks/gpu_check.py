"""One command for a GPU host: what the engine and the service really do there, as one JSON.

    python -m benchmarks.gpu_check [--quick] [--providers LIST] [--workers N] [--out FILE]

Opens a one-node probe session first: with CUDA asked for and not given (no GPU, or missing
CUDA / cuDNN libraries: ONNX Runtime falls back to the CPU silently), it stops there, as it does
at any later session without CUDA, with the reason on stderr and in the JSON and exit status 3.
Exports random-weight torchvision-layout models of both input kinds (``square``: uint8 central
squares in, the ten crops in the graph; ``crops``: float crops in) and an fp16 variant of each
(``model_export.precision``), then:

1. engine: ``OnnxClassifier.probabilities`` (the call the service makes: for the crops kind it
   includes the host-side softmax) at 1, 8 and 32 images per call, on the requested providers;
2. in process: ``ModelMetadata.preprocess`` of a 640x427 JPEG, one process per core, no HTTP;
3. service: ``alexnet-serve`` on the same providers (its fronts: ``--workers``, else one per
   core; one engine; room in its queue for every client), ``POST /predict`` with that JPEG at
   concurrency 1, 16, 64 and 256: images/s, latency, refusals, and per point the whole machine's
   busy share, the server's and the load generator's CPU, each kind of server process's CPU per
   image (front, engine, decode: /proc) and the engine's mean batch (``/metrics``); then the
   server's memory by kind of process;
4. targets (``benchmarks/gpu_http.py``): ``/predict`` at 64 and 256 clients >= 3,500 images/s and
   p50 at 1 client <= 4 ms (square kind, the export's default), and for each kind served >= 0.8 x
   min(the best engine point of the same model, 2.).

With ``--decode-device cuda`` (the default where CUDA is asked for; ``benchmarks/gpu_device.py``)
it also measures the GPU decode path: ``DeviceDecoder.classify`` at 32-256 images per call, the
agreement of its answers with the CPU path's on 512 varied JPEGs, and ``/predict`` at 256 clients
decoding on the GPU (one process), beside the CPU path's figures of the same run; where that path
is not possible here it stops, like a missing provider, with exit status 3.

The JSON (stdout; progress on stderr) records the providers each ONNX Runtime session really got
(``session.get_providers()``) and the device (``nvidia-smi``, else the CPU model). ``--quick``
(for CPU-only hosts and CI): the square kind's fp16 variant only, 1 and 8 images, the square
kind served at concurrency 1 and 16 (its targets at 16), few requests.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from alexnet_core.session import OnnxClassifier, probe_providers
from benchmarks.gpu_device import (
    DevicePathBroken,
    agreement,
    device_answers,
    device_engine,
    device_targets,
    peaked_model,
    require_decoder,
    varied_jpegs,
)
from benchmarks.gpu_http import (
    ProvidersMissing,
    bench_http,
    ceilings,
    log,
    preprocessing_on_all_cores,
    require_providers,
    targets,
)
from benchmarks.report import add_out_option, write_report

Json = dict[str, Any]


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
    require_providers(providers, classifier.session.get_providers(), f"the engine session of {path.stem}")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes on a CPU-only host (see above)")
    p.add_argument(
        "--providers",
        default="CUDAExecutionProvider,CPUExecutionProvider",
        help="ONNX Runtime providers in order of preference (default: CUDA, then CPU)",
    )
    p.add_argument(
        "--requests",
        type=int,
        help="requests per concurrency level, 4 per client at least (quick: 2); default 1000, quick 16",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="the server's front processes (ALEXNET_WORKERS; 0: one process; default: one per core)",
    )
    p.add_argument(
        "--decode-device",
        choices=("cuda", "cpu"),
        help="cuda: also measure the GPU decode path (engine, agreement, /predict at 256 clients) "
        "and fail (exit 3) if it is not possible; default: cuda when CUDA is among the providers",
    )
    add_out_option(p)
    args = p.parse_args(argv)
    if args.decode_device is None:
        args.decode_device = "cuda" if "CUDAExecutionProvider" in args.providers else "cpu"
    return args


def measure(report: Json, args: argparse.Namespace, providers: list[str], workdir: Path) -> None:
    """Fills ``report`` section by section, so that a run stopped by ProvidersMissing keeps what
    it measured before."""
    from tests.images import photo_jpeg

    report["probe_providers"] = probe_providers(providers)
    require_providers(providers, report["probe_providers"], "a probe session")
    decoder = require_decoder(providers) if args.decode_device == "cuda" else None
    models = export_models(workdir, args.quick)
    report["engine"] = {}
    for name, path in models.items():
        batches = (1, 8) if args.quick else (1, 8, 32, 128, 256)
        report["engine"][name] = bench_engine(path, providers, batches, 1.0 if args.quick else 3.0)
    photo = photo_jpeg("china.jpg")  # 640x427
    if decoder is not None:
        report["device_engine"] = device_engine(models["square-fp16"], providers, decoder, photo, 3.0)
        report["agreement"] = agreement(peaked_model(workdir), providers, decoder, varied_jpegs(512))
    concurrencies = (1, 16) if args.quick else (1, 16, 64, 256)
    requests = args.requests or (16 if args.quick else 1000)
    per_client = 2 if args.quick else 4
    report["in_process"], report["http"] = {}, {}
    for name in ("square",) if args.quick else ("square", "crops"):
        # Before the server starts: the preprocessing has the machine to itself.
        report["in_process"][name] = preprocessing_on_all_cores(
            models[name], photo, 2.0 if args.quick else 5.0
        )
        report["http"][name] = bench_http(
            models[name], photo, providers, concurrencies, requests, per_client, args.workers
        )
    if decoder is not None:  # one process: images reach the engine as bytes (docs/gpu.md)
        device = {"ALEXNET_DECODE_DEVICE": "cuda", "ALEXNET_MAX_BATCH_DELAY_MS": "2"}
        report["http_device_decode"] = bench_http(
            models["square"],
            photo,
            providers,
            (256,),
            requests,
            per_client,
            0,
            device,
            lambda url: device_answers(url, photo),
        )
    report["ceilings"] = ceilings(report)
    report["targets"] = [t.model_dump() for t in [*targets(report), *device_targets(report)]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    providers = [name.strip() for name in args.providers.split(",") if name.strip()]
    started = time.perf_counter()
    report: Json = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "requested_providers": providers,
        "available_providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "device": device_info(),
    }
    status = 0
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            measure(report, args, providers, Path(tmp))
    except (ProvidersMissing, DevicePathBroken) as exc:
        report["error"] = str(exc)
        log(f"FAILED: {exc}")
        status = 3
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(json.dumps(report, indent=2), args.out)
    for target in report.get("targets", []):
        verdict = "met" if target["met"] else "MISSED"
        log(f"[{verdict}] {target['target']}: {target['value']} vs {target['limit']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
