"""Levers: plugins that change how the model trains, through a few documented hooks.

A lever is declared in the spec (``Experiment.levers``: ``[{"name": "erasure", "args": {...}}]``) and found in
the ``mtdisent.levers`` registry (entry-point group ``mtdisent.levers``), like every other component. It may

* :meth:`Lever.build` a module the model owns (saved with the model, applied at inference too), for example
  the running statistics of an erasure layer;
* :meth:`Lever.features` transform each task's features between its encoder and its heads (classifier and
  adversaries), in training and at inference; ``labels`` are given in training (update statistics then) and
  ``None`` otherwise;
* :meth:`Lever.augment` change a training batch before the main step (synthesise factor combinations, for
  example); it sees the step, so it may run the model;
* :meth:`Lever.metrics` report what its last training step did (logged with the main step's metrics);
* :meth:`Lever.finish` change the final model once training is over (fit statistics on the training split's final
  features, for example).

Levers run in the order the spec lists them. A lever that only acts in training need not build anything; one
that builds a module is needed (as a plugin) to load the model, as a backbone is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._errors import signature_repr

if TYPE_CHECKING:
    from ._engine._step import AdversarialStep
    from ._model import MultiTaskModel

__all__ = ["Lever", "change_after_training", "finishing_levers"]


class Lever:
    """Base class of levers. Every hook is a no-op by default; override the ones the lever needs.

    A subclass's keyword constructor parameters are its spec arguments (checked by name by the registry).
    """

    def build(self, model: MultiTaskModel) -> nn.Module | None:
        """A module the model owns (its parameters train with the encoders, its buffers are checkpointed).

        Called once while the model is built; ``model`` has its encoders, tasks, pairs and ``feature_sizes``.
        """
        return None

    def features(
        self,
        module: nn.Module | None,
        features: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor] | None,
        training: bool,
    ) -> dict[str, torch.Tensor]:
        """``{task: (B, D)}`` -> ``{task: (B, D)}``: what the classifiers and adversaries read.

        Args:
            module: What :meth:`build` returned.
            features: The encoders' output (or the previous lever's).
            labels: ``{task: (B,)}`` (-1 unlabelled) in the training main step; ``None`` elsewhere (adversary
                steps on fresh batches, validation, inference).
            training: Whether the model is in training mode.
        """
        return features

    def augment(
        self, step: AdversarialStep, x: torch.Tensor, y: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Change the main step's batch ``(x (B, C, H, W), {task: (B,)})`` before it is used (training only)."""
        return x, y

    def metrics(self) -> dict[str, float]:
        """Metrics of the lever's part in the current main step (read after every lever's :meth:`augment`), logged.

        Name keys after the lever (``"recombine/flipped"``) so that they cannot collide with the step's own.
        """
        return {}

    def finishes(self) -> bool:
        """Whether :meth:`finish` changes the final model with these arguments (default: it is overridden).

        Override it when :meth:`finish` acts only for some arguments: ``md.train`` then knows that the final model
        is the last checkpoint's (``Run.model_at``, and ``md.evaluate``'s warning, depend on it).
        """
        return type(self).finish is not Lever.finish

    def finish(self, module: nn.Module | None, model: MultiTaskModel, data: Any) -> None:
        """Change the final model in place, once, when training is over (a no-op by default).

        ``md.train`` calls it in every process after the last iteration and, with
        ``training.batchnorm_stats="recompute"``, after the BatchNorm statistics are recomputed; levers in spec order.
        What it changes is the final model (``run.model``, the run's ``model.safetensors``, ``md.load``); the
        checkpoints keep the model as the last iteration left it, which is what a resume continues from, so a run
        resumed after its last iteration calls it again on that model. It must give the same result every time
        from the same model and data (seed what it draws). In a distributed run every process then takes rank 0's
        parameters and buffers.

        Args:
            module: What :meth:`build` returned.
            model: The final model, in training mode.
            data: The training split (``training.train_split``), as the data contract gives it.
        """

    def __repr__(self) -> str:
        return signature_repr(self)


def finishing_levers(model: MultiTaskModel) -> list[int]:
    """Indices of ``model``'s levers whose :meth:`Lever.finish` changes the final model (:meth:`Lever.finishes`)."""
    return [k for k, lever in enumerate(model.levers) if lever.finishes()]


def change_after_training(model: MultiTaskModel) -> str | None:
    """What ``md.train`` changes in ``model`` after its last checkpoint (a lever's finish, BatchNorm recomputed).

    ``None`` when nothing does: the final model is then the last iteration's.
    """
    finishing = finishing_levers(model)
    if finishing:
        return f"levers[{finishing[0]}] {model.experiment.levers[finishing[0]].name!r} changed it"
    if model.experiment.training.batchnorm_stats == "recompute":
        return "its BatchNorm statistics were recomputed"
    return None
