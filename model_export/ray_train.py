"""``alexnet-train --ray ADDRESS --ray-workers N``: the run as N Ray Train workers on a cluster.

Ray Train places the workers (one CPU each, or ``--threads``; one GPU each where the cluster has
GPUs and ``--device`` allows), sets RANK/WORLD_SIZE/LOCAL_RANK and makes the process group (gloo
on CPU, NCCL on GPU); each worker then calls ``model_export.train.run``, the function a plain or
torchrun launch runs. So a run writes what any run writes, from rank 0, into its run folder:
``checkpoint.pt`` after every epoch, ``metrics.jsonl``, the exported model in ``--weights-dir``.
Those paths and the dataset must be the same shared folder on every node.

This process only drives: it connects, starts the workers and waits. SIGTERM or SIGINT here is
passed on to the workers through a small actor they poll; they stop together at the next batch
and rank 0 records ``cancelled``, as in a local run. Its exit code is the run's, read from the
events the run wrote; where the workers died without one (a node lost, a process killed), it
records the error itself. If this process is killed, Ray ends the workers it owns.

Ray is imported here only: neither the server nor a local run loads it.
"""

import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from alexnet_core.training import (
    METRICS,
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    ExitCode,
    TrainRun,
    read_events,
)
from model_export import distributed
from model_export.runlog import CancelFlag, MetricsLog
from model_export.train import run

POLL_S = 0.5  # how often a worker asks whether the run was cancelled
CANCEL_GRACE_S = 120  # after a cancel, longest wait for the workers to stop by themselves


@ray.remote(num_cpus=0)
class CancelSwitch:
    """Set once by the driver, read by the workers."""

    def __init__(self) -> None:
        self.on = False

    def set(self) -> None:
        self.on = True

    def get(self) -> bool:
        return self.on


class RemoteCancel(CancelFlag):
    """A worker's cancel flag, set from the driver's ``CancelSwitch`` by a polling thread (the
    training function runs outside the main thread, where no signal handler can be installed)."""

    def __init__(self, switch: Any) -> None:
        super().__init__()
        self.switch = switch
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="cancel-poll", daemon=True)

    def _poll(self) -> None:
        while not self.stopped.wait(POLL_S):
            try:
                on = ray.get(self.switch.get.remote(), timeout=30)
            except ray.exceptions.GetTimeoutError:  # a busy node: ask again
                continue
            except ray.exceptions.RayError:  # the driver, which owns the switch, is gone: stop too
                on = True
            if on:
                self.signal = signal.SIGTERM
                return

    def install(self) -> None:
        self.thread.start()

    def restore(self) -> None:
        self.stopped.set()


class WorkerFailed(RuntimeError):
    """Raised by a worker whose run ended in error, so that Ray Train stops the others (which
    may be waiting for it in a collective) and the driver learns of it."""


def worker(loop_config: dict[str, Any]) -> None:
    """The training function of every Ray Train worker."""
    config = TrainRun.model_validate(loop_config["config"])
    procs = distributed.processes_from_env()
    print(
        f"alexnet-train: rank {procs.rank}/{procs.world_size} on node "
        f"{ray.get_runtime_context().get_node_id()}",
        file=sys.stderr,
    )
    cancel = RemoteCancel(loop_config["cancel"])
    cancel.install()
    try:
        code = run(config, procs, cancel)
    finally:
        cancel.restore()
    if code == ExitCode.ERROR:
        raise WorkerFailed(f"rank {procs.rank}: the run failed (see metrics.jsonl)")


def absolute(config: TrainRun) -> TrainRun:
    """Workers run in folders of Ray's: every path they are given is absolute."""
    paths = {name: getattr(config, name) for name in ("data", "out", "weights_dir", "data_root")}
    return config.model_copy(update={k: v.resolve() for k, v in paths.items() if isinstance(v, Path)})


def exit_code(events: list[Event]) -> int | None:
    """The code a local run would have ended with, from the last event that ends a run."""
    for event in reversed(events):
        if isinstance(event, DoneEvent):
            return ExitCode.OK
        if isinstance(event, CancelledEvent):
            return ExitCode.CANCELLED
        if isinstance(event, ErrorEvent):
            return ExitCode.DIVERGED if event.kind == "diverged" else ExitCode.ERROR
    return None


def trainer(config: TrainRun, switch: Any) -> TorchTrainer:
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    resources: dict[str, float] = {"CPU": config.threads or 1}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        worker,
        train_loop_config={"config": config.model_dump(mode="json"), "cancel": switch},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.ray_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # Ray Train's own records go beside the run's; the run's checkpoint is its own
        # checkpoint.pt, which a resume (of the job, or by hand) continues from.
        run_config=RunConfig(
            name="ray", storage_path=str(config.run_dir), failure_config=FailureConfig(max_failures=0)
        ),
    )


def fit(config: TrainRun, cancel: CancelFlag) -> BaseException | None:
    """Runs the workers to their end; the exception that ended them, if any."""
    switch = CancelSwitch.remote()
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            trainer(config, switch).fit()
        except BaseException as exc:  # handed to the main thread, which decides the exit code
            outcome.append(exc)

    # fit() in a thread: the main thread stays free to take SIGTERM and pass it on.
    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    told = False
    while thread.is_alive():
        thread.join(POLL_S)
        if cancel and not told:
            print("alexnet-train: cancelling the Ray Train workers", file=sys.stderr)
            ray.get(switch.set.remote())
            told = True
            thread.join(CANCEL_GRACE_S)
            if thread.is_alive():
                return TimeoutError(f"the workers did not stop within {CANCEL_GRACE_S} s of the cancel")
    return outcome[0] if outcome else None


def unreachable(address: str) -> str | None:
    """Why the head at host:port cannot be reached (ray.init would wait for it for minutes)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return None  # "auto", or another form ray.init resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        return f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}"
    return None


def record_error(config: TrainRun, message: str) -> int:
    """The run's end where no worker recorded one."""
    log = MetricsLog(config.run_dir / METRICS, append=True)
    log.write(ErrorEvent(message=message))
    log.close()
    print(f"alexnet-train: error: {message}", file=sys.stderr)
    return ExitCode.ERROR


def drive(config: TrainRun) -> int:
    config = absolute(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    assert config.ray is not None  # main() calls this only with --ray
    if (problem := unreachable(config.ray)) is not None:
        return record_error(config, problem)
    # A new run's rank 0 starts metrics.jsonl afresh; a resumed one appends after these.
    earlier = len(read_events(config.run_dir)) if config.resume else 0
    cancel = CancelFlag()
    try:
        # Before this, a SIGTERM ends the process as it would a local run still importing torch.
        ray.init(address=config.ray, logging_level=logging.WARNING)
        cancel.install()  # after ray.init, which installs a SIGTERM handler of its own that exits
        failure = fit(config, cancel)
    except (ConnectionError, ray.exceptions.RayError) as exc:
        failure = exc
    finally:
        cancel.restore()
    code = exit_code(read_events(config.run_dir)[earlier:])
    if code is None:
        message = f"the Ray Train workers ended without a result: {type(failure).__name__}: {failure}"
        if cancel:
            message = f"cancelled, but {message}"
        code = record_error(config, message)
    ray.shutdown()
    return code
