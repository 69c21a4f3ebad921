"""A local multi-node Ray cluster of real node processes, for the cluster training tests and
benchmark: ``ray start --head`` and ``ray start --address`` processes on this machine (unlike
``benchmarks.ray_cluster``'s in-process ``Cluster``, each node, and the trainers it runs, is a
process group the tests can find, count and kill), every port chosen free (never Ray's defaults,
which another cluster on the machine may hold), in a temporary folder of its own.

Each node is a ``ray start --block`` process in a session of its own: stopping it (SIGTERM, then
SIGKILL to its process group) ends that node's processes and no other cluster's, which
``ray stop`` would not guarantee.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


class ClusterUnavailable(RuntimeError):
    """Ray is not installed, or its processes cannot start here."""


@dataclass
class LocalCluster:
    address: str
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def processes(self, title: str) -> list[int]:
        """PIDs of this cluster's processes whose command line starts with ``title`` (such as
        ``ray::RayTrainWorker``): the descendants of its nodes, found through /proc."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry.name))
        found, todo = [], [node.pid for node in self.nodes]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline.startswith(title):
                found.append(pid)
        return found

    def free_cpus(self) -> float:
        """CPUs of the cluster no actor or placement group holds, asked of Ray in a subprocess (a
        driver in this process would stay connected)."""
        probe = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(ray.available_resources().get('CPU', 0))"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe, self.address], capture_output=True, text=True, timeout=120,
            cwd=REPO_ROOT, check=True,
        )  # fmt: skip
        return float(done.stdout.strip().splitlines()[-1])


def _ray() -> str:
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        raise ClusterUnavailable("Ray is not installed: pip install -c constraints.txt -e '.[cluster]'")
    return str(ray)


def _common(cpus: int) -> list[str]:
    return [
        f"--num-cpus={cpus}", "--num-gpus=0", "--block", "--disable-usage-stats",
        "--object-store-memory=100000000", f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        "--node-ip-address=127.0.0.1",
    ]  # fmt: skip


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    # The nodes' workers import this checkout (an installed package would do on a real cluster).
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path}
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip


def _wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    # One connection that polls (a driver in this process would stay connected to the cluster).
    probe = (
        "import ray, sys, time\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]):\n"
        "    time.sleep(0.5)\n"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise ClusterUnavailable("a Ray node exited at start-up (see its log in the cluster's folder)")
        try:
            done = subprocess.run(
                [sys.executable, "-c", probe, address, str(count)], capture_output=True, text=True,
                timeout=max(1.0, deadline - time.monotonic()), cwd=REPO_ROOT,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            break
        if done.returncode == 0:
            return
        time.sleep(1)  # the head not up yet: the connection failed
    raise ClusterUnavailable(f"the Ray cluster did not reach {count} live nodes within {timeout:.0f} s")


def stop_nodes(nodes: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """Ends nodes: SIGTERM to each ``ray start`` (which stops its node's processes), then SIGKILL
    to whatever of their sessions is left."""
    for node in nodes:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for node in nodes:
        with suppress(subprocess.TimeoutExpired):
            node.wait(max(0.1, deadline - time.monotonic()))
    for node in nodes:
        with suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1, timeout: float = 180) -> Iterator[LocalCluster]:
    """A head and ``nodes - 1`` worker nodes; raises ClusterUnavailable where Ray cannot start."""
    # Short: Ray's socket paths under it must stay within the 107 bytes a Unix socket allows.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{port}", temp_dir)
    ray = _ray()
    try:
        cluster.nodes.append(_start(
            [ray, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", *_common(cpus_per_node)],
            temp_dir / "head.log",
        ))  # fmt: skip
        for i in range(1, nodes):
            cluster.nodes.append(
                _start([ray, "start", f"--address={cluster.address}", *_common(cpus_per_node)],
                       temp_dir / f"node{i}.log")
            )  # fmt: skip
        _wait_for_nodes(cluster.address, nodes, cluster.nodes, timeout)
        yield cluster
    finally:
        stop_nodes(cluster.nodes[::-1])
        shutil.rmtree(temp_dir, ignore_errors=True)
