"""The gallery's storage under concurrency, over real HTTP against real servers: replicas (two
server processes on one weights directory) adding at once lose nothing and see each other's items;
adds do not stall the event loop, and no read waits on a save; a gallery in the old on-disk format
(manifest + FAISS file + thumbnail files) is migrated on first open."""

import hashlib
import json
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
from PIL import Image

from alexnet_core import files
from tests.images import encode
from tests.processes import server_subprocess
from tests.test_gallery import AUTH, KEY, add, export, image

LEGACY_FORMAT = "alexnet-serve-gallery/1"


@pytest.fixture(scope="module")
def features_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-model") / "feat.onnx"
    export(path, seed=1)
    return path


@pytest.fixture
def weights(features_model: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "weights"
    directory.mkdir()
    shutil.copy(features_model, directory / "feat.onnx")
    return directory


def write_legacy_gallery(
    directory: Path, model: Path, vectors: np.ndarray, thumbs: list[bytes], ids: list[str]
) -> None:
    """A gallery as the service stored it before SQLite: manifest.json naming index-1.faiss (an
    IndexIDMap2 over IndexFlatL2, keys 0..n-1) and its SHA-256, and thumbs/<key>.png."""
    (directory / "thumbs").mkdir(parents=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    data = faiss.serialize_index(index)
    (directory / "index-1.faiss").write_bytes(data.tobytes())
    for key, thumb in enumerate(thumbs):
        (directory / "thumbs" / f"{key}.png").write_bytes(thumb)
    manifest = {
        "format": LEGACY_FORMAT,
        "model_version": "feat",
        "model_sha256": files.sha256(model),
        "dim": vectors.shape[1],
        "generation": 1,
        "index_file": "index-1.faiss",
        "index_sha256": hashlib.sha256(data).hexdigest(),
        "next_key": len(vectors),
        "items": [
            {"id": item_id, "label": f"old {key}", "key": key, "added_at": "2024-01-01T00:00:00+00:00"}
            for key, item_id in enumerate(ids)
        ],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.long
def test_replicas_on_one_directory_keep_every_item(weights: Path, tmp_path: Path) -> None:
    """Two processes on one weights directory, 30 adds through each at once: every item is kept,
    each process finds the items added through the other, a removal reaches the other too, and a
    restart serves them all with their thumbnails."""
    with (
        server_subprocess(weights, tmp_path, api_key=KEY) as a,
        server_subprocess(weights, tmp_path, api_key=KEY) as b,
        httpx.Client(base_url=a.url, timeout=120) as ca,
        httpx.Client(base_url=b.url, timeout=120) as cb,
    ):
        jobs = [(ca if i % 2 else cb, f"item-{i}", image(i)) for i in range(60)]
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda job: add(*job).status_code, jobs))
        assert statuses == [201] * 60
        for c in (ca, cb):
            assert c.get("/gallery").json()["count"] == 60
        # Added through A (odd), found by B; added through B (even), found by A.
        for c, item in ((cb, 7), (ca, 8)):
            found = c.post("/similar", params={"k": 1}, files={"file": ("q.png", image(item))}).json()
            assert found["neighbours"][0]["id"] == f"item-{item}", found
            assert found["neighbours"][0]["distance"] < 1e-2
        assert ca.delete("/gallery/item-9", headers=AUTH).status_code == 200
        again = cb.post("/similar", params={"k": 1}, files={"file": ("q.png", image(9))}).json()
        assert again["neighbours"][0]["id"] != "item-9"
        assert cb.get("/gallery/item-9/thumbnail.png").status_code == 404
    with (
        server_subprocess(weights, tmp_path, api_key=KEY) as c,
        httpx.Client(base_url=c.url, timeout=120) as client,
    ):
        listing = client.get("/gallery").json()
        assert listing["count"] == 59
        assert {i["id"] for i in listing["items"]} == {f"item-{i}" for i in range(60)} - {"item-9"}
        for item in listing["items"]:
            thumb = client.get(item["thumbnail_url"])
            assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG"), item


class Poller:
    """GETs ``path`` in a loop from a thread, recording each answer's latency and status."""

    def __init__(self, url: str, path: str) -> None:
        self.url, self.path = url, path
        self.answers: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                status = client.get(self.path).status_code
                self.answers.append((time.perf_counter() - started, status))
                time.sleep(0.01)

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def worst(self) -> float:
        assert self.answers and all(status == 200 for _, status in self.answers), self.answers[-5:]
        return max(latency for latency, _ in self.answers)


@pytest.mark.long
def test_adds_do_not_stall_the_event_loop(weights: Path, tmp_path: Path) -> None:
    """A gallery of 4,000 items, two clients adding and one listing at once: /health never waits
    on a save (each add stores one item, and nothing on the event loop waits for it)."""
    n = 4000
    rng = np.random.default_rng(0)
    vectors = rng.random((n, 4096), dtype=np.float32)
    with (
        server_subprocess(weights, tmp_path, api_key=KEY) as server,
        httpx.Client(base_url=server.url, timeout=120) as c,
    ):
        version = c.get("/model").json()["version"]
        png = encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
        write_legacy_gallery(weights / "gallery" / version, weights / "feat.onnx", vectors, [png] * n,
                             [f"old-{i}" for i in range(n)])  # fmt: skip
        assert c.get("/gallery").json()["count"] == n  # opened (and loaded) before measuring
        with Poller(server.url, "/health") as health, Poller(server.url, "/gallery") as listing:
            time.sleep(0.3)
            jobs = [(f"new-{i}", image(i)) for i in range(12)]
            with ThreadPoolExecutor(2) as pool:
                statuses = list(pool.map(lambda job: add(c, *job).status_code, jobs))
            time.sleep(0.3)
        assert statuses == [201] * 12
        assert c.get("/gallery").json()["count"] == n + 12
        # Nothing on the loop waits for a save: a stall would last as long as one (a second or
        # more at this size); the bound leaves room for a loaded 2-core machine's scheduling.
        print(f"/health worst {health.worst() * 1000:.0f} ms over {len(health.answers)} requests")
        assert health.worst() < 0.5
        assert len(listing.answers) >= 3 and listing.worst() < 5


def test_reads_do_not_wait_on_a_save(weights: Path, tmp_path: Path) -> None:
    """The gallery database's write lock held by another process: an add waits for it, and
    meanwhile /health, the listing and a thumbnail answer at once."""
    from tests.conftest import cpu_settings, serve

    with (
        serve(cpu_settings(weights, api_key=KEY)) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        assert add(c, "first", image(1)).status_code == 201
        version = c.get("/model").json()["version"]
        database = weights / "gallery" / version / "gallery.sqlite"
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a save in another replica holds it
        result: list[int] = []
        adder = threading.Thread(target=lambda: result.append(add(c, "second", image(2)).status_code))
        try:
            adder.start()
            time.sleep(1.0)
            assert not result, "the add did not wait for the write lock"
            for path in ("/health", "/gallery", "/gallery/first/thumbnail.png"):
                started = time.perf_counter()
                assert c.get(path).status_code == 200
                assert time.perf_counter() - started < 1.0, path
        finally:
            holder.execute("COMMIT")
            holder.close()
        adder.join(timeout=60)
        assert result == [201]
        assert c.get("/gallery").json()["count"] == 2


def test_a_gallery_in_the_old_format_is_migrated(weights: Path, tmp_path: Path) -> None:
    from tests.conftest import cpu_settings, serve

    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        version = c.get("/model").json()["version"]
        images = [image(i) for i in range(3)]
        embedded = c.post("/embed", files=[("files", (f"{i}.png", d)) for i, d in enumerate(images)])
        vectors = np.asarray([r["vector"] for r in embedded.json()["results"]], np.float32)
        directory = weights / "gallery" / version
        write_legacy_gallery(directory, weights / "feat.onnx", vectors, images, ["a", "b", "c"])
        listing = c.get("/gallery").json()
        assert listing["count"] == 3 and [i["label"] for i in listing["items"]] == ["old 0", "old 1", "old 2"]
        found = c.post("/similar", params={"k": 1}, files={"file": ("q.png", images[1])}).json()
        assert found["neighbours"][0]["id"] == "b" and found["neighbours"][0]["distance"] < 1e-2
        assert c.get("/gallery/c/thumbnail.png").content == images[2]
        assert add(c, "d", image(4)).status_code == 201
        assert not (directory / "manifest.json").exists() and not list(directory.glob("index-*"))
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert [i["id"] for i in c.get("/gallery").json()["items"]] == ["a", "b", "c", "d"]
