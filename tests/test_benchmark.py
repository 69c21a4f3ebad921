"""benchmarks/benchmark.py: the whole program once in --quick mode (slow), and its bookkeeping;
benchmarks/paper_digits.py once on barely trained digits checkpoints (slow)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.e2e import ratios_and_targets
from benchmarks.load import Outcome, summarise
from benchmarks.paper_digits import changes
from benchmarks.paper_digits import main as paper_digits
from benchmarks.report import Report, human
from model_export.train import main as train
from tests.digits import write_digits
from tests.processes import run_report

SECTIONS = ("meta", "raw_ort", "torch", "preprocess", "e2e", "overload", "precision", "ratios", "targets")


def numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


@pytest.mark.slow
def test_quick_run_reports_every_section(imagenet_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "--quick", "--requests", "4",
        "--model", str(imagenet_model_dir / "alexnet-random.onnx"), "--providers", "CPUExecutionProvider",
        "--json",
    ]  # fmt: skip
    done, report = run_report("benchmarks.benchmark", args, tmp_path, timeout=600)
    assert json.loads(done.stdout) == report
    assert all(section in report for section in SECTIONS), report.keys()
    assert all(math.isfinite(n) for n in numbers(report))  # no NaN or inf anywhere

    raw = report["raw_ort"]
    assert raw["providers"] == ["CPUExecutionProvider"]
    assert [c["before"] for c in raw["rechecks"]] == ["batching_on", "batching_off", "overload"]
    assert [b["crops"] for b in raw["batches"]] == [10, 40, 80]
    assert all(b["ms_per_call"] > 0 and b["images_per_s"] > 0 for b in raw["batches"])
    torch = report["torch"]
    assert torch["same_weights"] and torch["max_abs_logit_diff_vs_ort"] < 1e-3
    assert all(row["torch_ms_per_call"] > 0 and row["ort_ms_per_call"] > 0 for row in torch["batches"])
    assert report["preprocess"]["large"]["width"] * report["preprocess"]["large"]["height"] == 12_000_000
    assert all(p["total_ms"] > 0 for p in report["preprocess"].values())

    for mode in ("batching_on", "batching_off"):
        run = report["e2e"][mode]
        assert run["providers"] == ["CPUExecutionProvider"]
        points = {(p["image"], p["concurrency"]): p for p in run["points"]}
        assert set(points) == {(i, c) for i in ("small", "large") for c in (1, 4, 16)}
        for point in points.values():
            assert point["ok"] == point["requests"] == 4 and point["errors"] == {}, point
            assert point["images_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"] <= point["max_ms"]
    assert report["e2e"]["batching_off"]["settings"] == {"ALEXNET_BATCHING": "false"}
    assert all(p["mean_batch_images"] == 1 for p in report["e2e"]["batching_off"]["points"])

    overload = report["overload"]
    assert overload["requests"] >= overload["concurrency"] == 64
    assert overload["errors"].get("503", 0) > 0  # a queue of 8 images cannot take 64 clients
    assert set(overload["errors"]) <= {"503"}  # refused with 503, never failed otherwise
    assert overload["recovery"]["first_status"] == 200

    variants = report["precision"]["variants"]
    assert variants["int8"]["mib"] < 0.4 * (imagenet_model_dir / "alexnet-random.onnx").stat().st_size / 2**20
    assert 0 <= variants["int8"]["top1_agreement"] <= 1
    assert all(v["ms_per_call"]["10"] > 0 for v in variants.values())

    assert {"raw_best_images_per_s", "preprocess_12mp_over_10crop_inference"} <= set(report["ratios"])
    assert len(report["targets"]) >= 8
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_summary_counts_statuses_and_latencies() -> None:
    timings = {"decode_ms": 2.0, "preprocess_ms": 3.0, "inference_ms": 70.0, "batch_images": 2}
    outcomes = [Outcome(200, s / 1000, timings) for s in (100, 110, 120, 130, 140)]
    outcomes += [Outcome(503, 0.005, detail="server busy"), Outcome("exc:ReadTimeout", 60.0)]
    summary = summarise(outcomes, wall_s=1.0)
    assert summary.requests == 7 and summary.ok == 5
    assert summary.errors == {"503": 1, "exc:ReadTimeout": 1}
    assert summary.images_per_s == 5.0
    assert summary.p50_ms == 120.0 and summary.max_ms == 140.0  # successful requests only
    assert summary.server_inference_ms == 70.0 and summary.mean_batch_images == 2.0


def test_ensemble_changes_count_images_both_ways() -> None:
    member = np.array([True, True, False, False, True])
    ensemble = np.array([True, False, True, True, True])
    assert changes(member, ensemble) == {"wrong_to_right": 2, "right_to_wrong": 1}
    assert changes(ensemble, ensemble) == {"wrong_to_right": 0, "right_to_wrong": 0}


@pytest.mark.slow
def test_paper_digits_compares_an_ensemble_with_its_members(tmp_path: Path) -> None:
    digits = write_digits(tmp_path / "digits", size=32)
    checkpoints = []
    for seed in (0, 1):  # one step each: the figures are meaningless, the bookkeeping is not
        run = tmp_path / f"s{seed}"
        assert train([
            str(digits.root), "--out", str(run), "--seed", str(seed), "--input-size", "64", "--resize-size",
            "73", "--batch-size", "16", "--limit-train-batches", "1", "--epochs", "1", "--no-export",
            "--no-progress", "--stats-images", "32",
        ]) == 0  # fmt: skip
        checkpoints.append(str(run / "checkpoint.pt"))
    report = tmp_path / "report.json"  # not stdout: the ONNX exporter prints there too
    assert paper_digits([str(digits.root), *checkpoints, "--per-class", "2", "--out", str(report)]) == 0
    out = json.loads(report.read_text())
    assert out["images"] == {"val": 20, "held_out": 20}
    assert (out["feature_search"]["gallery"], out["feature_search"]["queries"]) == (20, 20)
    ensemble = out["ensemble"]
    assert ensemble["ms_per_image"] > 0 and len(out["members"]) == 2
    for split in ("val", "held_out"):
        for member, moved in zip(out["members"], ensemble[f"{split}_against_members"], strict=True):
            gained = round(20 * ensemble[f"{split}_top1"]) - round(20 * member[f"{split}_top1"])
            assert moved["wrong_to_right"] - moved["right_to_wrong"] == gained, (split, member, moved)


def test_targets_compare_within_the_run() -> None:
    def point(image: str, concurrency: int, images_per_s: float, p50_ms: float) -> dict[str, object]:
        return {
            "image": image,
            "concurrency": concurrency,
            "ok": 1,
            "errors": {},
            "images_per_s": images_per_s,
            "p50_ms": p50_ms,
            "p95_ms": p50_ms,
            "p99_ms": p50_ms,
            "mean_batch_images": 1.0,
            "requests": 1,
            "wall_s": 1.0,
        }

    def batch(crops: int, ms_per_call: float, images_per_s: float) -> dict[str, object]:
        images = crops / 10
        ms_per_image = ms_per_call / images
        timing = {"ms_per_call": ms_per_call, "ms_per_call_best": ms_per_call, "ms_per_image": ms_per_image}
        return {"crops": crops, "images": images, "calls": 3, "images_per_s": images_per_s, **timing}

    values: dict[str, object] = {
        "meta": {"machine": "test", "model": "m.onnx", "compare_batches": [10]},
        "raw_ort": {
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 0,
            "providers_requested": ["CPUExecutionProvider"],
            "best_images_per_s": 15.0,
            "best_crops": 80,
            "batches": [batch(10, 75.0, 13.3), batch(80, 533.0, 15.0)],
            # The engine measured again right before the server ran: the reference for its ratios.
            "rechecks": [
                {"before": "batching_on", "batches": [batch(10, 70.0, 14.3), batch(80, 516.0, 15.5)]}
            ],
        },
        "preprocess": {
            "small": {
                "width": 640,
                "height": 427,
                "bytes": 1,
                "reps": 1,
                "decode_ms": 1,
                "resize_crop_ms": 3,
                "total_ms": 4.0,
            },
            "large": {
                "width": 4000,
                "height": 3000,
                "bytes": 1,
                "reps": 1,
                "decode_ms": 38,
                "resize_crop_ms": 2,
                "total_ms": 40.0,
            },
        },
        "e2e": {
            "batching_on": {
                "points": [
                    point("small", 1, 11.0, 88.0),
                    point("small", 4, 14.0, 280.0),
                    point("small", 16, 12.0, 1),
                ]
            }
        },
    }
    report = Report.model_validate(values)
    ratios, targets = ratios_and_targets(report)
    assert ratios["e2e_over_raw_batching_on_small_c4"] == pytest.approx(14 / 15.5, abs=1e-3)
    assert ratios["raw_10crop_ms"] == 70.0
    met = {t.target: t.met for t in targets}
    assert met["e2e/raw throughput >= 0.90 (batching_on, small, conc 4)"] is True
    assert met["e2e/raw throughput >= 0.90 (batching_on, small, conc 16)"] is False  # 12 / 15.5
    assert met["12 MP preprocessing <= 0.25 x 10-crop inference"] is False  # 40 / 70
    assert (
        met["p50 at conc 1 <= raw 10-crop + preprocessing + 10 ms (small, batching on)"]
        is False  # 88 > 70 + 4 + 10
    )  # 88 <= 89
    text = human(report.model_copy(update={"ratios": ratios, "targets": targets}))
    assert "MISSED" in text and "[met]" in text
