"""Serving overhead: what the service itself costs per image when the engine costs nothing.

    python -m benchmarks.overhead [--quick] [--model PATH] [--kind crops|square] [--out FILE] [--note TEXT]

Serves a model file with real metadata (``--model``'s, else a random-weights export's) and an
engine that costs almost nothing (``benchmarks.free_engine``), and measures, for a ~500 px JPEG
and a 12 MP JPEG:

- A, in process: the model's own preprocessing (``ModelMetadata.preprocess``), no HTTP, no
  engine: CPU time per image in one process pinned to one core, and throughput with one process
  per core, each pinned to its core;
- B, the service: ``POST /predict`` over loopback at concurrency 1, 4, 16 and 64, the server
  pinned to one core and then to all: images/s and the server's CPU time per image (all its
  threads and child processes, from /proc), and the load generator's own CPU (unpinned: on a
  small machine it competes with the server, so it is reported);
- efficiency A/B (CPU per image in process over CPU per image in the server), the wall-clock
  ratio B/A on the same cores, and the scaling from one core to all for both.

Prints one JSON document on stdout (progress on stderr). Bounded: each point stops at a request
count or a duration; load only goes to 127.0.0.1.
"""

import argparse
import io
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from alexnet_core.metadata import ModelMetadata
from benchmarks.cpu import log, machine_busy_pct
from benchmarks.free_engine import default_metadata, write_free_model
from benchmarks.images import big_jpeg, encoded, photo
from benchmarks.inference import MAX_PIXELS, read_metadata
from benchmarks.load import Upload, load_point, warm_up
from benchmarks.process_kinds import cpu_by_kind, cpu_ms_per_image, memory_mb_by_kind
from benchmarks.report import Target, add_out_option, rnd, write_report
from benchmarks.server import REPO_ROOT, model_settings, server_process

CONCURRENCIES = (1, 4, 16, 64)
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "overhead-cpu-2core.json"


class InProcess(BaseModel):
    processes: int
    cpus: list[int]
    images: int
    wall_s: float | None
    images_per_s: float | None
    cpu_ms_per_image: float | None


class ServerPoint(BaseModel):
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    images_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    mean_batch_images: float | None
    server_cpu_ms_per_image: float | None
    server_cpu_pct: float | None
    client_cpu_ms_per_image: float | None
    client_cpu_pct: float | None
    other_cpu_pct: float | None
    # The serial share: CPU per image of each kind of server process (front, engine, decode...).
    cpu_ms_per_image_by_kind: dict[str, float] = {}


class ImageResult(BaseModel):
    width: int
    height: int
    bytes: int
    in_process: dict[str, InProcess]  # by cores: "1", "all"
    server: dict[str, list[ServerPoint]]  # by cores the server was pinned to: "1", "all"
    memory_by_kind: dict[str, dict[str, float]] = {}  # after the points on all cores
    efficiency: dict[str, dict[int, float | None]]  # by cores, then concurrency
    wall_ratio: dict[str, dict[int, float | None]]  # B images/s over A images/s, same cores
    scaling_in_process: float | None
    scaling_server: dict[int, float | None]  # by concurrency
    scaling_server_best: float | None  # best images/s on all cores over best on one


class OverheadReport(BaseModel):
    meta: dict[str, Any]
    images: dict[str, ImageResult]
    targets: list[Target]


def _preprocess_worker(
    core: int, data: bytes, meta_json: str, max_images: int, duration_s: float, barrier: Any, results: Any
) -> None:
    os.sched_setaffinity(0, {core})
    meta = ModelMetadata.model_validate_json(meta_json)
    for _ in range(2):  # imports, allocator growth
        meta.preprocess(data, max_pixels=MAX_PIXELS)
    barrier.wait()
    cpu, started, count = time.process_time(), time.perf_counter(), 0
    while count < max_images and time.perf_counter() - started < duration_s:
        meta.preprocess(data, max_pixels=MAX_PIXELS)
        count += 1
    results.put((count, time.process_time() - cpu, time.perf_counter() - started))


def in_process(
    data: bytes, meta: ModelMetadata, cores: list[int], max_images: int, duration_s: float
) -> InProcess:
    """One process per core, each pinned to its core, started together."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(cores)), context.Queue()
    args = (data, meta.model_dump_json(), max_images, duration_s, barrier, results)
    workers = [context.Process(target=_preprocess_worker, args=(core, *args)) for core in cores]
    for worker in workers:
        worker.start()
    try:
        rows = [results.get(timeout=duration_s + 300) for _ in workers]
    except queue.Empty as exc:
        raise RuntimeError("an in-process preprocessing worker did not report") from exc
    finally:
        for worker in workers:
            worker.join(timeout=30)
    images = sum(r[0] for r in rows)
    wall = max(r[2] for r in rows)
    return InProcess(
        processes=len(cores),
        cpus=cores,
        images=images,
        wall_s=rnd(wall, 3),
        images_per_s=rnd(images / wall) if wall else None,
        cpu_ms_per_image=rnd(1000 * sum(r[1] for r in rows) / images) if images else None,
    )


def served(
    model: Path, upload: Upload, cores: list[int], requests: int, duration_s: float, workers: int | None
) -> tuple[list[ServerPoint], dict[str, dict[str, float]]]:
    """The points at each concurrency, and the server's memory by kind of process after them."""
    settings = {
        **model_settings(model),
        # Room for every client: refusals (503) are not this benchmark's subject.
        "ALEXNET_MAX_QUEUE_IMAGES": str(4 * max(CONCURRENCIES)),
        "ALEXNET_REQUEST_TIMEOUT_S": "120",
    }
    if workers is not None:
        settings["ALEXNET_WORKERS"] = str(workers)
    points = []
    with server_process(settings, cpus=set(cores)) as server:
        for concurrency in CONCURRENCIES:
            warm_up(server.url, upload, concurrency)
            before = cpu_by_kind(server.pid)
            s = load_point(server.url, server.pid, upload, concurrency, requests, duration_s)
            by_kind = cpu_ms_per_image(before, cpu_by_kind(server.pid), s.ok)
            fields = set(ServerPoint.model_fields) - {
                "concurrency",
                "client_cpu_pct",
                "cpu_ms_per_image_by_kind",
            }
            points.append(
                ServerPoint(
                    concurrency=concurrency,
                    client_cpu_pct=s.own_cpu_pct,
                    cpu_ms_per_image_by_kind=by_kind,
                    **s.model_dump(include=fields),
                )
            )
            log(
                f"  server on cores {cores}, c={concurrency}: {s.images_per_s} img/s, server "
                f"{s.server_cpu_ms_per_image} CPU-ms/img {by_kind}, "
                f"client {s.client_cpu_ms_per_image} CPU-ms/img"
            )
        memory = memory_mb_by_kind(server.pid)
    return points, memory


def _ratio(a: float | None, b: float | None) -> float | None:
    return rnd(a / b, 3) if a and b else None


def measure_image(
    name: str, data: bytes, model: Path, meta: ModelMetadata, plan: dict[str, float], workers: int | None
) -> ImageResult:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    cores = sorted(os.sched_getaffinity(0))
    count, duration = int(plan[f"{name}_requests"]), plan["duration_s"]
    log(f"{name} ({width}x{height}, {len(data)} bytes): A, in process")
    a = {
        "1": in_process(data, meta, cores[:1], count, duration),
        "all": in_process(data, meta, cores, count, duration),
    }
    log(
        f"  A: {a['1'].cpu_ms_per_image} CPU-ms/img; {a['1'].images_per_s} img/s on 1 core, "
        f"{a['all'].images_per_s} on all"
    )
    upload = Upload.of(data, f"{name}.jpg")
    log(f"{name}: B, the service")
    runs = {
        label: served(model, upload, pinned, count, duration, workers)
        for label, pinned in (("1", cores[:1]), ("all", cores))
    }
    b = {label: points for label, (points, _) in runs.items()}
    reference = a["1"].cpu_ms_per_image
    by_c = {label: {p.concurrency: p for p in points} for label, points in b.items()}
    best = {label: max((p.images_per_s or 0) for p in points) for label, points in b.items()}
    return ImageResult(
        width=width,
        height=height,
        bytes=len(data),
        in_process=a,
        server=b,
        memory_by_kind=runs["all"][1],
        efficiency={
            label: {c: _ratio(reference, p.server_cpu_ms_per_image) for c, p in points.items()}
            for label, points in by_c.items()
        },
        wall_ratio={
            label: {c: _ratio(p.images_per_s, a[label].images_per_s) for c, p in points.items()}
            for label, points in by_c.items()
        },
        scaling_in_process=_ratio(a["all"].images_per_s, a["1"].images_per_s),
        scaling_server={
            c: _ratio(by_c["all"][c].images_per_s, by_c["1"][c].images_per_s) for c in CONCURRENCIES
        },
        scaling_server_best=_ratio(best["all"], best["1"]),
    )


def targets(images: dict[str, ImageResult]) -> list[Target]:
    out = []
    small = {p.concurrency: p for p in images["small"].server["all"]}.get(64) if "small" in images else None
    if small is not None and "engine" in small.cpu_ms_per_image_by_kind:
        what = "serial share: the engine process's CPU per image <= 0.25 ms (small, 64 clients)"
        out.append(Target.at_most(what, small.cpu_ms_per_image_by_kind["engine"], 0.25))
    for name, result in images.items():
        value = result.efficiency["all"].get(16)
        out.append(Target.at_least(f"efficiency A/B >= 0.85 at concurrency 16 ({name})", value, 0.85))
        scaling = result.scaling_server_best
        what = f"server throughput scales from 1 core to all >= 1.8x ({name}, best concurrency)"
        out.append(Target.at_least(what, scaling, 1.8))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument(
        "--model", type=Path, help="take the metadata of this exported model (default: a random export's)"
    )
    p.add_argument(
        "--kind", choices=("crops", "square"), help="input kind when no --model is given (default crops)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: few requests per point")
    p.add_argument(
        "--duration", type=float, help="seconds per measurement point at most (default 15, quick 3)"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="the server's front processes (ALEXNET_WORKERS; 0: one process; default: the server's)",
    )
    add_out_option(p, DEFAULT_OUT.relative_to(REPO_ROOT))
    p.add_argument(
        "--note", default="", help="a remark stored in the JSON (e.g. that the machine was shared)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = {
        "duration_s": args.duration or (3.0 if args.quick else 15.0),
        "small_requests": 40 if args.quick else 1000,
        "large_requests": 8 if args.quick else 150,
    }
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    busy = machine_busy_pct(1.0)
    meta = read_metadata(args.model) if args.model else default_metadata("free-engine", args.kind or "crops")
    small = encoded(photo().resize((500, 333), Image.Resampling.LANCZOS), "JPEG", quality=90)
    images = {"small": small, "large": big_jpeg()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alexnet-overhead-") as tmp:
        model = write_free_model(meta, Path(tmp) / "weights" / "alexnet-free-engine.onnx")
        results = {
            name: measure_image(name, data, model, meta, plan, args.workers) for name, data in images.items()
        }
    report = OverheadReport(
        meta={
            "started_at": started_at,
            "command": " ".join(
                ["python -m benchmarks.overhead", *(argv if argv is not None else sys.argv[1:])]
            ),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "cores_available": sorted(os.sched_getaffinity(0)),
            "input_kind": meta.input_kind,
            "metadata_from": str(args.model) if args.model else "a random-weights torchvision export",
            "plan": plan,
            "machine_busy_pct_before": rnd(busy, 1),
            "loadavg_before": [rnd(x) for x in os.getloadavg()],
            "note": args.note,
            "total_s": rnd(time.perf_counter() - started, 1),
        },
        images=results,
        targets=targets(results),
    )
    write_report(report.model_dump_json(indent=2), args.out)
    for t in report.targets:
        log(f"[{'met' if t.met else 'MISSED'}] {t.target}: {t.value} vs {t.limit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
