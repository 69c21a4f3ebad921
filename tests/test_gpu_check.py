"""benchmarks/gpu_check.py: it refuses to report CPU figures as a GPU check, its targets come from
the run's own figures, and its quick run (slow) reports the host's side of every HTTP point."""

import shutil
from pathlib import Path

import pytest

from benchmarks.gpu_http import targets
from tests.processes import run_report


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU host: CUDA may well be there")
def test_cuda_asked_for_and_not_given_fails_loudly(tmp_path: Path) -> None:
    args = ["--quick", "--providers", "CUDAExecutionProvider,CPUExecutionProvider"]
    done, report = run_report("benchmarks.gpu_check", args, tmp_path, timeout=600, codes=(3,))
    assert "CUDAExecutionProvider was requested" in done.stderr
    assert "CUDAExecutionProvider was requested" in report["error"]
    assert "engine" not in report  # nothing was measured on the wrong device


def test_gpu_decode_asked_for_and_not_possible_fails_loudly(tmp_path: Path) -> None:
    """No nvImageCodec or no CUDA here: the check stops before measuring, naming what is missing."""
    args = ["--quick", "--providers", "CPUExecutionProvider", "--decode-device", "cuda"]
    done, report = run_report("benchmarks.gpu_check", args, tmp_path, timeout=600, codes=(3,))
    assert "FAILED: GPU decode was requested but this host lacks" in done.stderr
    assert "CUDAExecutionProvider" in report["error"]
    assert "engine" not in report


def _point(concurrency: int, images_per_s: float, p50_ms: float) -> dict[str, float]:
    return {"concurrency": concurrency, "images_per_s": images_per_s, "p50_ms": p50_ms}


def test_targets_compare_with_the_same_runs_engine_and_preprocessing() -> None:
    report = {
        "engine": {"square": {"batches": [{"images_per_s": 900.0}, {"images_per_s": 5000.0}]}},
        "in_process": {"square": {"images_per_s": 4000.0}},
        "http": {"square": {"points": [_point(1, 250, 3.5), _point(64, 3600, 17), _point(256, 3100, 80)]}},
    }
    by_name = {t.target: t for t in targets(report)}
    assert by_name["/predict p50 at 1 client <= 4 ms (square)"].met
    assert by_name["/predict at 64 clients >= 3,500 images/s (square)"].met
    assert not by_name["/predict at 256 clients >= 3,500 images/s (square)"].met
    # The ceiling is the smaller of the engine (5,000) and preprocessing on all cores (4,000).
    at_64 = by_name["/predict at 64 clients >= 0.8 x min(engine, in-process preprocessing) (square)"]
    assert (at_64.value, at_64.limit, at_64.met) == (0.9, 0.8, True)
    at_256 = by_name["/predict at 256 clients >= 0.8 x min(engine, in-process preprocessing) (square)"]
    assert (at_256.value, at_256.met) == (0.775, False)


def test_a_quick_run_names_the_concurrencies_it_measured() -> None:
    report = {
        "engine": {"square": {"batches": [{"images_per_s": 80.0}]}},
        "in_process": {"square": {"images_per_s": 120.0}},
        "http": {"square": {"points": [_point(1, 20, 45), _point(16, 60, 250)]}},
    }
    names = [t.target for t in targets(report)]
    assert "/predict at 16 clients >= 3,500 images/s (square)" in names
    relative = "/predict at 16 clients >= 0.8 x min(engine, in-process preprocessing) (square)"
    assert next(t for t in targets(report) if t.target == relative).value == 0.75


@pytest.mark.slow
def test_quick_run_reports_the_host_side_of_every_point(tmp_path: Path) -> None:
    args = ["--quick", "--providers", "CPUExecutionProvider"]
    _, report = run_report("benchmarks.gpu_check", args, tmp_path, timeout=900)
    assert report["in_process"]["square"]["images_per_s"] > 0
    http = report["http"]["square"]
    assert http["alexnet_workers"] == "unset"
    assert http["memory_by_kind"]["front"]["processes"] >= 1
    assert http["memory_by_kind"]["engine"]["processes"] == 1
    for point in http["points"]:
        assert point["statuses"] == {"200": point["requests"]}
        assert 0 < point["host_cpu_busy_pct"] <= 100
        assert {"front", "engine", "decode"} <= set(point["cpu_ms_per_image_by_kind"])
        assert point["engine_mean_batch"] >= 1
    assert [p["concurrency"] for p in http["points"]] == [1, 16]
    assert len(report["targets"]) == 3  # p50 at 1 client; absolute and relative at 16 clients
