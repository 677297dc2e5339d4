"""A description of the machine results were measured on, committed next to every benchmark or result table."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info"]


# instruction sets that change what a CPU result means: without bf16 instructions bf16 autocast is emulated (15x
# slower than float32 on one of this project's machines), with them it is faster (0.73x on another)
# x86 ("flags") and Arm ("Features") instruction sets that decide float32 and bf16 speed
CPU_FLAGS = (
    *("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"),
    *("asimd", "sve", "sve2", "bf16"),
)


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, list[str] | None]:
    """The first processor's model name and which of :data:`CPU_FLAGS` it reports (``None`` where unreadable)."""
    model: str | None = None
    flags: list[str] | None = None
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and flags is None:
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return model, flags


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, count and instruction sets, torch threads, Python and torch versions, and the GPU if any.

    ``cpu_flags`` lists which of :data:`CPU_FLAGS` the CPU reports (Linux; absent where ``/proc/cpuinfo`` is not
    readable): the "AMD EPYC" label alone does not say whether bf16 arithmetic is native.
    """
    model, flags = _cpuinfo()
    cpu = model or platform.processor()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        **({"cpu_flags": flags} if flags is not None else {}),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
