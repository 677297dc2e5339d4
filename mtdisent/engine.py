"""The training engine's extension points: the step contract, callbacks, the best-checkpoint rule.

* :class:`Step` / :class:`AdversarialStep`: what one iteration does (main step, adversary steps); subclass to
  change it.
* :class:`Callback` and the built-in ones (:class:`Checkpointer`, :class:`MetricsLog`, :class:`Progress`,
  :class:`GracefulStop`): what happens around the steps; pass your own as ``md.train(..., callbacks=[...])``.
* :class:`Selection`: which validation metric picks the best checkpoint (``training.select_metric``).
* :class:`Loop` and :func:`build_loop`: everything ``md.train`` builds, ready to drive by hand (for tests,
  benchmarks and notebooks): ``loop = build_loop(experiment, data); loop.step.update(0)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._data import resolve_data
from ._engine import (
    AdversarialStep,
    Callback,
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    GracefulStop,
    Loop,
    MetricsLog,
    Progress,
    Selection,
    Step,
)
from ._engine._distributed import DistInfo
from ._engine._setup import resolve_device
from ._engine._step import lambda_schedule, masked_cross_entropy
from ._engine._validation import validation_leakage
from ._spec import Experiment

__all__ = [
    "Step",
    "AdversarialStep",
    "Callback",
    "Checkpointer",
    "CheckpointWarning",
    "CheckpointError",
    "MetricsLog",
    "Progress",
    "GracefulStop",
    "Selection",
    "Loop",
    "build_loop",
    "lambda_schedule",
    "masked_cross_entropy",
    "validation_leakage",
]


def build_loop(
    experiment: Experiment, data: Any = None, *, device: str = "cpu", out_dir: str | Path | None = None, **kwargs: Any
) -> Loop:
    """Build what :func:`mtdisent.train` builds (model, data feed, step, validator, callbacks) without running it.

    Args:
        experiment: The experiment.
        data: As for :func:`mtdisent.train`.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        out_dir: Run directory (used only if the loop is run).
        **kwargs: ``resume``, ``restart``, ``quiet``, ``callbacks``, ``metrics`` as for :func:`mtdisent.train`.

    Returns:
        The :class:`Loop`: ``loop.step.update(i)`` runs iteration ``i`` (drawing from the caller's global RNG;
        ``loop.seed_streams(i)`` first draws what ``loop.run()`` would); ``loop.run()`` trains.
    """
    return Loop(experiment, resolve_data(experiment, data), out_dir, resolve_device(device), DistInfo(), **kwargs)
