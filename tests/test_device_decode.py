"""The GPU decode path's choices and fallbacks, on a host without a GPU or nvImageCodec (CI): which
path each real file takes, the device's resize-and-cut graph against the CPU path's square,
ALEXNET_DECODE_DEVICE=auto serving /predict through the CPU workers, cuda refused at start with
what is missing. The device path itself runs in ``benchmarks.gpu_check`` on a GPU host."""

import asyncio
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydantic import ValidationError

from alexnet_core.images import ImageInputError
from alexnet_core.pipeline import center_square
from alexnet_core.session import OnnxClassifier
from benchmarks.gpu_device import device_answers, varied_jpegs
from service.device_decode import DeviceBatcher, _Job, square_geometry, square_graph
from service.device_route import (
    DeviceDecodeUnavailable,
    decode_device,
    decoder_installed,
    missing_for_device_decode,
    route,
)
from service.main import batch_limit, device_batcher
from tests.conftest import cpu_settings, random_model_dir, serve
from tests.images import encode, model_batch, photo, photo_jpeg

GPU_HOST = shutil.which("nvidia-smi") is not None
no_gpu = pytest.mark.skipif(GPU_HOST, reason="a GPU host: CUDA may well be there")
REPO_ROOT = Path(__file__).resolve().parent.parent
CUDA_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(), "JPEG", quality=90, exif=exif.tobytes())


def files() -> dict[str, bytes]:
    """One real file of each kind the chooser tells apart, made here with Pillow."""
    baseline = photo_jpeg()
    return {
        "baseline": baseline,
        "grey": encode(photo().convert("L"), "JPEG", quality=90),
        "exif-upright": rotated_jpeg(1),
        "progressive": encode(photo(), "JPEG", quality=90, progressive=True),
        "cmyk": encode(photo().convert("CMYK"), "JPEG", quality=90),
        "rotated": rotated_jpeg(6),
        "png": encode(photo(), "PNG"),
        "webp": encode(photo(), "WEBP", quality=90),
        "corrupt-header": b"\xff\xd8\xff" + b"not a jpeg at all" * 4,
        "corrupt-data": baseline[: len(baseline) // 3],  # a sound header: the device is asked
    }


EXPECTED = {
    "baseline": None,
    "grey": None,
    "exif-upright": None,
    "progressive": "progressive JPEG",
    "cmyk": "CMYK JPEG",
    "rotated": "EXIF orientation 6",
    "png": "not a JPEG",
    "webp": "not a JPEG",
    "corrupt-header": "JPEG header unreadable",
    "corrupt-data": None,
}


def test_the_agreement_sets_jpegs_all_take_the_device_path() -> None:
    """``benchmarks.gpu_check``'s agreement images: varied, and every one a device-path JPEG."""
    images = varied_jpegs(60)
    routes = [route(data) for data in images]
    assert all(each.device for each in routes), [each.cpu_reason for each in routes]
    assert len({(each.width, each.height) for each in routes}) > 50
    assert sum(Image.open(io.BytesIO(data)).mode == "L" for data in images) == 6


def test_each_kind_of_file_takes_its_path() -> None:
    got = {name: route(data) for name, data in files().items()}
    assert {name: r.cpu_reason for name, r in got.items()} == EXPECTED
    assert (got["baseline"].width, got["baseline"].height) == (640, 427)
    assert got["baseline"].device and not got["png"].device


@pytest.mark.parametrize("size", [(640, 427), (300, 500), (200, 150), (1000, 1000), (257, 256)])
def test_the_device_cut_matches_the_cpu_square(size: tuple[int, int]) -> None:
    """The graph the GPU runs (here on ONNX Runtime's CPU provider: the same operators): shorter
    side to 256, antialiased bilinear, central square; within rounding of Pillow's."""
    session = ort.InferenceSession(square_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    image = photo().resize(size)
    pixels = np.asarray(image)
    new_h, new_w, top, left = square_geometry(image.width, image.height, 256)
    feeds = {
        "image": pixels,
        "size": np.array([new_h, new_w], np.int64),
        "corner": np.array([top, left], np.int64),
        "side": np.array([256, 256], np.int64),
    }
    square = session.run(None, feeds)[0]
    reference = center_square(image, 256).astype(np.int16)
    assert square.shape == (256, 256, 3) and square.dtype == np.uint8
    difference = np.abs(square.astype(np.int16) - reference)
    assert difference.mean() < 0.5
    assert np.percentile(difference, 99) <= 2


@no_gpu
def test_auto_without_a_gpu_or_the_library_is_the_cpu_path() -> None:
    missing = missing_for_device_decode(CUDA_FIRST, workers=0)
    assert any("CUDAExecutionProvider" in line for line in missing)
    assert any("nvImageCodec" in line for line in missing) == (not decoder_installed())
    assert decode_device("auto", CUDA_FIRST, 0) == "cpu"
    assert decode_device("cpu", CUDA_FIRST, 0) == "cpu"
    with pytest.raises(DeviceDecodeUnavailable, match="CUDAExecutionProvider"):
        decode_device("cuda", CUDA_FIRST, 0)


def test_fronts_keep_the_cpu_path_and_cuda_with_fronts_is_refused() -> None:
    missing = missing_for_device_decode(["CPUExecutionProvider"], workers=4)
    assert any("ALEXNET_WORKERS=0" in line for line in missing)
    with pytest.raises(DeviceDecodeUnavailable, match="ALEXNET_WORKERS=0"):
        decode_device("cuda", ["CPUExecutionProvider"], 4)


def test_the_library_absent_is_named(tmp_path: Path) -> None:
    """nvImageCodec made unimportable in a fresh interpreter (an empty ``nvidia`` package first on
    its path hides any installed one): the chooser names it and auto falls back."""
    (tmp_path / "nvidia").mkdir()
    (tmp_path / "nvidia" / "__init__.py").write_text("")
    code = (
        "from service.device_route import decoder_installed, decode_device\n"
        "assert not decoder_installed()\n"
        "print(decode_device('auto', ['CPUExecutionProvider'], 0))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"


def test_a_decode_device_outside_the_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="decode_device"):
        cpu_settings(tmp_path, decode_device="gpu")
    assert cpu_settings(tmp_path, decode_device="CUDA").decode_device == "cuda"


@no_gpu
def test_cuda_asked_for_and_not_possible_refuses_to_start(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")},
        "PYTHONPATH": str(REPO_ROOT),
        "ALEXNET_DECODE_DEVICE": "cuda",
        "ALEXNET_WORKERS": "0",
        "ALEXNET_WEIGHTS_DIR": str(tmp_path),
        "ALEXNET_PORT": "1",  # never bound: it must stop before
    }
    command = [sys.executable, "-c", "from service.cli import run; run()"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "ALEXNET_DECODE_DEVICE=cuda, but this server lacks" in done.stderr
    assert "CUDAExecutionProvider" in done.stderr
    assert "Uvicorn running" not in done.stderr
    # The app's own start (``uvicorn service.main:app``) refuses the same way.
    with pytest.raises(DeviceDecodeUnavailable, match="CUDAExecutionProvider"):
        device_batcher(cpu_settings(tmp_path, decode_device="cuda", providers=CUDA_FIRST), False)


@pytest.fixture(scope="module")
def square_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model_dir(tmp_path_factory.mktemp("square"), "square")


@no_gpu
def test_auto_serves_predict_through_the_cpu_path(square_dir: Path) -> None:
    every = files()
    names = ["baseline", "progressive", "cmyk", "rotated", "png", "webp"]
    classifier = OnnxClassifier(square_dir / "alexnet-random.onnx", ["CPUExecutionProvider"])
    want = classifier.probabilities(model_batch(classifier, [every[n] for n in names]))
    settings = cpu_settings(square_dir, decode_device="auto", providers=CUDA_FIRST)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/predict", files=[("files", (f"{n}.img", every[n])) for n in names])
        assert response.status_code == 200, response.text
        for name in ("corrupt-data", "corrupt-header"):
            bad = client.post("/predict", files={"file": (f"{name}.jpg", every[name])})
            assert bad.status_code == 422, bad.text
            assert f"{name}.jpg" in bad.json()["detail"] and "corrupt" in bad.json()["detail"]
    for result, row in zip(response.json()["results"], want, strict=True):
        top = result["predictions"][0]
        assert top["index"] == int(row.argmax())
        assert top["probability"] == pytest.approx(float(row.max()), rel=1e-4)


def test_a_device_batch_is_split_back_into_its_requests() -> None:
    """The batcher's answer to each request: its own rows, and a refused image as that file's 422
    (the others in the batch are answered)."""

    async def split() -> list[object]:
        loop = asyncio.get_running_loop()
        jobs = [
            _Job(None, [b"a", b"b"], ["file 'a': ", "file 'b': "], loop.create_future()),  # type: ignore[arg-type]
            _Job(None, [b"c"], ["file 'c': "], loop.create_future()),  # type: ignore[arg-type]
        ]
        probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)  # rows of a and c: b was refused
        DeviceBatcher._answer(jobs, probs, refused=[1], seconds=0.5)
        return [job.future.result() for job in jobs]

    first, second = asyncio.run(split())
    assert first.probabilities == pytest.approx(np.array([[0.9, 0.1]]))  # type: ignore[attr-defined]
    error = first.errors[1]  # type: ignore[attr-defined]
    assert isinstance(error, ImageInputError) and error.status_code == 422
    assert error.detail.startswith("file 'b': ")
    assert second.probabilities == pytest.approx(np.array([[0.2, 0.8]]))  # type: ignore[attr-defined]
    assert second.batch_images == 3 and not second.errors  # type: ignore[attr-defined]


def test_the_batch_limit_follows_the_provider(square_dir: Path) -> None:
    """On the CPU provider the CPU default (8) or the setting; the GPU's larger default applies
    only to a session on CUDA (``benchmarks.gpu_check`` records the server's batches there)."""
    on_cpu = OnnxClassifier(square_dir / "alexnet-random.onnx", ["CPUExecutionProvider"], warm_up=False)
    settings = cpu_settings(square_dir)
    assert batch_limit(settings, on_cpu) == settings.max_batch_images == 8
    assert batch_limit(settings, None) == 8
    assert batch_limit(cpu_settings(square_dir, max_batch_images=4), on_cpu) == 4
    assert settings.device_batch_images == 128


def test_the_device_runs_answer_check_passes_on_a_sound_server(square_dir: Path) -> None:
    """``benchmarks.gpu_check``'s check of a GPU-decoding server's answers, against a real server
    (here decoding on the CPU, whose answers it must accept)."""
    with serve(cpu_settings(square_dir)) as url:
        found = device_answers(url, photo_jpeg())
    assert (found["jpeg"], found["corrupt"], found["png"], found["after"]) == (200, 422, 200, 200)
    assert "broken.jpg" in found["corrupt_detail"]
    assert found["device_top1"]["index"] == found["cpu_top1"]["index"]
