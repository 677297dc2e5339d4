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
        finished: Whether :attr:`model` was changed after the last iteration (BatchNorm statistics recomputed,
            a lever's :meth:`~mtdisent.Lever.finish`), so that it differs from every checkpoint.
        latest_state: For a :attr:`finished` run without ``out_dir``: the model weights at the last iteration
            (a run with a directory keeps them in its last checkpoint). Use :meth:`model_at`.
    """

    experiment: Experiment
    model: MultiTaskModel
    out_dir: Path | None
    iteration: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    finished: bool = False
    latest_state: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        where = str(self.out_dir) if self.out_dir is not None else "in memory"
        best = f", best at iteration {self.best['iteration']}" if self.best else ""
        name = f" {self.experiment.name!r}" if self.experiment.name else ""
        return f"Run({where}{name}: {len(self.model.task_names)} tasks, {self.iteration} iterations{best})"

    def model_at(self, which: str = "best") -> MultiTaskModel:
        """The final model, or the latest or best checkpoint's, as :func:`~mtdisent.load` gives them.

        Args:
            which: ``"final"`` (the trained model, :attr:`model`), ``"latest"`` (the last iteration's checkpoint:
                :attr:`model` unless it was :attr:`finished` after it) or ``"best"`` (the checkpoint chosen on
                validation data; :attr:`model` when there was no validation, or when the last one won and nothing
                changed the model after it).

        Returns:
            The model; a separate copy (or a model loaded from the run directory) for an earlier state.

        Raises:
            CheckpointError: ``which`` is not one of the three. MtdisentError: the weights asked for were not kept.
        """
        check_which(which)
        if which == "final" or (which == "best" and self.best is None):
            return self.model
        device = next(self.model.parameters()).device
        if which == "latest":
            if not self.finished:
                return self.model
            if self.latest_state is not None:
                return self._with(self.latest_state)
            if self.out_dir is not None:
                return load(self.out_dir, which="latest").to(device)
            raise MtdisentError("the last iteration's model of this run was not kept; pass which='final'")
        assert self.best is not None
        if self.best.get("iteration") == self.iteration and not self.finished:
            return self.model
        if self.best_state is not None:
            return self._with(self.best_state)
        if self.out_dir is not None and (self.out_dir / "checkpoints" / "best").is_dir():
            return load(self.out_dir, which="best").to(device)
        raise MtdisentError(
            f"the best checkpoint (iteration {self.best.get('iteration')}) of this run was not kept; "
            "pass which='final', or train with out_dir to keep it"
        )

    def _with(self, state: dict[str, torch.Tensor]) -> MultiTaskModel:
        """A copy of :attr:`model` holding ``state``."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(state)
        return model
