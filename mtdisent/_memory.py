"""Checks before allocating: whether what an experiment builds or trains fits in its device's free memory.

Without them an experiment too large for its machine (the default adversaries of eight tasks at the paper's
resolution on a 24 GiB host, say) is killed by the operating system, or fails deep inside PyTorch, minutes in and
without a word on what to change. The checks count only what is certain to be allocated (weights, the optimisers'
state, the adversaries' gradients where the Gram shortcut does not replace them, a batch of the stacked adversary
inputs; not other activations or the allocator's slack), so they refuse nothing that could fit; what they let
through may still not fit. ``execution.memory_check=false`` turns them off.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._errors import SpecError
from ._spec import OptimizerSpec

__all__ = ["free_bytes", "optimizer_states", "require_memory", "gib", "element_bytes"]

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _host_free_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, capped by a cgroup's limit minus its usage; ``None`` where neither is known."""
    known: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for no limit
            known.append(max(limit - usage, 0))
            break
    return min(known) if known else None


def free_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device``; ``None`` where that cannot be known (no check then).

    CUDA: the device's free memory (``torch.cuda.mem_get_info``). CPU: the host's available memory
    (``MemAvailable``), or less where a cgroup limits the process, shared equally by the processes a launcher
    started on this host (``LOCAL_WORLD_SIZE``).
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        free = _host_free_bytes()
        # processes a launcher started on this host (torchrun's LOCAL_WORLD_SIZE) build and train side by side
        share = os.environ.get("LOCAL_WORLD_SIZE", "1")
        return free // int(share) if free is not None and share.isdigit() and int(share) > 0 else free
    return None


def optimizer_states(spec: OptimizerSpec) -> int:
    """Tensors the size of each parameter that the optimiser keeps: Adam's two moments, SGD's momentum buffer."""
    if spec.name in {"adam", "adamw"}:
        return 2
    return 1 if spec.momentum > 0 else 0


def element_bytes() -> int:
    """Bytes of one element of torch's default floating-point dtype (what parameters are built in)."""
    return torch.finfo(torch.get_default_dtype()).bits // 8


def gib(n: float) -> str:
    """``n`` bytes in GiB, one decimal."""
    return f"{n / 2**30:.1f} GiB"


def require_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    """Raise a one-line :class:`~mtdisent.SpecError` when ``needed`` bytes exceed what ``device`` has free.

    Args:
        needed: Bytes about to be allocated (a floor).
        device: Where.
        what: The message's start: what needs the memory, naming the spec fields behind it.
        advice: What would fit instead.
    """
    free = free_bytes(device)
    if free is None or needed <= free:
        return
    raise SpecError(
        f"{what} needs at least {gib(needed)}, more than the {gib(free)} free on {device}; {advice}; "
        "execution.memory_check=false skips this check"
    )
