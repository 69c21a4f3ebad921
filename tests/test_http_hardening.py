"""The HTTP layer under hostile but valid use (issue 15: findings 3, 4, 9, 10, 12, model integrity)
and the ways to start it (issue 12: the command line, ``uvicorn service.main:app``). Real servers on
loopback, raw sockets where a client library would be too polite."""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest

from alexnet_core import files, model_files
from tests.conftest import cpu_settings, free_port, serve
from tests.images import photo_jpeg
from tests.processes import wait_until

REPO = Path(__file__).parent.parent
KEY = "k3y"


def link_model(source: Path, weights: Path, name: str) -> Path:
    weights.mkdir(parents=True, exist_ok=True)
    os.link(source / "alexnet-random.onnx", weights / name)  # same file, no 240 MB copy
    return weights / name


def raw_exchange(url: str, data: bytes, timeout: float = 30) -> bytes:
    """Sends ``data`` as it is and reads the answer until the server closes or it is complete."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = [int(v) for k, v in headers_of(head).items() if k == "content-length"]
        if length and len(body) >= length[0]:
            break
    return received


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert headers_of(head)["content-type"] == "application/json", head
    return json.loads(body)


@pytest.fixture(scope="module")
def guarded(imagenet_model_dir: Path) -> Iterator[str]:
    """A server with a key and short header, body and keep-alive timeouts."""
    settings = cpu_settings(
        imagenet_model_dir, api_key=KEY, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1
    )
    with serve(settings) as url:
        yield url


# ------------------------------------------------------------------ finding 3: timeouts and limits


def test_idle_and_slow_connections_are_closed_and_health_keeps_answering(guarded: str) -> None:
    host, port = guarded.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(250)]
    slow = [socket.create_connection((host, int(port)), timeout=30) for _ in range(50)]
    try:
        for sock in slow:  # headers begun, never finished
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with httpx.Client(base_url=guarded, timeout=30) as client:
            assert client.get("/health").status_code == 200
        for sock in idle + slow:
            # EOF (or a reset) from the server: it closed the connection after the header timeout.
            # Without one the recv waits for its own 30 s timeout and raises.
            with suppress(ConnectionResetError):
                assert sock.recv(1024) == b""
        with httpx.Client(base_url=guarded, timeout=30) as client:
            assert client.get("/health").status_code == 200
    finally:
        for sock in idle + slow:
            sock.close()


def test_an_oversized_request_head_is_refused(guarded: str) -> None:
    # Neither uvicorn nor httptools bounds a head: without a limit the server buffers it whole.
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: a\r\n" * 20_000  # 200 KB, never ended
    response = raw_exchange(guarded, head)
    assert status_of(response) == 431, response[:300]
    assert "over 65536 bytes" in json_of(response)["detail"]
    with httpx.Client(base_url=guarded, timeout=30) as client:  # an ordinary large head is fine
        assert client.get("/health", headers={"X-Pad": "a" * 8000}).status_code == 200


def test_stalled_upload_gets_408(guarded: str) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    request = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    response = raw_exchange(guarded, request + head + photo_jpeg()[:10_000])  # then nothing more
    assert status_of(response) == 408, response[:300]
    assert "not received within 1 s" in json_of(response)["detail"]


# ------------------------------------------------------------- finding 4: the key before the body


def test_key_is_checked_before_the_body_is_read(guarded: str) -> None:
    # A body announced but never sent: answered at once, so nothing of it was waited for.
    for path in ("/train", "/model/activate"):
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {20 * 2**20}\r\n\r\n{{"
        ).encode()
        response = raw_exchange(guarded, request)
        assert status_of(response) == 401, response[:300]
        assert "API key" in json_of(response)["detail"]
    with httpx.Client(base_url=guarded, timeout=30) as client:
        bad_json = {"Content-Type": "application/json"}
        anonymous = client.post("/train", content=b"{not json", headers=bad_json)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/train", content=b"{not json", headers={**bad_json, "Authorization": "Bearer x"})
        assert wrong.status_code == 401
        deleted = client.delete("/train/0123456789ab")
        assert deleted.status_code == 401
        # With the key the request goes on to validation, as before.
        keyed = client.post(
            "/train", content=b"{not json", headers={**bad_json, "Authorization": f"Bearer {KEY}"}
        )
        assert keyed.status_code in (400, 422), keyed.text
        # Routes without a key stay open.
        assert client.get("/train").status_code == 200


def test_no_key_configured_refuses_before_the_body(imagenet_model_dir: Path) -> None:
    with serve(cpu_settings(imagenet_model_dir)) as url:
        request = b"POST /train HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{"
        response = raw_exchange(url, request)
        assert status_of(response) == 403 and "ALEXNET_API_KEY" in json_of(response)["detail"]


# --------------------------------------------------------------------- finding 12: contract gaps


def test_malformed_http_gets_a_json_400(guarded: str) -> None:
    response = raw_exchange(guarded, b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    assert status_of(response) == 400
    assert "malformed HTTP request" in json_of(response)["detail"]


def test_a_second_file_part_is_refused(guarded: str) -> None:
    image = photo_jpeg()
    with httpx.Client(base_url=guarded, timeout=60) as client:
        two = client.post("/predict", files=[("file", ("a.jpg", image)), ("file", ("b.jpg", image))])
        assert two.status_code == 400 and "`file` sent 2 times" in two.json()["detail"]
        assert client.post("/predict", files={"file": ("a.jpg", image)}).status_code == 200
        several = client.post("/predict", files=[("files", ("a.jpg", image)), ("files", ("b.jpg", image))])
        assert several.status_code == 200 and len(several.json()["results"]) == 2


def test_an_oversized_chunked_upload_is_a_413_whatever_its_form(server: str) -> None:
    """Without Content-Length the size is known only by reading: a body the form parser gives up
    on at once still gets the 413 that the same body with its Content-Length gets."""

    def garbage(total: int) -> Iterator[bytes]:  # not multipart: no boundary anywhere
        for _ in range(total // 2**20):
            yield bytes(2**20)

    multipart = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    with httpx.Client(base_url=server, timeout=60) as client:
        big = client.post("/predict", content=garbage(60 * 2**20), headers=multipart)
        assert big.status_code == 413 and "upload limit" in big.json()["detail"], big.text
        small = client.post("/predict", content=garbage(2**20), headers=multipart)
        assert small.status_code == 400 and "multipart" in small.json()["detail"], small.text
        # Refused when the whole body has been read: nothing left to read.
        fields = client.post("/predict", data={f"f{i}": "x" for i in range(1001)}, files={"file": b"x"})
        assert fields.status_code == 400 and "Too many fields" in fields.json()["detail"], fields.text


# ----------------------------------------------- findings 9 and 10, integrity: what gets served


def with_labels(source: Path, target: Path, count: int) -> Path:
    """A copy of ``source`` whose metadata lists ``count`` labels (its network still has 1000)."""
    proto = onnx.load(source)
    props = {p.key: p.value for p in proto.metadata_props}
    props["labels"] = json.dumps([f"class {i}" for i in range(count)])
    props["wnids"] = json.dumps([None] * count)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, target)
    return target


def assert_no_server_path(text: str, weights: Path) -> None:
    for path in {str(weights), str(weights.resolve()), str(weights.parent.resolve())}:
        assert path not in text, text


def assert_unready_naming_no_path(weights: Path, reason: str) -> None:
    """A server on ``weights`` with no usable model: /ready and /predict answer 503, /ready's
    reason names ``reason``, and neither answer names a server path."""
    with serve(cpu_settings(weights)) as url, httpx.Client(base_url=url, timeout=60) as c:
        ready = c.get("/ready")
        assert ready.status_code == 503 and reason in ready.json()["reason"]
        predict = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
        assert predict.status_code == 503
        for text in (ready.text, predict.text):
            assert_no_server_path(text, weights)


def test_labels_that_do_not_match_the_outputs_are_refused(imagenet_model_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    link_model(imagenet_model_dir, weights, "good.onnx")
    with_labels(imagenet_model_dir / "alexnet-random.onnx", weights / "five.onnx", 5)
    auth = {"Authorization": f"Bearer {KEY}"}
    with serve(cpu_settings(weights, model="five", api_key=KEY)) as url, httpx.Client(base_url=url) as c:
        assert c.get("/model").json()["file"] == "good.onnx"  # five.onnx refused at start-up
        refused = c.post("/model/activate", json={"version": "five"}, headers={**auth}, timeout=60)
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert "1000 classes" in detail and "5 labels" in detail, detail
        assert_no_server_path(refused.text, weights)
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}, timeout=60).status_code == 200
    (weights / "good.onnx").unlink()
    assert_unready_naming_no_path(weights, "5 labels")


def test_responses_name_no_server_paths_and_list_only_models(
    imagenet_model_dir: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights"
    model = link_model(imagenet_model_dir, weights, "model.onnx")
    (weights / "notes.onnx").write_text("not a model")
    (weights / "broken.onnx").write_bytes(model.read_bytes()[:100_000])
    auth = {"Authorization": f"Bearer {KEY}"}
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/model").json()["available_versions"] == ["model"]
        for version in ("broken", "notes"):
            refused = c.post("/model/activate", json={"version": version}, headers=auth)
            assert refused.status_code == 422 and "cannot be loaded" in refused.json()["detail"]
            assert_no_server_path(refused.text, weights)
    model.unlink()
    assert_unready_naming_no_path(weights, "broken.onnx")


def test_a_model_altered_after_export_is_refused(imagenet_model_dir: Path, tmp_path: Path) -> None:
    exported = imagenet_model_dir / "alexnet-random.onnx"
    # export_onnx recorded the SHA-256 beside the file, in `sha256sum` format.
    assert model_files.recorded_sha256(exported) == files.sha256(exported)
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(exported, weights / "altered.onnx")
    model_files.write_manifest(weights / "altered.onnx")
    with open(weights / "altered.onnx", "r+b") as f:  # one weight byte, deep inside the graph
        f.seek(f.seek(0, os.SEEK_END) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    link_model(imagenet_model_dir, weights, "intact.onnx")
    model_files.write_manifest(weights / "intact.onnx")
    link_model(imagenet_model_dir, weights, "unrecorded.onnx")  # exported before manifests
    auth = {"Authorization": f"Bearer {KEY}"}
    settings = cpu_settings(weights, model="altered", api_key=KEY)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        model = c.get("/model").json()
        assert model["file"] != "altered.onnx"
        refused = c.post("/model/activate", json={"version": "altered"}, headers=auth)
        assert refused.status_code == 422
        assert "does not match the SHA-256 recorded at export" in refused.json()["detail"]
        assert_no_server_path(refused.text, weights)
        intact = c.post("/model/activate", json={"version": "intact"}, headers=auth).json()
        assert intact["file"] == "intact.onnx" and intact["integrity"] == "verified"
        unrecorded = c.post("/model/activate", json={"version": "unrecorded"}, headers=auth).json()
        assert unrecorded["file"] == "unrecorded.onnx" and unrecorded["integrity"] == "unverified"
    for name in ("intact.onnx", "unrecorded.onnx", "ACTIVE"):
        (weights / name).unlink()
    with serve(cpu_settings(weights)) as url, httpx.Client(base_url=url, timeout=60) as c:
        ready = c.get("/ready")
        assert ready.status_code == 503 and "altered.onnx does not match" in ready.json()["reason"]


# ------------------------------------------------------- issue 12: the ways to start the server


def test_command_line_help_and_unknown_options() -> None:
    def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
        code = "from service.cli import run; run()"
        return subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )

    helped = serve_cli("--help", "--port", "1")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: alexnet-serve"), helped
    for option in ("--host", "--port", "--weights-dir", "--api-key", "--header-timeout-s", "--no-batching"):
        assert option in helped.stdout, option
    unknown = serve_cli("--prot", "1")
    assert unknown.returncode == 2 and "unrecognized arguments: --prot" in unknown.stderr, unknown


@contextmanager
def server_process(command: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return httpx.get(f"{url}/ready").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, "/ready", interval=0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_command_line_options_and_uvicorn_import_string(imagenet_model_dir: Path) -> None:
    port = free_port()
    cli = [sys.executable, "-c", "from service.cli import run; run()", "--port", str(port)]
    cli += ["--providers", "CPUExecutionProvider", "--weights-dir", str(imagenet_model_dir)]
    with server_process(cli, {"ALEXNET_PORT": "1"}, port) as url:  # the command line wins
        assert httpx.get(f"{url}/model").json()["providers"] == ["CPUExecutionProvider"]
    port = free_port()
    uvicorn = [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port)]
    env = {"ALEXNET_WEIGHTS_DIR": str(imagenet_model_dir), "ALEXNET_PROVIDERS": "CPUExecutionProvider"}
    with server_process(uvicorn, env, port) as url:
        assert httpx.get(f"{url}/ready").json()["model_version"] == "alexnet-random"


def test_importing_the_app_loads_no_model(imagenet_model_dir: Path) -> None:
    code = "import service.main as m; print(m.app.title, m.app.state.registry.current)"
    env = {**os.environ, "ALEXNET_WEIGHTS_DIR": str(imagenet_model_dir)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["alexnet-serve", "None"]
