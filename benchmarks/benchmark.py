"""How fast the engine is on this machine, and how close the HTTP service gets to it: one run.

    python -m benchmarks.benchmark [--model PATH] [--requests N] [--duration S] [--out FILE]
        [--json] [--quick] [--tune] [--providers LIST] [--wait-idle S] [--skip SECTIONS]

Sections: (1) raw ONNX Runtime ``session.run`` on 10, 40 and 80 crops, the limit, measured again
right before each server configuration; (2) PyTorch eager on the same weights, interleaved with
ORT; (3) preprocessing alone for a ~0.3 MP photo and a 12 MP JPEG; (4) ``POST /predict`` over real
HTTP against ``alexnet-serve`` started here in a subprocess, at concurrency 1, 4 and 16, both image
sizes, dynamic batching on and off; (5) overload far above capacity with a small queue and a short
timeout, then one request (recovery); (6) precision variants (int8 for CPU, fp16) vs fp32; then
the ratios and targets. ``--tune`` adds server settings side by side (preprocess threads, intra-op
threads, batch delay and size) and code experiments (ORT spinning back on, no refusal before the
body is read, the timeout counted from arrival), each in its own server.

Absolute times on shared 2-core machines vary by +-30-70 % between runs; every comparison below is
made within one run, A/B pairs are interleaved round by round, and each measurement records how
much of the machine other work took (``other_cpu_pct``; ``meta.disturbed`` lists those over 10 %).
Everything is bounded: each measurement point stops at ``--requests`` requests or ``--duration``
seconds, whichever is first, and the load generator only ever connects to 127.0.0.1.
"""

import argparse
import gc
import http.client
import io
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import N_CROPS
from alexnet_core.session import provider_list, session_options

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core.json"
CONCURRENCIES = (1, 4, 16)
OVERLOAD_CONCURRENCY = 64
OVERLOAD_QUEUE_IMAGES = 8
OVERLOAD_TIMEOUT_S = 1.0
OVERLOAD_RETRY_S = 0.02
MAX_PIXELS = 64_000_000  # the service's default

Json = dict[str, Any]
_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def percentiles_ms(seconds: list[float]) -> Json:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": rnd(p50), "p95_ms": rnd(p95), "p99_ms": rnd(p99), "max_ms": rnd(max(seconds) * 1000)}


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure: ``--quick`` or the full run."""

    quick: bool
    requests: int  # per e2e measurement point
    duration_s: float  # per e2e measurement point
    batches: tuple[int, ...]  # crops per raw call
    compare_batches: tuple[int, ...]  # crops per call for the torch and precision comparisons
    engine_budget_s: float  # per raw batch size
    engine_min_calls: int
    ab_rounds: int  # interleaved rounds of A/B comparisons
    preprocess_reps: tuple[int, int]  # small, 12 MP
    overload_requests: int
    overload_duration_s: float
    agreement_digits: int

    @classmethod
    def make(cls, args: argparse.Namespace) -> "Plan":
        quick = args.quick
        requests = args.requests or (12 if quick else 128)
        duration = args.duration or (8.0 if quick else 30.0)
        batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (10, 40, 80)
        return cls(
            quick=quick,
            requests=requests,
            duration_s=duration,
            batches=batches,
            # One image's ten crops always; the largest batch too, unless quick.
            compare_batches=batches[:1] if quick or len(batches) == 1 else (batches[0], batches[-1]),
            engine_budget_s=1.0 if quick else 6.0,
            engine_min_calls=2 if quick else 5,
            ab_rounds=2 if quick else 4,
            preprocess_reps=(8, 3) if quick else (40, 10),
            overload_requests=max(OVERLOAD_CONCURRENCY, requests * 16) if quick else 20_000,
            overload_duration_s=min(duration, 4.0 if quick else 10.0),
            agreement_digits=10 if quick else 200,
        )


# --------------------------------------------------------------------------- model and images


def export_random_model(weights_dir: Path) -> Path:
    """A 1000-class torchvision-layout model with random weights (timings do not depend on them)."""
    import warnings

    from model_export.export import export_onnx
    from model_export.weights import random_weights

    warnings.filterwarnings("ignore", category=FutureWarning)
    path = weights_dir / "alexnet-benchmark-random.onnx"
    # The crops kind: the raw-engine sections feed float crops (benchmarks.input_kinds compares kinds).
    export_onnx(random_weights("torchvision", seed=0), path, input_kind="crops")
    return path


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def sample_images() -> dict[str, bytes]:
    """``small``: scikit-learn's china.jpg (640x427), re-saved as JPEG. ``large``: a 12 MP
    (4000x3000) JPEG made from the same photo, upscaled with noise added so that it compresses
    (and decodes) like a camera photo rather than like a smooth upscale."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")  # (427, 640, 3) uint8
    height, width = photo.shape[:2]
    crop_width = height * 4 // 3  # 4:3 like the 12 MP frame, so the upscale keeps proportions
    left = (width - crop_width) // 2
    big = Image.fromarray(photo[:, left : left + crop_width]).resize((4000, 3000), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    noisy = np.asarray(big, dtype=np.int16) + rng.normal(0, 6, (3000, 4000, 3)).astype(np.int16)
    return {"small": jpeg_bytes(photo), "large": jpeg_bytes(np.clip(noisy, 0, 255).astype(np.uint8))}


def digit_images(count: int) -> list[bytes]:
    """scikit-learn's handwritten digits (8x8, 0-16) as 64x64 grey PNGs: the images the digits
    model is trained and validated on, and a stand-in set of real inputs for other models."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for image in digits.images[:count]:
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize(
            (64, 64), Image.Resampling.NEAREST
        )
        buffer = io.BytesIO()
        grey.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


# --------------------------------------------------------------------------- engine timings


def time_calls(
    fn: Callable[[], object], min_calls: int, budget_s: float, max_calls: int = 200
) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def call_stats(times: list[float], crops: int) -> Json:
    median = float(np.median(times))
    images = crops / N_CROPS
    return {
        "crops": crops,
        "images": images,
        "calls": len(times),
        "ms_per_call": rnd(median * 1000),
        "ms_per_call_best": rnd(min(times) * 1000),
        "ms_per_image": rnd(median * 1000 / images),
        "images_per_s": rnd(images / median),
    }


def make_session(path: Path, providers: list[str], threads: int) -> ort.InferenceSession:
    # The service's own session options and provider list: the same engine configuration.
    return ort.InferenceSession(str(path), session_options(threads), providers=provider_list(providers))


def session_runner(session: ort.InferenceSession, batch: np.ndarray) -> Callable[[], np.ndarray]:
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return lambda: session.run([meta.output_name], {meta.input_name: batch})[0]


def random_batch(crops: int, size: int) -> np.ndarray:
    return np.random.default_rng(crops).standard_normal((crops, 3, size, size), dtype=np.float32)


def bench_raw_ort(engine: "Engine", providers: list[str], threads: int, plan: Plan, load_s: float) -> Json:
    session, meta = engine.session, engine.meta
    rows = []
    for crops in plan.batches:
        run = session_runner(session, random_batch(crops, meta.input_size))
        first = time_calls(run, 1, 0)  # allocates this batch size's buffers: reported, not counted
        meter = CpuMeter()
        times = time_calls(run, plan.engine_min_calls, plan.engine_budget_s)
        usage = meter.read(len(times) * crops / N_CROPS, "engine")
        rows.append({**call_stats(times, crops), "first_call_ms": rnd(first[0] * 1000), **usage})
        log(f"raw ORT {crops} crops: {rows[-1]['ms_per_call']} ms/call")
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "providers_requested": providers,
        "providers": session.get_providers(),  # what the session really got (CUDA may fall back)
        "intra_op_threads": threads,
        "load_s": rnd(load_s),
        "batches": rows,
        "best_images_per_s": best["images_per_s"],
        "best_crops": best["crops"],
    }


class Engine:
    """One raw session kept for the whole run, to measure the engine again right before each
    server configuration: on a shared machine the speed drifts (+-30-70 %), and the e2e / raw
    ratio is only meaningful against an engine measured under the same conditions."""

    def __init__(self, model: Path, meta: ModelMetadata, providers: list[str], threads: int) -> None:
        self.session = make_session(model, providers, threads)
        self.meta = meta
        self.checks: list[Json] = []

    def recheck(self, label: str, batches: tuple[int, ...], budget_s: float) -> Json:
        rows = []
        for crops in batches:
            run = session_runner(self.session, random_batch(crops, self.meta.input_size))
            run()
            meter = CpuMeter()
            times = time_calls(run, 2, budget_s)
            rows.append({**call_stats(times, crops), **meter.read(len(times) * crops / N_CROPS, "engine")})
        check = {"before": label, "batches": rows}
        self.checks.append(check)
        log(
            f"raw ORT before {label}: " + ", ".join(f"{r['crops']} crops {r['ms_per_call']} ms" for r in rows)
        )
        return check


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    """A/B(/C) timings taken in alternating rounds, so that a slow patch of the machine (other
    tenants, frequency changes) hits every contender rather than one of them."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_calls(fn, calls, 0, max_calls=calls)
    return times


def torch_weights_from_onnx(model_path: Path, module: Any) -> bool:
    """Load the ONNX initialisers into ``module`` where names and shapes match the state dict
    (true for alexnet-export files: the exporter names initialisers after it)."""
    import onnx
    import torch
    from onnx import numpy_helper

    proto = onnx.load(model_path)
    arrays = {init.name: init for init in proto.graph.initializer}
    state = module.state_dict()
    if not all(k in arrays and tuple(arrays[k].dims) == tuple(v.shape) for k, v in state.items()):
        return False
    module.load_state_dict({k: torch.from_numpy(numpy_helper.to_array(arrays[k]).copy()) for k in state})
    return True


def bench_torch(model: Path, meta: ModelMetadata, raw: Json, threads: int, plan: Plan) -> Json:
    """PyTorch eager on the same weights and batches, interleaved with ORT. torch is imported here
    only: the serving install has none."""
    started = time.perf_counter()
    import torch

    from model_export.alexnet import AlexNet

    import_s = time.perf_counter() - started
    if threads:
        torch.set_num_threads(threads)
    module = AlexNet(meta.layout, meta.num_classes).eval()  # type: ignore[arg-type]
    same_weights = torch_weights_from_onnx(model, module)
    cuda = "CUDAExecutionProvider" in raw["providers"] and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module.to(device)
    session = make_session(model, raw["providers_requested"], threads)
    rows = []
    max_diff = None
    for crops in plan.compare_batches:
        batch = random_batch(crops, meta.input_size)

        def torch_run(batch: np.ndarray = batch) -> np.ndarray:
            # Host in, host out, as ORT is fed by the service: copies included on a GPU.
            with torch.inference_mode():
                out = module(torch.from_numpy(batch).to(device)).cpu().numpy()
            if cuda:
                torch.cuda.synchronize()
            return out

        ort_run = session_runner(session, batch)
        if max_diff is None:
            max_diff = float(np.max(np.abs(torch_run() - ort_run())))
        calls = max(2, round(plan.engine_min_calls * 10 / crops)) if crops > 10 else plan.engine_min_calls * 2
        times = interleaved({"torch": torch_run, "ort": ort_run}, plan.ab_rounds, calls)
        t, o = call_stats(times["torch"], crops), call_stats(times["ort"], crops)
        rows.append(
            {
                "crops": crops,
                "torch_ms_per_call": t["ms_per_call"],
                "ort_ms_per_call": o["ms_per_call"],
                "torch_images_per_s": t["images_per_s"],
                "ort_images_per_s": o["images_per_s"],
                "ort_speedup": rnd(t["ms_per_call"] / o["ms_per_call"]),
            }
        )
        log(f"torch vs ORT {crops} crops: {t['ms_per_call']} vs {o['ms_per_call']} ms/call")
    del session
    return {
        "device": str(device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "import_s": rnd(import_s),
        "same_weights": same_weights,
        "max_abs_logit_diff_vs_ort": max_diff if same_weights else None,
        "batches": rows,
    }


# --------------------------------------------------------------------------- preprocessing


def bench_preprocess(images: dict[str, bytes], meta: ModelMetadata, plan: Plan) -> Json:
    """One thread, the service's own ``preprocess`` (JPEG draft mode included)."""
    out: Json = {}
    for (name, data), reps in zip(images.items(), plan.preprocess_reps, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        # The first run pays imports and allocator growth.
        runs = [meta.preprocess(data, max_pixels=MAX_PIXELS) for _ in range(reps + 1)][1:]
        decode = float(np.median([r.decode_s for r in runs]))
        crop = float(np.median([r.preprocess_s for r in runs]))
        total = float(np.median([r.decode_s + r.preprocess_s for r in runs]))
        out[name] = {
            "width": width,
            "height": height,
            "bytes": len(data),
            "reps": reps,
            "decode_ms": rnd(decode * 1000),
            "resize_crop_ms": rnd(crop * 1000),
            "total_ms": rnd(total * 1000),
        }
        log(f"preprocess {name} {width}x{height}: {out[name]['total_ms']} ms")
    return out


# --------------------------------------------------------------------------- server and load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all threads (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat (Linux), else None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait; steal counts as busy: another tenant had the CPU
    return sum(values) - idle, sum(values)


def machine_busy_pct(seconds: float) -> float | None:
    before = machine_jiffies()
    time.sleep(seconds)
    after = machine_jiffies()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def wait_until_idle(max_wait_s: float, busy_pct: float = 15.0) -> float | None:
    """Other work on the machine (tests, training) skews every number here; wait for it to stop."""
    deadline = time.monotonic() + max_wait_s
    said = 0.0
    while True:
        busy = machine_busy_pct(2.0)
        if busy is None or busy <= busy_pct or time.monotonic() >= deadline:
            return busy
        if time.monotonic() - said > 30:
            said = time.monotonic()
            log(f"machine {busy:.0f} % busy with other work; waiting, {deadline - said:.0f} s at most")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Where the machine's CPU went during one measurement: this process, the server process
    (if any), and everything else (other tenants, steal). Wall-clock numbers on a shared machine
    are only as good as "other" is small; CPU-ms per image barely depends on it."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.wall = time.perf_counter()
        self.own = own_cpu_s()
        self.server = process_cpu_s(server_pid) if server_pid is not None else None
        self.machine = machine_jiffies()

    def read(self, images: float, own_name: str) -> Json:
        wall = time.perf_counter() - self.wall
        cores = os.cpu_count() or 1
        if wall <= 0:
            return {}
        own = own_cpu_s() - self.own
        out: Json = {f"{own_name}_cpu_pct": rnd(100 * own / wall / cores, 1)}
        used = own
        if self.server_pid is not None and self.server is not None:
            server_after = process_cpu_s(self.server_pid)
            if server_after is not None:
                server = server_after - self.server
                used += server
                out["server_cpu_pct"] = rnd(100 * server / wall / cores, 1)
                out["server_cpu_ms_per_image"] = rnd(1000 * server / images) if images else None
        else:
            out["cpu_ms_per_image"] = rnd(1000 * own / images) if images else None
        machine = machine_jiffies()
        if self.machine is not None and machine is not None and machine[1] > self.machine[1]:
            busy = (machine[0] - self.machine[0]) / (machine[1] - self.machine[1])
            out["other_cpu_pct"] = rnd(max(0.0, 100 * busy - 100 * used / wall / cores), 1)
        return out


# Experiments for --tune: code run in the server subprocess before the service starts, to compare
# the service with one change undone or made (none of them is a setting).
PATCHES: dict[str, str] = {
    # Undo: ORT's intra-op workers spinning after each parallel section (ORT's default), which on
    # 2 cores takes CPU from the decoding threads and the event loop.
    "ort_spinning": (
        "import alexnet_core.session as c\n"
        "_options = c.session_options\n"
        "def session_options(threads):\n"
        "    options = _options(threads)\n"
        "    options.add_session_config_entry('session.intra_op.allow_spinning', '1')\n"
        "    return options\n"
        "c.session_options = session_options\n"
    ),
    # Undo: the gate that refuses POST /predict before its body is read while the queue is full
    # (each refusal then pays for the multipart parse on the event loop first).
    "no_queue_gate": (
        "import service.main as m\n"
        "_create = m.create_app\n"
        "def create_app(settings=None):\n"
        "    app = _create(settings)\n"
        "    app.user_middleware = [w for w in app.user_middleware if w.cls.__name__ != 'QueueFullGate']\n"
        "    return app\n"
        "m.create_app = create_app\n"
    ),
    # Try: the request timeout counted from the request's arrival (the whole app call: body upload
    # and form parsing included) instead of from the start of the handler.
    "deadline_at_arrival": (
        "import asyncio, json, service.main as m\n"
        "_create2 = m.create_app\n"
        "def create_app(settings=None):\n"
        "    app = _create2(settings)\n"
        "    timeout = app.state.settings.request_timeout_s\n"
        "    body = json.dumps({'detail': 'timed out: server overloaded'}).encode()\n"
        "    headers = [(b'content-type', b'application/json'), (b'retry-after', b'1'),\n"
        "               (b'content-length', str(len(body)).encode())]\n"
        "    class Deadline:\n"
        "        def __init__(self, app):\n"
        "            self.app = app\n"
        "        async def __call__(self, scope, receive, send):\n"
        "            if scope['type'] != 'http' or scope['path'] != '/predict':\n"
        "                return await self.app(scope, receive, send)\n"
        "            started = False\n"
        "            async def tracked(message):\n"
        "                nonlocal started\n"
        "                started = started or message['type'] == 'http.response.start'\n"
        "                await send(message)\n"
        "            try:\n"
        "                async with asyncio.timeout(timeout):\n"
        "                    await self.app(scope, receive, tracked)\n"
        "            except TimeoutError:\n"
        "                if started:\n"
        "                    raise\n"
        "                await send({'type': 'http.response.start', 'status': 503, 'headers': headers})\n"
        "                await send({'type': 'http.response.body', 'body': body})\n"
        "    app.add_middleware(Deadline)\n"
        "    return app\n"
        "m.create_app = create_app\n"
    ),
}


@dataclass
class Server:
    """``alexnet-serve`` in a subprocess on a free loopback port, configured by environment only."""

    model: Path
    providers: list[str]
    settings: dict[str, str] = field(default_factory=dict)
    patches: tuple[str, ...] = ()
    url: str = ""
    ready: Json = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    start_s: float = 0.0

    @contextmanager
    def running(self) -> Iterator["Server"]:
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="alexnet-bench-server-") as workdir:
            # A clean ALEXNET_* environment (none inherited from the caller's shell) and a working
            # directory without a .env file: the server runs exactly the settings recorded here.
            env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
            env |= {
                "ALEXNET_WEIGHTS_DIR": str(self.model.parent),
                "ALEXNET_MODEL": self.model.name,
                "ALEXNET_PROVIDERS": ",".join(self.providers),
                "ALEXNET_HOST": "127.0.0.1",
                "ALEXNET_PORT": str(port),
                "ALEXNET_LOG_LEVEL": "warning",
                "ALEXNET_DATA_ROOT": workdir,
                **self.settings,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            }
            code = "".join(PATCHES[name] for name in self.patches) + "from service.main import run\nrun()\n"
            log_path = Path(workdir) / "server.log"
            started = time.perf_counter()
            with log_path.open("wb") as server_log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", code], env=env, cwd=workdir, stdout=server_log, stderr=server_log
                )
            self.url = f"http://127.0.0.1:{port}"
            try:
                self._wait_ready(log_path)
                self.start_s = time.perf_counter() - started
                yield self
            finally:
                self._stop()

    def _wait_ready(self, log_path: Path) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    response = client.get(f"{self.url}/ready")
                    if response.status_code == 200:
                        self.ready = response.json()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"alexnet-serve did not become ready (exit code {self.proc.poll()}):\n{tail}")

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid) if self.proc is not None else None


@dataclass(frozen=True)
class Upload:
    """A ``POST /predict`` body encoded once: the load generator only sends bytes, so its own CPU
    use (which shares the machine with the server) stays small."""

    body: bytes
    content_type: str

    @classmethod
    def of(cls, data: bytes, filename: str) -> "Upload":
        request = httpx.Request("POST", "http://127.0.0.1/", files={"file": (filename, data, "image/jpeg")})
        return cls(request.read(), request.headers["Content-Type"])


@dataclass
class Outcome:
    status: int | str  # HTTP status, or "exc:<type>" when no response came
    seconds: float
    timings: Json | None = None
    detail: str = ""


def run_load(
    url: str,
    upload: Upload,
    concurrency: int,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 120,
    retry_after_s: float = 0.0,
) -> tuple[list[Outcome], float]:
    """``concurrency`` closed-loop clients (each sends its next request when its last one is
    answered, no think time) until ``max_requests`` were sent or ``duration_s`` passed.

    Plain ``http.client`` keep-alive connections, one per client thread: on 2 cores the load
    generator shares the CPU with the server, and httpx cost several times more CPU per request
    (11 % of the machine at concurrency 16 against 25 requests/s), which the server then lacks."""
    target = urlsplit(url)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    sent = 0
    deadline = time.monotonic() + duration_s
    headers = {"Content-Type": upload.content_type, "Content-Length": str(len(upload.body))}

    def client_loop() -> None:
        nonlocal sent
        connection = http.client.HTTPConnection(
            target.hostname or "127.0.0.1", target.port, timeout=timeout_s
        )
        try:
            while True:
                with lock:
                    if sent >= max_requests or time.monotonic() >= deadline:
                        return
                    sent += 1
                started = time.perf_counter()
                try:
                    connection.request("POST", "/predict", body=upload.body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    seconds = time.perf_counter() - started
                    body = json.loads(data)
                    if response.status == 200:
                        outcome = Outcome(200, seconds, body["results"][0]["timings"])
                    else:
                        outcome = Outcome(response.status, seconds, detail=str(body.get("detail", "")))
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    outcome = Outcome(f"exc:{type(exc).__name__}", time.perf_counter() - started)
                    connection.close()  # reconnects on the next request
                with lock:
                    outcomes.append(outcome)
                if retry_after_s and outcome.status == 503:
                    time.sleep(retry_after_s)
        finally:
            connection.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout_s + 30)
    return outcomes, time.perf_counter() - started


def summarise(outcomes: list[Outcome], wall_s: float) -> Json:
    ok = [o for o in outcomes if o.status == 200]
    errors = Counter(str(o.status) for o in outcomes if o.status != 200)
    timings = [o.timings for o in ok if o.timings]

    def median_of(key: str) -> float | None:
        return rnd(float(np.median([t[key] for t in timings]))) if timings else None

    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": dict(errors),
        "wall_s": rnd(wall_s, 3),
        "images_per_s": rnd(len(ok) / wall_s) if wall_s > 0 else None,
        **percentiles_ms([o.seconds for o in ok]),
        # The server's own account of each request (medians), to locate where the time goes.
        "server_decode_ms": median_of("decode_ms"),
        "server_preprocess_ms": median_of("preprocess_ms"),
        "server_inference_ms": median_of("inference_ms"),
        "mean_batch_images": rnd(float(np.mean([t["batch_images"] for t in timings]))) if timings else None,
    }


def load_point(server: Server, upload: Upload, concurrency: int, requests: int, duration_s: float) -> Json:
    # Server + client near 100 % of the machine: the point was CPU-bound (the load generator's
    # share was taken from the server); a large "other": it was disturbed by other work.
    meter = CpuMeter(server.proc.pid if server.proc is not None else None)
    outcomes, wall = run_load(server.url, upload, concurrency, requests, duration_s)
    point = summarise(outcomes, wall)
    return point | meter.read(point["ok"], "client")


def warm_up(server: Server, upload: Upload, concurrency: int) -> None:
    # One burst at the largest concurrency: the first big batched call allocates its buffers.
    run_load(server.url, upload, concurrency, concurrency, 60)


def bench_e2e(
    model: Path,
    providers: list[str],
    uploads: dict[str, Upload],
    plan: Plan,
    settings: dict[str, str],
    patches: tuple[str, ...] = (),
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    label: str = "",
) -> Json:
    server = Server(model, providers, settings, patches)
    points = []
    with server.running():
        log(f"server {label} ready in {server.start_s:.1f} s on {server.ready.get('providers')}")
        warm_up(server, uploads["small"], max(concurrencies))
        for image, upload in uploads.items():
            warm_up(server, upload, 1)
            for concurrency in concurrencies:
                point = load_point(server, upload, concurrency, plan.requests, plan.duration_s)
                points.append({"image": image, "concurrency": concurrency, **point})
                log(
                    f"e2e {label} {image} c={concurrency}: {point['images_per_s']} img/s, "
                    f"p50 {point['p50_ms']} ms, errors {point['errors']}"
                )
    return {
        "settings": settings,
        "patches": list(patches),
        "providers": server.ready.get("providers"),
        "model_version": server.ready.get("model_version"),
        "server_start_s": rnd(server.start_s),
        "points": points,
    }


def bench_overload(
    model: Path,
    providers: list[str],
    upload: Upload,
    plan: Plan,
    baseline_p50_ms: float | None,
    patches: tuple[str, ...] = (),
) -> Json:
    settings = {
        "ALEXNET_MAX_QUEUE_IMAGES": str(OVERLOAD_QUEUE_IMAGES),
        "ALEXNET_REQUEST_TIMEOUT_S": str(OVERLOAD_TIMEOUT_S),
        "ALEXNET_MAX_FILES": "1",  # must not exceed the queue limit (a settings check)
    }
    server = Server(model, providers, settings, patches)
    with server.running():
        warm_up(server, upload, 8)
        # Impatient clients: a refused one retries after OVERLOAD_RETRY_S instead of the 1 s its
        # Retry-After asks for. (Retrying at once makes the result depend on how fast this load
        # generator can loop, not on the server; 20 ms still offers ~50x what the server can do.)
        meter = CpuMeter(server.proc.pid if server.proc is not None else None)
        outcomes, wall = run_load(
            server.url,
            upload,
            OVERLOAD_CONCURRENCY,
            plan.overload_requests,
            plan.overload_duration_s,
            retry_after_s=OVERLOAD_RETRY_S,
        )
        ok = len([o for o in outcomes if o.status == 200])
        usage = meter.read(ok, "client")
        # Recovery: the moment the load stops, one request, then a few more for the steady value.
        after = [run_load(server.url, upload, 1, 1, 30)[0][0] for _ in range(4)]
    rejected = [o for o in outcomes if o.status == 503]
    queue_full = [o for o in rejected if o.detail.startswith("server busy")]
    timed_out = [o for o in rejected if o.detail.startswith("timed out")]
    summary = summarise(outcomes, wall)
    first = after[0]
    return {
        "settings": settings,
        "patches": list(patches),
        **{k: v for k, v in usage.items() if k.endswith("_pct")},
        "concurrency": OVERLOAD_CONCURRENCY,
        "timeout_s": OVERLOAD_TIMEOUT_S,
        "client_retry_after_503_s": OVERLOAD_RETRY_S,
        **{k: summary[k] for k in ("requests", "ok", "errors", "wall_s", "images_per_s", "p50_ms", "p99_ms")},
        "max_latency_ms_any": rnd(max(o.seconds for o in outcomes) * 1000) if outcomes else None,
        "max_latency_ms_ok": summary["max_ms"],
        "rejected_queue_full": {"count": len(queue_full), **percentiles_ms([o.seconds for o in queue_full])},
        "rejected_timeout": {"count": len(timed_out), **percentiles_ms([o.seconds for o in timed_out])},
        "recovery": {
            "first_status": first.status,
            "first_ms": rnd(first.seconds * 1000),
            "next_ms": [rnd(o.seconds * 1000) for o in after[1:]],
            "baseline_p50_ms": baseline_p50_ms,
        },
    }


# --------------------------------------------------------------------------- precision variants


def bench_precision(
    model: Path,
    meta: ModelMetadata,
    providers: list[str],
    threads: int,
    workdir: Path,
    photo: bytes,
    plan: Plan,
) -> Json:
    try:
        from model_export import precision
    except ImportError as exc:
        return {"skipped": f"model_export.precision not available: {exc}"}
    built: dict[str, Path] = {"fp32": model}
    out: Json = {"variants": {}}
    for name, build in (("int8", precision.quantize_int8), ("fp16", precision.convert_fp16)):
        started = time.perf_counter()
        try:
            built[name] = build(model, workdir / f"{model.stem}-{name}.onnx")
        except Exception as exc:  # a converter missing or failing must not sink the whole run
            out["variants"][name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        out["variants"][name] = {
            "build_s": rnd(time.perf_counter() - started),
            "mib": rnd(built[name].stat().st_size / 2**20, 1),
        }
    sessions = {name: make_session(path, providers, threads) for name, path in built.items()}
    for name, session in sessions.items():
        out["variants"].setdefault(name, {})["providers"] = session.get_providers()
    if "fp16" in sessions and "CUDAExecutionProvider" not in sessions["fp16"].get_providers():
        out["variants"]["fp16"]["note"] = "fp16 is meant for CUDA; on CPU ORT casts around missing kernels"
    for crops in plan.compare_batches:
        batch = random_batch(crops, meta.input_size)
        calls = max(2, round(plan.engine_min_calls * 10 / crops)) if crops > 10 else plan.engine_min_calls * 2
        times = interleaved({n: session_runner(s, batch) for n, s in sessions.items()}, plan.ab_rounds, calls)
        for name, row in times.items():
            stats = call_stats(row, crops)
            out["variants"][name][f"ms_per_call_{crops}"] = stats["ms_per_call"]
            out["variants"][name][f"images_per_s_{crops}"] = stats["images_per_s"]
        log(
            f"precision {crops} crops: "
            + ", ".join(f"{n} {out['variants'][n][f'ms_per_call_{crops}']} ms" for n in times)
        )
    del sessions
    gc.collect()
    # Agreement with fp32 through the service's preprocessing and classifier. With random weights
    # the classes are near-ties and this says little; with a trained model (for instance the
    # digits model: --model runs/digits/...onnx) the digits images are its validation images.
    images = [photo, *digit_images(plan.agreement_digits)]
    for name, path in built.items():
        if name != "fp32":
            out["variants"][name]["top1_agreement"] = rnd(
                precision.top1_agreement(model, path, images, providers=providers), 4
            )
    out["agreement_images"] = len(images)
    out["model_trained"] = meta.trained
    for name in built:
        if name != "fp32":
            ref = out["variants"]["fp32"]
            out["variants"][name]["speedup_vs_fp32"] = {
                str(c): rnd(ref[f"ms_per_call_{c}"] / out["variants"][name][f"ms_per_call_{c}"])
                for c in plan.compare_batches
            }
    return out


# --------------------------------------------------------------------------- ratios and targets


def find_point(e2e: Json, mode: str, image: str, concurrency: int) -> Json | None:
    for point in e2e.get(mode, {}).get("points", []):
        if point["image"] == image and point["concurrency"] == concurrency:
            return point
    return None


def raw_reference(report: Json, before: str) -> list[Json]:
    """The engine measurement taken right before ``before`` (a server configuration), else the
    one of section 1."""
    for check in report["raw_ort"].get("rechecks", []):
        if check["before"] == before:
            return check["batches"]
    return report["raw_ort"]["batches"]


def disturbed(report: Json) -> list[str]:
    """Measurements during which other work used more than 10 % of the machine."""
    rows = [("raw", r) for r in report["raw_ort"]["batches"]]
    rows += [
        (f"raw before {c['before']}", r) for c in report["raw_ort"].get("rechecks", []) for r in c["batches"]
    ]
    for section in ("e2e", "tuning"):
        for mode, run in report.get(section, {}).items():
            rows += [(f"{section} {mode} {p['image']} c{p['concurrency']}", p) for p in run["points"]]
    if "overload" in report:
        rows.append(("overload", report["overload"]))
    return [name for name, row in rows if (row.get("other_cpu_pct") or 0) > 10]


def ratios_and_targets(report: Json) -> tuple[Json, list[Json]]:
    raw, pre, e2e = report["raw_ort"], report["preprocess"], report["e2e"]
    # The 10-crop time nearest to the preprocessing and conc-1 measurements (taken just before).
    ten = next(r for r in raw_reference(report, "batching_on") if r["crops"] == N_CROPS)["ms_per_call"]
    ratios: Json = {"raw_best_images_per_s": raw["best_images_per_s"], "raw_10crop_ms": ten}
    targets: list[Json] = []
    for mode in ("batching_on", "batching_off"):
        reference = raw_reference(report, mode)
        limit = max(r["images_per_s"] for r in reference)
        engine_cpu = [r["cpu_ms_per_image"] for r in reference if r.get("cpu_ms_per_image")]
        ratios[f"raw_reference_images_per_s_{mode}"] = limit
        for image in ("small", "large"):
            for concurrency in (4, 16):
                point = find_point(e2e, mode, image, concurrency)
                if point and point["images_per_s"] is not None:
                    ratio = rnd(point["images_per_s"] / limit, 3)
                    key = f"e2e_over_raw_{mode}_{image}_c{concurrency}"
                    ratios[key] = ratio
                    if engine_cpu and point.get("server_cpu_ms_per_image"):
                        # Engine CPU per image / server CPU per image: 1.0 = the server adds no
                        # CPU work to the engine's. Unlike wall-clock ratios, other tenants on the
                        # machine barely move it.
                        ratios[f"cpu_efficiency_{mode}_{image}_c{concurrency}"] = rnd(
                            min(engine_cpu) / point["server_cpu_ms_per_image"], 3
                        )
                    targets.append(
                        {
                            "target": f"e2e/raw throughput >= 0.90 ({mode}, {image}, conc {concurrency})",
                            "value": ratio,
                            "limit": 0.90,
                            "met": ratio >= 0.90,
                        }
                    )
    torch_rows = report.get("torch", {}).get("batches", [])
    for row in torch_rows:
        ratios[f"ort_speedup_over_torch_{row['crops']}"] = row["ort_speedup"]
    ratio_12mp = rnd(pre["large"]["total_ms"] / ten, 3)
    ratios["preprocess_12mp_over_10crop_inference"] = ratio_12mp
    targets.append(
        {
            "target": "12 MP preprocessing <= 0.25 x 10-crop inference",
            "value": ratio_12mp,
            "limit": 0.25,
            "met": ratio_12mp <= 0.25,
        }
    )
    for image in ("small", "large"):
        point = find_point(e2e, "batching_on", image, 1)
        if point and point["p50_ms"] is not None:
            budget = ten + pre[image]["total_ms"] + 10
            ratios[f"p50_c1_{image}_ms"] = point["p50_ms"]
            ratios[f"p50_c1_{image}_budget_ms"] = rnd(budget)
            targets.append(
                {
                    "target": f"p50 at conc 1 <= raw 10-crop + preprocessing + 10 ms ({image}, batching on)",
                    "value": point["p50_ms"],
                    "limit": rnd(budget),
                    "met": point["p50_ms"] <= budget,
                }
            )
    overload = report.get("overload")
    if overload and "timeout_s" in overload:
        worst = overload["max_latency_ms_any"]
        limit_ms = overload["timeout_s"] * 1000
        targets.append(
            {
                "target": "overload: no request longer than the timeout",
                "value": worst,
                "limit": limit_ms,
                "met": worst is not None and worst <= limit_ms,
            }
        )
        fast = overload["rejected_queue_full"]["p99_ms"]
        if fast is not None:
            targets.append(
                {
                    "target": "overload: queue-full 503s answered fast (p99 <= 100 ms)",
                    "value": fast,
                    "limit": 100,
                    "met": fast <= 100,
                }
            )
        recovery = overload["recovery"]
        base = recovery["baseline_p50_ms"] or float(np.median(recovery["next_ms"]))
        targets.append(
            {
                "target": "overload: first request after the load succeeds within 1.5x normal p50",
                "value": recovery["first_ms"],
                "limit": rnd(1.5 * base),
                "met": recovery["first_status"] == 200 and recovery["first_ms"] <= 1.5 * base,
            }
        )
    return ratios, targets


# --------------------------------------------------------------------------- report


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def human(report: Json) -> str:
    raw = report["raw_ort"]
    parts = [
        f"alexnet-serve benchmark, {report['meta']['machine']}, model {report['meta']['model']}",
        f"\n1. raw ONNX Runtime session.run ({', '.join(raw['providers'])}, intra-op threads "
        f"{raw['intra_op_threads'] or 'auto'})",
        table(
            [
                [
                    r["crops"],
                    r["ms_per_call"],
                    r["ms_per_image"],
                    r["images_per_s"],
                    r.get("cpu_ms_per_image"),
                    r.get("other_cpu_pct"),
                ]
                for r in raw["batches"]
            ],
            ["crops", "ms/call", "ms/image", "images/s", "cpu ms/image", "oth%"],
        ),
    ]
    for check in raw.get("rechecks", []):
        parts.append(
            f"  again before {check['before']}: "
            + ", ".join(
                f"{r['crops']} crops {r['ms_per_call']} ms "
                f"({r['images_per_s']} img/s, other {r.get('other_cpu_pct')} %)"
                for r in check["batches"]
            )
        )
    if "batches" in report.get("torch", {}):
        t = report["torch"]
        parts += [
            f"\n2. PyTorch eager ({t['device']}, {t['torch_threads']} threads, "
            f"same weights: {t['same_weights']}), interleaved with ORT",
            table(
                [
                    [r["crops"], r["torch_ms_per_call"], r["ort_ms_per_call"], r["ort_speedup"]]
                    for r in t["batches"]
                ],
                ["crops", "torch ms", "ORT ms", "ORT speed-up"],
            ),
        ]
    parts += [
        "\n3. preprocessing, one thread (decode with JPEG draft mode, resize + 10 crops)",
        table(
            [
                [
                    n,
                    f"{p['width']}x{p['height']}",
                    p["bytes"],
                    p["decode_ms"],
                    p["resize_crop_ms"],
                    p["total_ms"],
                ]
                for n, p in report["preprocess"].items()
            ],
            ["image", "size", "bytes", "decode ms", "resize+crop ms", "total ms"],
        ),
        "\n4. POST /predict over HTTP (server in a subprocess; cpu % of the whole machine)",
    ]
    rows = []
    for mode, run in report["e2e"].items():
        for p in run["points"]:
            rows.append(
                [
                    mode,
                    p["image"],
                    p["concurrency"],
                    p["ok"],
                    p["images_per_s"],
                    p["p50_ms"],
                    p["p95_ms"],
                    p["p99_ms"],
                    p["mean_batch_images"],
                    p.get("server_cpu_ms_per_image"),
                    p.get("server_cpu_pct"),
                    p.get("client_cpu_pct"),
                    p.get("other_cpu_pct"),
                    ",".join(f"{k}:{v}" for k, v in p["errors"].items()) or "-",
                ]
            )
    parts.append(
        table(
            rows,
            [
                "mode",
                "image",
                "conc",
                "ok",
                "img/s",
                "p50",
                "p95",
                "p99",
                "batch",
                "srv cpu ms/img",
                "srv%",
                "cli%",
                "oth%",
                "errors",
            ],
        )
    )
    if "overload" in report:
        o = report["overload"]
        r, full, late = o["recovery"], o["rejected_queue_full"], o["rejected_timeout"]
        parts += [
            f"\n5. overload: {o['concurrency']} clients, queue {OVERLOAD_QUEUE_IMAGES} images, timeout "
            f"{o['timeout_s']} s, {o['wall_s']} s",
            f"  {o['requests']} requests: {o['ok']} ok ({o['images_per_s']} img/s, p50 {o['p50_ms']} ms), "
            f"errors {o['errors']}",
            f"  max latency of any request {o['max_latency_ms_any']} ms "
            f"(timeout {o['timeout_s'] * 1000:g} ms)",
            f"  503 queue full: {full['count']}, p50 {full['p50_ms']} / p99 {full['p99_ms']} ms; "
            f"503 timeout: {late['count']}, max {late['max_ms']} ms",
            f"  recovery: first request {r['first_status']} in {r['first_ms']} ms, then {r['next_ms']} ms "
            f"(normal p50 {r['baseline_p50_ms']} ms)",
        ]
    prec = report.get("precision", {})
    if "variants" in prec:
        sizes = report["meta"]["compare_batches"]
        rows = [
            [
                n,
                v.get("providers", ["-"])[0] if v.get("providers") else "-",
                v.get("mib"),
                *(v.get(f"ms_per_call_{c}") for c in sizes),
                v.get("top1_agreement"),
                v.get("skipped", ""),
            ]
            for n, v in prec["variants"].items()
        ]
        parts += [
            f"\n6. precision variants, interleaved (agreement on {prec['agreement_images']} images, "
            f"trained model: {prec['model_trained']})",
            table(rows, ["variant", "provider", "MiB", *(f"ms/{c}" for c in sizes), "top-1 agree", "note"]),
        ]
    elif prec:
        parts.append(f"\n6. precision: skipped ({prec.get('skipped')})")
    if report.get("tuning"):
        rows = []
        for name, run in report["tuning"].items():
            for p in run["points"]:
                rows.append(
                    [
                        name,
                        p["image"],
                        p["concurrency"],
                        p["images_per_s"],
                        p["p50_ms"],
                        p["p99_ms"],
                        p["mean_batch_images"],
                        p.get("server_cpu_ms_per_image"),
                        p.get("server_cpu_pct"),
                        p.get("other_cpu_pct"),
                    ]
                )
        parts += [
            "\ntuning (server settings side by side)",
            table(
                rows,
                [
                    "variant",
                    "image",
                    "conc",
                    "img/s",
                    "p50",
                    "p99",
                    "batch",
                    "srv cpu ms/img",
                    "srv%",
                    "oth%",
                ],
            ),
        ]
    if report.get("tuning_overload"):
        rows = [
            [
                name,
                o["requests"],
                o["ok"],
                o["rejected_queue_full"]["count"],
                o["rejected_queue_full"]["p50_ms"],
                o["rejected_queue_full"]["p99_ms"],
                o["rejected_timeout"]["count"],
                o["max_latency_ms_any"],
                o["recovery"]["first_ms"],
                o.get("server_cpu_pct"),
                o.get("client_cpu_pct"),
            ]
            for name, o in report["tuning_overload"].items()
        ]
        parts += [
            "\noverload variants",
            table(
                rows,
                [
                    "variant",
                    "req",
                    "ok",
                    "503 full",
                    "p50",
                    "p99",
                    "503 timeout",
                    "max ms",
                    "recovery ms",
                    "srv%",
                    "cli%",
                ],
            ),
        ]
    if report["meta"].get("disturbed"):
        parts.append(
            f"\nWARNING: other work used > 10 % of the machine during {len(report['meta']['disturbed'])} "
            "measurements (meta.disturbed in the JSON, oth% columns): compare within rows, not across runs"
        )
    parts.append("\nratios")
    parts += [f"  {k}: {v}" for k, v in report["ratios"].items()]
    parts.append("\ntargets")
    parts += [
        f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} vs {t['limit']}"
        for t in report["targets"]
    ]
    return "\n".join(parts)


# --tune: one change at a time from the defaults (preprocess threads = min(4, cores), intra-op
# threads = one per core, batch delay 10 ms, batch 8 images), then the code experiments.
TUNING: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "default": ({}, ()),
    "preprocess_threads=1": ({"ALEXNET_PREPROCESS_THREADS": "1"}, ()),
    "intra_op_threads=1": ({"ALEXNET_INTRA_OP_THREADS": "1"}, ()),
    "max_batch_delay_ms=0": ({"ALEXNET_MAX_BATCH_DELAY_MS": "0"}, ()),
    "max_batch_delay_ms=2": ({"ALEXNET_MAX_BATCH_DELAY_MS": "2"}, ()),
    "max_batch_delay_ms=25": ({"ALEXNET_MAX_BATCH_DELAY_MS": "25"}, ()),
    "max_batch_images=4": ({"ALEXNET_MAX_BATCH_IMAGES": "4"}, ()),
    "ort_spinning": ({}, ("ort_spinning",)),
}
OVERLOAD_TUNING: dict[str, tuple[str, ...]] = {
    "default": (),
    "no_queue_gate": ("no_queue_gate",),
    "deadline_at_arrival": ("deadline_at_arrival",),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, help="an exported .onnx (default: export random weights to a temp dir)"
    )
    p.add_argument("--requests", type=int, help="requests per HTTP measurement point (default 128, quick 12)")
    p.add_argument(
        "--duration", type=float, help="seconds per HTTP measurement point at most (default 30, quick 8)"
    )
    p.add_argument(
        "--out", type=Path, help=f"write the JSON report here (e.g. {DEFAULT_OUT.relative_to(REPO_ROOT)})"
    )
    p.add_argument("--json", action="store_true", help="JSON report on stdout (the table goes to stderr)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions: about 1-2 minutes")
    p.add_argument("--tune", action="store_true", help="also compare server settings (adds a few minutes)")
    p.add_argument("--batches", help="crops per raw engine call, comma-separated (default 10,40,80)")
    p.add_argument(
        "--threads", type=int, default=0, help="ORT intra-op (and torch) threads; 0 = one per core"
    )
    p.add_argument(
        "--providers",
        default="CUDAExecutionProvider,CPUExecutionProvider",
        help="ORT execution providers in order of preference (default: CUDA, then CPU)",
    )
    p.add_argument(
        "--skip", default="", help="sections to leave out, comma-separated: torch,e2e,overload,precision"
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for other work on the machine to stop (default: don't)",
    )
    args = p.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args)
    # SIGTERM (and SIGINT, ignored in background jobs) unwind through the context managers, so a
    # stopped benchmark leaves no server subprocess behind.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    # The session records which providers it got; ORT's own warning when CUDA is missing is noise.
    ort.set_default_logger_severity(3)
    busy_before = wait_until_idle(args.wait_idle) if args.wait_idle else machine_busy_pct(1.0)
    if busy_before is not None and busy_before > 20:
        log(f"warning: the machine is {busy_before:.0f} % busy with other work; timings will be skewed")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        workdir = Path(tmp)
        if args.model is None:
            log("exporting a random-weights torchvision-layout model")
            model = export_random_model(workdir / "weights")
        else:
            model = args.model.resolve()
        meta = ModelMetadata.from_props(
            ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            .get_modelmeta()
            .custom_metadata_map
        )
        gc.collect()
        report: Json = {
            "meta": {
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": " ".join(
                    ["python -m benchmarks.benchmark", *(argv if argv is not None else sys.argv[1:])]
                ),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                "cpu_model": _cpu_model(),
                "python": platform.python_version(),
                "onnxruntime": ort.__version__,
                "model": model.name if args.model is None else str(model),
                "model_version": meta.version,
                "layout": meta.layout,
                "trained": meta.trained,
                "quick": plan.quick,
                "requests_per_point": plan.requests,
                "duration_s_per_point": plan.duration_s,
                "batches": list(plan.batches),
                "compare_batches": list(plan.compare_batches),
                "machine_busy_pct_before": rnd(busy_before, 1),
                "loadavg_before": [rnd(x) for x in os.getloadavg()],
            }
        }
        loading = time.perf_counter()
        engine = Engine(model, meta, providers, args.threads)
        report["raw_ort"] = bench_raw_ort(
            engine, providers, args.threads, plan, time.perf_counter() - loading
        )
        recheck_batches = (plan.batches[0], plan.batches[-1])
        recheck_s = 0.7 if plan.quick else 2.5

        report["raw_ort"]["rechecks"] = engine.checks  # filled as the run goes on

        def recheck(label: str) -> None:
            engine.recheck(label, recheck_batches, recheck_s)

        if "torch" not in skip:
            report["torch"] = bench_torch(model, meta, report["raw_ort"], args.threads, plan)
            gc.collect()
        images = sample_images()
        report["preprocess"] = bench_preprocess(images, meta, plan)
        uploads = {
            "small": Upload.of(images["small"], "china.jpg"),
            "large": Upload.of(images["large"], "12mp.jpg"),
        }
        report["e2e"] = {}
        if "e2e" not in skip:
            recheck("batching_on")
            report["e2e"]["batching_on"] = bench_e2e(model, providers, uploads, plan, {}, label="batching on")
            recheck("batching_off")
            report["e2e"]["batching_off"] = bench_e2e(
                model, providers, uploads, plan, {"ALEXNET_BATCHING": "false"}, label="batching off"
            )
        if "overload" not in skip:
            base = find_point(report["e2e"], "batching_on", "small", 1)
            recheck("overload")
            report["overload"] = bench_overload(
                model, providers, uploads["small"], plan, base["p50_ms"] if base else None
            )
            log(
                f"overload: {report['overload']['errors']}, max {report['overload']['max_latency_ms_any']} ms"
            )
        if "precision" not in skip:
            report["precision"] = bench_precision(
                model, meta, providers, args.threads, workdir, images["small"], plan
            )
        if args.tune:
            report["tuning"] = {}
            for name, (settings, patches) in TUNING.items():
                recheck(f"tuning {name}")
                report["tuning"][name] = bench_e2e(
                    model, providers, uploads, plan, settings, patches, (1, 4, 16), label=name
                )
            base = find_point(report["e2e"], "batching_on", "small", 1)
            report["tuning_overload"] = {
                name: bench_overload(
                    model, providers, uploads["small"], plan, base["p50_ms"] if base else None, patches
                )
                for name, patches in OVERLOAD_TUNING.items()
            }
        report["meta"]["disturbed"] = disturbed(report)
        if report["meta"]["disturbed"]:
            log(f"warning: {len(report['meta']['disturbed'])} measurements disturbed by other work")
        report["ratios"], report["targets"] = ratios_and_targets(report)
        report["meta"]["total_s"] = rnd(time.perf_counter() - started, 1)
    text = human(report)
    print(text, file=sys.stderr if args.json else sys.stdout)
    encoded = json.dumps(report, indent=2)
    if args.json:
        print(encoded)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(encoded + "\n")
        log(f"wrote {args.out}")
    return 0


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    raise SystemExit(main())
