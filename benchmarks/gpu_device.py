"""The device-decode half of ``benchmarks.gpu_check``: baseline JPEGs decoded, cut and classified on
the GPU (``service.device_decode``), beside the CPU path's figures of the same run.

- ``require_decoder``: with the GPU decode asked for (the default where CUDA is) and not possible
  here, the check stops (exit status 3) naming what is missing: no CPU figure is reported as a
  device figure;
- engine: ``DeviceDecoder.classify`` (decode + resize and cut + inference) of a 640x427 JPEG at
  32, 128 and 256 images per call;
- agreement: >= 500 varied baseline JPEGs made here (two photos, random crops and scales, grey
  ones, JPEG qualities and chroma subsamplings) through both paths on a peaked model (random
  weights with fc8 scaled, so that its probabilities are far from uniform and |delta p| means
  something): top-1 agreement >= 99 %, the mean and largest |delta p|;
- targets of issue 21: engine >= 10,000 images/s, /predict device decode at 256 clients >= 8,000
  images/s with the host under half busy, the CPU path not slower than the first run's.
"""

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from alexnet_core.session import OnnxClassifier
from benchmarks.gpu_http import ProvidersMissing, log
from benchmarks.images import encoded, photo
from benchmarks.report import Target, rnd
from service.device_route import missing_for_device_decode

Json = dict[str, Any]
AGREEMENT_IMAGES = 512
TARGET_AGREEMENT = 0.99
TARGET_ENGINE_IMAGES_PER_S = 10_000.0
TARGET_DEVICE_HTTP_IMAGES_PER_S = 8_000.0
TARGET_HOST_BUSY_PCT = 50.0
# The first device run (2026-11-29, benchmarks/results/gpu-h200.json): /predict at 16 clients.
FIRST_RUN_CPU_PATH_IMAGES_PER_S = 535.0
FC8_SCALE = 8.0  # random fc8 logits spread ~1: scaled, the top class takes most of the mass
DEVICE_BATCHES = (32, 128, 256)


def require_decoder(providers: list[str]) -> Any:
    """A working ``DeviceDecoder``, or ``ProvidersMissing`` naming what this host lacks."""
    missing = missing_for_device_decode(providers, workers=0)
    if missing:
        raise ProvidersMissing("GPU decode was requested but this host lacks " + "; ".join(missing))
    from service.device_decode import DeviceDecoder

    try:
        return DeviceDecoder()
    except Exception as exc:
        raise ProvidersMissing(f"GPU decode was requested but its decoder cannot start: {exc!r}") from exc


def varied_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Baseline JPEGs of many sizes, crops, qualities, subsamplings; a tenth grey."""
    rng = np.random.default_rng(seed)
    sources = [photo("china.jpg"), photo("flower.jpg")]
    out = []
    for i in range(count):
        image = sources[i % 2]
        width, height = int(rng.integers(96, image.width)), int(rng.integers(96, image.height))
        left, top = (
            int(rng.integers(0, image.width - width + 1)),
            int(rng.integers(0, image.height - height + 1)),
        )
        scale = float(rng.uniform(0.5, 2.5))
        cut = image.crop((left, top, left + width, top + height))
        cut = cut.resize(
            (max(32, int(width * scale)), max(32, int(height * scale))), Image.Resampling.BICUBIC
        )
        if i % 10 == 9:
            cut = cut.convert("L")
        quality, subsampling = int(rng.integers(50, 97)), int(rng.integers(0, 3))
        out.append(encoded(cut, "JPEG", quality=quality, subsampling=subsampling))
    return out


def peaked_model(workdir: Path) -> Path:
    """The square kind with random weights (seed 1) and fc8 scaled by ``FC8_SCALE``."""
    import torch

    from model_export.export import export_onnx
    from model_export.weights import random_weights

    weights = random_weights("torchvision", seed=1)
    fc8 = [m for m in weights.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        fc8.weight.mul_(FC8_SCALE)
        fc8.bias.mul_(FC8_SCALE)
    path = workdir / "alexnet-peaked.onnx"
    export_onnx(weights, path, input_kind="square")
    return path


def agreement(model: Path, providers: list[str], decoder: Any, images: list[bytes]) -> Json:
    classifier = OnnxClassifier(model, providers)
    meta = classifier.metadata
    cpu, device = [], []
    for start in range(0, len(images), 64):
        chunk = images[start : start + 64]
        batch = np.concatenate([meta.preprocess(data, max_pixels=10**8).batch for data in chunk])
        cpu.append(classifier.probabilities(batch))
        probs, refused = decoder.classify(classifier, chunk)
        if refused:
            raise RuntimeError(f"the device decoder refused {len(refused)} valid baseline JPEGs")
        device.append(probs)
    p_cpu, p_dev = np.concatenate(cpu).astype(np.float64), np.concatenate(device).astype(np.float64)
    delta = np.abs(p_cpu - p_dev)
    top1 = float(np.mean(p_cpu.argmax(1) == p_dev.argmax(1)))
    result = {
        "images": len(images),
        "top1_agreement": rnd(top1, 4),
        "mean_abs_delta_p": float(f"{delta.mean():.3g}"),
        "mean_abs_delta_p_of_top1": float(
            f"{np.take_along_axis(delta, p_cpu.argmax(1)[:, None], 1).mean():.3g}"
        ),
        "max_abs_delta_p": float(f"{delta.max():.3g}"),
        "model_mean_top1_probability": rnd(float(p_cpu.max(1).mean()), 3),
    }
    log(f"agreement device vs CPU decode: {result}")
    return result


def device_engine(model: Path, providers: list[str], decoder: Any, data: bytes, budget_s: float) -> Json:
    classifier = OnnxClassifier(model, providers)
    points = []
    for images in DEVICE_BATCHES:
        batch = [data] * images
        decoder.classify(classifier, batch)  # first call at this shape
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            started = time.perf_counter()
            decoder.classify(classifier, batch)
            times.append(time.perf_counter() - started)
        median = float(np.median(times))
        points.append(
            {
                "images": images,
                "ms_per_call_median": rnd(median * 1000, 2),
                "images_per_s": rnd(images / median, 1),
            }
        )
        log(f"device engine {model.stem} {images} images: {median * 1000:.1f} ms/call (decode+cut+run)")
    return {"providers": classifier.session.get_providers(), "batches": points}


class DevicePathBroken(RuntimeError):
    """The server's GPU decode path answered wrongly: its figures would not be worth reporting."""


def device_answers(url: str, data: bytes) -> Json:
    """Before the load: the server decoding on the GPU answers a baseline JPEG as the CPU path
    does (top-1 and its probability), a corrupt one with a 422 naming the file, a PNG (CPU path)
    with a 200, and is still alive after them; else ``DevicePathBroken``."""
    import httpx

    png = encoded(Image.open(io.BytesIO(data)), "PNG")
    with httpx.Client(base_url=url, timeout=60) as client:

        def top(name: str, body: bytes) -> httpx.Response:
            return client.post("/predict", files={"file": (name, body)})

        jpeg, corrupt, png_answer = (
            top("a.jpg", data),
            top("broken.jpg", data[: len(data) // 3]),
            top("a.png", png),
        )
        after = top("again.jpg", data)
    found = {
        "jpeg": jpeg.status_code,
        "corrupt": corrupt.status_code,
        "corrupt_detail": corrupt.json().get("detail") if corrupt.status_code != 200 else None,
        "png": png_answer.status_code,
        "after": after.status_code,
    }
    problems = [
        f"{name} answered {code}"
        for name, code in found.items()
        if name != "corrupt_detail" and code != (422 if name == "corrupt" else 200)
    ]
    if not problems and "broken.jpg" not in str(found["corrupt_detail"]):
        problems.append(f"the corrupt JPEG's 422 does not name the file: {found['corrupt_detail']!r}")
    if not problems:
        device_top = jpeg.json()["results"][0]["predictions"][0]
        cpu_top = png_answer.json()["results"][0]["predictions"][0]
        found["device_top1"], found["cpu_top1"] = device_top, cpu_top
        if device_top["index"] != cpu_top["index"]:
            problems.append(
                f"top-1 differs: GPU decode {device_top}, CPU decode of the same pixels {cpu_top}"
            )
    if problems:
        raise DevicePathBroken("the GPU decode path answered wrongly: " + "; ".join(problems))
    log(f"device path answers: {found}")
    return found


def device_targets(report: Json) -> list[Target]:
    """Issue 21's targets, where the run measured the device path (else none)."""
    if "device_engine" not in report:
        return []
    out = []
    engine = [b["images_per_s"] for run in report.get("engine", {}).values() for b in run["batches"]]
    out.append(
        Target.at_least(
            "engine >= 10,000 images/s (ten crops, best batch)",
            max(engine, default=None),
            TARGET_ENGINE_IMAGES_PER_S,
        )
    )
    if "agreement" in report:
        out.append(
            Target.at_least(
                "device vs CPU decode top-1 agreement >= 99 %",
                report["agreement"]["top1_agreement"],
                TARGET_AGREEMENT,
            )
        )
    device_points = {p["concurrency"]: p for p in report.get("http_device_decode", {}).get("points", [])}
    if 256 in device_points:
        point = device_points[256]
        out.append(
            Target.at_least(
                "/predict device decode at 256 clients >= 8,000 images/s",
                point["images_per_s"],
                TARGET_DEVICE_HTTP_IMAGES_PER_S,
            )
        )
        out.append(
            Target.at_most(
                "host CPU busy at that point < 50 %", point["host_cpu_busy_pct"], TARGET_HOST_BUSY_PCT
            )
        )
    cpu_points = {p["concurrency"]: p for p in report.get("http", {}).get("square", {}).get("points", [])}
    if 16 in cpu_points and device_points:
        out.append(
            Target.at_least(
                "CPU path at 16 clients >= the first run's 535 images/s",
                cpu_points[16]["images_per_s"],
                FIRST_RUN_CPU_PATH_IMAGES_PER_S,
            )
        )
    return out
