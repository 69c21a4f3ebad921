"""The engine alone: raw ONNX Runtime timings, PyTorch eager against ORT, the host preprocessing,
and the precision variants (int8, fp16) against fp32."""

import gc
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import N_CROPS
from alexnet_core.session import provider_list, session_options
from benchmarks.cpu import CpuMeter, log
from benchmarks.images import digit_images
from benchmarks.plan import Plan
from benchmarks.report import Precision as PrecisionReport
from benchmarks.report import PreprocessRow, RawBatch, RawOrt, Recheck, TorchReport, TorchRow, Variant, rnd

MAX_PIXELS = 64_000_000  # the service's default


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


def median_ms(fn: Callable[[], object], repeats: int, per: int = 1) -> float:
    """Median time of ``fn`` over ``repeats`` calls after one warm-up call, in ms per ``per`` items
    (rounded to 0.01 ms)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000 / per)
    return round(float(np.median(times)), 2)


def call_stats(times: list[float], crops: int) -> dict[str, Any]:
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


def read_metadata(path: Path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)


def session_runner(session: ort.InferenceSession, batch: np.ndarray) -> Callable[[], np.ndarray]:
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return lambda: session.run([meta.output_name], {meta.input_name: batch})[0]


def random_batch(crops: int, size: int) -> np.ndarray:
    return np.random.default_rng(crops).standard_normal((crops, 3, size, size), dtype=np.float32)


class Engine:
    """One raw session kept for the whole run, to measure the engine again right before each
    server configuration: on a shared machine the speed drifts, and the e2e / raw ratio is only
    meaningful against an engine measured under the same conditions."""

    def __init__(self, model: Path, meta: ModelMetadata, providers: list[str], threads: int) -> None:
        started = time.perf_counter()
        self.session = make_session(model, providers, threads)
        self.load_s = time.perf_counter() - started
        self.meta, self.providers, self.threads = meta, providers, threads
        self.checks: list[Recheck] = []

    def measure(self, crops: int, min_calls: int, budget_s: float) -> RawBatch:
        run = session_runner(self.session, random_batch(crops, self.meta.input_size))
        first = time_calls(run, 1, 0)  # allocates this batch size's buffers: reported, not counted
        meter = CpuMeter()
        times = time_calls(run, min_calls, budget_s)
        usage = meter.read(len(times) * crops / N_CROPS)
        return RawBatch(**call_stats(times, crops), first_call_ms=rnd(first[0] * 1000), **usage.model_dump())

    def raw(self, plan: Plan) -> RawOrt:
        rows = []
        for crops in plan.batches:
            rows.append(self.measure(crops, plan.engine_min_calls, plan.engine_budget_s))
            log(f"raw ORT {crops} crops: {rows[-1].ms_per_call} ms/call")
        best = max(rows, key=lambda r: r.images_per_s)
        return RawOrt(
            providers_requested=self.providers,
            providers=self.session.get_providers(),
            intra_op_threads=self.threads,
            load_s=rnd(self.load_s),
            batches=rows,
            best_images_per_s=best.images_per_s,
            best_crops=best.crops,
        )

    def recheck(self, label: str, plan: Plan) -> None:
        rows = [self.measure(crops, 2, plan.recheck_s) for crops in plan.recheck_batches]
        self.checks.append(Recheck(before=label, batches=rows))
        log(f"raw ORT before {label}: " + ", ".join(f"{r.crops} crops {r.ms_per_call} ms" for r in rows))


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


def compare_calls(plan: Plan, crops: int) -> int:
    return max(2, round(plan.engine_min_calls * 10 / crops)) if crops > 10 else plan.engine_min_calls * 2


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


def bench_torch(model: Path, engine: Engine, plan: Plan) -> TorchReport:
    """PyTorch eager on the same weights and batches, interleaved with ORT. torch is imported here
    only: the serving install has none."""
    started = time.perf_counter()
    import torch

    from model_export.alexnet import AlexNet

    import_s = time.perf_counter() - started
    if engine.threads:
        torch.set_num_threads(engine.threads)
    meta = engine.meta
    module = AlexNet(meta.layout, meta.num_classes).eval()  # type: ignore[arg-type]
    same_weights = torch_weights_from_onnx(model, module)
    cuda = "CUDAExecutionProvider" in engine.session.get_providers() and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module.to(device)
    rows, max_diff = [], None
    for crops in plan.compare_batches:
        batch = random_batch(crops, meta.input_size)

        def torch_run(batch: np.ndarray = batch) -> np.ndarray:
            # Host in, host out, as ORT is fed by the service: copies included on a GPU.
            with torch.inference_mode():
                out = module(torch.from_numpy(batch).to(device)).cpu().numpy()
            if cuda:
                torch.cuda.synchronize()
            return out

        ort_run = session_runner(engine.session, batch)
        if max_diff is None:
            max_diff = float(np.max(np.abs(torch_run() - ort_run())))
        times = interleaved({"torch": torch_run, "ort": ort_run}, plan.ab_rounds, compare_calls(plan, crops))
        t, o = call_stats(times["torch"], crops), call_stats(times["ort"], crops)
        rows.append(
            TorchRow(
                crops=crops,
                torch_ms_per_call=t["ms_per_call"],
                ort_ms_per_call=o["ms_per_call"],
                torch_images_per_s=t["images_per_s"],
                ort_images_per_s=o["images_per_s"],
                ort_speedup=rnd(t["ms_per_call"] / o["ms_per_call"]),
            )
        )
        log(f"torch vs ORT {crops} crops: {t['ms_per_call']} vs {o['ms_per_call']} ms/call")
    return TorchReport(
        device=str(device),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        import_s=rnd(import_s),
        same_weights=same_weights,
        max_abs_logit_diff_vs_ort=max_diff if same_weights else None,
        batches=rows,
    )


def bench_preprocess(images: dict[str, bytes], meta: ModelMetadata, plan: Plan) -> dict[str, PreprocessRow]:
    """One thread, the service's own preprocessing for this model (JPEG draft mode included)."""
    out = {}
    for (name, data), reps in zip(images.items(), plan.preprocess_reps, strict=True):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        # The first run pays imports and allocator growth.
        runs = [meta.preprocess(data, max_pixels=MAX_PIXELS) for _ in range(reps + 1)][1:]
        out[name] = PreprocessRow(
            width=width,
            height=height,
            bytes=len(data),
            reps=reps,
            decode_ms=rnd(float(np.median([r.decode_s for r in runs])) * 1000) or 0.0,
            resize_crop_ms=rnd(float(np.median([r.preprocess_s for r in runs])) * 1000) or 0.0,
            total_ms=rnd(float(np.median([r.decode_s + r.preprocess_s for r in runs])) * 1000) or 0.0,
        )
        log(f"preprocess {name} {width}x{height}: {out[name].total_ms} ms")
    return out


def _build_variants(model: Path, workdir: Path, out: PrecisionReport) -> dict[str, Path]:
    from model_export import precision

    built: dict[str, Path] = {"fp32": model}
    out.variants["fp32"] = Variant()
    for name, build in (("int8", precision.quantize_int8), ("fp16", precision.convert_fp16)):
        started = time.perf_counter()
        try:
            built[name] = build(model, workdir / f"{model.stem}-{name}.onnx")
        except Exception as exc:  # a converter missing or failing must not sink the whole run
            out.variants[name] = Variant(skipped=f"{type(exc).__name__}: {exc}")
            continue
        out.variants[name] = Variant(
            build_s=rnd(time.perf_counter() - started), mib=rnd(built[name].stat().st_size / 2**20, 1)
        )
    return built


def bench_precision(model: Path, engine: Engine, workdir: Path, photo: bytes, plan: Plan) -> PrecisionReport:
    try:
        from model_export import precision
    except ImportError as exc:
        return PrecisionReport(skipped=f"model_export.precision not available: {exc}")
    out = PrecisionReport()
    built = _build_variants(model, workdir, out)
    sessions = {name: make_session(path, engine.providers, engine.threads) for name, path in built.items()}
    for name, session in sessions.items():
        out.variants[name].providers = session.get_providers()
    if "fp16" in sessions and "CUDAExecutionProvider" not in sessions["fp16"].get_providers():
        out.variants["fp16"].note = "fp16 is meant for CUDA; on CPU ORT casts around missing kernels"
    for crops in plan.compare_batches:
        batch = random_batch(crops, engine.meta.input_size)
        runners = {n: session_runner(s, batch) for n, s in sessions.items()}
        for name, row in interleaved(runners, plan.ab_rounds, compare_calls(plan, crops)).items():
            stats = call_stats(row, crops)
            out.variants[name].ms_per_call[crops] = stats["ms_per_call"]
            out.variants[name].images_per_s[crops] = stats["images_per_s"]
        log(
            f"precision {crops} crops: "
            + ", ".join(f"{n} {out.variants[n].ms_per_call[crops]} ms" for n in sessions)
        )
    del sessions
    gc.collect()
    # Agreement with fp32 through the service's preprocessing and classifier. With random weights
    # the classes are near-ties and this says little; with a trained model (for instance the
    # digits model: --model runs/digits/...onnx) the digits images are its validation images.
    images = [photo, *digit_images(plan.agreement_digits)]
    reference = out.variants["fp32"]
    for name, path in built.items():
        if name != "fp32":
            variant = out.variants[name]
            variant.top1_agreement = rnd(
                precision.top1_agreement(model, path, images, providers=engine.providers), 4
            )
            variant.speedup_vs_fp32 = {
                c: rnd((reference.ms_per_call[c] or 0) / (variant.ms_per_call[c] or 1))
                for c in plan.compare_batches
            }
    out.agreement_images = len(images)
    out.model_trained = engine.meta.trained
    return out
