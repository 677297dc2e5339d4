"""Distributed data parallel training under torchrun: process group set-up and rank helpers.

Under ``torchrun --nproc_per_node=K`` (or any launcher setting ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``),
:func:`~mtdisent.train` joins the process group itself (gloo on CPU, NCCL on CUDA). Every rank draws the
same global batch order and trains on its slice of each global batch (``batch_size / K`` images), so a
K-process run sees the same data as a single process with the same ``batch_size`` and seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._errors import SpecError

__all__ = ["DistInfo", "setup", "teardown", "all_true", "any_true"]


@dataclass(frozen=True)
class DistInfo:
    """Where the current process stands in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and logs."""
        return self.rank == 0


def setup(device_name: str) -> tuple[DistInfo, torch.device | None]:
    """Join the process group when launched distributed; returns the info and this rank's device (if fixed)."""
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise SpecError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        use_cuda = device_name in {"auto", "cuda"} and torch.cuda.is_available() or device_name.startswith("cuda")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
    else:
        return DistInfo(), None
    if device_name in {"auto", "cuda"} and torch.cuda.is_available():
        return info, torch.device("cuda", info.local_rank)
    return info, None


def teardown(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=op)
    return t


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank."""
    return bool(_reduce(torch.tensor([int(flag)], device=device), dist.ReduceOp.MIN, info).item())


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` holds on some rank."""
    return bool(_reduce(torch.tensor([int(flag)], device=device), dist.ReduceOp.MAX, info).item())
