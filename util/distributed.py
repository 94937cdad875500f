"""torchrun support: process group set-up, this process's rank and device."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.errors import ConfigError


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` and ``cuda`` pick this rank's GPU (ranks share GPUs round-robin when there are
    more ranks than GPUs); ``auto`` falls back to the CPU without CUDA."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use --opts device cpu)")
    if name in ("auto", "cuda"):
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                          "exist (use cuda:0, auto or cpu)")
    return device


def setup(device_name: str) -> Context:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # NCCL needs one GPU per rank; ranks that share a GPU reduce their counts through gloo.
        nccl = device.type == "cuda" and torch.cuda.device_count() >= local_world
        dist.init_process_group("nccl" if nccl else "gloo")
    return Context(rank, world, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
