"""A local multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), for the cluster
tests and the Serve benchmark. Every port is one found free here, never Ray's defaults (another
Ray cluster may run on the machine), and the cluster is stopped by its own handle: never
``ray stop``, which ends every Ray process of the machine."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def node_args(temp_dir: Path | None = None, cpus: int = 1) -> dict[str, Any]:
    """One node's options: its ports free ones, no dashboard, ``cpus`` CPUs (an engine replica
    takes one: one engine per node)."""
    args: dict[str, Any] = {
        "num_cpus": cpus,
        "node_manager_port": free_port(),
        "object_manager_port": free_port(),
        "metrics_export_port": free_port(),
        "metrics_agent_port": free_port(),
        "runtime_env_agent_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "include_dashboard": False,
        "object_store_memory": 256 * 2**20,
    }
    if temp_dir is not None:  # the head: its ports, and where every node keeps its files
        args |= {"gcs_server_port": free_port(), "ray_client_server_port": free_port()}
        args["temp_dir"] = str(temp_dir)
    return args


@contextmanager
def local_cluster(nodes: int = 2, cpus: int = 1) -> Iterator[Any]:
    """A head and ``nodes - 1`` worker nodes, this process connected as the driver; the replicas
    import this checkout (PYTHONPATH)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's files (and the address file `ray.init()` reads) under a folder of this cluster's own,
    # with a short path: Ray's sockets live under it, and a socket path has at most 107 bytes.
    root = Path(f"/tmp/ray-{os.getpid()}")
    temp_dir = root / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(root)
    cluster = Cluster(initialize_head=True, head_node_args=node_args(temp_dir, cpus))
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args(cpus=cpus))
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)  # logs and sockets: nothing left in /tmp
