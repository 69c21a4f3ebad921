"""The Open Inference Protocol (KServe v2) through `tritonclient.http`, a client nobody here wrote,
against the real server over HTTP; its answers checked against /predict on the same images."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from alexnet_core.session import OnnxClassifier
from tests.conftest import cpu_settings, serve
from tests.images import base64_input, photo_jpeg

httpclient = pytest.importorskip("tritonclient.http", reason="pip install tritonclient geventhttpclient")
from tritonclient.utils import InferenceServerException  # noqa: E402

PHOTOS = [photo_jpeg("china.jpg"), photo_jpeg("flower.jpg")]


@pytest.fixture(scope="module")
def url(imagenet_model_dir: Path) -> Iterator[str]:
    # Room for ten crops as JSON numbers (about 30 MB of text).
    with serve(cpu_settings(imagenet_model_dir, max_upload_mb=64)) as base:
        yield base


@pytest.fixture(scope="module")
def triton(url: str) -> Iterator["httpclient.InferenceServerClient"]:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def classifier(imagenet_model_dir: Path) -> OnnxClassifier:
    (path,) = imagenet_model_dir.glob("*.onnx")
    return OnnxClassifier(path, ["CPUExecutionProvider"], warm_up=False)


def predict(url: str, image: bytes, k: int = 5) -> list[dict[str, object]]:
    answer = httpx.post(f"{url}/predict", params={"top_k": k}, files={"file": ("a.jpg", image)}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["predictions"]


def bytes_input(images: list[bytes]) -> "httpclient.InferInput":
    """Binary only: tritonclient sends JSON BYTES as UTF-8 text, which image bytes are not."""
    tensor = httpclient.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def test_health_and_metadata(triton: "httpclient.InferenceServerClient", classifier: OnnxClassifier) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("alexnet")
    assert triton.is_model_ready("alexnet", classifier.version)
    assert not triton.is_model_ready("resnet")
    assert {"binary_tensor_data", "classification"} <= set(triton.get_server_metadata()["extensions"])
    meta = triton.get_model_metadata("alexnet")
    assert meta["name"] == "alexnet" and meta["versions"] == [classifier.version]
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["images"] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert inputs["image_bytes"]["datatype"] == "BYTES"
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]


def test_infer_encoded_images_matches_predict(triton: "httpclient.InferenceServerClient", url: str) -> None:
    """BYTES images get the full ten-crop pipeline: the same probabilities as /predict."""
    result = triton.infer("alexnet", [bytes_input(PHOTOS)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, 1000) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    for image, row in zip(PHOTOS, probabilities, strict=True):
        for p in predict(url, image):
            assert row[p["index"]] == pytest.approx(p["probability"], rel=1e-5)
    assert result.get_response()["model_name"] == "alexnet"


def test_infer_raw_tensor_binary_and_json(
    triton: "httpclient.InferenceServerClient", classifier: OnnxClassifier
) -> None:
    """The model's own input (ten crops per image), as binary data and as JSON numbers."""
    crops = np.concatenate([classifier.metadata.preprocess(p, max_pixels=10**8).crops for p in PHOTOS])
    assert crops.shape == (20, 3, 224, 224)
    expected = classifier.probabilities(crops)
    for binary, sent in ((True, crops), (False, crops[:10])):  # JSON: one image, the body limit
        tensor = httpclient.InferInput("images", list(sent.shape), "FP32")
        tensor.set_data_from_numpy(sent, binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        got = triton.infer("alexnet", [tensor], outputs=[out]).as_numpy("probabilities")
        np.testing.assert_allclose(got, expected[: len(sent) // 10], rtol=1e-5, atol=1e-7)
    # The encoded images give the same answer as their crops.
    from_bytes = triton.infer("alexnet", [bytes_input(PHOTOS)]).as_numpy("probabilities")
    np.testing.assert_allclose(from_bytes, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(triton: "httpclient.InferenceServerClient", url: str, binary: bool) -> None:
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = triton.infer("alexnet", [bytes_input(PHOTOS)], outputs=[out]).as_numpy("probabilities")
    assert result.shape == (2, 3)
    for image, row in zip(PHOTOS, result, strict=True):
        top = predict(url, image, k=3)
        # bytes from binary data, str from JSON (as tritonclient gives them for Triton too)
        parsed = [(item.decode() if binary else item).split(":", 2) for item in row]
        assert [int(index) for _, index, _ in parsed] == [p["index"] for p in top]
        assert [label for _, _, label in parsed] == [p["label"] for p in top]
        for (score, _, _), p in zip(parsed, top, strict=True):
            assert float(score) == pytest.approx(p["probability"], abs=1e-6)


def test_base64_images_in_json(url: str) -> None:
    """curl-friendly: images as base64 strings in plain JSON (content_type, as MLServer)."""
    body = {
        "inputs": [base64_input(PHOTOS[:1])],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }
    answer = httpx.post(f"{url}/v2/models/alexnet/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 1]
    assert int(output["data"][0].split(":")[1]) == predict(url, PHOTOS[0], k=1)[0]["index"]


def expect_error(call: object, status: int, words: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    assert caught.value.status() == str(status), caught.value
    assert words in caught.value.message(), caught.value.message()


def test_errors_through_the_client(triton: "httpclient.InferenceServerClient") -> None:
    expect_error(lambda: triton.infer("resnet", [bytes_input(PHOTOS[:1])]), 404, "unknown model")
    expect_error(lambda: triton.infer("alexnet", [bytes_input([b"not an image"])]), 415, "image_bytes[0]")
    expect_error(lambda: triton.get_model_metadata("alexnet", "nope"), 404, "not served")
    wrong_shape = httpclient.InferInput("images", [10, 3, 32, 32], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((10, 3, 32, 32), np.float32))
    expect_error(lambda: triton.infer("alexnet", [wrong_shape]), 400, "expected [-1, 3, 224, 224]")
    nine = httpclient.InferInput("images", [9, 3, 224, 224], "FP32")
    nine.set_data_from_numpy(np.zeros((9, 3, 224, 224), np.float32))
    expect_error(lambda: triton.infer("alexnet", [nine]), 400, "multiple of 10")
    wrong_type = httpclient.InferInput("images", [10, 3, 224, 224], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((10, 3, 224, 224), np.float64))
    expect_error(lambda: triton.infer("alexnet", [wrong_type]), 400, "expected FP32")
    unknown_out = [httpclient.InferRequestedOutput("logits")]
    expect_error(
        lambda: triton.infer("alexnet", [bytes_input(PHOTOS[:1])], outputs=unknown_out), 400, "logits"
    )
    too_many = bytes_input(PHOTOS * 9)  # 18 images, limit 16
    expect_error(lambda: triton.infer("alexnet", [too_many]), 400, "16 per request")


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"{not json", {}, "not JSON"),
        (b"[]", {}, "JSON object"),
        (b'{"inputs": []}', {}, "non-empty list"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, -3]}]}', {}, "negative"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [10, 3, 224, 224]}]}', {}, "neither"),
        (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', {}, "datatype"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [2], "data": [1, "a"]}]}', {}, "FP32"),
        (
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
            {},
            "2 values",
        ),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [2]}]}xx', {"x": "1"}, "not JSON"),
        (b'{"inputs": [{"name": "q", "datatype": "FP32", "shape": [1], "data": [1]}]}', {}, "unknown input"),
    ],
)
def test_malformed_requests_get_protocol_errors(
    url: str, body: bytes, headers: dict[str, str], words: str
) -> None:
    answer = httpx.post(f"{url}/v2/models/alexnet/infer", content=body, headers=headers, timeout=60)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()) == {"error"} and words in answer.json()["error"], answer.json()


def post_binary(
    url: str, header: dict[str, object], data: bytes, length: int | None = None
) -> httpx.Response:
    head = json.dumps(header).encode()
    length_header = {"Inference-Header-Content-Length": str(len(head) if length is None else length)}
    return httpx.post(
        f"{url}/v2/models/alexnet/infer", content=head + data, headers=length_header, timeout=60
    )


def test_binary_tensor_data_is_checked(url: str) -> None:
    spec = {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}
    cases = [
        (post_binary(url, {"inputs": [spec]}, b"\x09\x00\x00\x00abc"), "runs past"),
        (post_binary(url, {"inputs": [spec]}, b"\x01\x00\x00\x00abc"), "bytes left"),
        (post_binary(url, {"inputs": [spec]}, b"\x03\x00\x00\x00abcdef"), "belong to no input"),
        (post_binary(url, {"inputs": [spec]}, b"\x03\x00\x00\x00abc", length=999), "does not fit"),
        (
            post_binary(url, {"inputs": [{**spec, "parameters": {"binary_data_size": 70}}]}, b"x"),
            "does not fit",
        ),
    ]
    for answer, words in cases:
        assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    crops = {
        "name": "images",
        "datatype": "FP32",
        "shape": [10, 3, 224, 224],
        "parameters": {"binary_data_size": 8},
    }
    answer = post_binary(url, {"inputs": [crops]}, bytes(8))
    assert answer.status_code == 400 and "8 bytes for shape" in answer.json()["error"]


def test_not_ready_without_a_model(tmp_path: Path) -> None:
    with serve(cpu_settings(tmp_path, max_upload_mb=1)) as base:
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        try:
            assert client.is_server_live() and not client.is_server_ready()
            assert not client.is_model_ready("alexnet")
            expect_error(lambda: client.infer("alexnet", [bytes_input(PHOTOS[:1])]), 503, "no model loaded")
            # The body limit answers in the protocol's shape too.
            big = httpclient.InferInput("images", [10, 3, 224, 224], "FP32")
            big.set_data_from_numpy(np.zeros((10, 3, 224, 224), np.float32))
            expect_error(lambda: client.infer("alexnet", [big]), 413, "upload limit")
        finally:
            client.close()
        answer = httpx.get(f"{base}/v2/health/ready")
        assert answer.status_code == 400 and "not ready" in answer.json()["error"]


@pytest.mark.parametrize("count", [65, 2_000_000])
def test_too_many_encoded_images_is_a_400_not_a_busy_server(url: str, count: int) -> None:
    """More images than a request may hold: no retry helps, so not a 503 (beyond the queue's
    capacity the admission would say "server busy")."""
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [count], "data": [""] * count}]}
    answer = httpx.post(f"{url}/v2/models/alexnet/infer", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert f"{count} images, 1 to 16 per request" in answer.json()["error"]
    assert "retry-after" not in answer.headers


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}]}",
    ],
)
def test_deeply_nested_json_is_a_400(url: str, body: bytes) -> None:
    answer = httpx.post(f"{url}/v2/models/alexnet/infer", content=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert "nested too deeply" in answer.json()["error"]


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000, "-1"])
def test_a_header_length_that_is_not_a_plain_number_is_a_400(url: str, length: str) -> None:
    """``str.isdigit`` accepts "²", and 5000 digits, but ``int()`` refuses both."""
    head = b'{"inputs": []}'
    headers = {"Inference-Header-Content-Length": length.encode("latin-1")}
    answer = httpx.post(f"{url}/v2/models/alexnet/infer", content=head, headers=headers, timeout=60)
    assert answer.status_code == 400, answer.text
    assert "Inference-Header-Content-Length" in answer.json()["error"]
