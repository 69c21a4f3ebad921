"""Fault injection: what the service does when its parts die, its files are corrupt, the disk is
full, clients vanish mid-upload, or it is told to stop while it works.

Real processes throughout: servers started as subprocesses (``python -c "from service.main import
run; run()"``, configured by ALEXNET_* variables) where the test kills or signals them, trainers
started by the service or directly, killed with real signals; a full disk is a real file-size
limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG) and, where this process may
mount one, a real full tmpfs (ENOSPC).
"""

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
import torch

from service.training_jobs import JobStore, read_metrics
from tests.conftest import cpu_settings, serve
from tests.digits import write_digits
from tests.images import big_photo_jpeg, photo_jpeg
from tests.processes import ServerProcess, alive, link_model, server_subprocess, wait_until

REPO = Path(__file__).resolve().parent.parent
KEY = "fault-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# ~0.5 s per step on 2 cores; 400 training images = 6 steps an epoch, 100 validation images.
TRAIN = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73}
TRAIN_ARGS = ["--batch-size", "64", "--input-size", "64", "--resize-size", "73", "--no-progress"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits, cut to 40 training and 10 validation images per class: epochs of a
    few seconds, so that a test can reach the middle of its second epoch quickly."""
    root = tmp_path_factory.mktemp("fault-data")
    write_digits(root / "digits", size=32)
    for split, keep in (("train", 40), ("val", 10)):
        for folder in (root / "digits" / split).iterdir():
            for extra in sorted(folder.iterdir())[keep:]:
                extra.unlink()
    return root


def fault_server(
    weights: Path, tmp: Path, data_root: Path | None = None, **settings: object
) -> AbstractContextManager[ServerProcess]:
    """A server subprocess with this module's key, for the tests that kill or signal it."""
    return server_subprocess(weights, tmp, data_root, api_key=KEY, **settings)


def records(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r.get("event") == event]


def trainer_pid(weights: Path, job_id: str) -> int:
    store = JobStore(weights / "jobs.sqlite3")  # the service's own record of the process
    try:
        job = store.get(job_id)
    finally:
        store.close()
    assert job is not None and job.pid is not None
    return job.pid


# --------------------------------------------------------------------------- (a) trainer killed


@pytest.mark.long
def test_trainer_killed_mid_epoch_fails_the_job_keeps_its_checkpoint(
    imagenet_model_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    link_model(imagenet_model_dir, weights)
    settings = cpu_settings(weights, data_root=data_root, api_key=KEY)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        job = api.post("/train", json={**TRAIN, "epochs": 4}, headers=AUTH).json()
        run_dir = weights / "runs" / job["id"]
        wait_until(lambda: records(run_dir, "epoch"), 300, "the first epoch's checkpoint")
        time.sleep(1.0)  # into the second epoch's steps
        pid = trainer_pid(weights, job["id"])
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does: no handler, no last words

        final = wait_until(
            lambda: (j := api.get(job["url"]).json())["state"] not in ("queued", "running") and j,
            60,
            "failed",
        )
        assert final["state"] == "failed"
        assert "SIGKILL" in final["error"] and "resume" in final["error"], final["error"]
        # The checkpoint is whole and is the last completed epoch's.
        checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert checkpoint["epoch"] == records(run_dir, "epoch")[-1]["epoch"] >= 1
        assert sorted(p.name for p in weights.glob("*.onnx")) == ["alexnet-random.onnx"]  # nothing exported
        # The server did not notice beyond the job's record.
        assert api.get("/health").status_code == 200
        assert api.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
        assert api.post(f"{job['url']}/resume", headers=AUTH).status_code == 202  # and it resumes
        assert api.delete(job["url"], headers=AUTH).status_code in (202, 409)
        wait_until(lambda: api.get(job["url"]).json()["state"] not in ("queued", "running"), 120, "stopped")


# --------------------------------------------------------------------------- (b) server killed


@pytest.mark.long
def test_server_killed_mid_training_restart_interrupts_and_resumes(data_root: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    with (
        fault_server(weights, tmp_path, data_root) as server,
        httpx.Client(timeout=60) as api,
    ):
        job = api.post(f"{server.url}/train", json={**TRAIN, "epochs": 6}, headers=AUTH).json()
        run_dir = weights / "runs" / job["id"]
        wait_until(lambda: records(run_dir, "epoch"), 300, "the first epoch")
        before = api.get(f"{server.url}{job['url']}").json()
        pid = trainer_pid(weights, job["id"])
        assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()  # it needs no API key
        server.proc.send_signal(signal.SIGKILL)  # no lifespan shutdown: the trainer is orphaned
        server.proc.wait(timeout=30)
    assert alive(pid), "the trainer outlives its server"
    # Keep the orphan from stopping at once, as a trainer in the middle of a long batch would:
    # the signal the new server sends waits until it runs again.
    os.kill(pid, signal.SIGSTOP)
    try:
        with (
            fault_server(weights, tmp_path, data_root) as server,
            httpx.Client(timeout=60) as api,
        ):
            after = api.get(f"{server.url}{job['url']}").json()
            assert after["state"] == "interrupted" and "resume" in after["error"]
            for key in ("id", "created_at", "started_at", "request", "epochs"):
                assert after[key] == before[key], key
            assert (
                after["epoch"] >= 1
                and len(api.get(f"{server.url}{job['url']}/metrics").json()["epochs"]) >= 1
            )
            assert [j["id"] for j in api.get(f"{server.url}/train").json()] == [job["id"]]
            # Two trainers on one run folder would race: refused while the orphan is still there.
            early = api.post(f"{server.url}{job['url']}/resume", headers=AUTH)
            assert early.status_code == 409 and "still stopping" in early.json()["detail"]

            os.kill(pid, signal.SIGCONT)
            wait_until(lambda: not alive(pid), 60, "the orphaned trainer to stop")
            cancelled = records(run_dir, "cancelled")  # it stopped because the new server said so
            assert cancelled and cancelled[-1]["signal"] == signal.SIGTERM

            resumed = api.post(f"{server.url}{job['url']}/resume", headers=AUTH)
            assert resumed.status_code == 202, resumed.text
            wait_until(
                lambda: [r for r in records(run_dir, "start") if r.get("resumed")], 120, "a resumed run"
            )
            assert api.get(f"{server.url}{job['url']}").json()["state"] == "running"
            assert api.delete(f"{server.url}{job['url']}", headers=AUTH).status_code == 202
            final = wait_until(
                lambda: (j := api.get(f"{server.url}{job['url']}").json())["state"] != "running" and j,
                120,
                "cancel",
            )
            assert final["state"] == "cancelled"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def test_cancel_before_the_trainer_is_up_is_a_cancel(data_root: Path, tmp_path: Path) -> None:
    # The SIGTERM arrives while the trainer still imports torch, before its handler exists: it
    # dies of the signal (exit -15) instead of exiting 130. Still a cancel, not a failure.
    settings = cpu_settings(tmp_path / "weights", data_root=data_root, api_key=KEY)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        job = api.post("/train", json={**TRAIN, "epochs": 2}, headers=AUTH).json()
        wait_until(lambda: api.get(job["url"]).json()["state"] == "running", 30, "running", 0.02)
        assert api.delete(job["url"], headers=AUTH).status_code == 202
        final = wait_until(
            lambda: (j := api.get(job["url"]).json())["state"] != "running" and j, 60, "stopped"
        )
        assert final["state"] == "cancelled", final


# --------------------------------------------------------------------------- (c) corrupt models


def corrupt_models(good: Path, folder: Path) -> dict[str, bytes]:
    """Damaged model files of several kinds, each newer than ``good``."""
    data = good.read_bytes()
    no_meta = onnx.load(good)
    del no_meta.metadata_props[:]  # a real ONNX model, but not one exported by alexnet-export
    bad_meta = onnx.load(good)
    onnx.helper.set_model_props(bad_meta, {"format": '"alexnet-serve/1"', "labels": "not json"})
    flipped = bytearray(data[:4096])
    for i in range(0, 4096, 7):
        flipped[i] ^= 0xFF  # the protobuf header and graph structure scrambled
    return {
        "empty": b"",
        "truncated-header": data[:1000],
        "truncated-weights": data[: len(data) // 2],
        "scrambled-structure": bytes(flipped) + data[4096:],
        "random-bytes": os.urandom(65536),
        "no-metadata": no_meta.SerializeToString(),
        "bad-metadata": bad_meta.SerializeToString(),
    }


def test_corrupt_model_files_are_never_served(imagenet_model_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    good = link_model(imagenet_model_dir, weights, "good.onnx")
    os.utime(good, (1_000_000_000, 1_000_000_000))  # the oldest: every corrupt file is newer
    for name, data in corrupt_models(good, weights).items():
        (weights / f"{name}.onnx").write_bytes(data)
    (weights / ".half-written.onnx.x1y2.part").write_bytes(good.read_bytes()[:5000])  # an export in flight
    # At start-up the newest files are tried first: every one of them is skipped.
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as api:
        model = api.get("/model").json()
        assert model["file"] == "good.onnx"
        assert ".half-written" not in " ".join(model["available_versions"])
        for name in corrupt_models(good, weights):
            response = api.post("/model/activate", json={"version": name}, headers=AUTH)
            assert response.status_code == 422, (name, response.text)
            assert "cannot be loaded" in response.json()["detail"]
            assert api.get("/model").json()["sha256"] == model["sha256"]
        assert api.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
    assert not (weights / "ACTIVE").exists()  # no failed activation was recorded for a restart
    # A pointer to a corrupt file (left by an operator, or a file damaged after activation).
    (weights / "ACTIVE").write_text("truncated-weights.onnx")
    with serve(cpu_settings(weights, model=None)) as url:
        assert httpx.get(f"{url}/model").json()["file"] == "good.onnx"
    with serve(cpu_settings(weights, model="random-bytes")) as url:
        assert httpx.get(f"{url}/model").json()["file"] == "good.onnx"


# --------------------------------------------------------------------------- (d) disk full


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG, as on a disk that is full."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.fixture(scope="module")
def one_epoch_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a one-epoch checkpoint (about 450 MB: weights and SGD momentum)."""
    out = tmp_path_factory.mktemp("run") / "run"
    command = [sys.executable, "-m", "model_export.train", str(data_root / "digits"), "--out", str(out),
               "--epochs", "1", "--no-export", *TRAIN_ARGS]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, timeout=600)
    return out


@pytest.mark.long
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    one_epoch_run: Path, data_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    before = (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns, checkpoint.stat().st_size)
    command = [sys.executable, "-m", "model_export.train", str(data_root / "digits"), "--out", str(run_dir),
               "--resume", "--epochs", "2", "--no-export", *TRAIN_ARGS]  # fmt: skip
    run = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=file_size_limit(100 * 2**20),
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "cannot write" in run.stderr and "checkpoint.pt" in run.stderr and "is kept" in run.stderr
    error = records(run_dir, "error")[-1]["message"]
    assert "cannot write" in error  # what GET /train/{id} shows for a job
    after = (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns, checkpoint.stat().st_size)
    assert after == before  # the epoch-1 checkpoint, untouched
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl"]


def export_command(weights: Path) -> list[str]:
    return [sys.executable, "-m", "model_export.cli", "--source", "random", "--layout", "torchvision",
            "--weights-dir", str(weights)]  # fmt: skip


def check_failed_export(run: subprocess.CompletedProcess[str], weights: Path, reason: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "alexnet-export: error: cannot write the model" in run.stderr and reason in run.stderr
    assert list(weights.iterdir()) == []  # no *.onnx the service could pick up, no temp file


def test_disk_full_during_export_leaves_nothing_behind(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    run = subprocess.run(
        export_command(weights), cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=file_size_limit(50 * 2**20),
    )  # fmt: skip
    check_failed_export(run, weights, "File too large")


def test_full_tmpfs_during_export_leaves_nothing_behind(tmp_path: Path) -> None:
    """ENOSPC from a real, full filesystem: a 64 MiB tmpfs (needs the right to mount)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(weights)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = subprocess.run(export_command(weights), cwd=REPO, capture_output=True, text=True, timeout=600)
        check_failed_export(run, weights, "No space left on device")
    finally:
        subprocess.run(["umount", str(weights)], check=True)


# --------------------------------------------------------------------------- (e) client vanishes
# (uploads abandoned mid-body: tests/test_server_process.py)


# --------------------------------------------------------------------------- (f) SIGTERM


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(
    imagenet_model_dir: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    link_model(imagenet_model_dir, weights)
    big = big_photo_jpeg()  # 12 MP: a few seconds for several of them on two cores
    with fault_server(weights, tmp_path, request_timeout_s=60) as server:
        files = [("files", (f"{i}.jpg", big, "image/jpeg")) for i in range(3)]
        started = threading.Barrier(5)

        def predict() -> httpx.Response:
            with httpx.Client(timeout=120) as client:
                started.wait()
                return client.post(f"{server.url}/predict", files=files)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(predict) for _ in range(4)]
            started.wait()

            def in_flight() -> bool:
                text = httpx.get(f"{server.url}/metrics", timeout=10).text
                return float(re.search(r"^alexnet_requests_in_flight (\S+)", text, re.M).group(1)) >= 5  # type: ignore[union-attr]

            wait_until(in_flight, 30, "four requests in flight (and this one)", interval=0.05)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
                httpx.get(f"{server.url}/health", timeout=5)
            assert not all(f.done() for f in futures), "the requests finished before the check"
            responses = [f.result(timeout=120) for f in futures]
        assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
        assert all(len(r.json()["results"]) == 3 for r in responses)
        # uvicorn re-raises the signal once it has shut down, so the exit status names it.
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.output() and "Traceback" not in server.output()
