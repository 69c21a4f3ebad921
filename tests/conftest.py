"""Shared fixtures: models exported in the test session, and the real app on a loopback port."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn

from benchmarks.server import free_port
from service.core.config import Settings
from service.core.http import server_config
from service.main import create_app

if TYPE_CHECKING:  # model_export imports torch: only the tests that export load it
    from model_export.export import InputKind


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port, in a background thread."""
    port = free_port()
    # The server's own configuration (timeouts, limits, protocol), on a loopback port.
    config = server_config(create_app(settings), settings, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def random_model_dir(weights_dir: Path, input_kind: "InputKind") -> Path:
    """``weights_dir`` holding the tests' 1000-class model, ``alexnet-random.onnx``: torchvision
    layout, random weights of seed 0, exported as ``input_kind``."""
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    export_onnx(
        random_weights("torchvision", seed=0), weights_dir / "alexnet-random.onnx", input_kind=input_kind
    )
    return weights_dir


@pytest.fixture(scope="session")
def imagenet_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir holding one 1000-class torchvision-layout model with random weights, of the
    crops kind (float crops in, logits out: several tests feed crops to it directly)."""
    return random_model_dir(tmp_path_factory.mktemp("weights"), "crops")


def cpu_settings(weights_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "weights_dir": weights_dir,
        "providers": ["CPUExecutionProvider"],
        "data_root": weights_dir / "data",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def server(imagenet_model_dir: Path) -> Iterator[str]:
    """One server for the read-only tests: the random 1000-class model, default limits."""
    with serve(cpu_settings(imagenet_model_dir)) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c
