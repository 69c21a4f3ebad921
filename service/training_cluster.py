"""Training jobs on a Ray cluster (``ALEXNET_TRAIN_ON_RAY``): what the server checks before one.

The server runs such a job as it runs any: one ``alexnet-train`` process, whose config.json
carries the cluster's address and the number of workers. That process is then only the driver of
the job's Ray Train workers (``model_export.ray_train``): it passes a SIGTERM on to them and exits
with the run's code, so following, cancelling, resuming and owning the job stay as they are. Ray
is never imported by the server.
"""

import importlib.util

from alexnet_core.errors import StatusError


class ClusterRefused(StatusError):
    """A job this server cannot place on a cluster (answered with its status and detail)."""


def check_cluster(ray_address: str | None, workers: int) -> None:
    """Refuses a job the server cannot place: several workers without a cluster (422, naming the
    field), or a cluster configured without Ray installed (501)."""
    if ray_address is None and workers > 1:
        raise ClusterRefused(
            422,
            f"ray_workers: {workers} workers need a Ray cluster, and this server has none "
            "(ALEXNET_TRAIN_ON_RAY is unset): ask for 1 worker, or configure the cluster",
        )
    if ray_address is not None and importlib.util.find_spec("ray") is None:
        raise ClusterRefused(
            501,
            "ALEXNET_TRAIN_ON_RAY is set but Ray is not installed here: pip install '.[cluster]'",
        )
