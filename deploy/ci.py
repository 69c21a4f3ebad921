"""The deployment, for real: build the image and run the CPU compose stack on this machine.

Installs Docker from Debian's packages when absent and starts a daemon when none runs; makes a
base image without any registry (debootstrap + docker import, cached by its tag); serves the
torch wheel from a local PEP 503 index on 127.0.0.1; hands the build the CA certificates that the
host trusts beyond Debian's own (a TLS-intercepting proxy's); builds with the project's Dockerfile
(legacy builder: no frontend image to fetch); then runs the compose stack (docker-compose.yml +
docker-compose.cpu.yml) with an .env, checks health, /predict with a real photo through the
published port, a short /train job inside the container, a restart that keeps the trained model
and the job history, and `down -v`. Prints a JSON summary with the time of every step.

    python deploy/ci.py [--work DIR] [--summary FILE]      (root, Debian or Ubuntu)
"""

import argparse
import base64
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.tools import (  # noqa: E402
    DockerDaemon,
    compose_command,
    extra_ca_certificates,
    free_port,
    port_pair,
    run,
    torch_index,
)

BASE_IMAGE = "local/debian:bookworm"
IMAGE = "alexnet-serve:ci"
PROJECT = "alexnet-ci"
TRAIN = {
    "dataset": "digits",
    "epochs": 1,
    "batch_size": 64,
    "input_size": 64,
    "resize_size": 73,
    "layout": "torchvision",
    "activate": True,
}


class Steps:
    """Wall time of each named step, for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.failed: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"\n== {name} ==", flush=True)
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.failed = name
            raise
        finally:
            self.seconds[name] = round(time.monotonic() - start, 1)
            print(f"-- {name}: {self.seconds[name]} s", flush=True)


def base_image(work: Path) -> str:
    """Debian bookworm from Debian's mirror, imported as an image: no registry involved."""
    if run(["docker", "image", "inspect", BASE_IMAGE], check=False, quiet=True).returncode == 0:
        print(f"{BASE_IMAGE} already present")
        return "cached"
    rootfs = work / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = os.environ.get("DEPLOY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], quiet=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout)
    if tar.wait() != 0:
        raise RuntimeError("tar of the debootstrap root failed")
    shutil.rmtree(rootfs)
    return "debootstrap"


def build(work: Path) -> dict[str, Any]:
    index_url, server = torch_index(work / "torch-index")
    try:
        args = {"CUDA_IMAGE": BASE_IMAGE, "TORCH_INDEX_URL": index_url}
        ca = extra_ca_certificates()
        if ca:
            args["EXTRA_CA_CERTS"] = ca
        command = ["docker", "build", "--network", "host", "-t", IMAGE]
        for key, value in args.items():
            command += ["--build-arg", f"{key}={value}"]
        # The legacy builder: BuildKit on Docker 20.10 needs a frontend image from Docker Hub for
        # some features and is not always there; the Dockerfile works with both.
        run([*command, str(ROOT)], env={**os.environ, "DOCKER_BUILDKIT": "0"})
    finally:
        server.terminate()
        server.wait(timeout=30)
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], quiet=True).stdout)
    return {"image": IMAGE, "image_bytes": size, "extra_ca_certificates": ca.count("BEGIN CERTIFICATE")}


class Stack:
    """The compose project under test, on the published port of its .env."""

    def __init__(self, work: Path, compose: list[str]) -> None:
        self.port = free_port()
        self.key = secrets.token_urlsafe(24)
        self.env_file = work / ".env"
        low = port_pair()
        self.env_file.write_text(
            f"ALEXNET_API_KEY={self.key}\nDEPLOY_IMAGE={IMAGE}\nDEPLOY_EXPORT_SOURCE=random\n"
            f"DEPLOY_PORT={self.port}\nDEPLOY_PORT_RANGE={low}-{low + 1}\n"
        )
        self.base = [*compose, "--project-name", PROJECT, "--project-directory", str(ROOT)]
        self.base += ["--env-file", str(self.env_file)]
        self.files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"]
        # Only the .env decides: no ALEXNET_/DEPLOY_/COMPOSE_ variable of the caller leaks in.
        prefixes = ("ALEXNET_", "DEPLOY_", "COMPOSE_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = {"Authorization": f"Bearer {self.key}"}

    @property
    def command(self) -> list[str]:
        return self.base + [arg for f in self.files for arg in ("-f", str(f))]

    def compose(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run([*self.command, *args], env=self.env, **kwargs)

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", "--pull", "never")
        self.wait_ready()

    def wait_ready(self, url: str | None = None, attempts: int = 300) -> None:
        """Polls /ready once a second (the export job and the API start in between)."""
        url = url or self.url
        for _ in range(attempts):
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise RuntimeError(f"{url}/ready never answered 200")

    def copy_into_data(self, folder: Path) -> None:
        """A dataset into the data volume, owned by the image's user (tar through `exec`)."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(folder, arcname=folder.name)
        run(
            [*self.command, "exec", "-T", "api", "tar", "-x", "-C", "/data"],
            env=self.env,
            input_bytes=buffer.getvalue(),
        )


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_serving(stack: Stack, client: httpx.Client) -> dict[str, Any]:
    from tests.images import photo_jpeg

    health = client.get("/health")
    check(health.status_code == 200, f"/health: {health.status_code} {health.text}")
    model = client.get("/model").json()
    check(model["providers"] == ["CPUExecutionProvider"], f"providers: {model['providers']}")
    answer = client.post("/predict", files={"file": ("china.jpg", photo_jpeg(), "image/jpeg")})
    check(answer.status_code == 200, f"/predict: {answer.status_code} {answer.text}")
    body = answer.json()
    check(len(body["results"][0]["predictions"]) == 5, f"/predict: {body}")
    check(body["model_version"] == model["version"], f"/predict served {body['model_version']}")
    # The Open Inference Protocol on the same port: the photo as base64 BYTES, top-1 label.
    image = {
        "name": "image_bytes",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(photo_jpeg()).decode()],
    }
    request = {
        "inputs": [{**image, "parameters": {"content_type": "base64"}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
    }
    v2 = client.post("/v2/models/alexnet/infer", json=request)
    check(v2.status_code == 200, f"/v2 infer: {v2.status_code} {v2.text}")
    (label,) = v2.json()["outputs"][0]["data"]
    top = body["results"][0]["predictions"][0]
    check(label.split(":", 2)[1:] == [str(top["index"]), top["label"]], f"/v2 {label} but /predict {top}")
    return model


def train(stack: Stack, client: httpx.Client, work: Path) -> dict[str, Any]:
    from tests.digits import write_digits

    folder = write_digits(work / "data" / "digits", size=32)
    stack.copy_into_data(folder.root)
    started = client.post("/train", json=TRAIN, headers=stack.auth)
    check(started.status_code == 202, f"/train: {started.status_code} {started.text}")
    job = started.json()
    for _ in range(1800):  # polled once a second: a one-epoch job on digits
        job = client.get(f"/train/{job['id']}").json()
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(1)
    check(job["state"] == "succeeded" and job["activated"], f"training job: {job}")
    model = client.get("/model").json()
    check(model["version"] == job["model_version"] and model["trained"], f"after training: {model}")
    return job


def after_restart(stack: Stack, client: httpx.Client, job: dict[str, Any]) -> None:
    model = check_serving(stack, client)
    check(model["version"] == job["model_version"], f"after the restart {model['version']} is served")
    jobs = {j["id"]: j for j in client.get("/train").json()}
    check(job["id"] in jobs and jobs[job["id"]]["state"] == "succeeded", f"job history lost: {jobs}")


def replica_urls(stack: Stack, count: int) -> list[str]:
    urls = []
    for index in range(1, count + 1):
        out = stack.compose("port", "--index", str(index), "api", "8000", quiet=True).stdout.strip()
        urls.append(f"http://127.0.0.1:{out.rsplit(':', 1)[1]}")
    return urls


def check_replicas(stack: Stack, job: dict[str, Any]) -> float:
    """docker-compose.replicas.yml with two API replicas: a model activated on the first is served
    by the second (which polls the shared ACTIVE file). Returns the seconds that took."""
    stack.files.append(ROOT / "docker-compose.replicas.yml")
    stack.compose("up", "-d", "--no-build", "--pull", "never", "--scale", "api=2")
    first, second = replica_urls(stack, 2)
    for url in (first, second):
        stack.wait_ready(url)
    versions = httpx.get(f"{first}/model", timeout=60).json()["available_versions"]
    other = next(v for v in versions if v != job["model_version"])
    activated = httpx.post(
        f"{first}/model/activate", json={"version": other}, headers=stack.auth, timeout=120
    )
    check(activated.status_code == 200, f"activate on replica 1: {activated.text}")
    started = time.monotonic()
    for _ in range(120):  # polled once a second
        if httpx.get(f"{second}/model", timeout=60).json()["version"] == other:
            return round(time.monotonic() - started, 1)
        time.sleep(1)
    raise AssertionError(f"replica 2 never served {other}, activated on replica 1")


def leftovers() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    found = []
    for kind in ("container", "volume", "network"):
        extra = ["-a"] if kind == "container" else []
        out = run(["docker", kind, "ls", *extra, "-q", "--filter", label], quiet=True).stdout.split()
        found += [f"{kind} {name}" for name in out]
    return found


def deploy(work: Path, steps: Steps, summary: dict[str, Any]) -> None:
    with steps("docker engine"):
        daemon = DockerDaemon(work)
        daemon.start()
    try:
        summary["docker"] = run(["docker", "version", "-f", "{{.Server.Version}}"], quiet=True).stdout.strip()
        with steps("base image"):
            summary["base_image"] = base_image(work)
        with steps("build"):
            summary.update(build(work))
        compose = compose_command()
        summary["compose"] = run([*compose, "version", "--short"], quiet=True).stdout.strip()
        stack = Stack(work, compose)
        try:
            stack_checks(stack, steps, work, summary)
        except BaseException:
            stack.compose("logs", "--no-color", "--tail", "200", check=False)
            raise
        finally:
            with steps("down -v"):
                stack.compose("down", "-v", "--remove-orphans", check=False)
                left = leftovers()
            summary["left_running"] = left
            check(not left, f"left behind: {left}")
    finally:
        with steps("docker engine stop"):
            summary["daemon_started_here"] = daemon.stop()


def stack_checks(stack: Stack, steps: Steps, work: Path, summary: dict[str, Any]) -> None:
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        with steps("compose up (export job, API ready)"):
            stack.up()
        with steps("health and /predict"):
            check_serving(stack, client)
        with steps("/train job in the container"):
            job = train(stack, client, work)
        with steps("restart (down, up)"):
            stack.compose("down")
            stack.up()
        with steps("trained model and job history kept"):
            after_restart(stack, client, job)
        with steps("two replicas agree"):
            summary["replica_followed_s"] = check_replicas(stack, job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "alexnet-deploy")
    parser.add_argument("--summary", type=Path, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    steps, summary = Steps(), {}
    start = time.monotonic()
    ok = False
    try:
        deploy(args.work, steps, summary)
        ok = True
    finally:
        summary.update(ok=ok, failed_step=steps.failed)
        summary.update(total_s=round(time.monotonic() - start, 1), steps=steps.seconds)
        text = json.dumps(summary, indent=2)
        print(f"\n== summary ==\n{text}", flush=True)
        if args.summary:
            args.summary.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
