"""Training jobs under the conditions issue 15 found them to fail in (findings 5-8 and 11): two
servers on one weights directory, restarts, hostile dataset folders. Real servers over HTTP and
real alexnet-train processes on scikit-learn's digits."""

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alexnet_core.training import CHECKPOINT, DoneEvent, JobState, last, read_events
from model_export.data import DatasetError, find_classes, list_images
from model_export.train import main as train_main
from service.job_store import JobRecord, JobStore
from service.schemas import TrainRequest
from service.training_datasets import DatasetRefused, check_dataset
from tests.conftest import cpu_settings, serve
from tests.digits import write_digits

KEY = {"Authorization": "Bearer test-key"}
# One-epoch jobs of two steps, validated on 20 images: seconds of training, the export dominates.
QUICK = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73, "epochs": 1,
         "limit_train_batches": 2, "val10_max_images": 20}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_digits(root / "digits", size=16, held_out_per_class=0)
    return root


def weights_with_model(tmp_path: Path, imagenet_model_dir: Path) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir()
    os.link(imagenet_model_dir / "alexnet-random.onnx", weights / "alexnet-random.onnx")  # no 240 MB copy
    return weights


def wait_for(api: httpx.Client, job_id: str, done: Any, what: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/train/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: timed out waiting for {what}: {job}")


# --------------------------------------------------------------------------- 5: two servers


@pytest.mark.long
def test_a_second_server_leaves_the_first_ones_job_alone(tmp_path: Path, data_root: Path) -> None:
    settings = cpu_settings(tmp_path / "weights", data_root=data_root, api_key="test-key")
    with serve(settings) as url_a, httpx.Client(base_url=url_a, timeout=60) as a:
        started = a.post("/train", json={**QUICK, "epochs": 50, "limit_train_batches": None}, headers=KEY)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        first = wait_for(a, job_id, lambda j: j["state"] == "running" and j["step"], "its first steps")
        with serve(settings) as url_b, httpx.Client(base_url=url_b, timeout=60) as b:
            # B started while A's trainer ran: the trainer goes on (steps keep coming) and both
            # servers see the job running.
            wait_for(
                a, job_id, lambda j: j["state"] != "running" or j["step"] > first["step"] + 2, "more steps"
            )
            assert a.get(f"/train/{job_id}").json()["state"] == "running"
            assert b.get(f"/train/{job_id}").json()["state"] == "running"
            refused = b.delete(f"/train/{job_id}", headers=KEY)
            assert refused.status_code == 409 and "another server" in refused.json()["detail"]
            assert b.post("/train", json=QUICK, headers=KEY).status_code == 409  # one job at a time
        assert a.get(f"/train/{job_id}").json()["state"] == "running"  # B's shutdown left it alone too
        assert a.delete(f"/train/{job_id}", headers=KEY).status_code == 202
        final = wait_for(a, job_id, lambda j: j["state"] not in ("queued", "running"), "the cancel")
        assert final["state"] == "cancelled"


# --------------------------------------------------------------------------- 6: activate false


@pytest.mark.long
def test_a_job_not_to_be_activated_is_not_served_after_a_restart(
    tmp_path: Path, data_root: Path, imagenet_model_dir: Path
) -> None:
    weights = weights_with_model(tmp_path, imagenet_model_dir)
    assert not (weights / "ACTIVE").exists()  # nothing was ever activated: the newest file is served
    settings = cpu_settings(weights, data_root=data_root, api_key="test-key")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        before = api.get("/model").json()["version"]
        job = api.post("/train", json={**QUICK, "activate": False}, headers=KEY).json()
        final = wait_for(api, job["id"], lambda j: j["state"] not in ("queued", "running"), "the end")
        assert final["state"] == "succeeded" and final["model_version"] and not final["activated"], final
        assert api.get("/model").json()["version"] == before
    assert (weights / f"{final['model_version']}.onnx").is_file()  # the newest file now
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        assert api.get("/model").json()["version"] == before


# --------------------------------------------------------------------------- 7, 8: datasets


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, a folder outside it) with datasets whose inside leads out of the root."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "data", base / "outside"
    write_digits(outside / "set", size=8, held_out_per_class=0)
    for name in ("split-link", "class-link", "image-link", "inside-link"):
        write_digits(root / name, size=8, held_out_per_class=0)
    shutil.rmtree(root / "split-link" / "val")
    (root / "split-link" / "val").symlink_to(outside / "set" / "val", target_is_directory=True)
    shutil.rmtree(root / "class-link" / "train" / "3")
    (root / "class-link" / "train" / "3").symlink_to(
        outside / "set" / "train" / "3", target_is_directory=True
    )
    image = next((root / "image-link" / "val" / "7").iterdir())
    image.unlink()
    image.symlink_to(next((outside / "set" / "val" / "7").iterdir()))
    # A link that stays inside the root is fine.
    shutil.rmtree(root / "inside-link" / "val" / "5")
    (root / "inside-link" / "val" / "5").symlink_to(root / "digits-5", target_is_directory=True)
    shutil.copytree(outside / "set" / "val" / "5", root / "digits-5")
    (root / "loop").symlink_to(root / "loop")
    (root / "loop-inside").mkdir()
    (root / "loop-inside" / "train").symlink_to(root / "loop-inside" / "train")
    (root / "loop-inside" / "val").mkdir()
    return root, outside


@pytest.fixture(scope="module")
def hostile_api(
    hostile_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    settings = cpu_settings(tmp_path_factory.mktemp("weights"), data_root=hostile_root[0], api_key="test-key")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        yield api


@pytest.mark.parametrize(
    ("dataset", "named"),
    [
        ("split-link", "val"),
        ("class-link", "train/3"),
        ("image-link", "val/7/"),
        ("loop", "cannot be resolved"),
        ("loop-inside", "loop-inside"),
        ("é" * 130, "over 255 bytes"),
        ("b" * 254 + "é", "over 255 bytes"),
    ],
)
def test_datasets_that_lead_out_loop_or_overflow_are_a_400(
    hostile_api: httpx.Client, hostile_root: tuple[Path, Path], dataset: str, named: str
) -> None:
    root, outside = hostile_root
    # json.dumps escapes non-ASCII as \uXXXX: a lone surrogate reaches the server as JSON allows it.
    body = json.dumps({**QUICK, "dataset": dataset})
    response = hostile_api.post("/train", content=body, headers={**KEY, "content-type": "application/json"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert named in detail and str(outside) not in detail and str(root) not in detail
    assert hostile_api.get("/train").json() == []  # nothing ran


def test_a_link_inside_the_root_is_allowed(hostile_root: tuple[Path, Path]) -> None:
    root, _ = hostile_root
    assert check_dataset(root, "inside-link") == root / "inside-link"
    with pytest.raises(DatasetRefused, match="leads outside"):
        check_dataset(root, "class-link")
    # The API refuses a lone surrogate as JSON already (422); the check itself refuses it too.
    with pytest.raises(DatasetRefused, match="not a valid file name"):
        check_dataset(root, "\ud800x")


def test_the_trainers_own_listing_refuses_links_out_of_the_data_root(hostile_root: tuple[Path, Path]) -> None:
    root, _ = hostile_root
    classes = find_classes(root / "image-link" / "train", root)
    with pytest.raises(DatasetError, match="leads outside the data root"):
        list_images(root / "image-link" / "val", classes, root)
    with pytest.raises(DatasetError, match="leads outside the data root"):
        find_classes(root / "class-link" / "train", root)
    assert list_images(root / "inside-link" / "val", classes, root)
    # Without a data root (a user's own command line) links are followed, as before.
    assert list_images(root / "image-link" / "val", classes)


# --------------------------------------------------------------------------- 11: job states


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, Path]:
    """(run folder, weights dir) of a real run that ended (done, exported) while no server watched."""
    base = tmp_path_factory.mktemp("finished")
    run, weights = base / "run", base / "weights"
    code = train_main([
        str(data_root / "digits"), "--out", str(run), "--weights-dir", str(weights), "--input-size", "64",
        "--resize-size", "73", "--batch-size", "64", "--epochs", "1", "--limit-train-batches", "2",
        "--val10-max-images", "20", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    return run, weights


def seed_job(weights: Path, job_id: str, run_dir: Path, state: JobState = JobState.running) -> None:
    store = JobStore(weights / "jobs.sqlite3")
    try:
        request = TrainRequest(**{**QUICK, "val10_max_images": None})
        store.save(JobRecord(job_id, state, request, run_dir, time.time(), time.time(), pid=None))
    finally:
        store.close()


@pytest.mark.long
def test_jobs_found_running_at_start_up_are_settled_by_what_their_run_left(
    tmp_path: Path, data_root: Path, finished_run: tuple[Path, Path]
) -> None:
    run, model_dir = finished_run
    weights = tmp_path / "weights"
    shutil.copytree(model_dir, weights)
    finished, early, late = "0000000000a1", "0000000000b2", "0000000000c3"
    shutil.copytree(run, weights / "runs" / finished)
    (weights / "runs" / early).mkdir(parents=True)  # stopped in its first epoch: no checkpoint
    (weights / "runs" / late).mkdir()
    shutil.copy(run / CHECKPOINT, weights / "runs" / late / CHECKPOINT)
    for job_id in (finished, early, late):
        seed_job(weights, job_id, weights / "runs" / job_id)
    done = last(read_events(run), DoneEvent)
    assert done is not None and done.version

    settings = cpu_settings(weights, data_root=data_root, api_key="test-key")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        job = api.get(f"/train/{finished}").json()
        assert job["state"] == "succeeded" and job["model_version"] == done.version, job
        assert job["error"] is None and job["progress"] == 1.0
        assert api.post(f"/train/{finished}/resume", headers=KEY).status_code == 409  # no duplicate

        job = api.get(f"/train/{early}").json()
        assert job["state"] == "interrupted" and "{id}" not in job["error"]
        assert "resume" not in job["error"] and "POST /train" in job["error"]
        assert api.post(f"/train/{early}/resume", headers=KEY).status_code == 409

        job = api.get(f"/train/{late}").json()
        assert job["state"] == "interrupted" and f"POST /train/{late}/resume" in job["error"], job
