"""The result of training: :class:`Run`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._errors import MtdisentError
from .._model import MultiTaskModel
from .._spec import Experiment
from ._checkpoint import check_which, load

__all__ = ["Run"]


@dataclass(repr=False)
class Run:
    """The result of :func:`~mtdisent.train`.

    Attributes:
        experiment: The experiment trained.
        model: The trained model (training mode, on the training device).
        out_dir: The run directory, or ``None`` for an in-memory run.
        iteration: Iterations completed.
        history: The logged metrics, one dict per logged iteration.
        best: Validation metrics of the best checkpoint, when validation data was given.
        best_state: For a run without ``out_dir``: the model weights of the best checkpoint (a run with a
            directory keeps them in ``checkpoints/best``). Use :meth:`model_at` rather than reading it.
    """

    experiment: Experiment
    model: MultiTaskModel
    out_dir: Path | None
    iteration: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        where = str(self.out_dir) if self.out_dir is not None else "in memory"
        best = f", best at iteration {self.best['iteration']}" if self.best else ""
        name = f" {self.experiment.name!r}" if self.experiment.name else ""
        return f"Run({where}{name}: {len(self.model.task_names)} tasks, {self.iteration} iterations{best})"

    def model_at(self, which: str = "best") -> MultiTaskModel:
        """The model at the final, latest or best checkpoint.

        Args:
            which: ``"final"`` or ``"latest"`` (the trained model, :attr:`model`), or ``"best"`` (the checkpoint
                chosen on validation data; :attr:`model` when there was no validation or the last one won).

        Returns:
            The model; a separate copy (or a model loaded from ``checkpoints/best``) for an earlier best.

        Raises:
            CheckpointError: ``which`` is not one of the three. MtdisentError: the best weights were not kept.
        """
        check_which(which)
        if which != "best" or self.best is None or self.best.get("iteration") == self.iteration:
            return self.model
        if self.best_state is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(self.best_state)
            return model
        if self.out_dir is not None and (self.out_dir / "checkpoints" / "best").is_dir():
            return load(self.out_dir, which="best").to(next(self.model.parameters()).device)
        raise MtdisentError(
            f"the best checkpoint (iteration {self.best.get('iteration')}) of this run was not kept; "
            "pass which='final', or train with out_dir to keep it"
        )
