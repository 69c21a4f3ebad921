"""Feature search over real HTTP: /embed, /gallery, /similar on a real server with a model exported
with its features output (fc7 after ReLU), checked against torch; the gallery's files on disk
(atomic, restart-proof, bound to one model file, corruption reported); hostile inputs answered 4xx."""

import json
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from alexnet_core.pipeline import center_square, ten_crop
from tests.conftest import cpu_settings, serve
from tests.images import base64_input, encode, photo, photo_jpeg

KEY = "gallery-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZES = {"input_size": 64, "resize_size": 73}  # small crops: a quick export and quick inference


def export(path: Path, seed: int) -> None:
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    # The crops kind with --features (the square kind always has the output: tests/test_square_model.py).
    weights = random_weights("paper", seed=seed, num_classes=10)
    export_onnx(weights, path, features=True, input_kind="crops", **SIZES)


@pytest.fixture(scope="module")
def features_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("features-model") / "feat.onnx"
    export(path, seed=1)
    return path


@pytest.fixture
def weights(features_model: Path, tmp_path: Path) -> Path:
    """A fresh weights directory holding (a copy of) the features model: each test its own gallery."""
    directory = tmp_path / "weights"
    directory.mkdir()
    shutil.copy(features_model, directory / "feat.onnx")
    return directory


@pytest.fixture
def client(weights: Path) -> Iterator[httpx.Client]:
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def image(seed: int) -> bytes:
    """A distinct real-looking image per seed: a crop of a real photo, shifted and tinted."""
    rng = np.random.default_rng(seed)
    left, top = (int(v) for v in rng.integers(0, 300, 2))
    region = np.asarray(
        photo("flower.jpg" if seed % 2 else "china.jpg").crop((left, top, left + 200, top + 200))
    )
    tinted = np.clip(region.astype(np.int16) + rng.integers(-40, 40, 3), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(tinted), "PNG")


def add(c: httpx.Client, item_id: str, data: bytes, label: str | None = None) -> httpx.Response:
    form = {"id": item_id} | ({"label": label} if label is not None else {})
    return c.post("/gallery", data=form, files={"file": (f"{item_id}.png", data, "image/png")}, headers=AUTH)


def torch_features(path: Path, data: bytes) -> np.ndarray:
    """The ten-crop mean of fc7 after ReLU, computed by torch from the same weights."""
    from model_export.weights import random_weights

    model = random_weights("paper", seed=1, num_classes=10).model.eval()
    square = center_square(Image.open(__import__("io").BytesIO(data)).convert("RGB"), SIZES["resize_size"])
    crops = torch.from_numpy(
        ten_crop(square, SIZES["input_size"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    )
    with torch.no_grad():
        x = torch.flatten(model.avgpool(model.features(crops)), 1)
        return model.classifier[:5](x).mean(dim=0).numpy()


def test_features_output_is_fc7_after_relu(features_model: Path) -> None:
    session = ort.InferenceSession(str(features_model), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["features_output"]) == "features"


def test_embed_is_the_ten_crop_mean_of_fc7(client: httpx.Client, features_model: Path) -> None:
    data = image(3)
    response = client.post("/embed", files=[("files", ("a.png", data)), ("files", ("b.png", image(4)))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["aggregation"] == "ten-crop mean" and body["dim"] == 4096
    first, second = (np.asarray(r["vector"], np.float32) for r in body["results"])
    assert first.shape == (4096,) and (first >= 0).all()  # after the ReLU
    expected = torch_features(features_model, data)
    assert np.abs(first - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert not np.allclose(first, second)


def test_gallery_add_search_delete_and_restart(client: httpx.Client, weights: Path) -> None:
    items = {f"img-{i}": image(i) for i in range(6)}
    for item_id, data in items.items():
        response = add(client, item_id, data, label=f"label {item_id}")
        assert response.status_code == 201, response.text
        assert response.json()["id"] == item_id
    listing = client.get("/gallery").json()
    assert listing["count"] == 6 and {i["id"] for i in listing["items"]} == set(items)

    # Each image's nearest neighbour is itself, at distance 0; the rest follow, farther.
    response = client.post("/similar", params={"k": 3}, files={"file": ("q.png", items["img-2"])})
    assert response.status_code == 200, response.text
    body = response.json()
    neighbours = body["neighbours"]
    assert neighbours[0]["id"] == "img-2" and neighbours[0]["distance"] < 1e-2
    assert (
        len(neighbours) == 3
        and neighbours[0]["distance"] <= neighbours[1]["distance"] <= neighbours[2]["distance"]
    )
    assert neighbours[0]["label"] == "label img-2"
    assert len(body["predictions"]) == 5  # ranked from the same inference call
    # The distances are Euclidean between the /embed vectors.
    vectors = {
        i: np.asarray(
            client.post("/embed", files={"file": ("x.png", items[i])}).json()["results"][0]["vector"]
        )
        for i in ("img-2", neighbours[1]["id"])
    }
    assert neighbours[1]["distance"] == pytest.approx(
        float(np.linalg.norm(vectors["img-2"] - vectors[neighbours[1]["id"]])), rel=1e-3
    )
    thumb = client.get(neighbours[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert max(Image.open(__import__("io").BytesIO(thumb.content)).size) <= 96

    assert client.delete("/gallery/img-2", headers=AUTH).status_code == 200
    assert client.delete("/gallery/img-2", headers=AUTH).status_code == 404
    again = client.post("/similar", params={"k": 1}, files={"file": ("q.png", items["img-2"])}).json()
    assert again["neighbours"][0]["id"] != "img-2"

    # On disk: one SQLite database (and its WAL files), the items in it, nothing else.
    directory = next((weights / "gallery").iterdir())
    assert {p.name for p in directory.iterdir()} <= {f"gallery.sqlite{s}" for s in ("", "-wal", "-shm")}
    with closing(sqlite3.connect(directory / "gallery.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM gallery_items").fetchone() == (5,)
    # A restart keeps the gallery.
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/gallery").json()["count"] == 5
        kept = c.post("/similar", params={"k": 1}, files={"file": ("q.png", items["img-4"])}).json()
        assert kept["neighbours"][0]["id"] == "img-4"


def test_corrupt_store_is_reported_and_not_served(client: httpx.Client, weights: Path) -> None:
    assert add(client, "one", image(1)).status_code == 201
    directory = next((weights / "gallery").iterdir())
    database = directory / "gallery.sqlite"
    with closing(sqlite3.connect(database)) as db, db:
        # One flipped byte inside a stored vector: SQLite alone would serve it.
        (vector,) = db.execute("SELECT vector FROM gallery_items").fetchone()
        db.execute("UPDATE gallery_items SET vector = ?", (bytes([vector[0] ^ 0xFF]) + vector[1:],))

    def refused(c: httpx.Client) -> None:
        for response in (
            c.get("/gallery"),
            c.post("/similar", files={"file": ("q.png", image(1))}),
            add(c, "two", image(2)),
        ):
            assert response.status_code == 503, response.text
            assert "corrupt" in response.json()["detail"]
            assert str(weights.parent) not in response.text  # no server path reaches the client

    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        refused(c)
        for suffix in ("-wal", "-shm"):
            database.with_name(database.name + suffix).unlink(missing_ok=True)
        database.write_bytes(b"not a database at all" * 100)
        refused(c)
        with closing(sqlite3.connect(database.with_name("other.sqlite"))) as db:
            db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        database.with_name("other.sqlite").replace(database)  # a database without its meta
        refused(c)
        # Moved away, a new gallery starts without a restart.
        directory.rename(directory.with_name("broken"))
        assert c.get("/gallery").json()["count"] == 0
        assert add(c, "fresh", image(3)).status_code == 201


def test_another_models_gallery_is_refused(client: httpx.Client, weights: Path) -> None:
    assert add(client, "one", image(1)).status_code == 201
    export(weights / "feat.onnx", seed=2)  # same version name, other weights: vectors not comparable
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for response in (c.get("/gallery"), c.post("/similar", files={"file": ("q.png", image(1))})):
            assert response.status_code == 409, response.text
            assert "another model file" in response.json()["detail"]


def test_embed_and_v2_time_out_as_predict_does(weights: Path) -> None:
    """/embed and /v2 inference run under /predict's time limit and answer as it does: a 503 with
    Retry-After and the same reason, counted as a timeout."""
    with (
        serve(cpu_settings(weights, request_timeout_s=0.001)) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        embedded = c.post("/embed", files={"file": ("a.png", image(1))})
        inferred = c.post("/v2/models/alexnet/infer", json={"inputs": [base64_input([image(1)])]})
        for response, reason in ((embedded, embedded.json()["detail"]), (inferred, inferred.json()["error"])):
            assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
            assert reason == "timed out after 0.001 s waiting for inference: server overloaded"
        assert 'alexnet_rejected_total{reason="timeout"} 2.0' in c.get("/metrics").text


def test_model_without_features_is_a_409(imagenet_model_dir: Path) -> None:
    with (
        serve(cpu_settings(imagenet_model_dir, api_key=KEY)) as url,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        for response in (
            c.post("/embed", files={"file": ("a.jpg", photo_jpeg())}),
            c.post("/similar", files={"file": ("a.jpg", photo_jpeg())}),
            c.get("/gallery"),
            add(c, "x", image(1)),
        ):
            assert response.status_code == 409, response.text
            assert "alexnet-export --features" in response.json()["detail"]


@pytest.mark.parametrize(
    ("form", "files", "status", "words"),
    [
        ({"id": "../escape"}, True, 422, "id"),
        ({"id": ""}, True, 422, "id"),
        ({"id": "a" * 65}, True, 422, "id"),
        ({"id": "with space"}, True, 422, "id"),
        ({"id": "ok\n"}, True, 422, "id"),
        ({"id": "ok", "label": "x" * 201}, True, 422, "label"),
        ({"id": "ok"}, False, 400, "no image"),
        ({}, True, 422, "id"),
    ],
)
def test_hostile_gallery_adds(
    client: httpx.Client, weights: Path, form: dict[str, str], files: bool, status: int, words: str
) -> None:
    upload = {"file": ("a.png", image(1), "image/png")} if files else None
    response = client.post("/gallery", data=form, files=upload, headers=AUTH)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert not (weights / "gallery").exists() or not list((weights / "gallery").rglob("gallery.sqlite"))


def test_hostile_requests(client: httpx.Client, weights: Path) -> None:
    png = image(1)
    # No key, a wrong key: refused before the body is read; nothing written.
    assert client.post("/gallery", data={"id": "x"}, files={"file": ("a.png", png)}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        client.post("/gallery", data={"id": "x"}, files={"file": ("a.png", png)}, headers=wrong).status_code
        == 401
    )
    assert client.delete("/gallery/x").status_code == 401
    assert not (weights / "gallery").exists()
    assert add(client, "dup", png).status_code == 201
    duplicate = add(client, "dup", png)
    assert duplicate.status_code == 409 and "exists" in duplicate.json()["detail"]
    not_image = client.post(
        "/gallery", data={"id": "t"}, files={"file": ("a.png", b"plain text")}, headers=AUTH
    )
    assert not_image.status_code == 415
    two_files = client.post(
        "/gallery", data={"id": "t"}, files=[("file", ("a.png", png)), ("file", ("b.png", png))], headers=AUTH
    )
    assert two_files.status_code == 400
    cases = [
        (client.post("/embed"), 400),
        (client.post("/embed", files={"file": ("e.png", b"")}), 400),
        (client.post("/embed", files={"file": ("t.png", png[: len(png) // 2])}), 422),
        (client.post("/embed", files=[("files", ("a.png", png))] * 17), 400),
        (client.post("/similar"), 422),
        (client.post("/similar", params={"k": 0}, files={"file": ("a.png", png)}), 422),
        (client.post("/similar", params={"k": 101}, files={"file": ("a.png", png)}), 422),
        (client.post("/similar", params={"k": "x"}, files={"file": ("a.png", png)}), 422),
        (client.post("/similar", files={"file": ("a.txt", b"GIF89a broken")}), 422),
        (client.delete("/gallery/..%2Fetc", headers=AUTH), 404),  # no route: the slash is decoded
        (client.delete("/gallery/bad%20id", headers=AUTH), 422),
        (client.delete("/gallery/" + "a" * 65, headers=AUTH), 422),
        (client.delete("/gallery/missing", headers=AUTH), 404),
        (client.get("/gallery/missing/thumbnail.png"), 404),
        (client.get("/gallery/bad%20id/thumbnail.png"), 422),
        (client.put("/gallery"), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["detail"]
    assert client.get("/gallery").json()["count"] == 1


def test_empty_gallery_and_docs(client: httpx.Client) -> None:
    response = client.post("/similar", files={"file": ("a.png", image(1))})
    assert response.status_code == 404 and "empty" in response.json()["detail"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/embed",
        "/similar",
        "/gallery",
        "/gallery/{item_id}",
        "/gallery/{item_id}/thumbnail.png",
    } <= set(paths)
    body = paths["/gallery"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["id", "file"] and body["properties"]["file"]["format"] == "binary"
