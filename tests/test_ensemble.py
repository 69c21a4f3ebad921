"""Ensembles (the paper's 5-CNN average) over real HTTP and from the CLI: built from versions in the
weights directory, one ONNX graph whose probabilities equal the mean of its members' as served,
shown in /model with its members, activated and rolled back like any model; bad requests are 4xx."""

import json
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from model_export.ensemble import main as ensemble_cli
from tests.conftest import cpu_settings, serve
from tests.images import photo_jpeg

KEY = "ensemble-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    directory = tmp_path_factory.mktemp("ensemble-weights")
    for name, seed, classes in (("r1", 1, 10), ("r2", 2, 10), ("seven", 3, 7)):
        export_onnx(
            random_weights("paper", seed=seed, num_classes=classes),
            directory / f"{name}.onnx",
            input_size=64,
            resize_size=73,
        )
    return directory


@pytest.fixture(scope="module")
def client(weights: Path) -> Iterator[httpx.Client]:
    settings = cpu_settings(weights, api_key=KEY, model="r1")
    with serve(settings) as url, httpx.Client(base_url=url, timeout=600) as c:
        yield c


def served_probabilities(c: httpx.Client, version: str, image: bytes) -> np.ndarray:
    assert c.post("/model/activate", json={"version": version}, headers=AUTH).status_code == 200
    result = c.post("/predict", params={"top_k": 10}, files={"file": ("a.jpg", image)}).json()
    assert result["model_version"] == version
    out = np.zeros(10)
    for p in result["results"][0]["predictions"]:
        out[p["index"]] = p["probability"]
    return out


def test_api_builds_serves_and_rolls_back_an_ensemble(client: httpx.Client, weights: Path) -> None:
    response = client.post(
        "/model/ensemble", json={"members": ["r1", "r2"], "version": "pair", "activate": True}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["activated"] and body["members"] == ["r1", "r2"] and "pair" in body["available_versions"]
    model = client.get("/model").json()
    assert model["version"] == "pair" and model["members"] == ["r1", "r2"] and model["source"] == "ensemble"
    # One graph: both members' weights inside it, one input, one output (members of the default,
    # square kind output ten-crop probabilities).
    graph = onnx.load(str(weights / "pair.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["probabilities"]
    weights_in_graph = [i.name for i in graph.initializer if i.name.endswith("classifier.0.weight")]
    assert sorted(name[:3] for name in weights_in_graph) == ["m0_", "m1_"]

    image = photo_jpeg()
    pair = served_probabilities(client, "pair", image)
    members = [served_probabilities(client, v, image) for v in ("r1", "r2")]
    assert np.abs(pair - np.mean(members, axis=0)).max() < 1e-5
    assert not np.allclose(members[0], members[1], atol=1e-4)  # the average is of two different models
    # Rolled back to a member and forward again, like any model.
    assert client.get("/model").json()["members"] == []
    assert served_probabilities(client, "pair", image) == pytest.approx(pair, abs=1e-7)
    assert (weights / "ACTIVE").read_text() == "pair.onnx"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"members": ["r1"]}, 422, "at least 2"),
        ({"members": ["r1"] * 9}, 422, "at most 8"),
        ({"members": ["r1", "r1"]}, 422, "twice"),
        ({"members": ["r1", "nope"]}, 404, "no model 'nope'"),
        ({"members": ["r1", "../r2"]}, 404, "no model"),
        ({"members": ["r1", "seven"]}, 422, "differ in labels"),
        ({"members": ["r1", "r2"], "version": "../escape"}, 422, "version"),
        ({"members": ["r1", "r2"], "version": "r1"}, 409, "exists"),
        ({"members": ["r1", "r2"], "extra": 1}, 422, "extra"),
        ({"members": "r1,r2"}, 422, "members"),
        ({"members": ["r1", ""]}, 422, "members"),
    ],
)
def test_bad_ensemble_requests(
    client: httpx.Client, weights: Path, body: dict[str, object], status: int, words: str
) -> None:
    before = sorted(p.name for p in weights.iterdir())
    response = client.post("/model/ensemble", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert sorted(p.name for p in weights.iterdir()) == before  # nothing written, nothing left over


def test_ensemble_needs_the_key(client: httpx.Client) -> None:
    assert client.post("/model/ensemble", json={"members": ["r1", "r2"]}).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert client.post("/model/ensemble", json={"members": ["r1", "r2"]}, headers=wrong).status_code == 401
    not_json = client.post(
        "/model/ensemble", content=b"{", headers={**AUTH, "content-type": "application/json"}
    )
    assert not_json.status_code in (400, 422)
    assert "/model/ensemble" in client.get("/openapi.json").json()["paths"]


def with_labels(source: Path, target: Path, count: int) -> None:
    """A copy of ``source`` whose metadata lists ``count`` labels (its network has more outputs):
    members that fit together, whose ensemble the service cannot serve."""
    proto = onnx.load(source)
    props = {p.key: p.value for p in proto.metadata_props}
    props |= {"labels": json.dumps([f"class {i}" for i in range(count)]), "wnids": json.dumps([None] * count)}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, target)


def test_an_ensemble_that_cannot_be_served_is_a_422_and_kept_nowhere(
    client: httpx.Client, weights: Path
) -> None:
    for name in ("r1", "r2"):
        with_labels(weights / f"{name}.onnx", weights / f"{name}-five.onnx", 5)
    before = sorted(p.name for p in weights.iterdir())
    served = client.get("/model").json()["version"]
    body = {"members": ["r1-five", "r2-five"], "version": "unservable", "activate": True}
    response = client.post("/model/ensemble", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "cannot be served" in detail and "5 labels" in detail, detail
    assert str(weights) not in detail and str(weights.resolve()) not in detail
    assert sorted(p.name for p in weights.iterdir()) == before
    assert client.get("/model").json()["version"] == served


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes of this process past ``limit`` bytes fail with EFBIG, as on a full disk (the server
    runs in a thread of it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_names_no_server_path(client: httpx.Client, weights: Path) -> None:
    before = sorted(p.name for p in weights.iterdir())
    with file_size_limit(2**20):
        response = client.post(
            "/model/ensemble", json={"members": ["r1", "r2"], "version": "full"}, headers=AUTH
        )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "cannot write full.onnx" in detail and "File too large" in detail, detail
    assert str(weights.parent) not in detail and str(weights.resolve().parent) not in detail
    assert sorted(p.name for p in weights.iterdir()) == before


def test_cli(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ensemble_cli(["--weights-dir", str(weights), "r1", "missing"]) == 1
    assert "no such model file" in capsys.readouterr().err
    assert ensemble_cli(["--weights-dir", str(weights), "r1", "seven"]) == 1
    assert "differ in labels" in capsys.readouterr().err
    assert ensemble_cli(["--weights-dir", str(weights), "--version", "cli-pair", "r1", "r2.onnx"]) == 0
    assert "ensemble of r1, r2" in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(weights / "cli-pair.onnx")).metadata_props}
    assert json.loads(props["members"]) == ["r1", "r2"] and json.loads(props["version"]) == "cli-pair"
    assert not list(weights.glob("*.part")) and not list(weights.glob(".*.part"))


@pytest.mark.long
@pytest.mark.parametrize("kind", ["crops", "square"])
def test_either_model_kind_makes_an_ensemble(tmp_path: Path, kind: str) -> None:
    """Members that take the host's crops (logits out) and members with the ten crops in their
    graph (probabilities out) both average to their members' mean (checked while building)."""
    from model_export.ensemble import build_ensemble
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    members = []
    for seed in (1, 2):
        path = tmp_path / f"{kind}{seed}.onnx"
        weights = random_weights("torchvision", seed=seed, num_classes=5)
        export_onnx(weights, path, input_size=64, resize_size=73, input_kind=kind)
        members.append(path)
    meta = build_ensemble(members, tmp_path / "pair.onnx")
    assert meta.input_kind == kind and meta.members == [f"{kind}1", f"{kind}2"]
    assert (tmp_path / "pair.onnx.sha256").is_file()  # served as verified, like any export


@pytest.mark.parametrize("kind", ["crops", "square"])
def test_members_with_different_channel_statistics_make_an_ensemble(tmp_path: Path, kind: str) -> None:
    """The same recipe with another seed estimates the channel means from another sample of the
    training images: such members are averaged each with its own normalisation, as served alone."""
    from dataclasses import replace

    from alexnet_core.session import OnnxClassifier
    from model_export.ensemble import build_ensemble
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    members = []
    for seed, mean, std in ((1, None, None), (2, (0.35, 0.30, 0.25), (0.12, 0.13, 0.14))):
        weights = random_weights("torchvision", seed=seed, num_classes=5)
        if mean is not None:
            weights = replace(weights, mean=mean, std=std)
        members.append(tmp_path / f"{kind}{seed}.onnx")
        export_onnx(weights, members[-1], input_size=64, resize_size=73, input_kind=kind)
    build_ensemble(members, tmp_path / "pair.onnx")  # refused before: "differ in mean"

    image = photo_jpeg()

    def served(path: Path, metadata_from: Path | None = None) -> np.ndarray:
        classifier = OnnxClassifier(path, ["CPUExecutionProvider"])
        preprocessing = (
            OnnxClassifier(metadata_from, ["CPUExecutionProvider"]) if metadata_from else classifier
        )
        return classifier.probabilities(preprocessing.metadata.preprocess(image, max_pixels=10**7).batch)

    alone = [served(p) for p in members]
    assert np.abs(served(tmp_path / "pair.onnx") - np.mean(alone, axis=0)).max() < 1e-5
    if kind == "crops":  # without the renormalisation the average would be off by more than allowed
        unadapted = served(members[1], metadata_from=members[0])
        assert np.abs(unadapted - alone[1]).max() / 2 > 1e-5
