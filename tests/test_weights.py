"""Weight sources. The download is tested against a local HTTP server only: never the internet."""

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model_export.alexnet import AlexNet
from model_export.weights import (
    PRETRAINED_FILE,
    WeightsError,
    download,
    load_checkpoint,
    load_pretrained,
    pretrained_file,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    truncate_to: int | None = None

    def do_GET(self) -> None:
        body = self.payload if self.truncate_to is None else self.payload[: self.truncate_to]
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))  # claims the whole file
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def file_server() -> Iterator[type[_Handler]]:
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/{PRETRAINED_FILE}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def official_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """A torchvision-format state dict standing in for the official file, and its SHA-256."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("state") / "alexnet.pth"
    torch.save(AlexNet("torchvision").state_dict(), path)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_download_good_file(
    tmp_path: Path, file_server: type[_Handler], official_like: tuple[bytes, str]
) -> None:
    data, sha = official_like
    file_server.payload = data
    path = download(file_server.url, tmp_path / PRETRAINED_FILE, sha[:8])  # type: ignore[attr-defined]
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [PRETRAINED_FILE]


@pytest.mark.parametrize(
    ("truncated", "error"),
    [(False, "checksum mismatch"), (True, r"truncated|failed")],
    ids=["wrong-hash", "truncated"],
)
def test_a_failed_download_leaves_nothing(
    tmp_path: Path, file_server: type[_Handler], official_like: tuple[bytes, str], truncated: bool, error: str
) -> None:
    data, sha = official_like
    file_server.payload = data
    if truncated:  # the right hash, a third of the file
        file_server.truncate_to = len(data) // 3
    expected = sha[:8] if truncated else "00000000"
    with pytest.raises(WeightsError, match=error):
        download(file_server.url, tmp_path / PRETRAINED_FILE, expected)  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


def test_pretrained_downloads_once_then_reuses(
    tmp_path: Path, file_server: type[_Handler], official_like: tuple[bytes, str]
) -> None:
    data, sha = official_like
    file_server.payload = data
    loaded = load_pretrained(tmp_path, file_server.url, sha[:8])  # type: ignore[attr-defined]
    assert loaded.trained and loaded.sha256 == sha and len(loaded.classes.labels) == 1000
    file_server.payload = b"something else"  # a second download would now fail the checksum
    assert pretrained_file(tmp_path, file_server.url, sha[:8]) == tmp_path / PRETRAINED_FILE  # type: ignore[attr-defined]


def test_offline_with_hand_copied_file(tmp_path: Path, official_like: tuple[bytes, str]) -> None:
    data, sha = official_like
    (tmp_path / PRETRAINED_FILE).write_bytes(data)  # an air-gapped site copies the file in
    loaded = load_pretrained(tmp_path, "http://127.0.0.1:9/unreachable", sha[:8])
    assert loaded.sha256 == sha


def test_offline_without_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        pretrained_file(tmp_path, "http://127.0.0.1:9/unreachable.pth", "7be5be79")
    message = str(info.value)
    assert PRETRAINED_FILE in message and str(tmp_path) in message and "alexnet-train" in message
    assert list(tmp_path.iterdir()) == []


def test_hand_copied_wrong_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / PRETRAINED_FILE).write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="not the official file"):
        pretrained_file(tmp_path, "http://127.0.0.1:9/x.pth", "7be5be79")


def test_torchvision_state_dict_loads_strictly(tmp_path: Path, official_like: tuple[bytes, str]) -> None:
    path = tmp_path / "state.pth"
    path.write_bytes(official_like[0])
    loaded = load_checkpoint(path)
    expected = torch.load(path, weights_only=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key])
    assert loaded.model.layout == "torchvision" and loaded.source == "checkpoint:state.pth"


def test_wrong_layout_names_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "paper.pth"
    torch.save(AlexNet("paper").state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(path, layout="torchvision")
    message = str(info.value)
    assert "wrong shapes" in message and "features.0.weight" in message
    assert "missing keys" in message or "unexpected keys" in message


def test_wrong_class_count_names_the_shapes(tmp_path: Path) -> None:
    state = AlexNet("torchvision", 1000).state_dict()
    state["classifier.6.weight"] = torch.zeros(10, 4096)  # head for 10 classes, bias still 1000
    path = tmp_path / "mixed.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"classifier\.6\.bias: file \(1000,\) vs model \(10,\)"):
        load_checkpoint(path)


def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": AlexNet("torchvision").state_dict(), "hook": print}, path)  # pickles a callable
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)
