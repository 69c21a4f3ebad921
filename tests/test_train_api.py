"""/train through real HTTP: jobs are real alexnet-train processes on scikit-learn's digits."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from model_export.weights import load_checkpoint
from tests.conftest import cpu_settings, serve
from tests.digits import DigitsFolder, write_digits

KEY = {"Authorization": "Bearer test-key"}
SMALL = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DigitsFolder]:
    root = tmp_path_factory.mktemp("data")
    return root, write_digits(root / "digits", size=32)


@pytest.fixture
def api(tmp_path: Path, digits_root: tuple[Path, DigitsFolder]) -> Iterator[httpx.Client]:
    settings = cpu_settings(tmp_path / "weights", data_root=digits_root[0], api_key="test-key")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def wait_for(client: httpx.Client, job_id: str, states: set[str], timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/train/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


@pytest.mark.long
def test_train_activate_predict_end_to_end(api: httpx.Client, digits_root: tuple[Path, DigitsFolder]) -> None:
    started = api.post(
        "/train",
        json={**SMALL, "epochs": 15, "layout": "torchvision", "target_top1": 0.9, "activate": True},
        headers=KEY,
    )
    assert started.status_code == 202, started.text
    job = started.json()
    assert started.headers["location"] == job["url"] == f"/train/{job['id']}"
    assert job["state"] in ("queued", "running")
    assert api.post("/train", json={**SMALL, "epochs": 1}, headers=KEY).status_code == 409  # one at a time

    seen_progress = set()
    deadline = time.monotonic() + 900
    while (state := (current := api.get(job["url"]).json())["state"]) in ("queued", "running"):
        if current["progress"]:
            seen_progress.add(round(current["progress"], 2))
            assert current["total_steps"] and current["loss"] is not None
        assert time.monotonic() < deadline
        time.sleep(1)
    assert state == "succeeded", current
    assert len(seen_progress) >= 2 and current["progress"] == 1.0
    assert current["activated"] and current["model_version"]
    assert current["val_top1"] >= 0.9 and current["val10_top1"] >= 0.85  # centre crop; service's ten crops

    model = api.get("/model").json()
    assert model["version"] == current["model_version"] and model["trained"]
    assert model["labels_sample"] == [str(d) for d in range(10)] and model["validation_top1"] >= 0.9

    metrics = api.get(f"{job['url']}/metrics").json()
    assert 1 <= len(metrics["epochs"]) <= 15 and metrics["steps"]
    assert metrics["epochs"][0]["val_top1"] < 0.5  # it learned here, from chance
    curves = api.get(current["curves_url"])
    assert curves.status_code == 200 and curves.content.startswith(b"\x89PNG")
    assert [j["id"] for j in api.get("/train").json()] == [job["id"]]

    held_out = digits_root[1].held_out
    files = [("files", (p.name, p.read_bytes(), "image/png")) for paths in held_out.values() for p in paths]
    truth = [digit for digit, paths in held_out.items() for _ in paths]
    predicted = []
    for start in range(0, len(files), 10):  # within the default ALEXNET_MAX_FILES
        response = api.post("/predict", files=files[start : start + 10], params={"top_k": 1})
        assert response.status_code == 200, response.text
        predicted += [r["predictions"][0]["label"] for r in response.json()["results"]]
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    assert correct >= 0.85 * len(truth), list(zip(predicted, truth, strict=True))


def test_cancel_keeps_last_checkpoint_and_resume(api: httpx.Client) -> None:
    # Short epochs (3 batches): what is tested is the stop and the resume, not the learning.
    job = api.post("/train", json={**SMALL, "epochs": 50, "limit_train_batches": 3}, headers=KEY).json()
    deadline = time.monotonic() + 300
    while api.get(f"/train/{job['id']}").json()["epoch"] is None:  # first epoch done, checkpoint written
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert api.delete(f"/train/{job['id']}").status_code == 401  # needs the key
    cancelled = api.delete(f"/train/{job['id']}", headers=KEY)
    assert cancelled.status_code == 202
    final = wait_for(api, job["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    assert final["state"] == "cancelled" and final["epoch"] >= 1
    assert api.delete(f"/train/{job['id']}", headers=KEY).status_code == 409  # not running any more

    resumed = api.post(f"/train/{job['id']}/resume", headers=KEY)
    assert resumed.status_code == 202 and resumed.json()["state"] in ("queued", "running")
    # At once, while the job may still be queued (trainer not started): that cancels it too.
    assert api.delete(f"/train/{job['id']}", headers=KEY).status_code == 202
    final = wait_for(api, job["id"], {"cancelled", "failed", "succeeded"}, timeout=120)
    assert final["state"] == "cancelled", final


@pytest.mark.long
def test_restart_keeps_history_and_resumes(tmp_path: Path, digits_root: tuple[Path, DigitsFolder]) -> None:
    settings = cpu_settings(tmp_path / "weights", data_root=digits_root[0], api_key="test-key")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        job = api.post("/train", json={**SMALL, "epochs": 2}, headers=KEY).json()
        deadline = time.monotonic() + 300
        while api.get(f"/train/{job['id']}").json()["epoch"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    # The server stopped mid-training: its trainer was stopped and keeps the epoch-1 checkpoint.
    run_dir = tmp_path / "weights" / "runs" / job["id"]
    assert load_checkpoint(run_dir / "checkpoint.pt").model is not None
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        after = api.get(f"/train/{job['id']}").json()
        assert after["state"] == "interrupted" and "resume" in after["error"]
        assert api.post(f"/train/{job['id']}/resume", headers=KEY).status_code == 202
        final = wait_for(api, job["id"], {"succeeded", "failed", "cancelled"})
        assert final["state"] == "succeeded", final
        assert final["epoch"] == 2 and final["model_version"]
        assert not final["activated"]  # activate was not asked for
        assert api.get("/ready").status_code == 503  # nothing was put into service


def test_training_needs_a_key(tmp_path: Path, digits_root: tuple[Path, DigitsFolder]) -> None:
    with serve(cpu_settings(tmp_path, data_root=digits_root[0])) as url, httpx.Client(base_url=url) as api:
        refused = api.post("/train", json=SMALL, headers=KEY)
        assert refused.status_code == 403 and "ALEXNET_API_KEY" in refused.json()["detail"]
        assert api.get("/train").json() == []


def test_wrong_key_is_refused(api: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}):
        response = api.post("/train", json=SMALL, headers=headers)
        assert response.status_code == 401, headers
    assert api.get("/train").json() == []


@pytest.mark.parametrize(
    "dataset",
    ["../digits", "/etc", "digits/../../etc", "..", "outside-link", "%2e%2e/digits", "nope", "digits\x00"],
)
def test_dataset_paths_cannot_leave_the_data_root(
    api: httpx.Client, digits_root: tuple[Path, DigitsFolder], dataset: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "train").mkdir(parents=True)
    (outside / "val").mkdir()
    link = digits_root[0] / "outside-link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    response = api.post("/train", json={**SMALL, "dataset": dataset}, headers=KEY)
    assert response.status_code == 400, response.text
    assert "dataset" in response.json()["detail"]
    assert api.get("/train").json() == []  # nothing ran


def test_bad_training_parameters(api: httpx.Client) -> None:
    for bad in (
        {"epochs": 0},
        {"batch_size": 100_000},
        {"lr": -1},
        {"input_size": 32},
        {"layout": "vgg"},
        {"lr_schedule": "rm -rf /"},
        {"unknown": 1},
    ):
        response = api.post("/train", json={**SMALL, **bad}, headers=KEY)
        assert response.status_code == 422, bad
        assert "invalid request" in response.json()["detail"]


def test_several_workers_need_a_cluster(api: httpx.Client) -> None:
    # This server has no ALEXNET_TRAIN_ON_RAY: the request is refused before anything is recorded.
    response = api.post("/train", json={**SMALL, "ray_workers": 2}, headers=KEY)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "ray_workers" in detail and "ALEXNET_TRAIN_ON_RAY" in detail
    assert api.post("/train", json={**SMALL, "ray_workers": 0}, headers=KEY).status_code == 422
    assert api.get("/train").json() == []
