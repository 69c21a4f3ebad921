"""Stores written by alexnet-serve 0.1.0, before Alembic, opened by this version: a jobs.sqlite3 and
a gallery's gallery.sqlite in the tables that version made are migrated to the current schema at
start-up without losing a row, and served by a real server over HTTP."""

import hashlib
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np

from service.schemas import TrainRequest
from tests.conftest import cpu_settings, serve
from tests.free_model import write_free_model
from tests.test_gallery import AUTH, KEY, add, export, image

# The statements 0.1.0 ran (service/job_store.py and service/gallery.py of that version).
JOBS_V010 = (
    "CREATE TABLE IF NOT EXISTS jobs (id TEXT, state TEXT, request TEXT, run_dir TEXT, created_at REAL, "
    "started_at REAL, finished_at REAL, pid INTEGER, error TEXT, model_version TEXT, activated INTEGER, "
    "PRIMARY KEY (id))"
)
GALLERY_V010 = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS items (key INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "label TEXT, added_at TEXT NOT NULL, model_version TEXT NOT NULL, vector_sha256 TEXT NOT NULL, "
    "vector BLOB NOT NULL, thumbnail BLOB)",
    "CREATE TABLE IF NOT EXISTS removals (seq INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL)",
)


def head(database: Path) -> str:
    with closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_job_database_of_0_1_0_is_migrated_without_losing_a_row(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_free_model(weights / "first.onnx")
    request = TrainRequest.model_validate({"dataset": "digits", "epochs": 3}).model_dump_json()
    rows = [
        (
            "a1",
            "succeeded",
            request,
            str(tmp_path / "runs" / "a1"),
            100.0,
            101.0,
            150.0,
            7,
            None,
            "trained-a1",
            1,
        ),
        (
            "b2",
            "failed",
            request,
            str(tmp_path / "runs" / "b2"),
            200.0,
            201.0,
            202.0,
            8,
            "trainer exited",
            None,
            0,
        ),
    ]
    with closing(sqlite3.connect(weights / "jobs.sqlite3", isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(JOBS_V010)
        db.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    with serve(cpu_settings(weights)) as url:
        jobs = httpx.get(f"{url}/train", timeout=30).json()
    assert [(j["id"], j["state"], j["model_version"], j["error"]) for j in jobs] == [
        ("b2", "failed", None, "trainer exited"),
        ("a1", "succeeded", "trained-a1", None),
    ]
    assert jobs[1]["activated"] is True and jobs[0]["request"]["epochs"] == 3
    assert head(weights / "jobs.sqlite3") == "0002"
    with closing(sqlite3.connect(weights / "jobs.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM jobs WHERE host IS NULL").fetchone() == (2,)


def test_a_gallery_of_0_1_0_is_migrated_without_losing_an_item(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    export(weights / "feat.onnx", seed=1)
    images = [image(n) for n in range(3)]
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        model = c.get("/model").json()
        embedded = c.post("/embed", files=[("files", (f"{n}.png", d)) for n, d in enumerate(images)]).json()
    vectors = [np.asarray(r["vector"], np.float32).tobytes() for r in embedded["results"]]
    directory = weights / "gallery" / model["version"]
    directory.mkdir(parents=True)
    with closing(sqlite3.connect(directory / "gallery.sqlite", isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in GALLERY_V010:
            db.execute(statement)
        meta = {"format": "alexnet-serve-gallery/2", "model_sha256": model["sha256"], "dim": "4096",
                "version": model["version"]}  # fmt: skip
        db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        for n, (vector, data) in enumerate(zip(vectors, images, strict=True)):
            db.execute(
                "INSERT INTO items (id, label, added_at, model_version, vector_sha256, vector, thumbnail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f"old-{n}", f"label {n}", "2025-01-01T00:00:00+00:00", model["version"],
                 hashlib.sha256(vector).hexdigest(), vector, data),
            )  # fmt: skip
        db.execute("DELETE FROM items WHERE id = 'old-0'")  # removed, as 0.1.0 logged it
        db.execute("INSERT INTO removals (key) VALUES (1)")
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        listing = c.get("/gallery").json()
        assert [(i["id"], i["label"]) for i in listing["items"]] == [
            ("old-1", "label 1"),
            ("old-2", "label 2"),
        ]
        found = c.post("/similar", params={"k": 1}, files={"file": ("q.png", images[2])}).json()
        assert found["neighbours"][0]["id"] == "old-2" and found["neighbours"][0]["distance"] < 1e-2
        assert c.get("/gallery/old-1/thumbnail.png").content == images[1]
        assert add(c, "new", image(7)).status_code == 201
        assert [i["id"] for i in c.get("/gallery").json()["items"]] == ["old-1", "old-2", "new"]
        assert c.delete("/gallery/old-1", headers=AUTH).status_code == 200
    assert head(directory / "gallery.sqlite") == "0002"
    with closing(sqlite3.connect(directory / "gallery.sqlite")) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {"meta", "items", "removals"} & tables
    shutil.rmtree(weights / "gallery")
