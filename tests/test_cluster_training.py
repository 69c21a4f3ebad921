"""Training jobs on a real 2-node Ray cluster, started here (``ray start`` processes on free ports,
benchmarks/ray_cluster.py): ``POST /train`` with ``ray_workers`` on a server configured with the
cluster, jobs on scikit-learn's digits for a few steps. Marked ``cluster``: run with
``pytest -m cluster -n 0`` after ``pip install -e '.[cluster]'``; skipped where Ray cannot start.

Each node has one CPU, so the two workers of a job land on different nodes."""

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.ray_nodes import ClusterUnavailable, LocalCluster, local_cluster
from benchmarks.server import free_port
from tests.digits import CLASS_NAMES, DigitsFolder, write_digits
from tests.processes import ServerProcess, server_subprocess, wait_until

pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")

pytestmark = pytest.mark.cluster

KEY = {"Authorization": "Bearer test-key"}
# A few steps of small batches: what is tested is placement, following and stopping, not learning.
QUICK = {
    "dataset": "digits", "batch_size": 32, "input_size": 64, "resize_size": 73, "ray_workers": 2,
    "limit_train_batches": 2, "log_every": 1, "val10_max_images": 20, "stats_images": 100,
}  # fmt: skip
ENDED = {"succeeded", "failed", "cancelled", "interrupted"}
WORKER = "ray::RayTrainWorker"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    try:
        with local_cluster(nodes=2, cpus_per_node=1) as running:
            yield running
    except ClusterUnavailable as exc:
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DigitsFolder]:
    root = tmp_path_factory.mktemp("data")
    return root, write_digits(root / "digits", size=32)


@contextmanager
def api_server(
    weights: Path, tmp: Path, data_root: Path, cluster: LocalCluster
) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """The server as in production, in one process, configured with the cluster."""
    with (
        server_subprocess(
            weights, tmp, data_root, api_key="test-key", train_on_ray=cluster.address, workers=0
        ) as server,
        httpx.Client(base_url=server.url, timeout=60) as api,
    ):
        yield server, api


def wait_for(api: httpx.Client, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
    return wait_until(
        lambda: (job := api.get(f"/train/{job_id}").json())["state"] in states and job,
        timeout,
        f"job {job_id} in {states}",
        interval=0.5,
    )


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return [r for r in rows if r["event"] == kind]


def trainer_pids(run_dir: Path) -> list[int]:
    """The job's ``alexnet-train`` process (the Ray driver), found by its config path."""
    config = str(run_dir / "config.json").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"model_export.train" in cmdline and config in cmdline:
            pids.append(int(entry.name))
    return pids


def predict(api: httpx.Client, image: Path) -> httpx.Response:
    return api.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))])


def test_two_worker_job_succeeds_is_served_and_survives_a_restart(
    cluster: LocalCluster, data_root: tuple[Path, DigitsFolder], tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    held_out = data_root[1].held_out["7"][0]
    with api_server(weights, tmp_path, data_root[0], cluster) as (server, api):
        started = api.post("/train", json={**QUICK, "epochs": 1, "activate": True}, headers=KEY)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        job = wait_for(api, job_id, ENDED, timeout=420)
        run_dir = weights / "runs" / job_id
        log = (run_dir / "train.log").read_text(errors="replace")
        assert job["state"] == "succeeded", (job, log[-4000:])
        assert job["activated"] and job["model_version"] and job["progress"] == 1.0
        assert events(run_dir, "start")[0]["world_size"] == 2
        assert len(events(run_dir, "step")) == 2  # one writer: rank 0
        # Each rank says where it ran: two workers, two nodes.
        assert len(set(re.findall(r"rank \d/2 on node (\w+)", log))) == 2, log[-4000:]
        assert api.get("/model").json()["version"] == job["model_version"]
        served = predict(api, held_out)
        assert served.status_code == 200, served.text
        assert served.json()["results"][0]["predictions"][0]["label"] in CLASS_NAMES
        server.proc.kill()  # no shutdown of its own: only what it recorded remains
    with api_server(weights, tmp_path, data_root[0], cluster) as (_, api):
        after = api.get(f"/train/{job_id}").json()
        assert after["state"] == "succeeded" and after["model_version"] == job["model_version"]
        assert after["request"]["ray_workers"] == 2 and after["activated"]
        assert api.get("/model").json()["version"] == job["model_version"]
        assert predict(api, held_out).status_code == 200
    assert cluster.processes(WORKER) == []


def test_cancel_stops_the_workers_resume_continues_and_a_killed_driver_ends_the_job(
    cluster: LocalCluster, data_root: tuple[Path, DigitsFolder], tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    with api_server(weights, tmp_path, data_root[0], cluster) as (_, api):
        job_id = api.post("/train", json={**QUICK, "epochs": 50}, headers=KEY).json()["id"]
        run_dir = weights / "runs" / job_id
        wait_until(lambda: api.get(f"/train/{job_id}").json()["epoch"], 420, "the first epoch's checkpoint")
        assert len(cluster.processes(WORKER)) == 2
        assert api.delete(f"/train/{job_id}", headers=KEY).status_code == 202
        cancelled = wait_for(api, job_id, ENDED, timeout=120)
        assert cancelled["state"] == "cancelled" and cancelled["epoch"] >= 1, cancelled
        assert events(run_dir, "cancelled"), "rank 0 recorded the cancel"
        wait_until(lambda: cluster.processes(WORKER) == [], 60, "no Ray Train worker left")

        assert api.post(f"/train/{job_id}/resume", headers=KEY).status_code == 202
        wait_until(lambda: len(events(run_dir, "start")) == 2, 300, "the resumed run's start")
        resumed = events(run_dir, "start")[1]
        assert resumed["resumed"] and resumed["start_epoch"] == cancelled["epoch"]
        assert resumed["world_size"] == 2
        (driver,) = trainer_pids(run_dir)
        os.kill(driver, signal.SIGKILL)
        killed = wait_for(api, job_id, ENDED, timeout=60)
        assert killed["state"] == "failed" and "SIGKILL" in killed["error"], killed
        assert "resume" in killed["error"]  # it has a checkpoint: the message says how to continue
        # Ray ends the workers of a driver that is gone.
        wait_until(lambda: cluster.processes(WORKER) == [], 90, "no Ray Train worker left")
        # And what the job held on the cluster is free again for the next one.
        wait_until(lambda: cluster.free_cpus() == 2, 90, "both CPUs of the cluster free")


def test_an_unreachable_cluster_fails_the_job_at_once_saying_why(
    data_root: tuple[Path, DigitsFolder], tmp_path: Path
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    with (
        server_subprocess(
            tmp_path / "weights", tmp_path, data_root[0], api_key="test-key", train_on_ray=nowhere, workers=0
        ) as server,
        httpx.Client(base_url=server.url, timeout=60) as api,
    ):
        job_id = api.post("/train", json={**QUICK, "epochs": 1}, headers=KEY).json()["id"]
        failed = wait_for(api, job_id, ENDED, timeout=120)
        assert failed["state"] == "failed" and f"cannot reach the Ray cluster at {nowhere}" in failed["error"]
