"""BatchNorm statistics re-estimated from data: what a trained model normalises with at inference.

Training keeps momentum averages of the batch statistics (the DLTK encoders use momentum 0.01, TF1's default),
so an inference model's statistics are a trailing average over weights that kept changing; on the study's
``shapes_n`` workload one model read unseen accuracy 0.97 with its running statistics and 0.45 with
re-estimated ones (``benchmarks/results/trajectory/NOTES.md``). :func:`recompute_batchnorm` replaces every
running statistic of the model (encoders, classifiers, adversaries, stacked or not) by exact averages over one
pass of a dataset; ``training.batchnorm_stats="recompute"`` applies it to the final model at the end of training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._data import ContractView, DataError, DataSource, make_loader, sequential_batches, task_classes
from ._errors import MtdisentError
from ._heads import StackedHeads
from ._model import MultiTaskModel
from ._torch import eval_mode

__all__ = ["recompute_batchnorm"]


Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def recompute_batchnorm(
    model: MultiTaskModel,
    data: Any,
    *,
    batch_size: int = 50,
    num_workers: int = 0,
    split: str = "data",
    transform: Callable[[torch.Tensor, dict[str, torch.Tensor]], Batch] | None = None,
) -> MultiTaskModel:
    """Re-estimate every BatchNorm running mean and variance of ``model`` from one pass over ``data``, in place.

    Each statistic becomes the plain average, over the pass, of the per-batch statistics a training forward
    computes (cumulative averaging, not momentum). Only BatchNorm runs in training mode: dropout and the levers
    behave as at inference. Batches are the dataset's own (a transform the dataset applies still is) unless
    ``transform`` changes them the way training did: random flips, or a lever that adds synthetic samples (the
    engine passes its step's :meth:`~mtdisent.engine.Step.augment`). Conditional adversaries read the batch's
    labels, as in training. Only full batches are used (a batch of one has no variance). The model's mode is
    restored afterwards; if the pass fails, the previous statistics are put back. A model without BatchNorm is
    returned unchanged.

    Args:
        model: The trained model.
        data: One split following the data contract (items ``(image, {task: label})``), usually the training one.
        batch_size: Images per forward pass (at least 2); training's batch size reproduces its batch statistics.
        num_workers: DataLoader worker processes.
        split: The data's name, for error messages.
        transform: ``(x (B, C, H, W), {task: (B,)}) -> (x', labels')`` applied to each batch, on the model's
            device, before its forward, under ``torch.no_grad()`` (enable gradients inside if it needs them). It
            sees the model in eval mode with the statistics it came with (a lever that runs the model, as
            ``recombine`` does, computes what it computed in training), moves no statistic, and may change the
            batch size.

    Returns:
        ``model``, with new statistics.

    Raises:
        DataError: ``data`` has fewer than ``batch_size`` samples, or breaks the data contract.
        MtdisentError: ``batch_size`` is not an integer of at least 2, or ``data`` holds several splits.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise MtdisentError(
            f"batch_size: expected an integer of at least 2 (BatchNorm needs a batch), got {batch_size!r}"
        )
    if isinstance(data, (DataSource, Mapping)):
        raise MtdisentError(
            f"data: pass one split (for example data['train']), not {len(data)} splits ({sorted(data)})"
        )
    plain = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    stacks = [m for m in model.modules() if isinstance(m, StackedHeads) and m.spec.batchnorm]
    if not plain and not stacks:
        return model
    if isinstance(data, ContractView):
        view, split = data, data.split
    else:
        view = ContractView(data, task_classes(model.experiment), model.input_shape, split)
    if view.n < batch_size:
        raise DataError(
            f"{split}: recomputing BatchNorm statistics needs at least one full batch of {batch_size} images, "
            f"the data has {view.n}; pass a smaller batch_size or more data"
        )
    buffers = [b for m in [*plain, *stacks] for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in buffers]
    settings = [m.momentum for m in plain], [(s.momentum, s.batchnorm_training) for s in stacks]
    device = next(model.parameters()).device
    batches = [b for b in sequential_batches(view.n, batch_size) if len(b) == batch_size]
    with eval_mode(model), torch.no_grad():
        for m in plain:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        for s in stacks:
            s.reset_batchnorm()
            s.momentum, s.batchnorm_training = None, False
        try:
            loader = make_loader(view, batches, num_workers=num_workers, pin_memory=device.type == "cuda")
            for x, labels, _ in loader:
                x, labels = x.to(device), {t: y.to(device) for t, y in labels.items()}
                if transform is not None:  # it sees the model as it was: the statistics it came with
                    accumulated = [b.clone() for b in buffers]
                    for b, value in zip(buffers, saved, strict=True):
                        b.copy_(value)
                    x, labels = transform(x, labels)
                    for b, value in zip(buffers, accumulated, strict=True):
                        b.copy_(value)
                with _tracking(plain, stacks):  # batch statistics, accumulated, for this forward only
                    features = model.encode(x)
                    model.classify(features)
                    if model.pairs:
                        model.adversary_logits(features, labels=labels)
        except BaseException:
            for b, value in zip(buffers, saved, strict=True):
                b.copy_(value)
            raise
        finally:
            for m, momentum in zip(plain, settings[0], strict=True):
                m.momentum = momentum
            for s, (momentum, mode) in zip(stacks, settings[1], strict=True):
                s.momentum, s.batchnorm_training = momentum, mode
    return model


@contextlib.contextmanager
def _tracking(plain: Sequence[nn.Module], stacks: Sequence[StackedHeads]) -> Iterator[None]:
    """BatchNorm layers in training mode (batch statistics, running ones updated) inside, eval mode after."""
    for m in plain:
        m.train()
    for s in stacks:
        s.batchnorm_training = True
    try:
        yield
    finally:
        for m in plain:
            m.eval()
        for s in stacks:
            s.batchnorm_training = False
