"""Classifier heads trained again on a trained model's fixed features (the encoders and levers frozen).

A classifier trained beside its encoder may read a nuisance the features also carry (the shortcut), even when
the features carry the task itself. :func:`retrain_classifiers` trains the heads again on the features as the
model now computes them at inference, for example after an erasure layer was fitted on them
(``mtdisent_plugins.levers.erasure.fit_erasure(..., retrain_epochs=...)``): a head can then only use what the
features still hold. It is last-layer retraining in the sense of Kirichenko, Izmailov & Wilson (2023), on the
training split and applied to the whole MLP head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._data import DataSource
from ._engine._setup import build_optimizer
from ._engine._step import masked_cross_entropy
from ._errors import MtdisentError, did_you_mean
from ._model import MultiTaskModel
from ._torch import own_rng
from .evaluation._features import collect_features

__all__ = ["retrain_classifiers"]


def _check(value: Any, name: str, ok: bool, valid: str) -> None:
    if not ok:
        raise MtdisentError(f"retrain_classifiers: {name}={value!r}: expected {valid}")


def retrain_classifiers(
    model: MultiTaskModel,
    data: Any,
    *,
    tasks: Sequence[str] | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
) -> MultiTaskModel:
    """Train the classifiers of ``tasks`` again on ``model``'s fixed features of ``data``, in place.

    The features are computed once, as at inference (eval mode, levers included: an erasure layer erases). Each
    head starts from its trained weights and takes ``epochs`` passes over the labelled samples in shuffled
    mini-batches of ``training.batch_size``, with the experiment's main optimiser (``training.optimizer``; its
    learning rate, or ``lr``) on the main step's masked cross-entropy; then its BatchNorm statistics become the
    exact mean and variance over all of them under the final weights. Encoders, levers, adversaries and the other
    heads are not changed.

    Args:
        model: A trained model.
        data: One split following the data contract, usually the training one.
        tasks: The heads to retrain (default every task).
        epochs: Passes over ``data`` (at least 1).
        lr: Learning rate (default the experiment's ``training.optimizer.lr``).
        batch_size: Images per forward pass when computing the features.
        num_workers: DataLoader worker processes for that pass.
        seed: Seeds the shuffles, any dropout, and whatever the data draws from torch's global generator (random
            augmentation, e.g. ``fetal_us_sim``'s ``train_shift``); the global random state is left as it was.

    Returns:
        ``model``, its mode restored.

    Raises:
        MtdisentError: a bad argument, an unknown task, a task with fewer than two labelled samples, or ``data``
            holding several splits.
    """
    if not isinstance(model, MultiTaskModel):
        raise MtdisentError(f"retrain_classifiers: model must be a MultiTaskModel, got {type(model).__name__}")
    if isinstance(data, (DataSource, Mapping)):
        raise MtdisentError(
            f"retrain_classifiers: data: pass one split (for example data['train']), not {sorted(data)}"
        )
    names = list(model.task_names if tasks is None else tasks)
    _check(tasks, "tasks", bool(names) and not isinstance(tasks, str), "a non-empty list of task names")
    for task in names:
        if task not in model.task_names:
            raise MtdisentError(
                f"retrain_classifiers: tasks: unknown task {task!r}. {did_you_mean(task, model.task_names)}"
            )
    _check(
        epochs, "epochs", isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1, "an integer >= 1"
    )
    _check(
        lr, "lr", lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0), "a number > 0"
    )
    training = model.experiment.training
    optimizer = training.optimizer if lr is None else training.optimizer.model_copy(update={"lr": float(lr)})
    device = next(model.parameters()).device
    with own_rng(device, seed):
        features, labels = collect_features(model, data, batch_size, num_workers=num_workers)  # {task: (N, D)}, CPU
        for task in names:
            keep = labels[task] >= 0
            if int(keep.sum()) < 2:
                raise MtdisentError(f"retrain_classifiers: task {task!r}: {int(keep.sum())} labelled samples, need 2")
            x, y = features[task][keep].to(device), labels[task][keep].to(device)  # (M, D), (M,)
            head = model.classifiers.head(task).train()
            opt = build_optimizer(optimizer, list(head.parameters()))
            for _ in range(epochs):
                for rows in torch.randperm(len(y), device=device).split(training.batch_size):
                    if len(rows) < 2:  # BatchNorm needs two rows: a single leftover row is skipped this epoch
                        continue
                    loss = masked_cross_entropy(head(x[rows]), y[rows])
                    assert loss is not None  # every row is labelled
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():  # the BatchNorm statistics of the final weights over every labelled sample
                norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
                momenta = [m.momentum for m in norms]
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None  # one batch, cumulative: exactly its mean and (unbiased) variance
                head(x)
                for m, momentum in zip(norms, momenta, strict=True):
                    m.momentum = momentum
            model.classifiers.load_head(task, head)
    return model
