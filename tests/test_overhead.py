"""benchmarks/overhead.py and its free engine: a model file with real metadata and a graph that
costs almost nothing, served by the real service; the whole benchmark once in --quick mode (slow)."""

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from alexnet_core.metadata import ModelMetadata
from benchmarks.free_engine import default_metadata, write_free_model
from tests.conftest import cpu_settings, serve
from tests.images import photo_jpeg
from tests.processes import run_report


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_free_engine_takes_crops_and_keeps_the_metadata(tmp_path: Path) -> None:
    meta = default_metadata("x")
    model = write_free_model(meta, tmp_path / "alexnet-free.onnx")
    s = session(model)
    written = ModelMetadata.from_props(s.get_modelmeta().custom_metadata_map)
    assert written.version == "alexnet-free" and written.labels == meta.labels and written.mean == meta.mean
    (given,) = s.get_inputs()
    assert (
        given.name == meta.input_name and given.type == "tensor(float)" and given.shape[1:] == [3, 224, 224]
    )
    crops = np.random.default_rng(0).standard_normal((20, 3, 224, 224), dtype=np.float32)
    (logits,) = s.run([meta.output_name], {meta.input_name: crops})
    assert logits.shape == (20, 1000) and np.isfinite(logits).all()
    assert model.stat().st_size < 100_000  # no weights worth the name


def test_free_engine_of_the_square_kind_returns_probabilities(tmp_path: Path) -> None:
    meta = default_metadata("x", input_kind="square")
    s = session(write_free_model(meta, tmp_path / "alexnet-free-square.onnx"))
    (given,) = s.get_inputs()
    assert given.type == "tensor(uint8)" and given.shape[1:] == [256, 256, 3]
    squares = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    (probabilities,) = s.run([meta.output_name], {meta.input_name: squares})
    assert probabilities.shape == (3, 1000)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_the_service_serves_the_free_engine(tmp_path: Path) -> None:
    write_free_model(default_metadata("x"), tmp_path / "alexnet-free.onnx")
    with serve(cpu_settings(tmp_path)) as url:
        response = httpx.post(f"{url}/predict", files={"file": ("a.jpg", photo_jpeg())}, timeout=60)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert len(result["predictions"]) == 5


@pytest.mark.slow
def test_quick_run_reports_both_sides_for_both_images(tmp_path: Path) -> None:
    done, report = run_report("benchmarks.overhead", ["--quick", "--duration", "2"], tmp_path, timeout=900)
    assert json.loads(done.stdout) == report
    assert set(report["images"]) == {"small", "large"}
    for image in report["images"].values():
        assert image["in_process"]["1"]["cpu_ms_per_image"] > 0 and image["in_process"]["all"]["images"] > 0
        for points in image["server"].values():
            assert [p["concurrency"] for p in points] == [1, 4, 16, 64]
            assert all(p["ok"] == p["requests"] > 0 and p["errors"] == {} for p in points)
            assert all(p["server_cpu_ms_per_image"] > 0 for p in points)
        assert image["efficiency"]["all"]["16"] > 0 and image["scaling_in_process"] > 0
    assert len(report["targets"]) == 4
