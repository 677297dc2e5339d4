"""What the levers that synthesise training samples share: a checkpointed step counter, per-step seeds, splicing.

:class:`~mtdisent_plugins.levers.recombine.Recombine` and :class:`~mtdisent_plugins.levers.intervene.Intervene`
both pick rows of the main step's batch with a generator seeded by the experiment's seed and the number of main
steps so far (a buffer the model checkpoints, so a resumed run draws what the uninterrupted one would), make new
samples from them and either append them to the batch or put them in the chosen rows' place.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mtdisent import ComponentError, MtdisentError

MODES = ("append", "replace")


class StepCount(nn.Module):
    """The number of main steps a lever has seen, as a buffer: checkpoints carry it, so resumes are exact."""

    steps: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def next_step(count: StepCount | None, lever: str) -> int:
    """The lever's main-step count before this step, advancing it by one; an error if the lever was not built."""
    if count is None:
        raise MtdisentError(f"lever {lever!r}: augment before build; the model builds its levers")
    current = int(count.steps)
    count.steps.add_(1)
    return current


def step_seed(lever: str, seed: int, count: int) -> int:
    """A well-mixed 63-bit seed for main step ``count`` of an experiment seeded ``seed``, distinct per lever."""
    digest = hashlib.blake2b(f"{lever}:{seed}:{count}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def check_common(fraction: object, mode: object, start: object) -> None:
    """Validate the arguments every synthesising lever takes; a one-line :class:`ComponentError` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ComponentError(f"fraction={fraction!r}; expected a number in (0, 1]")
    if mode not in MODES:
        raise ComponentError(f"mode={mode!r}; expected 'append' or 'replace'")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ComponentError(f"start={start!r}; expected an integer >= 0")


def splice(
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    rows: torch.Tensor,
    x_new: torch.Tensor,
    y_new: dict[str, torch.Tensor],
    mode: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Put ``n`` new samples made from batch ``rows`` into the batch ``(x (B, C, H, W), {task: (B,)})``.

    ``"append"``: after the batch (B + n rows); ``"replace"``: in the rows they were made from (B rows; neither
    input is modified). Returns the batch and where each new sample is in it ((n,), on the CPU).
    """
    if mode == "append":
        b = x.shape[0]
        y_out = {k: torch.cat([v, y_new[k]]) for k, v in y.items()}
        return torch.cat([x, x_new]), y_out, torch.arange(b, b + len(rows))  # (B + n, C, H, W)
    x_out, y_out = x.clone(), {k: v.clone() for k, v in y.items()}  # (B, C, H, W)
    x_out[rows.to(x.device)] = x_new
    for k, v in y_out.items():
        v[rows.to(v.device)] = y_new[k]
    return x_out, y_out, rows.clone()
