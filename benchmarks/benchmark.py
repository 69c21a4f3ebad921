"""How fast the engine is on this machine, and how close the HTTP service gets to it: one run.

    python -m benchmarks.benchmark [--model PATH] [--requests N] [--duration S] [--out FILE]
        [--json] [--quick] [--tune] [--providers LIST] [--wait-idle S] [--skip SECTIONS]

Sections: (1) raw ONNX Runtime ``session.run`` on 10, 40 and 80 crops, the limit, measured again
right before each server configuration; (2) PyTorch eager on the same weights, interleaved with
ORT; (3) preprocessing alone for a ~0.3 MP photo and a 12 MP JPEG; (4) ``POST /predict`` over real
HTTP against ``alexnet-serve`` started here in a subprocess, at concurrency 1, 4 and 16, both image
sizes, dynamic batching on and off; (5) overload far above capacity with a small queue and a short
timeout, then one request (recovery); (6) precision variants (int8 for CPU, fp16) vs fp32; then
the ratios and targets. ``--tune`` adds server settings side by side, one changed at a time.

Absolute times on shared 2-core machines vary a lot between runs; every comparison below is made
within one run, A/B pairs are interleaved round by round, and each measurement records how much
of the machine other work took (``other_cpu_pct``). Everything is bounded: each measurement point
stops at ``--requests`` requests or ``--duration`` seconds, whichever is first, and the load
generator only ever connects to 127.0.0.1.
"""

import argparse
import gc
import os
import platform
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort

from benchmarks.cpu import log, machine_busy_pct, wait_until_idle
from benchmarks.e2e import bench_e2e, bench_overload, ratios_and_targets
from benchmarks.images import sample_images
from benchmarks.inference import Engine, bench_precision, bench_preprocess, bench_torch, read_metadata
from benchmarks.load import Upload
from benchmarks.plan import Plan
from benchmarks.report import Report, add_out_option, human, rnd
from benchmarks.server import REPO_ROOT, export_random_model

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-2core.json"
# --tune: one real setting changed at a time from the defaults.
TUNING: dict[str, dict[str, str]] = {
    "default": {},
    "preprocess_threads=1": {"ALEXNET_PREPROCESS_THREADS": "1"},
    "intra_op_threads=1": {"ALEXNET_INTRA_OP_THREADS": "1"},
    "max_batch_delay_ms=0": {"ALEXNET_MAX_BATCH_DELAY_MS": "0"},
    "max_batch_delay_ms=25": {"ALEXNET_MAX_BATCH_DELAY_MS": "25"},
    "max_batch_images=4": {"ALEXNET_MAX_BATCH_IMAGES": "4"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.benchmark",
        description=(__doc__ or "").split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument(
        "--model", type=Path, help="an exported .onnx (default: export random weights to a temp dir)"
    )
    p.add_argument("--requests", type=int, help="requests per HTTP measurement point (default 128, quick 12)")
    p.add_argument(
        "--duration", type=float, help="seconds per HTTP measurement point at most (default 30, quick 8)"
    )
    add_out_option(p, DEFAULT_OUT.relative_to(REPO_ROOT))
    p.add_argument("--json", action="store_true", help="JSON report on stdout (the table goes to stderr)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions: about 1-2 minutes")
    p.add_argument("--tune", action="store_true", help="also compare server settings (adds a few minutes)")
    p.add_argument(
        "--workers", type=int, help="the server's front processes (ALEXNET_WORKERS; 0: one process)"
    )
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


def provenance(
    args: argparse.Namespace, argv: list[str] | None, model: Path, plan: Plan, busy: float | None
) -> dict[str, Any]:
    meta = read_metadata(model)
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.benchmark", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "cpu_model": cpu_model(),
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
        "machine_busy_pct_before": rnd(busy, 1),
        "loadavg_before": [rnd(x) for x in os.getloadavg()],
    }


def measure(
    args: argparse.Namespace, argv: list[str] | None, plan: Plan, workdir: Path, busy: float | None
) -> Report:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.model is None:
        log("exporting a random-weights torchvision-layout model")
        # The crops kind: the raw-engine sections feed float crops (benchmarks.input_kinds compares kinds).
        model = export_random_model(workdir / "weights", input_kind="crops")
    else:
        model = args.model.resolve()
    meta = read_metadata(model)
    gc.collect()
    engine = Engine(model, meta, providers, args.threads)
    raw = engine.raw(plan)
    torch = None if "torch" in skip else bench_torch(model, engine, plan)
    gc.collect()
    images = sample_images()
    report = Report(
        meta=provenance(args, argv, model, plan, busy),
        raw_ort=raw,
        torch=torch,
        preprocess=bench_preprocess(images, meta, plan),
    )
    uploads = {
        "small": Upload.of(images["small"], "china.jpg"),
        "large": Upload.of(images["large"], "12mp.jpg"),
    }
    processes = {} if args.workers is None else {"ALEXNET_WORKERS": str(args.workers)}
    configurations = {"batching_on": processes, "batching_off": {**processes, "ALEXNET_BATCHING": "false"}}
    for mode, settings in configurations.items() if "e2e" not in skip else ():
        engine.recheck(mode, plan)
        report.e2e[mode] = bench_e2e(model, providers, uploads, plan, settings, label=mode)
    if "overload" not in skip:
        base = report.e2e["batching_on"].point("small", 1) if "batching_on" in report.e2e else None
        engine.recheck("overload", plan)
        report.overload = bench_overload(
            model, providers, uploads["small"], plan, base.p50_ms if base else None
        )
        log(f"overload: {report.overload.errors}, max {report.overload.max_latency_ms_any} ms")
    if "precision" not in skip:
        report.precision = bench_precision(model, engine, workdir, images["small"], plan)
    for name, settings in TUNING.items() if args.tune else ():
        engine.recheck(f"tuning {name}", plan)
        report.tuning[name] = bench_e2e(model, providers, uploads, plan, settings, label=name)
    report.raw_ort.rechecks = engine.checks  # taken before each server configuration
    report.meta["disturbed"] = report.disturbed()
    if report.meta["disturbed"]:
        log(f"warning: {len(report.meta['disturbed'])} measurements disturbed by other work")
    report.ratios, report.targets = ratios_and_targets(report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(args)
    # SIGTERM (and SIGINT, ignored in background jobs) unwind through the context managers, so a
    # stopped benchmark leaves no server subprocess behind.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    # The session records which providers it got; ORT's own warning when CUDA is missing is noise.
    ort.set_default_logger_severity(3)
    busy = wait_until_idle(args.wait_idle) if args.wait_idle else machine_busy_pct(1.0)
    if busy is not None and busy > 20:
        log(f"warning: the machine is {busy:.0f} % busy with other work; timings will be skewed")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        report = measure(args, argv, plan, Path(tmp), busy)
    report.meta["total_s"] = rnd(time.perf_counter() - started, 1)
    print(human(report), file=sys.stderr if args.json else sys.stdout)
    encoded = report.model_dump_json(indent=2, exclude_none=True)
    if args.json:
        print(encoded)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(encoded + "\n")
        log(f"wrote {args.out}")
    return 0


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    raise SystemExit(main())
