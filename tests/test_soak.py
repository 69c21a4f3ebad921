"""Smoke test of ``python -m benchmarks.soak``: a few seconds of its mix at low concurrency.

Too short for its growth checks to mean anything (pools and arenas still fill after a 3-second
warm-up), so those are not asserted here; the 10-minute run is (see benchmarks/soak.py)."""

from pathlib import Path

import pytest

from tests.processes import run_report


@pytest.mark.long
def test_soak_smoke(imagenet_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "--minutes", "0.1", "--concurrency", "4",
        "--warm-up-s", "3", "--settle-s", "1", "--model", str(imagenet_model_dir / "alexnet-random.onnx"),
    ]  # fmt: skip
    run, report = run_report("benchmarks.soak", args, tmp_path, timeout=180, codes=(0, 1))
    assert "p99 ms" in run.stdout and "RSS MiB" in run.stdout
    assert report["requests"] > 20 and report["served_200"] > 5
    assert not [s for s in report["by_status"] if s.startswith("5")], report["by_status"]
    assert report["unexpected"] == {}, report["unexpected"]
    hostile = {"random-bytes", "truncated-jpeg", "png-bomb-header", "too-many-files", "svg", "empty-file"}
    assert hostile & set(report["by_kind"]), report["by_kind"]
    assert set(report["process"]) == {"start", "after_warm_up", "middle", "end"}
    assert report["process"]["end"]["fds"] <= report["process"]["after_warm_up"]["fds"]
    short_run_noise = ("RSS under load grew", "threads grew")
    assert all(f.startswith(short_run_noise) for f in report["failures"]), report["failures"]
    assert report["per_minute"] and report["per_minute"][0]["p99_ms_200"] > 0
