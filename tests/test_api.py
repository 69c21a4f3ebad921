"""The real app under uvicorn on a loopback port, real image bytes over HTTP."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from alexnet_core.images import decode
from alexnet_core.pipeline import center_square
from benchmarks.mix import gif_claiming, png_claiming
from tests.conftest import cpu_settings, serve
from tests.images import encode, photo, photo_jpeg

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def expected_probabilities(model: Path, data: bytes) -> np.ndarray:
    """The paper's ten-crop average computed independently of the service's ten_crop."""
    square = center_square(decode(data, 256, 10**8), 256).astype(np.float32) / 255.0
    x = ((square - MEAN) / STD).transpose(2, 0, 1)
    crops = [x[:, t : t + 224, s : s + 224] for t, s in ((0, 0), (0, 32), (32, 0), (32, 32), (16, 16))]
    batch = np.stack(crops + [c[:, :, ::-1] for c in crops]).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"images": batch}
    )[0]
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (softmax / softmax.sum(axis=1, keepdims=True)).mean(axis=0)


def test_predict_real_photo_end_to_end(client: httpx.Client, imagenet_model_dir: Path) -> None:
    data = photo_jpeg("china.jpg")
    response = client.post("/predict", files={"file": ("china.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "alexnet-random"
    (result,) = body["results"]
    assert result["filename"] == "china.jpg"
    predictions = result["predictions"]
    assert len(predictions) == 5
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    expected = expected_probabilities(imagenet_model_dir / "alexnet-random.onnx", data)
    assert [p["index"] for p in predictions] == list(np.argsort(-expected)[:5])
    for p in predictions:
        assert p["probability"] == pytest.approx(float(expected[p["index"]]), rel=1e-4)
    assert predictions[0]["wnid"].startswith("n") and predictions[0]["label"]
    timings = result["timings"]
    assert timings["decode_ms"] > 0 and timings["preprocess_ms"] > 0 and timings["inference_ms"] > 0


def test_several_files_and_top_k(client: httpx.Client) -> None:
    files = [("files", (name, photo_jpeg(name), "image/jpeg")) for name in ("china.jpg", "flower.jpg")]
    response = client.post("/predict", params={"top_k": 1000}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["china.jpg", "flower.jpg"]
    for r in results:
        assert len(r["predictions"]) == 1000
        assert sum(p["probability"] for p in r["predictions"]) == pytest.approx(1.0, abs=1e-5)
        assert sorted(p["index"] for p in r["predictions"]) == list(range(1000))
    assert results[0]["predictions"][0]["index"] != results[1]["predictions"][0]["index"] or (
        results[0]["predictions"][0]["probability"] != results[1]["predictions"][0]["probability"]
    )


def test_file_name_and_content_type_are_ignored(client: httpx.Client) -> None:
    data = encode(photo(), "PNG")
    as_declared = client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
    as_text = client.post("/predict", files={"file": ("notes.txt", data, "text/plain")})
    assert as_declared.status_code == as_text.status_code == 200
    assert as_declared.json()["results"][0]["predictions"] == as_text.json()["results"][0]["predictions"]


def test_exif_rotated_photo_predicts_like_upright(client: httpx.Client) -> None:
    upright = photo("flower.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    a = client.post("/predict", files={"file": ("r.png", rotated)}).json()["results"][0]["predictions"]
    b = client.post("/predict", files={"file": ("u.png", encode(upright, "PNG"))}).json()["results"][0][
        "predictions"
    ]
    assert a == b


BAD_UPLOADS = {
    "empty file": ({"file": ("e.jpg", b"", "image/jpeg")}, 400, "empty"),
    "not an image": (
        {"file": ("a.jpg", b"just some text, not pixels", "image/jpeg")},
        415,
        "not a supported",
    ),
    "svg": (
        {"file": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")},
        415,
        "not a supported",
    ),
    "truncated jpeg": ({"file": ("t.jpg", photo_jpeg()[:3000], "image/jpeg")}, 422, "truncated"),
    "corrupt jpeg": ({"file": ("c.jpg", b"\xff\xd8\xff\xdb" + b"\x13" * 4000)}, 422, "corrupt"),
    "png bomb header": ({"file": ("b.png", png_claiming(100_000, 100_000))}, 413, "too many pixels"),
    "png just over the limit": ({"file": ("b.png", png_claiming(8001, 8000))}, 413, "over the limit"),
    "gif bomb header": ({"file": ("b.gif", gif_claiming(65535, 65535))}, 413, "pixels"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_input_is_a_clear_4xx_and_server_lives(client: httpx.Client, case: str) -> None:
    files, status, words = BAD_UPLOADS[case]
    response = client.post("/predict", files=files)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail
    assert client.get("/health").status_code == 200
    assert client.post("/predict", files={"file": ("ok.jpg", photo_jpeg())}).status_code == 200


@pytest.mark.parametrize(
    ("request_kwargs", "status", "words"),
    [
        ({}, 400, "no image"),
        ({"data": {"other": "field"}}, 400, "no image"),
        ({"content": b"raw bytes", "headers": {"content-type": "application/octet-stream"}}, 400, "no image"),
        ({"params": {"top_k": 0}, "files": {"file": ("a.jpg", b"x")}}, 422, "top_k"),
        ({"params": {"top_k": 1001}, "files": {"file": ("a.jpg", b"x")}}, 422, "top_k"),
        ({"params": {"top_k": "five"}, "files": {"file": ("a.jpg", b"x")}}, 422, "top_k"),
        ({"files": [("files", (f"{i}.jpg", b"x")) for i in range(17)]}, 400, "too many files"),
        (
            {"content": b"--xx\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
            400,
            "",
        ),
    ],
)
def test_bad_requests(client: httpx.Client, request_kwargs: dict, status: int, words: str) -> None:
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_upload_limit_checked_while_reading(imagenet_model_dir: Path) -> None:
    with serve(cpu_settings(imagenet_model_dir, max_upload_mb=1)) as url, httpx.Client(base_url=url) as c:
        big = b"\xff\xd8\xff" + b"\x00" * (2 * 2**20)
        declared = c.post("/predict", files={"file": ("big.jpg", big)})
        assert declared.status_code == 413 and "upload limit" in declared.json()["detail"]

        sent = 0

        def endless() -> bytes:  # chunked, no Content-Length: only counting can stop it
            nonlocal sent
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
            while sent < 50 * 2**20:
                sent += 65536
                yield b"\x00" * 65536

        try:
            streamed = c.post(
                "/predict", content=endless(), headers={"content-type": "multipart/form-data; boundary=b"}
            )
            assert streamed.status_code == 413
        except httpx.HTTPError:
            pass  # the server may close the connection while we are still sending
        assert sent < 50 * 2**20  # it was cut off long before the client ran out of data
        assert c.get("/health").status_code == 200
        assert c.post("/predict", files={"file": ("ok.jpg", photo_jpeg())}).status_code == 200


def test_no_model_starts_and_explains(tmp_path: Path) -> None:
    with serve(cpu_settings(tmp_path)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/health").status_code == 200
        ready = c.get("/ready")
        assert ready.status_code == 503 and "alexnet-export" in ready.json()["reason"]
        predict = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
        assert predict.status_code == 503 and "alexnet-export" in predict.json()["detail"]
        assert c.get("/model").status_code == 503


def test_ready_model_and_metrics(client: httpx.Client) -> None:
    ready = client.get("/ready").json()
    assert ready["ready"] and ready["providers"] == ["CPUExecutionProvider"]
    model = client.get("/model").json()
    assert model["layout"] == "torchvision" and model["num_classes"] == 1000 and not model["trained"]
    assert len(model["sha256"]) == 64 and model["providers"] == ["CPUExecutionProvider"]
    assert model["input_size"] == 224 and model["resize_size"] == 256
    client.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
    text = client.get("/metrics").text
    for series in (
        'alexnet_requests_total{method="POST",route="/predict",status="200"}',
        "alexnet_decode_seconds_bucket",
        "alexnet_preprocess_seconds_bucket",
        "alexnet_inference_seconds_bucket",
        "alexnet_inference_batch_images_bucket",
        "alexnet_requests_in_flight",
        "alexnet_queue_images",
        'alexnet_model_info{providers="CPUExecutionProvider",version="alexnet-random"} 1.0',
    ):
        assert series in text, series


def test_swagger_ui_is_served_offline(client: httpx.Client) -> None:
    html = client.get("/docs").text
    assets = [part.split('"')[1] for part in html.split("src=")[1:] + html.split("href=")[1:]]
    assert assets and all(a.startswith("/") for a in assets), assets
    assert "cdn" not in html.lower()
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body  # the upload form


def test_service_never_imports_torch(imagenet_model_dir: Path) -> None:
    script = f"""
import sys, asyncio, httpx
from service.main import create_app
from service.core.config import Settings
from tests.images import photo_jpeg
weights = {str(imagenet_model_dir)!r}
settings = Settings(_env_file=None, weights_dir=weights, providers=["CPUExecutionProvider"])
app = create_app(settings)
async def main():
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/predict", files={{"file": ("a.jpg", photo_jpeg())}})
            assert r.status_code == 200, r.text
asyncio.run(main())
print("torch" in sys.modules, "torchvision" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_activation_needs_key_and_swaps(imagenet_model_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(imagenet_model_dir / "alexnet-random.onnx", weights / "first.onnx")
    shutil.copy(imagenet_model_dir / "alexnet-random.onnx", weights / "second.onnx")
    (weights / "broken.onnx").write_bytes((weights / "first.onnx").read_bytes()[:100_000])
    (weights / "ACTIVE").write_text("first.onnx")
    settings = cpu_settings(weights, api_key="s3cret")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        # metadata carries the version "alexnet-random": both copies report it, files tell them apart
        assert c.get("/model").json()["file"] == "first.onnx"
        assert c.post("/model/activate", json={"version": "second"}).status_code == 401
        wrong = c.post(
            "/model/activate", json={"version": "second"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.post("/model/activate", json={"version": "../first"}, headers=auth).status_code == 404
        broken = c.post("/model/activate", json={"version": "broken"}, headers=auth)
        assert broken.status_code == 422 and "cannot be loaded" in broken.json()["detail"]
        assert c.get("/model").json()["file"] == "first.onnx"  # the served model stayed
        swapped = c.post("/model/activate", json={"version": "second"}, headers=auth)
        assert swapped.status_code == 200 and swapped.json()["file"] == "second.onnx"
        assert c.get("/model").json()["file"] == "second.onnx"
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
        assert "s3cret" not in json.dumps(c.get("/model").json())
    assert (weights / "ACTIVE").read_text() == "second.onnx"  # a restart keeps the activated model
    with serve(cpu_settings(weights)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/model").json()["file"] == "second.onnx"
        assert c.post("/model/activate", json={"version": "first"}).status_code == 403  # no key: disabled
