"""alexnet-train end to end on scikit-learn's digits (real images, no download), and its data
pipeline. Step counts, not seconds, bound the runs: these machines vary by +-30 % and more."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_core.pipeline import ten_crop
from alexnet_core.session import OnnxClassifier
from alexnet_core.training import ExitCode, TrainConfig
from model_export.data import (
    ColourStatistics,
    DatasetError,
    ImageFolderDataset,
    PcaLighting,
    colour_statistics,
    find_classes,
    list_images,
    load_square,
)
from model_export.schedule import make_scheduler
from model_export.train import main
from model_export.weights import load_checkpoint
from tests.digits import CLASS_NAMES, DigitsFolder, write_digits

REPO = Path(__file__).resolve().parent.parent
# 64 px crops of a 73 px square: small enough for a CPU, and the size at which the measured
# runs learn (at 224 px the same recipe collapses on digits).
SMALL = ["--input-size", "64", "--resize-size", "73", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFolder:
    return write_digits(tmp_path_factory.mktemp("digits"), size=32)


def records(run: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a poll may catch the last one half-written)."""
    text = (run / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def of(kind: str, rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["event"] == kind]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part") or p.name.startswith(".export-")]


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.long
def test_learns_digits_and_exports_a_validated_model(digits: DigitsFolder, tmp_path: Path) -> None:
    run, weights_dir = tmp_path / "run", tmp_path / "weights"
    # Digits are not mirror-symmetric, so flips only slow learning down: off here, as a user would.
    # The paper's layout, which the step bound below was measured with (the default is torchvision's).
    code = main([
        str(digits.root), "--out", str(run), "--weights-dir", str(weights_dir), *SMALL, "--no-flip",
        "--layout", "paper", "--epochs", "12", "--stop-at-top1", "0.9", "--log-every", "1", "--seed", "0",
    ])  # fmt: skip
    assert code == 0
    rows = records(run)
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "done"
    start, epochs, steps, done = rows[0], of("epoch", rows), of("step", rows), rows[-1]
    assert start["steps_per_epoch"] == digits.train // 64
    assert start["total_steps"] == 12 * start["steps_per_epoch"]
    assert [s["step"] for s in steps] == list(range(1, epochs[-1]["step"] + 1))
    assert all(np.isfinite(s["loss"]) and s["lr"] == 0.01 and s["images_per_s"] > 0 for s in steps)
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    # The goal, within at most 12 epochs = 264 steps (measured: 132-242).
    assert epochs[-1]["val_top1"] >= 0.9
    assert epochs[0]["val_top1"] < 0.5  # it really learned here, from chance
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    print(f"\ndigits: {epochs[-1]['step']} steps, {len(epochs)} epochs, "
          f"{np.median([e['seconds'] for e in epochs]):.1f} s/epoch, top-1 {epochs[-1]['val_top1']:.3f}, "
          f"ten-crop {done['val10_top1']:.3f}")  # fmt: skip

    # The checkpoint: the format model_export.weights reads, recording the run's normalisation.
    content = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert content["epoch"] == len(epochs) and content["global_step"] == epochs[-1]["step"]
    assert content["class_names"] == CLASS_NAMES
    assert content["std"] == pytest.approx([1 / 255] * 3)  # the paper's 0-255 minus the mean
    mean = colour_statistics(list_images(digits.root / "train", CLASS_NAMES), 73).mean
    assert content["mean"] == pytest.approx(mean.tolist())
    assert (content["input_size"], content["resize_size"]) == (64, 73)
    assert content["validation_top1"] == epochs[-1]["val_top1"]
    assert content["config"]["init"] == "caffe"
    loaded = load_checkpoint(run / "checkpoint.pt")
    assert loaded.classes.labels == CLASS_NAMES and loaded.mean == tuple(content["mean"])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The exported model: in place atomically (nothing half-written left), carrying its ten-crop
    # accuracy measured through the service's own path.
    (model_path,) = weights_dir.glob("*.onnx")
    assert leftovers(weights_dir) == [] and leftovers(run) == []
    assert done["model"] == str(model_path) and done["val10_images"] == digits.val
    classifier = OnnxClassifier(model_path, providers=["CPUExecutionProvider"])
    meta = classifier.metadata
    assert meta.version == done["version"] == model_path.stem
    assert meta.labels == CLASS_NAMES and meta.trained
    assert (meta.input_size, meta.resize_size) == (64, 73)
    assert meta.mean == pytest.approx(content["mean"]) and meta.std == pytest.approx(content["std"])
    assert meta.validation_top1 == done["val10_top1"] and meta.validation_top5 == done["val10_top5"]
    # This run (--no-flip) never saw a mirror: it is validated and served with the five crops alone.
    assert (meta.train_flip, meta.test_crops) == (False, 5)
    assert meta.validation_top1 >= 0.8

    # Images neither split contains, as the service would classify them.
    correct = total = 0
    for name, paths in digits.held_out.items():
        for path in paths:
            # The model's own input (the square kind by default: the crops are made in its graph).
            batch = meta.preprocess(path.read_bytes(), max_pixels=10**6).batch
            correct += meta.labels[int(classifier.probabilities(batch).argmax())] == name
            total += 1
    assert correct / total >= 0.7


def test_divergence_stops_with_a_clear_error(
    digits: DigitsFolder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main([str(digits.root), "--out", str(run), *SMALL, "--lr", "1e3", "--epochs", "1",
                 "--log-every", "1", "--no-export"])  # fmt: skip
    assert code == ExitCode.DIVERGED
    error = capsys.readouterr().err
    assert "training diverged at epoch 1 step" in error and "lower --lr" in error
    last = records(run)[-1]
    assert last["event"] == "error" and last["kind"] == "diverged" and last["message"] in error
    assert len(of("step", records(run))) <= 5  # caught at once, not at the end of the epoch
    assert not (run / "checkpoint.pt").exists()


def test_several_workers_need_a_ray_cluster(
    digits: DigitsFolder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([str(digits.root), "--out", str(tmp_path / "run"), *SMALL, "--ray-workers", "2"])
    assert exited.value.code == ExitCode.USAGE
    assert "2 workers need a Ray cluster: pass --ray ADDRESS" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.long
def test_resume_continues_the_epoch_count(digits: DigitsFolder, tmp_path: Path) -> None:
    run, straight = tmp_path / "run", tmp_path / "straight"
    common = [str(digits.root), *SMALL, "--limit-train-batches", "2", "--log-every", "1", "--no-export"]
    assert main([*common, "--out", str(run), "--epochs", "1"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # A second fresh start would overwrite the run: refused.
    assert main([*common, "--out", str(run), "--epochs", "2"]) == ExitCode.ERROR
    assert main([*common, "--out", str(run), "--epochs", "2", "--resume"]) == 0

    rows = records(run)
    assert [r["resumed"] for r in of("start", rows)] == [False, True]
    assert of("start", rows)[1]["start_epoch"] == 1
    assert [e["epoch"] for e in of("epoch", rows)] == [1, 2]
    assert [s["step"] for s in of("step", rows)] == [1, 2, 3, 4]
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"], len(resumed["history"])) == (2, 4, 2)

    # Each epoch is seeded by (seed, epoch): resuming gives the uninterrupted run's weights.
    assert main([*common, "--out", str(straight), "--epochs", "2"]) == 0
    uninterrupted = torch.load(straight / "checkpoint.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.long
def test_sigterm_cancels_within_a_batch_and_keeps_the_checkpoint(
    digits: DigitsFolder, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "model_export.train", str(digits.root), "--out", str(run), *SMALL,
         "--epochs", "50", "--limit-train-batches", "8", "--log-every", "1", "--no-export"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen_step = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            rows = records(run) if (run / "metrics.jsonl").exists() else []
            steps = of("step", rows)
            # Wait for the first epoch's checkpoint, then for the second epoch to be under way.
            if of("epoch", rows) and steps and steps[-1]["epoch"] == 2:
                seen_step = steps[-1]["step"]
                break
            time.sleep(0.05)
        assert seen_step, "training did not reach its second epoch"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == ExitCode.CANCELLED, stderr
    last = records(run)[-1]
    assert last["event"] == "cancelled" and last["epoch"] == 1
    assert last["step"] <= seen_step + 2 < 16  # within a batch or so, well before the epoch's end
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert load_checkpoint(run / "checkpoint.pt").classes.labels == CLASS_NAMES
    assert leftovers(run) == []


@pytest.mark.long
def test_two_process_data_parallel_run(digits: DigitsFolder, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "model_export.train", str(digits.root), "--out", str(run), "--input-size", "64",
         "--resize-size", "73", "--batch-size", "32", "--epochs", "1", "--limit-train-batches", "2",
         "--log-every", "1", "--no-export", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(run)
    # One writer: a second rank writing would duplicate these records.
    assert [r["event"] for r in rows] == ["start", "step", "step", "epoch", "done"]
    assert rows[0]["world_size"] == 2 and rows[0]["val_images"] == digits.val
    assert np.isfinite(of("epoch", rows)[0]["val_loss"])
    assert load_checkpoint(run / "checkpoint.pt").classes.labels == CLASS_NAMES  # no DDP "module." keys


# --- data pipeline -------------------------------------------------------------------------------


def colour_folder(root: Path, count: int = 40, size: int = 24, seed: int = 0) -> np.ndarray:
    """Images of correlated RGB noise in two classes; returns the covariance they were drawn with."""
    rng = np.random.default_rng(seed)
    mixing = np.array([[40.0, 0, 0], [30, 20, 0], [10, -15, 8]])
    for i in range(count):
        pixels = rng.standard_normal((size, size, 3)) @ mixing.T + np.array([120.0, 110, 100])
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return mixing @ mixing.T


def test_colour_statistics_are_those_of_the_training_squares(tmp_path: Path) -> None:
    covariance = colour_folder(tmp_path)
    samples = list_images(tmp_path / "train", find_classes(tmp_path / "train"))
    stats = colour_statistics(samples, resize=24)
    pixels = np.concatenate([load_square(p, 24).reshape(-1, 3) for p, _ in samples]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0) / 255, rtol=1e-9)
    np.testing.assert_allclose(stats.covariance, np.cov(pixels.T, bias=True), rtol=1e-6)
    np.testing.assert_allclose(stats.covariance, covariance, rtol=0.1, atol=15)  # what was drawn
    lighting = stats.lighting()
    assert list(lighting.eigenvalues) == sorted(lighting.eigenvalues, reverse=True)
    vectors, values = lighting.eigenvectors, lighting.eigenvalues
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, stats.covariance, atol=1e-6)


def test_pca_lighting_shifts_along_the_principal_axes() -> None:
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    covariance = rotation @ np.diag([900.0, 100.0, 4.0]) @ rotation.T
    lighting = ColourStatistics(np.zeros(3), covariance, 1).lighting()
    torch.manual_seed(0)
    shifts = np.stack([lighting.random_shift() for _ in range(20000)]).astype(np.float64)
    along = shifts @ lighting.eigenvectors  # coordinates on p1, p2, p3
    # std of a_i * sqrt(lambda_i): 0.1 * (30, 10, 2) grey levels, independent of each other.
    np.testing.assert_allclose(along.std(axis=0), [3.0, 1.0, 0.2], rtol=0.03)
    np.testing.assert_allclose(along.mean(axis=0), 0, atol=0.05)
    correlation = np.corrcoef(along.T)
    np.testing.assert_allclose(correlation[~np.eye(3, dtype=bool)], 0, atol=0.03)


def test_lighting_adds_one_colour_to_the_whole_image() -> None:
    square = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    lighting = PcaLighting(np.array([400.0, 25.0, 1.0]), np.eye(3))
    options = {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [1 / 255] * 3}
    plain = ImageFolderDataset([], train=True, flip=False, **options).transform(square)
    lit = ImageFolderDataset([], train=True, flip=False, lighting=lighting, **options).transform(square)
    difference = (lit - plain).numpy()  # std 1/255: the difference is in grey levels
    assert np.ptp(difference, axis=(1, 2)) == pytest.approx([0, 0, 0], abs=1e-3)
    assert np.abs(difference).max() > 0


def test_flip_is_random_and_switchable_and_validation_is_the_services_centre_crop() -> None:
    square = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    expected = ten_crop(square, 20, mean, std)[0]  # crop == resize: the whole square, unflipped
    torch.manual_seed(0)
    for flip, lower, upper in ((True, 70, 130), (False, 0, 0)):
        dataset = ImageFolderDataset([], resize=20, crop=20, mean=mean, std=std, train=True, flip=flip)
        mirrored = 0
        for _ in range(200):
            out = dataset.transform(square).numpy()
            if not np.array_equal(out, expected):
                np.testing.assert_array_equal(out, expected[:, :, ::-1])
                mirrored += 1
        assert lower <= mirrored <= upper, (flip, mirrored)

    validation = ImageFolderDataset([], resize=20, crop=12, mean=mean, std=std, train=False)
    np.testing.assert_array_equal(validation.transform(square).numpy(), ten_crop(square, 12, mean, std)[4])


def test_random_crops_are_windows_of_the_square() -> None:
    square = np.random.default_rng(4).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    dataset = ImageFolderDataset(
        [], resize=20, crop=15, mean=[0] * 3, std=[1 / 255] * 3, train=True, flip=False
    )
    corners = set()
    torch.manual_seed(0)
    for _ in range(100):
        out = dataset.transform(square).numpy().transpose(1, 2, 0)  # back in grey levels
        matches = [(top, left) for top in range(6) for left in range(6)
                   if np.abs(out - square[top : top + 15, left : left + 15]).max() < 1e-3]  # fmt: skip
        assert len(matches) == 1
        corners.add(matches[0])
    assert len(corners) > 15  # of the 36 possible windows


def test_class_folders(tmp_path: Path) -> None:
    for split, name in (("train", "cat"), ("train", "ant"), ("val", "cat"), ("val", "dog")):
        (tmp_path / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    classes = find_classes(tmp_path / "train")
    assert classes == ["ant", "cat"]
    assert list_images(tmp_path / "train", classes) == [
        (tmp_path / "train" / "ant" / "x.png", 0), (tmp_path / "train" / "cat" / "x.png", 1),
    ]  # fmt: skip
    with pytest.raises(DatasetError, match="dog"):
        list_images(tmp_path / "val", classes)


# --- learning-rate schedules ---------------------------------------------------------------------


def schedule_args(**overrides: object) -> TrainConfig:
    values = {"lr": 0.01, "lr_schedule": None, "plateau_patience": 1, "max_lr_reductions": 3}
    return TrainConfig.model_validate(values | overrides)


def test_explicit_lr_schedule_by_epoch() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = make_scheduler(optimizer, schedule_args(lr_schedule="0:5e-4,2:2e-4,5:5e-5,9:1e-5"))
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([5e-4, 5e-4, 2e-4, 2e-4, 2e-4, 5e-5, 5e-5, 5e-5, 5e-5, 1e-5, 1e-5])


def test_plateau_divides_by_ten_on_a_flat_validation_loss_at_most_three_times() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = make_scheduler(optimizer, schedule_args())
    rates = []
    for loss in [2.0, 1.5, 1.0, 1.0, 1.0, *[1.0] * 15]:  # improving, then flat
        optimizer.step()
        scheduler.step(loss)  # type: ignore[arg-type]
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:4] == pytest.approx([0.01] * 4)  # patience 1: the second flat evaluation cuts
    assert rates[4] == pytest.approx(1e-3)
    assert sorted(set(np.round(np.log10(rates), 6))) == [-5, -4, -3, -2]
    assert rates[-1] == pytest.approx(1e-5)
