"""A model's features over a dataset, read through the data contract's one path (as training reads it)."""

from __future__ import annotations

from typing import Any

import torch

from .._data import ContractView, make_loader, sequential_batches, task_classes
from .._errors import did_you_mean
from .._model import Features
from ._metrics import EvaluationError

__all__ = ["LAYERS", "collect_features"]

LAYERS = ("features", "penultimate")


def collect_features(
    model: Any,
    dataset: Any,
    batch_size: int = 256,
    layer: str = "features",
    device: str | torch.device | None = None,
    *,
    num_workers: int = 0,
    split: str = "data",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model`` (eval mode, no gradients) over ``dataset`` and gather per-task features and labels.

    ``dataset`` follows the data contract and is checked as training checks it (tensor-backed datasets are
    sliced directly, others read item by item, with ``num_workers`` DataLoader workers).

    Args:
        model: A :class:`~mtdisent.MultiTaskModel`.
        dataset: A map-style dataset.
        batch_size: Images per forward pass.
        layer: ``"features"`` (encoder output) or ``"penultimate"`` (the classifiers' last hidden layer).
        device: Where to run the model; default the device of its parameters. The model is not moved.
        num_workers: DataLoader worker processes.
        split: The dataset's name in error messages.

    Returns:
        ``(features, labels)``: ``{task: float (N, D)}`` and ``{task: LongTensor[N]}`` on the CPU, -1 where a
        sample has no label for a task. The model's train/eval mode is restored. With ``adversary.scales="all"``
        and ``layer="features"`` the features are a :class:`~mtdisent.MultiTaskModel` ``Features`` carrying the
        encoders' pooled scales as well (what the adversaries read).
    """
    if layer not in LAYERS:
        raise EvaluationError(f"layer: unknown layer {layer!r}. {did_you_mean(str(layer), LAYERS)}")
    experiment = getattr(model, "experiment", None)
    if experiment is None or not callable(getattr(model, layer, None)):
        raise EvaluationError(f"model: expected a MultiTaskModel, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if device is None:
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    view = ContractView(dataset, task_classes(experiment), model.input_shape, split)
    chunks: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}
    labels: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}
    scales: dict[str, list[torch.Tensor]] = {}
    fn = getattr(model, layer)  # eval mode, inference mode, previous mode restored
    batches = sequential_batches(view.n, batch_size)
    for x, y, _ in make_loader(view, batches, num_workers=num_workers, pin_memory=dev.type == "cuda"):
        out = fn(x.to(dev))  # {task: (B, D)}
        for t in model.task_names:
            chunks[t].append(out[t].detach().float().cpu().clone())
            labels[t].append(y[t])
        for t, s in getattr(out, "scales", {}).items():  # the encoders' pooled scales (adversary.scales="all")
            scales.setdefault(t, []).append(s.detach().float().cpu().clone())
    gathered = {t: torch.cat(v) for t, v in chunks.items()}
    features = Features(gathered, {t: torch.cat(v) for t, v in scales.items()}) if scales else gathered
    return features, {t: torch.cat(v) for t, v in labels.items()}
