"""The server's own state (job records, training runs, the ACTIVE pointer, galleries) on storage
that fails: a real full filesystem (a small tmpfs filled to the last page), a read-only volume (a
read-only bind mount or tmpfs remounted read-only: root ignores file modes, not mount flags), an
interpreter the kernel refuses to execute, a job database another process holds locked. Real
servers over HTTP, real alexnet-train processes on scikit-learn's digits."""

import errno
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from alexnet_core.training import JobState
from service.job_store import JobStore
from tests.conftest import cpu_settings, serve
from tests.digits import write_digits
from tests.free_model import write_free_model
from tests.images import photo_jpeg
from tests.processes import server_subprocess

KEY = "state-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# One epoch of two steps: seconds of training once torch is imported.
QUICK = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73, "epochs": 1,
         "limit_train_batches": 2, "val10_max_images": 20}  # fmt: skip
ENDED = ("succeeded", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_digits(root / "digits", size=16, held_out_per_class=0)
    return root


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``path``, unmounted (lazily: a server may still hold a
    file open while it stops) on exit."""
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def read_only_view(source: Path, target: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``target``: a bind mount remounted read-only."""
    target.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(source), str(target))
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (target / "probe").touch()  # even for root
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def fill(fs: Path) -> Path:
    """Fills ``fs`` to its last page; returns the file that holds the space."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (2**20, 4096):
            block = b"\1" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ended(api: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    def end() -> dict[str, Any] | None:
        job = api.get(f"/train/{job_id}").json()
        return job if job["state"] in ENDED else None

    return wait_until(end, timeout, "the job's end")


def recorded_state(weights: Path, job_id: str) -> JobState | None:
    store = JobStore(weights / "jobs.sqlite3")  # what a restart would find
    try:
        job = store.get(job_id)
    finally:
        store.close()
    return job.state if job else None


def start_and_cancel(api: httpx.Client) -> None:
    """A new job starts (nothing blocks it), and is cancelled."""
    started = api.post("/train", json={**QUICK, "epochs": 5}, headers=AUTH)
    assert started.status_code == 202, started.text
    assert api.delete(started.json()["url"], headers=AUTH).status_code == 202
    assert ended(api, started.json()["id"], 120)["state"] == "cancelled"


# --------------------------------------------------------------------------- jobs: disk full


@pytest.mark.long
def test_a_job_whose_record_cannot_be_saved_ends_once_space_is_back(tmp_path: Path, data_root: Path) -> None:
    with tmpfs(tmp_path / "fs", "16m") as fs:
        weights = fs / "weights"
        settings = cpu_settings(weights, data_root=data_root, api_key=KEY)
        with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
            job = api.post("/train", json=QUICK, headers=AUTH).json()
            wait_until(lambda: api.get(job["url"]).json()["state"] == "running", 60, "running")
            filler = fill(fs)  # the trainer's next write fails, then the server's record of it
            final = ended(api, job["id"], 180)
            assert final["state"] == "failed" and final["error"], final
            assert recorded_state(weights, job["id"]) == JobState.running  # not written yet: no room
            # A new job is refused for what it is, not as "a job is running".
            refused = api.post("/train", json=QUICK, headers=AUTH)
            assert refused.status_code == 507 and "No space left" in refused.json()["detail"], refused.text
            assert [j["id"] for j in api.get("/train").json()] == [job["id"]]

            filler.unlink()  # space is back: the record is written, without a restart
            wait_until(lambda: recorded_state(weights, job["id"]) == JobState.failed, 30, "the record")
            assert api.delete(job["url"], headers=AUTH).status_code == 409  # ended, not "another server's"
            start_and_cancel(api)


@pytest.mark.long
def test_a_trainer_that_cannot_be_started_fails_its_job(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interpreter = tmp_path / "python"
    interpreter.write_bytes(Path(sys.executable).resolve().read_bytes())
    interpreter.chmod(0o644)  # no execute bit: execve refuses it, even to root
    settings = cpu_settings(tmp_path / "weights", data_root=data_root, api_key=KEY)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "executable", str(interpreter))  # what the trainer is started with
            job = api.post("/train", json=QUICK, headers=AUTH).json()
            final = ended(api, job["id"], 30)
        assert final["state"] == "failed" and "Permission denied" in final["error"], final
        assert recorded_state(tmp_path / "weights", job["id"]) == JobState.failed
        start_and_cancel(api)


def test_a_locked_job_database_stalls_neither_server_nor_client(tmp_path: Path, data_root: Path) -> None:
    weights = tmp_path / "weights"
    with serve(cpu_settings(weights, data_root=data_root, api_key=KEY)) as url:
        holder = sqlite3.connect(weights / "jobs.sqlite3", isolation_level=None)  # a backup, say
        answers: list[httpx.Response] = []

        def post() -> None:
            answers.append(httpx.post(f"{url}/train", json=QUICK, headers=AUTH, timeout=60))

        for hold_s in (7.0, 1.0):  # past SQLite's 5 s busy timeout, then within it
            holder.execute("BEGIN IMMEDIATE")  # holds the write lock
            poster = threading.Thread(target=post)
            poster.start()
            time.sleep(0.5)  # the POST waits for the lock now
            assert httpx.get(f"{url}/health", timeout=2).status_code == 200  # the event loop is free
            time.sleep(hold_s - 0.5)
            holder.execute("ROLLBACK")
            poster.join(timeout=60)
        holder.close()
        locked, started = answers
        assert locked.status_code == 503 and locked.headers["retry-after"], locked.text
        assert "locked" in locked.json()["detail"]
        assert started.status_code == 202, started.text
        with httpx.Client(base_url=url, timeout=60) as api:
            assert [j["id"] for j in api.get("/train").json()] == [started.json()["id"]]  # none left over
            assert api.delete(started.json()["url"], headers=AUTH).status_code == 202
            assert ended(api, started.json()["id"], 120)["state"] == "cancelled"


# --------------------------------------------------------------------------- activation


def free_models(weights: Path) -> None:
    write_free_model(weights / "first.onnx")
    os.utime(weights / "first.onnx", (1_000_000_000, 1_000_000_000))
    write_free_model(weights / "second.onnx")  # the newest: served at start-up


def served(api: httpx.Client) -> str:
    """The model /predict answers with, the same /model names."""
    version = api.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).json()["model_version"]
    assert api.get("/model").json()["version"] == version
    return version


def test_an_activation_that_cannot_be_recorded_changes_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "16m") as weights:
        free_models(weights)
        with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as api:
            assert served(api) == "second"
            filler = fill(weights)  # no room for the new ACTIVE file
            refused = api.post("/model/activate", json={"version": "first"}, headers=AUTH)
            filler.unlink()
            assert served(api) == "second" and not (weights / "ACTIVE").exists()
            assert refused.status_code == 507, refused.text
            assert "ACTIVE" in refused.json()["detail"] and str(weights) not in refused.json()["detail"]
            assert api.post("/model/activate", json={"version": "first"}, headers=AUTH).status_code == 200
            assert served(api) == "first" and (weights / "ACTIVE").read_text() == "first.onnx"


# --------------------------------------------------------------------------- read-only weights


def test_a_read_only_weights_volume_is_served(tmp_path: Path, data_root: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    free_models(volume)
    with read_only_view(volume, tmp_path / "weights") as weights:
        # No state directory: serving works, what would write answers 503 and says what to set.
        with (
            server_subprocess(weights, tmp_path, data_root, api_key=KEY, wait_for="/ready") as server,
            httpx.Client(base_url=server.url, timeout=60) as api,
        ):
            assert served(api) == "second"
            for response in (
                api.post("/model/activate", json={"version": "first"}, headers=AUTH),
                api.post("/train", json=QUICK, headers=AUTH),
                api.get("/train"),
                api.get("/gallery"),
            ):
                assert response.status_code == 503, response.text
                assert "ALEXNET_STATE_DIR" in response.json()["detail"], response.text
            assert served(api) == "second"
        # A state directory of its own: activation (and the gallery) work; training, which writes
        # its model into the weights directory, says why not.
        state = tmp_path / "state"
        with (
            server_subprocess(weights, tmp_path, data_root, api_key=KEY, state_dir=state) as server,
            httpx.Client(base_url=server.url, timeout=60) as api,
        ):
            assert api.post("/model/activate", json={"version": "first"}, headers=AUTH).status_code == 200
            assert served(api) == "first" and (state / "ACTIVE").read_text() == "first.onnx"
            assert api.get("/gallery").status_code == 409  # enabled: this model has no features
            refused = api.post("/train", json=QUICK, headers=AUTH)
            assert refused.status_code == 503 and "weights directory" in refused.json()["detail"]
            assert api.get("/train").json() == []
        with server_subprocess(weights, tmp_path, data_root, state_dir=state, wait_for="/ready") as server:
            assert httpx.get(f"{server.url}/model").json()["version"] == "first"  # kept across a restart
    assert sorted(p.name for p in volume.iterdir()) == ["first.onnx", "second.onnx"]
