"""Schemathesis against the app's own OpenAPI schema, over real HTTP to the real server.

Every operation in ``/openapi.json`` is called with generated data, valid and invalid (wrong
types, missing fields, random multipart bodies for ``/predict``, random and real job ids), and
every response is checked against the schema: no 5xx, only documented status codes, bodies that
match the documented models, the documented content type and headers. The mutation endpoints are
called both with the server's key and without it (schemathesis then sends a made-up bearer token,
or none). A second test runs schemathesis' own runner (its coverage phase: boundary values,
missing and extra fields, wrong methods; and its stateful phase) against the same server.

The server has a key, so that the authenticated paths run too; its data root is an empty folder,
so a generated ``POST /train`` (or resume) can never find a dataset and start a real training job
(400); its weights dir holds one model, hard-linked, so ``POST /model/activate`` of a generated
version is a 404 (re-activating that one model, were it ever generated, changes nothing). One
finished job is in its job store, so that the job endpoints are reached beyond their 404.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from service.core.config import Settings
from service.main import create_app
from service.schemas import JobState, TrainRequest
from service.training_jobs import JobRecord, JobStore
from tests.conftest import cpu_settings, serve

KEY = "fuzz-key"
JOB_ID = "0123456789ab"  # the finished job put into the store before the server starts
EXAMPLES = 30  # per operation and generation mode

# The schema the app builds for itself (the served /openapi.json is compared with it below),
# loaded at collection time so that each operation is a test of its own.
SCHEMA: dict[str, Any] = create_app(Settings(_env_file=None)).openapi()
OPERATIONS = [(path, method) for path, methods in SCHEMA["paths"].items() for method in methods]

# Schemathesis' "a schema-valid request is accepted" cannot hold where validity depends on
# content that a schema cannot describe: any bytes are a valid `file` but only image bytes are an
# image (400: neither field sent, and the schema cannot say "one of the two"; 413/415/422: not an
# image, or a bomb), and a job's dataset must also exist under the data root (400; empty here on
# purpose). For these the check is replaced by the statuses that such content may get.
REFUSED_WHEN_VALID: dict[tuple[str, str], list[int]] = {
    ("/predict", "post"): [400, 413, 415, 422],
    # 422: more than one Ray Train worker asked of a server with no cluster (ALEXNET_TRAIN_ON_RAY).
    ("/train", "post"): [400, 422],
    ("/train/{job_id}/resume", "post"): [400],
    # Feature search on a model exported without a features output (the fuzzed one): 409 at once;
    # where it had one, `file` would still need to be an image.
    ("/embed", "post"): [400, 409, 413, 415, 422],
    ("/similar", "post"): [400, 409, 413, 415, 422],
    ("/gallery", "post"): [400, 409, 413, 415, 422],
    ("/gallery", "get"): [409],
    ("/gallery/{item_id}", "delete"): [409],
    ("/gallery/{item_id}/thumbnail.png", "get"): [409],
    # Members must exist and fit together; the fuzzed weights directory holds one model.
    ("/model/ensemble", "post"): [404, 422],
}
CLI_CONFIG = "\n".join(
    f'[[operations]]\ninclude-name = "{method.upper()} {path}"\n'
    f"checks.positive_data_acceptance.expected-statuses = {json.dumps(['2xx', *map(str, codes)])}\n"
    for (path, method), codes in REFUSED_WHEN_VALID.items()
)


def seed_finished_job(weights: Path) -> None:
    """A failed job with metrics, curves and a checkpoint, as a real run leaves them."""
    run_dir = weights / "runs" / JOB_ID
    run_dir.mkdir(parents=True)
    now = time.time()
    records = [
        {
            "event": "start",
            "epochs": 2,
            "start_epoch": 0,
            "steps_per_epoch": 4,
            "total_steps": 8,
            "time": now,
        },
        {"event": "step", "epoch": 1, "step": 4, "total_steps": 8, "loss": 2.1, "lr": 0.01, "time": now + 1},
        {"event": "epoch", "epoch": 1, "step": 4, "val_top1": 0.3, "val_top5": 0.8, "time": now + 2},
        {"event": "error", "kind": "error", "message": "disk full", "time": now + 3},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    Image.new("RGB", (8, 8)).save(run_dir / "curves.png")
    (run_dir / "checkpoint.pt").write_bytes(b"resume finds it; the empty data root refuses first")
    store = JobStore(weights / "jobs.sqlite3")
    request = TrainRequest(dataset="digits", epochs=2, batch_size=64, input_size=64)
    job = JobRecord(JOB_ID, JobState.failed, request, run_dir, now, now, now + 3, None, "disk full")
    store.save(job)
    store.close()


@pytest.fixture(scope="module")
def fuzz_server(imagenet_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weights = tmp_path_factory.mktemp("fuzz-weights")
    os.link(imagenet_model_dir / "alexnet-random.onnx", weights / "alexnet-random.onnx")
    seed_finished_job(weights)
    data_root = tmp_path_factory.mktemp("fuzz-empty-data")
    with serve(cpu_settings(weights, data_root=data_root, api_key=KEY)) as url:
        yield url
        # No crash: after everything the generators threw at it, the server still answers, and
        # no generated request started a job or changed the seeded one.
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/ready").status_code == 200
            assert [(j["id"], j["state"]) for j in client.get("/train").json()] == [(JOB_ID, "failed")]
            predicted = client.post(
                "/predict", files={"file": ("a.png", (weights / "runs" / JOB_ID / "curves.png").read_bytes())}
            )
            assert predicted.status_code == 200, predicted.text


def test_served_schema_is_the_one_fuzzed(fuzz_server: str) -> None:
    assert httpx.get(f"{fuzz_server}/openapi.json").json() == SCHEMA


def test_validation_errors_are_documented_as_sent() -> None:
    # FastAPI documents {"detail": [...]} for 422 unless told otherwise; the app sends
    # {"detail": "...", "errors": [...]}. Every operation must document the shape it sends.
    assert "HTTPValidationError" not in json.dumps(SCHEMA)
    for path, method in OPERATIONS:
        if "422" in (responses := SCHEMA["paths"][path][method]["responses"]):
            ref = responses["422"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ValidationErrorResponse"), (method, path)


def test_405_lists_every_method_of_the_path(fuzz_server: str) -> None:
    # GET and POST /train are two routes: Starlette alone would answer "Allow: POST".
    assert httpx.put(f"{fuzz_server}/train").headers["allow"] == "GET, POST"
    assert httpx.put(f"{fuzz_server}/train/{JOB_ID}").headers["allow"] == "GET, DELETE"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_operation_conforms_to_its_schema(
    fuzz_server: str, path: str, method: str, mode: GenerationMode
) -> None:
    operation = schemathesis.openapi.from_dict(SCHEMA)[path][method]
    if mode is GenerationMode.NEGATIVE and not (
        operation.body or operation.path_parameters or operation.query
    ):
        pytest.skip("no parameters and no body: nothing to make invalid")
    secured = bool(operation.definition.raw.get("security"))
    refused = REFUSED_WHEN_VALID.get((path, method))
    excluded = [positive_data_acceptance] if refused else []
    cases = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE and "{job_id}" in path:
        # Random ids are all 404s; the seeded job reaches the code behind the lookup.
        cases = st.one_of(
            cases, operation.as_strategy(generation_mode=mode, path_parameters={"job_id": JOB_ID})
        )

    def call(case: schemathesis.Case, headers: dict[str, str] | None) -> None:
        response = case.call_and_validate(
            base_url=fuzz_server, headers=headers, excluded_checks=excluded, timeout=60
        )
        if refused and mode is GenerationMode.POSITIVE and headers is not None:
            # As schemathesis' own check: missing resources and conflicts are not rejections.
            assert response.status_code < 300 or response.status_code in {*refused, 404, 409}, response.text

    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        if secured:
            call(case, {"Authorization": f"Bearer {KEY}"})
        # Unsecured operations once; secured ones again without the key: schemathesis sends a
        # made-up bearer token or none, which must be a documented 401.
        call(case, None if secured else {})

    check()


def test_schemathesis_runner_all_phases(fuzz_server: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CLI_CONFIG + f'\n[parameters]\n"path.job_id" = "{JOB_ID}"\n')
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{fuzz_server}/openapi.json", "--header", f"Authorization: Bearer {KEY}",
        "--phases", "examples,coverage,fuzzing,stateful", "--checks", "all", "--max-examples", "15",
        "--workers", "1", "--request-timeout", "60", "--seed", "1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
