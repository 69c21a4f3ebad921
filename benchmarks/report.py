"""The benchmark's results as typed models (written as JSON, read back by tests) and as text tables."""

import argparse
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


class Usage(BaseModel):
    """Where the machine's CPU went during one measurement (percentages of the whole machine)."""

    own_cpu_pct: float | None = None  # this process: the engine, or the load generator
    cpu_ms_per_image: float | None = None  # this process's CPU per image (engine measurements)
    client_cpu_ms_per_image: float | None = None  # this process's CPU per image (as load generator)
    server_cpu_pct: float | None = None
    server_cpu_ms_per_image: float | None = None  # all the server's threads and processes
    other_cpu_pct: float | None = None  # everything else: other tenants, steal


class Latency(BaseModel):
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class RawBatch(Usage):
    crops: int
    images: float
    calls: int
    ms_per_call: float
    ms_per_call_best: float
    ms_per_image: float
    images_per_s: float
    first_call_ms: float | None = None


class Recheck(BaseModel):
    before: str  # the server configuration measured right after
    batches: list[RawBatch]


class RawOrt(BaseModel):
    providers_requested: list[str]
    providers: list[str]  # what the session really got (CUDA may fall back)
    intra_op_threads: int
    load_s: float | None = None
    batches: list[RawBatch]
    best_images_per_s: float
    best_crops: int
    rechecks: list[Recheck] = Field(default_factory=list)

    def reference(self, before: str) -> list[RawBatch]:
        """The engine measured right before ``before`` (a server configuration), else section 1."""
        return next((c.batches for c in self.rechecks if c.before == before), self.batches)


class TorchRow(BaseModel):
    crops: int
    torch_ms_per_call: float
    ort_ms_per_call: float
    torch_images_per_s: float
    ort_images_per_s: float
    ort_speedup: float | None


class TorchReport(BaseModel):
    device: str
    torch_version: str
    torch_threads: int
    import_s: float | None
    same_weights: bool
    max_abs_logit_diff_vs_ort: float | None
    batches: list[TorchRow]


class PreprocessRow(BaseModel):
    width: int
    height: int
    bytes: int
    reps: int
    decode_ms: float
    resize_crop_ms: float
    total_ms: float


class LoadSummary(Latency, Usage):
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float | None
    images_per_s: float | None
    # The server's own account of each request (medians), to locate where the time goes.
    server_decode_ms: float | None = None
    server_preprocess_ms: float | None = None
    server_inference_ms: float | None = None
    mean_batch_images: float | None = None


class Point(LoadSummary):
    image: str
    concurrency: int


class E2eRun(BaseModel):
    settings: dict[str, str] = Field(default_factory=dict)  # beyond the defaults
    providers: list[str] | None = None
    model_version: str | None = None
    server_start_s: float | None = None
    points: list[Point]

    def point(self, image: str, concurrency: int) -> Point | None:
        return next((p for p in self.points if p.image == image and p.concurrency == concurrency), None)


class Rejected(Latency):
    count: int


class Recovery(BaseModel):
    first_status: int | str
    first_ms: float | None
    next_ms: list[float | None]
    baseline_p50_ms: float | None


class Overload(Usage):
    settings: dict[str, str]
    concurrency: int
    timeout_s: float
    client_retry_after_503_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float | None
    images_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_latency_ms_any: float | None
    max_latency_ms_ok: float | None
    rejected_queue_full: Rejected
    rejected_timeout: Rejected
    recovery: Recovery


class Variant(BaseModel):
    skipped: str | None = None
    build_s: float | None = None
    mib: float | None = None
    providers: list[str] = Field(default_factory=list)
    note: str | None = None
    ms_per_call: dict[int, float | None] = Field(default_factory=dict)  # by crops per call
    images_per_s: dict[int, float | None] = Field(default_factory=dict)
    top1_agreement: float | None = None
    speedup_vs_fp32: dict[int, float | None] = Field(default_factory=dict)


class Precision(BaseModel):
    skipped: str | None = None
    variants: dict[str, Variant] = Field(default_factory=dict)
    agreement_images: int | None = None
    model_trained: bool | None = None


class Target(BaseModel):
    target: str
    value: float | None
    limit: float
    met: bool

    @classmethod
    def at_least(cls, target: str, value: float | None, limit: float) -> "Target":
        return cls(target=target, value=value, limit=limit, met=(value or 0) >= limit)

    @classmethod
    def at_most(cls, target: str, value: float | None, limit: float) -> "Target":
        return cls(target=target, value=value, limit=limit, met=value is not None and value <= limit)


class Report(BaseModel):
    meta: dict[str, Any]  # provenance: machine, versions, command, plan (free-form, never computed on)
    raw_ort: RawOrt
    torch: TorchReport | None = None
    preprocess: dict[str, PreprocessRow]  # by image: small, large
    e2e: dict[str, E2eRun] = Field(default_factory=dict)  # by server configuration
    overload: Overload | None = None
    precision: Precision | None = None
    tuning: dict[str, E2eRun] = Field(default_factory=dict)  # --tune: one setting changed at a time
    ratios: dict[str, float | None] = Field(default_factory=dict)
    targets: list[Target] = Field(default_factory=list)

    def disturbed(self) -> list[str]:
        """Measurements during which other work used more than 10 % of the machine."""
        rows: list[tuple[str, Usage]] = [(f"raw {r.crops}", r) for r in self.raw_ort.batches]
        rows += [(f"raw before {c.before}", r) for c in self.raw_ort.rechecks for r in c.batches]
        for section, runs in (("e2e", self.e2e), ("tuning", self.tuning)):
            for mode, run in runs.items():
                rows += [(f"{section} {mode} {p.image} c{p.concurrency}", p) for p in run.points]
        if self.overload is not None:
            rows.append(("overload", self.overload))
        return [name for name, row in rows if (row.other_cpu_pct or 0) > 10]


# --------------------------------------------------------------------------- text


def add_out_option(parser: argparse.ArgumentParser, example: Path | None = None) -> None:
    """``--out``: the file a benchmark also writes its JSON report to (``example``: a path to show)."""
    shown = f" (e.g. {example})" if example is not None else ""
    parser.add_argument("--out", type=Path, help=f"also write the JSON report here{shown}")


def write_report(text: str, out: Path | None) -> None:
    """A report's JSON on stdout, and into ``out`` (its folder made) when given."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _engine(report: Report) -> list[str]:
    raw = report.raw_ort
    parts = [
        f"\n1. raw ONNX Runtime session.run ({', '.join(raw.providers)}, intra-op threads "
        f"{raw.intra_op_threads or 'auto'})",
        table(
            [
                [r.crops, r.ms_per_call, r.ms_per_image, r.images_per_s, r.cpu_ms_per_image, r.other_cpu_pct]
                for r in raw.batches
            ],
            ["crops", "ms/call", "ms/image", "images/s", "cpu ms/image", "oth%"],
        ),
    ]
    parts += [
        f"  again before {c.before}: "
        + ", ".join(
            f"{r.crops} crops {r.ms_per_call} ms ({r.images_per_s} img/s, other {r.other_cpu_pct} %)"
            for r in c.batches
        )
        for c in raw.rechecks
    ]
    if report.torch is not None:
        t = report.torch
        parts += [
            f"\n2. PyTorch eager ({t.device}, {t.torch_threads} threads, same weights: {t.same_weights}), "
            "interleaved with ORT",
            table(
                [[r.crops, r.torch_ms_per_call, r.ort_ms_per_call, r.ort_speedup] for r in t.batches],
                ["crops", "torch ms", "ORT ms", "ORT speed-up"],
            ),
        ]
    parts += [
        "\n3. preprocessing, one thread (decode with JPEG draft mode, resize + 10 crops)",
        table(
            [
                [n, f"{p.width}x{p.height}", p.bytes, p.decode_ms, p.resize_crop_ms, p.total_ms]
                for n, p in report.preprocess.items()
            ],
            ["image", "size", "bytes", "decode ms", "resize+crop ms", "total ms"],
        ),
    ]
    return parts


def _points(title: str, runs: dict[str, E2eRun]) -> list[str]:
    rows = [
        [
            mode,
            p.image,
            p.concurrency,
            p.ok,
            p.images_per_s,
            p.p50_ms,
            p.p95_ms,
            p.p99_ms,
            p.mean_batch_images,
            p.server_cpu_ms_per_image,
            p.server_cpu_pct,
            p.own_cpu_pct,
            p.other_cpu_pct,
            ",".join(f"{k}:{v}" for k, v in p.errors.items()) or "-",
        ]
        for mode, run in runs.items()
        for p in run.points
    ]
    header = ["mode", "image", "conc", "ok", "img/s", "p50", "p95", "p99", "batch", "srv cpu ms/img"]
    return [title, table(rows, [*header, "srv%", "cli%", "oth%", "errors"])]


def _overload(o: Overload) -> list[str]:
    r, full, late = o.recovery, o.rejected_queue_full, o.rejected_timeout
    return [
        f"\n5. overload: {o.concurrency} clients, settings {o.settings}, {o.wall_s} s",
        f"  {o.requests} requests: {o.ok} ok ({o.images_per_s} img/s, p50 {o.p50_ms} ms), errors {o.errors}",
        f"  max latency of any request {o.max_latency_ms_any} ms (timeout {o.timeout_s * 1000:g} ms)",
        f"  503 queue full: {full.count}, p50 {full.p50_ms} / p99 {full.p99_ms} ms; "
        f"503 timeout: {late.count}, max {late.max_ms} ms",
        f"  recovery: first request {r.first_status} in {r.first_ms} ms, then {r.next_ms} ms "
        f"(normal p50 {r.baseline_p50_ms} ms)",
    ]


def _precision(prec: Precision) -> list[str]:
    if prec.skipped:
        return [f"\n6. precision: skipped ({prec.skipped})"]
    sizes = sorted({c for v in prec.variants.values() for c in v.ms_per_call})
    rows = [
        [
            name,
            v.providers[0] if v.providers else "-",
            v.mib,
            *(v.ms_per_call.get(c) for c in sizes),
            v.top1_agreement,
            v.skipped or "",
        ]
        for name, v in prec.variants.items()
    ]
    return [
        f"\n6. precision variants, interleaved (agreement on {prec.agreement_images} images, "
        f"trained model: {prec.model_trained})",
        table(rows, ["variant", "provider", "MiB", *(f"ms/{c}" for c in sizes), "top-1 agree", "note"]),
    ]


def human(report: Report) -> str:
    parts = [f"alexnet-serve benchmark, {report.meta.get('machine')}, model {report.meta.get('model')}"]
    parts += _engine(report)
    parts += _points(
        "\n4. POST /predict over HTTP (server in a subprocess; cpu % of the whole machine)", report.e2e
    )
    if report.overload is not None:
        parts += _overload(report.overload)
    if report.precision is not None:
        parts += _precision(report.precision)
    if report.tuning:
        parts += _points("\ntuning (one server setting changed at a time)", report.tuning)
    disturbed = report.disturbed()
    if disturbed:
        parts.append(
            f"\nWARNING: other work used > 10 % of the machine during {len(disturbed)} measurements "
            "(oth% columns): compare within rows, not across runs"
        )
    parts.append("\nratios")
    parts += [f"  {k}: {v}" for k, v in report.ratios.items()]
    parts.append("\ntargets")
    parts += [
        f"  [{'met' if t.met else 'MISSED'}] {t.target}: {t.value} vs {t.limit}" for t in report.targets
    ]
    return "\n".join(parts)
