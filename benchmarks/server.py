"""``alexnet-serve`` in a subprocess on a free loopback port: the one helper that benchmarks and tests
use to run the server the way it runs in production (configured by ALEXNET_* variables only), and
to read what it costs from ``/proc``."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_name(key: str) -> str:
    """``max_files`` or ``ALEXNET_MAX_FILES`` -> ``ALEXNET_MAX_FILES``."""
    return key if key.startswith("ALEXNET_") else f"ALEXNET_{key.upper()}"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        # The command name may hold spaces and parentheses: the fields start after the last ")".
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (every thread's children: /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def process_cpu_s(pid: int, children: bool = True) -> float | None:
    """User + system CPU seconds of a process: all its threads, and with ``children`` its live
    descendants and the children it has reaped (Linux /proc), else None."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after the command name.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
        total = ticks / os.sysconf("SC_CLK_TCK")
        return total + sum(process_cpu_s(child) or 0.0 for child in _children(pid))
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessStats:
    rss_mb: float
    fds: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> "ProcessStats":
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kb = int(fields["VmRSS"].split()[0])
        return cls(round(rss_kb / 1024, 1), len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"]))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its live descendants, MiB."""
    return ProcessStats.of(pid).rss_mb + sum(rss_mb(child) for child in _children(pid))


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    workdir: Path
    log_path: Path
    tmpdir: Path  # its TMPDIR
    ready: dict[str, Any] = field(default_factory=dict)
    start_s: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, chars: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if chars is None else text[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid)

    def stats(self) -> ProcessStats:
        return ProcessStats.of(self.proc.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def metrics(self, timeout: float = 10) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=timeout).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out


def wait_for_200(
    proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float, what: str = "alexnet-serve"
) -> httpx.Response:
    """Poll ``url`` until it answers 200 while ``proc`` runs; else RuntimeError with the log's tail."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{what} did not answer {url} with 200 (exit code {proc.poll()}):\n{tail}")


def stop_process(proc: subprocess.Popen[bytes], graceful: bool = True, timeout_s: float = 60) -> None:
    """SIGTERM and up to ``timeout_s`` to exit (``graceful``), then SIGKILL."""
    if proc.poll() is None:
        if graceful:
            proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    proc.wait(timeout=30)


@contextmanager
def server_process(
    settings: Mapping[str, object],
    *,
    workdir: Path | None = None,
    wait_for: str = "/ready",
    timeout_s: float = 180,
    graceful: bool = True,
    cpus: set[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Start ``alexnet-serve``'s entry point with these settings (``max_files`` or
    ``ALEXNET_MAX_FILES`` keys) and wait until ``wait_for`` answers 200.

    The environment has no ALEXNET_* variable from the caller's shell and the working directory no
    ``.env`` file: the server runs exactly the settings given here (defaults: loopback, a free
    port, the CPU provider, log level warning, the working directory as data root). ``cpus`` pins
    the server (and every thread it starts) to those cores. On exit it is stopped with SIGTERM
    (``graceful``) or SIGKILL."""
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alexnet-server-")))
        workdir.mkdir(parents=True, exist_ok=True)
        tmpdir = workdir / "tmp"
        tmpdir.mkdir(exist_ok=True)
        port = free_port()
        values = {
            "ALEXNET_HOST": "127.0.0.1",
            "ALEXNET_PORT": str(port),
            "ALEXNET_PROVIDERS": "CPUExecutionProvider",
            "ALEXNET_LOG_LEVEL": "warning",
            "ALEXNET_DATA_ROOT": str(workdir),
            **{env_name(k): str(v) for k, v in settings.items()},
        }
        port = int(values["ALEXNET_PORT"])
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
        full_env |= values | {
            "TMPDIR": str(tmpdir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        log_path = workdir / "server.log"
        started = time.perf_counter()
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from service.cli import run; run()"],
                env=full_env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Pinned before Python starts: every thread the server creates inherits it.
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        server = ServerProcess(proc, f"http://127.0.0.1:{port}", port, workdir, log_path, tmpdir)
        try:
            server.ready = wait_for_200(proc, f"{server.url}{wait_for}", log_path, timeout_s).json()
            server.start_s = time.perf_counter() - started
            yield server
        finally:
            stop_process(proc, graceful)


def export_random_model(
    weights_dir: Path, name: str = "alexnet-benchmark-random.onnx", input_kind: str | None = None
) -> Path:
    """A 1000-class torchvision-layout model with random weights (timings do not depend on them),
    of the export's default input kind unless ``input_kind`` says otherwise."""
    import warnings

    from model_export.export import export_onnx
    from model_export.weights import random_weights

    warnings.filterwarnings("ignore", category=FutureWarning)
    weights_dir.mkdir(parents=True, exist_ok=True)
    kind = {"input_kind": input_kind} if input_kind else {}
    export_onnx(random_weights("torchvision", seed=0), weights_dir / name, **kind)
    return weights_dir / name


def model_settings(model: Path) -> dict[str, str]:
    """The settings that serve exactly this model file."""
    return {"ALEXNET_WEIGHTS_DIR": str(model.parent), "ALEXNET_MODEL": model.name}
