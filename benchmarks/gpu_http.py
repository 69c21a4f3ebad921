"""The service half of ``benchmarks.gpu_check``: ``alexnet-serve`` on the check's providers under
``POST /predict`` load, what each point cost the host (the whole machine, each kind of server
process, the engine's batches), the in-process preprocessing the service is compared with, and
the targets of "the whole host behind one GPU", from the run's own figures."""

import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cpu import CpuMeter, machine_jiffies
from benchmarks.inference import read_metadata
from benchmarks.load import Upload, run_load
from benchmarks.overhead import in_process
from benchmarks.process_kinds import cpu_by_kind, cpu_ms_per_image, memory_mb_by_kind
from benchmarks.report import Target, rnd
from benchmarks.server import ServerProcess, server_process

Json = dict[str, Any]
CUDA = "CUDAExecutionProvider"
TARGET_IMAGES_PER_S = 3500.0
TARGET_SHARE_OF_CEILING = 0.8
TARGET_P50_ONE_CLIENT_MS = 4.0
TARGET_CONCURRENCIES = (64, 256)
# The export's default input kind: the service's absolute targets are about it; the share of
# the ceiling is reported for every kind served.
TARGET_MODEL = "square"


class ProvidersMissing(RuntimeError):
    """The check asked for CUDA and a session runs without it: its figures would be the CPU's."""


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def require_providers(requested: list[str], got: list[str] | None, what: str) -> None:
    if CUDA in requested and CUDA not in (got or []):
        raise ProvidersMissing(
            f"{CUDA} was requested but {what} runs on {got}: no GPU, or the CUDA 13 / cuDNN 9 "
            "libraries were not found (ONNX Runtime falls back to the CPU silently; its log names "
            "the library it could not load)"
        )


def preprocessing_on_all_cores(model: Path, data: bytes, duration_s: float) -> Json:
    """``ModelMetadata.preprocess`` of ``data`` for this model, one process per core, no HTTP:
    what the host's cores can prepare for the engine at most."""
    cores = sorted(os.sched_getaffinity(0))
    result = in_process(data, read_metadata(model), cores, max_images=1_000_000, duration_s=duration_s)
    log(f"in-process preprocessing {model.stem} on {len(cores)} cores: {result.images_per_s} images/s")
    return result.model_dump()


def _engine_batches(server: ServerProcess) -> tuple[float, float]:
    """Images and inference calls so far, from the engine's batch-size histogram."""
    metrics = server.metrics()
    prefix = "alexnet_inference_batch_images"
    return metrics.get(f"{prefix}_sum", 0.0), metrics.get(f"{prefix}_count", 0.0)


def _busy_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return rnd(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def load_point(server: ServerProcess, upload: Upload, concurrency: int, requests: int) -> Json:
    """``requests`` POST /predict from ``concurrency`` closed-loop clients (the shared load
    generator), bounded by the count only: an hour is no bound for a point. With it, the whole
    machine's busy share, the server's and the load generator's CPU, each kind of server
    process's CPU per image, and the engine's mean batch over the point."""
    batches = _engine_batches(server)
    kinds, machine, meter = cpu_by_kind(server.pid), machine_jiffies(), CpuMeter(server.pid)
    outcomes, wall = run_load(server.url, upload, concurrency, max_requests=requests, duration_s=3600)
    ms = sorted(o.seconds * 1000 for o in outcomes if o.status == 200)
    usage = meter.read(len(ms))
    host_busy, by_kind = _busy_pct(machine, machine_jiffies()), cpu_by_kind(server.pid)
    images, calls = (after - before for after, before in zip(_engine_batches(server), batches, strict=True))
    return {
        "concurrency": concurrency,
        "requests": requests,
        "statuses": dict(sorted(Counter(str(o.status) for o in outcomes).items())),
        "images_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(ms[len(ms) // 2], 1) if ms else None,
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 1) if ms else None,
        "host_cpu_busy_pct": host_busy,
        "server_cpu_pct": usage.server_cpu_pct,
        "load_generator_cpu_pct": usage.own_cpu_pct,
        "server_cpu_ms_per_image": usage.server_cpu_ms_per_image,
        "cpu_ms_per_image_by_kind": cpu_ms_per_image(kinds, by_kind, len(ms)),
        "engine_calls": int(calls),
        "engine_mean_batch": rnd(images / calls) if calls else None,
    }


def server_settings(
    model: Path, providers: list[str], concurrency: int, workers: int | None, extra: Json | None = None
) -> Json:
    settings = {
        "ALEXNET_WEIGHTS_DIR": str(model.parent),
        "ALEXNET_MODEL": model.stem,
        "ALEXNET_PROVIDERS": ",".join(providers),
        # Room for every client: refusals (503) would measure the queue bound, not the host.
        "ALEXNET_MAX_QUEUE_IMAGES": str(4 * concurrency),
        "ALEXNET_REQUEST_TIMEOUT_S": "120",
    }
    if workers is not None:
        settings["ALEXNET_WORKERS"] = str(workers)
    return {**settings, **(extra or {})}


def bench_http(
    model: Path,
    data: bytes,
    providers: list[str],
    concurrencies: tuple[int, ...],
    requests: int,
    per_client: int,
    workers: int | None,
    extra: Json | None = None,
    probe: Callable[[str], Json] | None = None,
) -> Json:
    """``alexnet-serve`` (benchmarks/server.py) on these providers; each concurrency's point
    (``requests``, ``per_client`` for each client at least), then the server's memory by kind of
    process."""
    upload = Upload.of(data, "photo.jpg")
    settings = server_settings(model, providers, max(concurrencies), workers, extra)
    started = time.perf_counter()
    with server_process(settings) as server:
        require_providers(providers, server.ready.get("providers"), f"the server's engine ({model.stem})")
        log(f"http {model.stem}: ready in {time.perf_counter() - started:.1f} s")
        answers = probe(server.url) if probe is not None else None
        run_load(server.url, upload, max(concurrencies), max(concurrencies), 3600)  # every batch size
        points = []
        for concurrency in concurrencies:
            points.append(load_point(server, upload, concurrency, max(requests, per_client * concurrency)))
            p = points[-1]
            log(
                f"http {model.stem} concurrency {concurrency}: {p['images_per_s']} images/s, p50 "
                f"{p['p50_ms']} ms, host {p['host_cpu_busy_pct']} % busy, engine batch "
                f"{p['engine_mean_batch']}, CPU-ms/image {p['cpu_ms_per_image_by_kind']}"
            )
        memory = memory_mb_by_kind(server.pid)
    return {
        "server_providers": server.ready.get("providers"),
        "model_version": server.ready.get("model_version"),
        "alexnet_workers": settings.get("ALEXNET_WORKERS", "unset"),
        "server_settings": {k: v for k, v in settings.items() if k != "ALEXNET_WEIGHTS_DIR"},
        "points": points,
        "memory_by_kind": memory,
        **({"probe": answers} if answers is not None else {}),
    }


def ceilings(report: Json) -> dict[str, Json]:
    """For each model served: the best engine point of the same model, preprocessing on all
    cores, and the smaller of the two, which the service can at best deliver."""
    out = {}
    for name in report.get("http", {}):
        engine = max((b["images_per_s"] for b in report["engine"][name]["batches"]), default=None)
        preprocessing = report["in_process"][name]["images_per_s"]
        out[name] = {
            "engine_best_images_per_s": engine,
            "in_process_images_per_s": preprocessing,
            "ceiling_images_per_s": min(engine, preprocessing) if engine and preprocessing else None,
        }
    return out


def targets(report: Json) -> list[Target]:
    """The issue's targets at 64 and 256 clients (a quick run: at its largest concurrency)."""
    out = []
    limits = ceilings(report)
    for name, run in report.get("http", {}).items():
        by_c = {p["concurrency"]: p for p in run["points"]}
        if name == TARGET_MODEL:
            p50 = by_c[1]["p50_ms"] if 1 in by_c else None
            what = f"/predict p50 at 1 client <= {TARGET_P50_ONE_CLIENT_MS:g} ms ({name})"
            out.append(Target.at_most(what, p50, TARGET_P50_ONE_CLIENT_MS))
        ceiling = limits[name]["ceiling_images_per_s"]
        for c in [c for c in TARGET_CONCURRENCIES if c in by_c] or [max(by_c)]:
            served = by_c[c]["images_per_s"]
            if name == TARGET_MODEL:
                what = f"/predict at {c} clients >= {TARGET_IMAGES_PER_S:,.0f} images/s ({name})"
                out.append(Target.at_least(what, served, TARGET_IMAGES_PER_S))
            what = (
                f"/predict at {c} clients >= {TARGET_SHARE_OF_CEILING:g} x min(engine, in-process "
                f"preprocessing) ({name})"
            )
            share = rnd(served / ceiling, 3) if served and ceiling else None
            out.append(Target.at_least(what, share, TARGET_SHARE_OF_CEILING))
    return out
