"""Several processes training one model (torchrun), with PyTorch DistributedDataParallel.

`torchrun --nproc_per_node N train.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `from_env`
joins the process group (gloo on CPU, nccl on GPU). Each rank takes its share of every global
batch (see `LengthGroupedSampler`), DDP averages gradients, and only rank 0 writes checkpoints,
logs and the progress bar. A single process is the world of size 1 and pays nothing for this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, value: float | int, device) -> float:
        """The sum of `value` over every rank (the value itself in a single process)."""
        if not self.distributed:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item()

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object of our own), in rank order."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def from_env(device_name: str = "auto") -> tuple[World, str]:
    """The world torchrun describes (or a single process), and the device this rank should use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank), f"cuda:{local_rank}" if use_cuda else "cpu"
