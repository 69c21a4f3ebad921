"""Replicas that agree: two real server processes on one weights directory. A model activated on
one is served by the other within a few seconds, and a client hammering the other meanwhile
sees no failed request."""

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.server import server_process
from tests.images import encode, photo

KEY = "replica-key"


@contextmanager
def replica(weights: Path, workdir: Path) -> Iterator[str]:
    """``alexnet-serve`` in its own process (as a replica runs), on a free port, until /ready."""
    settings = {"weights_dir": weights, "data_root": weights / "data", "api_key": KEY, "log_level": "info"}
    with server_process(settings, workdir=workdir, timeout_s=300) as server:
        yield server.url


@pytest.fixture(scope="module")
def shared_weights(imagenet_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models in one directory: the session's random model (linked) and another seed."""
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    weights = tmp_path_factory.mktemp("shared-weights")
    (first,) = imagenet_model_dir.glob("*.onnx")
    os.link(first, weights / first.name)
    export_onnx(
        random_weights("torchvision", seed=1), weights / "alexnet-other.onnx", version="alexnet-other"
    )
    (weights / "ACTIVE").write_text(first.name)
    return weights


class Hammer:
    """Posts /predict in a loop on one server, recording every status and served version."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.image = encode(photo().resize((320, 213)), "JPEG")
        self.answers: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/predict", files={"file": ("a.jpg", self.image, "image/jpeg")})
                    version = r.json().get("model_version", "") if r.status_code == 200 else r.text
                    self.answers.append((r.status_code, version))
                except httpx.HTTPError as exc:
                    self.answers.append((0, repr(exc)))

    def served(self, version: str) -> int:
        return sum(1 for status, v in self.answers if status == 200 and v == version)


@pytest.mark.long
def test_activation_on_one_replica_reaches_the_other(shared_weights: Path, tmp_path: Path) -> None:
    with (
        replica(shared_weights, tmp_path / "a") as a,
        replica(shared_weights, tmp_path / "b") as b,
    ):
        before = httpx.get(f"{b}/model").json()["version"]
        assert before == httpx.get(f"{a}/model").json()["version"] != "alexnet-other"
        hammer = Hammer(b)
        hammer.thread.start()
        try:
            for _ in range(600):  # wait for a few answers before the switch
                if hammer.served(before) >= 3:
                    break
                time.sleep(0.1)
            activated = httpx.post(
                f"{a}/model/activate",
                json={"version": "alexnet-other"},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=120,
            )
            assert activated.status_code == 200, activated.text
            switched_at = time.monotonic()
            for _ in range(300):  # polled every 0.1 s
                if httpx.get(f"{b}/model", timeout=30).json()["version"] == "alexnet-other":
                    break
                time.sleep(0.1)
            took = time.monotonic() - switched_at
            assert httpx.get(f"{b}/model").json()["version"] == "alexnet-other", "B never followed A"
            for _ in range(600):  # and B's clients get the new model
                if hammer.served("alexnet-other") >= 3:
                    break
                time.sleep(0.1)
        finally:
            hammer.stop.set()
            hammer.thread.join(timeout=120)
        failed = [a for a in hammer.answers if a[0] != 200]
        assert not failed, failed
        versions = [v for _, v in hammer.answers]
        assert versions[0] == before and versions[-1] == "alexnet-other"
        # One switch, never back: B follows the pointer, it never rewrites it.
        assert versions == sorted(versions, key=lambda v: v == "alexnet-other")
        assert (shared_weights / "ACTIVE").read_text().strip() == "alexnet-other.onnx"
        print(f"B served the model activated on A after {took:.1f} s; {len(versions)} requests, none failed")
        # A restarted replica starts on the activated model (the pointer).
        with replica(shared_weights, tmp_path / "c") as c:
            assert httpx.get(f"{c}/model").json()["version"] == "alexnet-other"
