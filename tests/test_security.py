"""Security properties of the service, through the real app over HTTP.

Already covered elsewhere, not repeated here: /model/activate without a key or with a wrong one
(401), with no key configured (403), a ``../`` version (404) and the key absent from /model
(tests/test_api.py::test_activation_needs_key_and_swaps); POST /train without a key, with a wrong
key or Basic auth (401), with no key configured (403), and DELETE without a key (401)
(tests/test_train_api.py); dataset paths ``..``, absolute, a symlink out, ``%2e%2e``, NUL
(test_dataset_paths_cannot_leave_the_data_root); epochs 0, batch size 100000 and other bad
training parameters (test_bad_training_parameters); files per request, upload size, pixel limit
at the defaults and top_k 0/1001/"five" (tests/test_api.py).
"""

import ast
import inspect
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.core import security
from service.training_jobs import JobStore
from tests.conftest import cpu_settings, serve
from tests.digits import write_digits
from tests.images import photo_jpeg

REPO = Path(__file__).resolve().parent.parent
KEY = "s3cret-Key_with.symbols~42"
AUTH = {"Authorization": f"Bearer {KEY}"}
JOB_ID = "0123456789ab"
TRAIN = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73, "epochs": 1}
MUTATIONS = [
    ("POST", "/train", TRAIN),
    ("DELETE", f"/train/{JOB_ID}", None),
    ("POST", f"/train/{JOB_ID}/resume", None),
    ("POST", "/model/activate", {"version": "alexnet-random"}),
]
WRONG_CREDENTIALS = {
    "none": {},
    "empty bearer": {"Authorization": "Bearer"},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "prefix of the key": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key and more": {"Authorization": f"Bearer {KEY}x"},
    "other case": {"Authorization": f"Bearer {KEY.upper()}"},
    "basic with the key": {"Authorization": f"Basic {KEY}"},
    "key without a scheme": {"Authorization": KEY},
    "key in another header": {"X-API-Key": KEY},
    "key in the query": {},  # and ?api_key= below
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, imagenet_model_dir: Path) -> tuple[Path, Path, Path]:
    """(weights dir with a model and one stopped job, data root with digits, a folder outside both
    holding a valid model and a valid dataset: the targets of every escape attempted below)."""
    base = tmp_path_factory.mktemp("security")
    weights, data, outside = base / "weights", base / "data", base / "outside"
    weights.mkdir()
    os.link(imagenet_model_dir / "alexnet-random.onnx", weights / "alexnet-random.onnx")
    write_digits(data / "digits", size=16, held_out_per_class=0)
    outside.mkdir()
    os.link(imagenet_model_dir / "alexnet-random.onnx", outside / "outside-model.onnx")
    (outside / "train").mkdir()
    (outside / "val").mkdir()
    (data / "escape").symlink_to(outside, target_is_directory=True)
    (weights / "escape.onnx").symlink_to(outside / "outside-model.onnx")
    (weights / "escape-dir").symlink_to(outside, target_is_directory=True)
    store = JobStore(weights / "jobs.sqlite3")  # a stopped job: resume and DELETE reach their logic
    from service.schemas import JobState, TrainRequest
    from service.training_jobs import JobRecord

    run_dir = weights / "runs" / JOB_ID
    run_dir.mkdir(parents=True)
    store.save(JobRecord(JOB_ID, JobState.failed, TrainRequest(**TRAIN), run_dir, time.time(), error="test"))
    store.close()
    return weights, data, outside


@pytest.fixture(scope="module")
def api(roots: tuple[Path, Path, Path]) -> Iterator[httpx.Client]:
    weights, data, _ = roots
    with serve(cpu_settings(weights, data_root=data, api_key=KEY)) as url, httpx.Client(base_url=url) as c:
        yield c


def jobs(api: httpx.Client) -> list[tuple[str, str]]:
    return [(j["id"], j["state"]) for j in api.get("/train").json()]


# --------------------------------------------------------------------------- the key


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=[f"{m} {p}" for m, p, _ in MUTATIONS])
def test_mutations_refuse_missing_or_wrong_keys(
    api: httpx.Client, method: str, path: str, body: dict[str, Any] | None, credentials: str
) -> None:
    params = {"api_key": KEY} if credentials == "key in the query" else {}
    response = api.request(method, path, json=body, headers=WRONG_CREDENTIALS[credentials], params=params)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert api.get("/model").json()["file"] == "alexnet-random.onnx"
    assert jobs(api) == [(JOB_ID, "failed")]  # nothing started, cancelled or resumed


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=[f"{m} {p}" for m, p, _ in MUTATIONS])
def test_authentication_comes_before_anything_else(
    api: httpx.Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    # No oracle for anonymous clients: an unknown job, an invalid job id or an invalid body gets
    # the same 401 as a valid request, not a 404/422 telling what exists or what is checked.
    wrong = {"Authorization": "Bearer x"}
    for variant in (path.replace(JOB_ID, "ffffffffffff"), path.replace(JOB_ID, "not-an-id")):
        assert api.request(method, variant, json=body, headers=wrong).status_code == 401, variant
    assert api.request(method, path, content=b"{not json", headers=wrong).status_code == 401
    assert api.request(method, path, json={"unexpected": 1}, headers=wrong).status_code == 401


@pytest.mark.parametrize("configured", [None, ""])
@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=[f"{m} {p}" for m, p, _ in MUTATIONS])
def test_mutations_are_disabled_without_a_configured_key(
    roots: tuple[Path, Path, Path],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    configured: str | None,
) -> None:
    weights, data, _ = roots
    with serve(cpu_settings(weights, data_root=data, api_key=configured)) as url:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer anything"}):
            response = httpx.request(method, f"{url}{path}", json=body, headers=headers)
            assert response.status_code == 403, response.text
            assert "ALEXNET_API_KEY" in response.json()["detail"]


def test_key_is_compared_in_constant_time() -> None:
    # The comparison itself: secrets.compare_digest on bytes, and no other comparison of the key.
    tree = ast.parse(textwrap.dedent(inspect.getsource(security.require_api_key)))
    calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert "secrets.compare_digest" in calls
    equalities = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq | ast.In) for op in n.ops)
    ]
    assert not [c for c in equalities if re.search(r"expected|given|credentials|secret", c)], equalities


def test_a_key_with_non_ascii_characters_works(roots: tuple[Path, Path, Path]) -> None:
    # Header bytes reach the app decoded as latin-1; a UTF-8 key must still match its own bytes.
    weights, data, _ = roots
    key = "clé-ключ-鍵"
    with serve(cpu_settings(weights, data_root=data, api_key=key)) as url:
        raw = [(b"Authorization", b"Bearer " + key.encode())]
        ok = httpx.post(f"{url}/model/activate", json={"version": "alexnet-random"}, headers=raw)
        assert ok.status_code == 200, ok.text
        wrong = [(b"Authorization", b"Bearer " + "cle-ключ-鍵".encode())]
        assert httpx.post(f"{url}/model/activate", json={"version": "x"}, headers=wrong).status_code == 401


# --------------------------------------------------------------------------- the key stays secret
# (never in the logs of a real server process: tests/test_server_process.py)


def test_log_levels_that_would_dump_requests_are_refused() -> None:
    # uvicorn's "trace" logs every ASGI message, headers (the key) included.
    with pytest.raises(ValueError, match="log_level"):
        cpu_settings(Path("w"), log_level="trace")
    assert cpu_settings(Path("w"), log_level="DEBUG").log_level == "debug"


# --------------------------------------------------------------------------- paths stay in their roots

ESCAPES = [
    "%252e%252e/outside",  # double-encoded
    "..%2f..%2foutside",
    "..\\..\\outside",  # backslashes
    "digits\\..\\..\\outside",
    "digits/./../../outside",
    "digits/train/../../..",
    "./..",
    "//etc",
    "\\\\host\\share",
    "~",
    "~root",
    "．．/outside",  # fullwidth full stops
    "escape",  # a symlink in the data root pointing outside it
    "escape/",
    "escape/.",
    "digits/../escape",
    "\x00",
    "digits\x00/../../outside",
    "digits/\n",
]


@pytest.mark.parametrize("dataset", ESCAPES)
def test_dataset_cannot_leave_the_data_root(api: httpx.Client, dataset: str) -> None:
    response = api.post("/train", json={**TRAIN, "dataset": dataset}, headers=AUTH)
    assert response.status_code == 400, response.text
    assert jobs(api) == [(JOB_ID, "failed")]


def test_absolute_dataset_path_to_a_real_dataset_is_refused(
    api: httpx.Client, roots: tuple[Path, Path, Path]
) -> None:
    for dataset in (str(roots[1] / "digits"), str(roots[2]), "file://" + str(roots[1] / "digits")):
        assert api.post("/train", json={**TRAIN, "dataset": dataset}, headers=AUTH).status_code == 400
    assert jobs(api) == [(JOB_ID, "failed")]


@pytest.mark.parametrize(
    "version",
    [
        "../outside/outside-model",
        "../outside/outside-model.onnx",
        "%2e%2e/outside/outside-model",
        "%252e%252e%252foutside%252foutside-model",
        "..\\outside\\outside-model",
        "/etc/passwd",
        "OUTSIDE-MODEL",
        "escape",  # a symlink in the weights dir pointing out of it
        "escape.onnx",
        "escape-dir/outside-model",
        "alexnet-random\x00",
        "alexnet-random.onnx/..",
        "",
    ],
)
def test_model_version_cannot_leave_the_weights_dir(
    api: httpx.Client, roots: tuple[Path, Path, Path], version: str
) -> None:
    response = api.post("/model/activate", json={"version": version}, headers=AUTH)
    assert response.status_code in (404, 422), response.text
    model = api.get("/model").json()
    assert model["file"] == "alexnet-random.onnx"
    assert "escape" not in model["available_versions"]
    assert not (roots[0] / "ACTIVE").exists() or (roots[0] / "ACTIVE").read_text() == "alexnet-random.onnx"


# --------------------------------------------------------------------------- pickles


class Payload:
    """Unpickling this would create ``marker``: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {"features.0.weight": Payload(marker)}, "epoch": 1}, path)
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    # The control: loading the file the unsafe way runs its code. The tests below would pass
    # trivially if it did not.
    marker = tmp_path / "marker"
    torch.load(malicious_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_is_not_executed_by_export(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    command = [sys.executable, "-m", "model_export.cli", "--source", "checkpoint", "--checkpoint", str(evil),
               "--weights-dir", str(tmp_path / "weights")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and not marker.exists()
    assert "not a readable PyTorch checkpoint" in run.stderr and "Traceback" not in run.stderr
    assert not list((tmp_path / "weights").glob("*.onnx"))


def test_malicious_checkpoint_is_not_executed_on_resume(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = tmp_path / "data"
    write_digits(data, size=16, held_out_per_class=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    malicious_checkpoint(run_dir / "checkpoint.pt", marker)
    command = [sys.executable, "-m", "model_export.train", str(data), "--out", str(run_dir), "--resume",
               "--epochs", "2", "--no-export", "--no-progress"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and not marker.exists(), run.stderr[-2000:]
    assert "not a readable checkpoint" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


# --------------------------------------------------------------------------- uploads


# --------------------------------------------------------------------------- limits


def test_configured_limits_are_enforced(roots: tuple[Path, Path, Path]) -> None:
    weights, data, _ = roots
    settings = cpu_settings(
        weights, data_root=data, api_key=KEY, max_files=2, max_pixels=100_000, max_upload_mb=0.5
    )
    small = photo_jpeg()  # 640x427 = 273,280 pixels
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        from PIL import Image

        from tests.images import encode

        tiny = encode(Image.new("RGB", (300, 300), (10, 20, 30)), "PNG")  # 90,000 pixels
        assert c.post("/predict", files=[("files", ("a.png", tiny))] * 2).status_code == 200
        too_many = c.post("/predict", files=[("files", ("a.png", tiny))] * 3)
        assert too_many.status_code == 400 and "at most 2" in too_many.json()["detail"]
        pixels = c.post("/predict", files={"file": ("a.jpg", small)})
        assert pixels.status_code == 413 and "100000" in pixels.json()["detail"]
        body = c.post("/predict", files={"file": ("a.jpg", small + bytes(600_000))})
        assert body.status_code == 413 and "upload limit" in body.json()["detail"]
        for bad in ({"epochs": 501}, {"batch_size": 1025}, {"batch_size": 0}, {"input_size": 513},
                    {"dataset": "d" * 256}, {"lr": 1.5}, {"lr_schedule": "0:1," * 200 + "1:1"}):  # fmt: skip
            assert c.post("/train", json={**TRAIN, **bad}, headers=AUTH).status_code == 422, bad
        assert c.post("/model/activate", json={"version": "v" * 256}, headers=AUTH).status_code == 422
        assert c.post("/train", content=b"{" * 2_000_000, headers=AUTH).status_code == 413  # JSON bodies too


# --------------------------------------------------------------------------- CORS


def test_cors_is_off_by_default(api: httpx.Client) -> None:
    origin = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in api.get("/model", headers=origin).headers
    assert "access-control-allow-origin" not in api.post("/predict", headers=origin).headers
    preflight = api.options(
        "/model/activate",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405


def test_cors_allows_exactly_the_configured_origins(roots: tuple[Path, Path, Path], caplog: Any) -> None:
    weights, data, _ = roots
    caplog.set_level(logging.WARNING)
    allowed = "https://app.example"
    settings = cpu_settings(weights, data_root=data, cors_origins=f"{allowed}, https://other.example")
    with serve(settings) as url, httpx.Client(base_url=url) as c:
        assert c.get("/model", headers={"Origin": allowed}).headers["access-control-allow-origin"] == allowed
        assert (
            "access-control-allow-origin"
            not in c.get("/model", headers={"Origin": "https://evil.example"}).headers
        )
        preflight = c.options(
            "/predict", headers={"Origin": allowed, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == allowed
        assert "access-control-allow-credentials" not in preflight.headers  # no cookies, ever
        refused = c.options(
            "/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_refusals_before_the_routes_carry_cors_headers(roots: tuple[Path, Path, Path]) -> None:
    """The gates' answers too: without the header a browser hides the error from the page."""
    weights, data, _ = roots
    origin = {"Origin": "https://app.example"}
    settings = cpu_settings(
        weights, data_root=data, api_key=KEY, cors_origins=origin["Origin"], max_upload_mb=0.5
    )
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        no_key = c.post("/model/activate", json={"version": "x"}, headers=origin)
        too_large = c.post("/predict", content=bytes(600_000), headers=origin)
        for answer, status in ((no_key, 401), (too_large, 413)):
            assert answer.status_code == status, answer.text
            assert answer.headers.get("access-control-allow-origin") == origin["Origin"], answer.headers
