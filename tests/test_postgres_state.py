"""Servers sharing their state through a real PostgreSQL server (ALEXNET_DATABASE_URL), started by
the test from the machine's own binaries (tests/postgres.py): job records that survive a restart
and that every server sees, gallery items added through two servers at once all present in both,
an activation through one server served by the other within the stated time (no ACTIVE file
involved), and the database stopped under a running server: 503 + Retry-After naming it, /predict
unharmed, and everything back once the database is."""

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.digits import write_digits
from tests.free_model import write_free_model
from tests.images import photo_jpeg
from tests.postgres import Postgres, missing
from tests.processes import ServerProcess, server_subprocess, wait_until
from tests.test_gallery import export, image

pytestmark = pytest.mark.postgres
KEY = "postgres-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUICK = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73, "epochs": 1,
         "limit_train_batches": 2, "val10_max_images": 20}  # fmt: skip
ACTIVATION_SEEN_S = 2.0  # the target; the history is polled every 0.5 s (database_poll_s)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    if reason := missing():
        pytest.skip(reason)
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            server.remove()


@pytest.fixture
def database(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """A database of its own for each test."""
    return postgres.create_database(request.node.name.replace("test_", "")[:40])


@pytest.fixture(scope="module")
def features_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = tmp_path_factory.mktemp("pg-weights")
    export(weights / "feat.onnx", seed=1)
    return weights


def server(
    weights: Path, tmp: Path, url: str, name: str, **settings: object
) -> AbstractContextManager[ServerProcess]:
    """``alexnet-serve`` in a process with a state directory of its own: what it shares with the
    other servers goes through the database."""
    state = tmp / f"state-{name}"
    return server_subprocess(weights, tmp, data_root=tmp / "data", api_key=KEY, database_url=url,
                             state_dir=state, workers=0, **settings)  # fmt: skip


def add(c: httpx.Client, item_id: str, data: bytes) -> httpx.Response:
    return c.post("/gallery", data={"id": item_id}, files={"file": (f"{item_id}.png", data)}, headers=AUTH)


def test_jobs_are_shared_and_survive_a_restart(postgres: Postgres, database: str, tmp_path: Path) -> None:
    write_digits(tmp_path / "data" / "digits", size=16, held_out_per_class=0)
    weights = tmp_path / "weights"
    write_free_model(weights / "first.onnx")
    with server(weights, tmp_path, database, "a") as a, server(weights, tmp_path, database, "b") as b:
        started = httpx.post(f"{a.url}/train", json=QUICK, headers=AUTH, timeout=60)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        ended = wait_until(
            lambda: (
                (job := httpx.get(f"{a.url}/train/{job_id}", timeout=30).json())["state"] == "succeeded"
                and job
            ),
            300,
            "the job's success",
        )
        seen = httpx.get(f"{b.url}/train", timeout=30).json()  # the other server's listing
        assert [(j["id"], j["state"]) for j in seen] == [(job_id, "succeeded")]
        # One job at a time, across the servers sharing the database.
        second = httpx.post(f"{b.url}/train", json=QUICK, headers=AUTH, timeout=60)
        assert second.status_code == 202, second.text
        refused = httpx.post(f"{a.url}/train", json=QUICK, headers=AUTH, timeout=60)
        assert refused.status_code == 409 and second.json()["id"] in refused.json()["detail"]
        assert (
            httpx.delete(f"{b.url}/train/{second.json()['id']}", headers=AUTH, timeout=30).status_code == 202
        )
    assert not list(tmp_path.glob("state-*/jobs.sqlite3"))  # the records are in PostgreSQL only
    with server(weights, tmp_path, database, "c") as c:  # a new server, a new state directory
        again = httpx.get(f"{c.url}/train/{job_id}", timeout=30).json()
        assert again["state"] == "succeeded" and again["model_version"] == ended["model_version"]
        states = {j["id"]: j["state"] for j in httpx.get(f"{c.url}/train", timeout=30).json()}
        assert states[second.json()["id"]] in ("cancelled", "interrupted")
    rows = postgres.query(database.rsplit("/", 1)[1], "SELECT id, state FROM jobs ORDER BY created_at")
    assert rows[0] == (job_id, "succeeded")


def test_gallery_adds_through_two_servers_are_all_present(
    database: str, features_weights: Path, tmp_path: Path
) -> None:
    with (
        server(features_weights, tmp_path, database, "a") as a,
        server(features_weights, tmp_path, database, "b") as b,
        httpx.Client(base_url=a.url, timeout=120) as ca,
        httpx.Client(base_url=b.url, timeout=120) as cb,
    ):
        ids = [f"item-{n}" for n in range(16)]
        with ThreadPoolExecutor(4) as pool:  # both servers adding at once
            answers = list(pool.map(lambda n: add(ca if n % 2 else cb, ids[n], image(n)), range(len(ids))))
        assert [r.status_code for r in answers] == [201] * len(ids), [
            r.text for r in answers if r.status_code != 201
        ]
        for c in (ca, cb):
            assert sorted(i["id"] for i in c.get("/gallery").json()["items"]) == sorted(ids)
        # Found through the server that did not add it, and gone from both once removed through one.
        found = cb.post("/similar", params={"k": 1}, files={"file": ("q.png", image(3))}).json()
        assert found["neighbours"][0]["id"] == "item-3" and found["neighbours"][0]["distance"] < 1e-2
        assert ca.get("/gallery/item-3/thumbnail.png").status_code == 200
        assert cb.delete("/gallery/item-3", headers=AUTH).status_code == 200
        again = ca.post("/similar", params={"k": 1}, files={"file": ("q.png", image(3))}).json()
        assert again["neighbours"][0]["id"] != "item-3"
        assert add(ca, "item-0", image(0)).status_code == 409  # added through b: an id is one item
    assert not list(tmp_path.glob("state-*/gallery"))  # nothing in the state directories


def test_activation_through_one_server_is_served_by_the_other(database: str, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_free_model(weights / "first.onnx")
    os.utime(weights / "first.onnx", (1_000_000_000, 1_000_000_000))
    write_free_model(weights / "second.onnx")  # the newest: served at start-up
    with (
        server(weights, tmp_path, database, "a") as a,
        server(weights, tmp_path, database, "b") as b,
        httpx.Client(base_url=b.url, timeout=60) as cb,
    ):
        assert cb.get("/model").json()["version"] == "second"
        answers: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=b.url, timeout=60) as c:
                while not stop.is_set():
                    answers.append(c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code)

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        try:
            activated = httpx.post(
                f"{a.url}/model/activate", json={"version": "first"}, headers=AUTH, timeout=60
            )
            answered = time.monotonic()
            assert activated.status_code == 200, activated.text
            wait_until(lambda: cb.get("/model").json()["version"] == "first", 30, "b serving first", 0.02)
            seen_s = time.monotonic() - answered
        finally:
            stop.set()
            thread.join(timeout=60)
        print(f"activation through a seen by b after {seen_s:.2f} s; {len(answers)} requests to b meanwhile")
        assert seen_s <= ACTIVATION_SEEN_S
        assert answers and set(answers) == {200}
    assert not list(tmp_path.glob("state-*/ACTIVE"))  # the history, not a file, says what is active
    with server(weights, tmp_path, database, "c") as c:  # a restart serves the activated one
        assert httpx.get(f"{c.url}/model", timeout=30).json()["version"] == "first"


def test_database_stopped_under_a_running_server(
    postgres: Postgres, database: str, features_weights: Path, tmp_path: Path
) -> None:
    name = f"the database 127.0.0.1:{postgres.port}/{database.rsplit('/', 1)[1]}"
    with (
        server(features_weights, tmp_path, database, "a") as a,
        httpx.Client(base_url=a.url, timeout=60) as c,
    ):
        assert add(c, "before", image(1)).status_code == 201
        postgres.stop("fast")
        try:
            for answer in (
                c.get("/train"),
                c.get("/gallery"),
                add(c, "during", image(2)),
                c.post("/similar", files={"file": ("q.png", image(1))}),
                c.post("/model/activate", json={"version": "feat"}, headers=AUTH),
            ):
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"] and name in answer.json()["detail"], answer.text
            # Classifying needs no database.
            assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
        finally:
            postgres.start()
        wait_until(lambda: c.get("/train").status_code == 200, 30, "the database back")
        assert add(c, "after", image(2)).status_code == 201
        assert sorted(i["id"] for i in c.get("/gallery").json()["items"]) == ["after", "before"]
        assert c.post("/model/activate", json={"version": "feat"}, headers=AUTH).status_code == 200


def test_a_job_that_ends_while_the_database_is_down_is_recorded_once_it_is_back(
    postgres: Postgres, database: str, tmp_path: Path
) -> None:
    write_digits(tmp_path / "data" / "digits", size=16, held_out_per_class=0)
    weights = tmp_path / "weights"
    write_free_model(weights / "first.onnx")
    dbname = database.rsplit("/", 1)[1]
    with server(weights, tmp_path, database, "a") as a, httpx.Client(base_url=a.url, timeout=60) as c:
        job = c.post("/train", json=QUICK, headers=AUTH).json()
        wait_until(lambda: c.get(job["url"]).json()["state"] == "running", 120, "the job running")
        postgres.stop("fast")
        try:
            # Shown ended by the server that ran it while its record waits for the database.
            wait_until(
                lambda: (r := c.get(job["url"])).status_code == 200 and r.json()["state"] == "succeeded",
                300,
                "the job's end, shown during the outage",
                interval=1.0,
            )
            assert c.get("/train").status_code == 503  # the listing needs the database
        finally:
            postgres.start()
        recorded = lambda: postgres.query(dbname, f"SELECT state FROM jobs WHERE id = '{job['id']}'")  # noqa: E731
        wait_until(lambda: recorded() == [("succeeded",)], 30, "the record written once the database is back")
        assert [j["state"] for j in c.get("/train").json()] == ["succeeded"]
