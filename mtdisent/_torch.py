"""Small PyTorch helpers shared by the model, the engine and evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["eval_mode", "own_rng", "seed_rng"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block and restore each one's previous mode (of every submodule)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def seed_rng(seed: int, device: torch.device) -> None:
    """Seed torch's global CPU generator and ``device``'s (not every GPU's, as ``torch.manual_seed`` does)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def own_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Give the block torch's global CPU generator and ``device``'s, seeded with ``seed`` if given; restore."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            seed_rng(seed, device)
        yield
