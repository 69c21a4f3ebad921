"""Data-parallel set-up under torchrun or Ray Train (RANK/WORLD_SIZE set): gloo on CPU, NCCL on GPU.

torchrun only sets the environment and the process makes the group; Ray Train makes the group
itself (its TorchConfig) before it calls the training function, so ``init`` leaves that one as it is.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes_from_env() -> Processes:
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Processes()
    return Processes(
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
    )


def init(procs: Processes, device: str) -> None:
    if not procs.distributed or dist.is_initialized():
        return
    nccl = device != "cpu" and torch.cuda.is_available()
    if nccl:  # NCCL binds each rank to the current device when the group is made
        torch.cuda.set_device(procs.local_rank)
    dist.init_process_group("nccl" if nccl else "gloo")


def close(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, procs: Processes) -> list[float]:
    """Sum over processes (identity for one). Each training step calls it once with the loss and
    the cancel flag, so that every rank stops, or raises, at the same step."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if procs.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()
