"""BatchNorm statistics re-estimated from data: what a trained model normalises with at inference.

Training keeps momentum averages of the batch statistics (the DLTK encoders use momentum 0.01, TF1's default),
so an inference model's statistics are a trailing average over weights that kept changing. On the study's
``shapes_n`` workload that average alone moved one model's unseen accuracy from 0.45 to 0.97
(``benchmarks/results/trajectory/NOTES.md``). :func:`recompute_batchnorm` replaces every running statistic of
the model (encoders, classifiers, adversaries) by exact averages over one pass of a dataset, as
``torch.optim.swa_utils.update_bn`` does for plain BatchNorm modules; ``training.batchnorm_stats="recompute"``
applies it to the final model at the end of training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._data import ContractView, DataError, make_loader, task_classes
from ._heads import StackedHeads
from ._model import MultiTaskModel
from ._torch import eval_mode

__all__ = ["recompute_batchnorm"]


def recompute_batchnorm(
    model: MultiTaskModel, data: Any, *, batch_size: int = 50, split: str = "data"
) -> MultiTaskModel:
    """Re-estimate every BatchNorm running mean and variance of ``model`` from one pass over ``data``, in place.

    Each statistic becomes the plain average, over the pass, of the per-batch statistics a training forward
    computes (cumulative averaging, not momentum). Only BatchNorm runs in training mode: dropout and the levers
    behave as at inference, nothing is augmented and no weight changes. Conditional adversaries read the
    dataset's labels, as in training. A last batch smaller than ``batch_size`` is skipped (a batch of one has no
    variance); the model's train/eval mode is restored afterwards.

    Args:
        model: The trained model.
        data: A dataset following the data contract (items ``(image, {task: label})``), usually the training split.
        batch_size: Images per forward pass; the training batch size reproduces training's batch statistics.
        split: The data's name, for error messages.

    Returns:
        ``model``, with new statistics.

    Raises:
        DataError: ``data`` has fewer than ``batch_size`` samples, or breaks the data contract.
    """
    view = data if isinstance(data, ContractView) else ContractView(data, task_classes(model.experiment), None, split)
    if view.n < batch_size:
        raise DataError(
            f"{split}: recomputing BatchNorm statistics needs at least one full batch of {batch_size} images, "
            f"the data has {view.n}; pass a smaller batch_size or more data"
        )
    plain = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    stacks = [m for m in model.modules() if isinstance(m, StackedHeads) and m.spec.batchnorm]
    momenta = [m.momentum for m in plain], [s.momentum for s in stacks]
    device = next(model.parameters()).device
    batches = [list(range(s, s + batch_size)) for s in range(0, view.n - batch_size + 1, batch_size)]
    with eval_mode(model), torch.no_grad():
        for m in plain:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for s in stacks:
            s.reset_batchnorm()
            s.batchnorm_training, s.momentum = True, None
        try:
            for x, labels, _ in make_loader(view, batches):
                labels = {t: y.to(device) for t, y in labels.items()}
                features = model.encode(x.to(device))
                model.classify(features)
                if model.pairs:
                    model.adversary_logits(features, labels=labels)
        finally:
            for m, momentum in zip(plain, momenta[0], strict=True):
                m.momentum = momentum
            for s, momentum in zip(stacks, momenta[1], strict=True):
                s.batchnorm_training, s.momentum = None, momentum
    return model
