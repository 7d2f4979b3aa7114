"""The trainer's place in a torchrun run: this rank's device, barriers, gathering, DDP wrapping and teardown."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world_size, chosen)


def teardown_distributed(dist: Dist) -> None:
    """Leave the process group (a live gloo/nccl group aborts the process at exit); no-op when alone."""
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op when alone)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


def all_gather(value: Any, dist: Dist) -> list[Any]:
    """Every rank's `value` (picklable), in rank order; [value] when alone."""
    if dist.world_size == 1:
        return [value]
    values: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def wrap_ddp(module: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """`module` inside DistributedDataParallel when there are several ranks; itself when alone."""
    if dist.world_size == 1:
        return module
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def maybe_no_sync(module: torch.nn.Module, sync: bool) -> Any:
    """DDP's no_sync for accumulation micro-steps (skips the all-reduce); a null context otherwise."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()
