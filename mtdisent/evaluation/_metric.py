"""Metrics accumulated over batches: the one metrics path of validation during training and ``md.evaluate``.

A :class:`Metric` (in the manner of torchmetrics' ``Metric``) registers tensor states with :meth:`Metric.add_state`,
accumulates them in :meth:`Metric.update` from each batch's classifier logits and labels, and turns them into
named values in :meth:`Metric.compute`. Under ``torchrun`` the states are summed across processes before
:meth:`Metric.compute` (:meth:`Metric.sync`), so every rank may see a different part of the data. A new metric is
one subclass in one file, passed as ``md.train(..., metrics=[...])`` (logged as ``val_<key>``, and usable as
``training.select_metric``) or ``md.evaluate(..., metrics=[...])`` (in ``report.values``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.distributed as dist

from ._metrics import TaskMetrics, confusion_matrix, metrics_from_confusion

__all__ = ["Metric", "Accuracy"]


class Metric:
    """Base class of metrics. Override :meth:`update` and :meth:`compute`; declare states in ``__init__``.

    Attributes:
        name: A short name (for messages).
    """

    name: ClassVar[str] = "metric"

    def __init__(self) -> None:
        self._defaults: dict[str, torch.Tensor] = {}

    def add_state(self, name: str, default: torch.Tensor) -> None:
        """Declare a state tensor, summed across processes by :meth:`sync`; :meth:`reset` restores ``default``."""
        self._defaults[name] = default.detach().clone()
        setattr(self, name, default.detach().clone())

    def reset(self) -> None:
        """Forget what was accumulated."""
        for name, default in self._defaults.items():
            setattr(self, name, default.clone())

    def update(self, logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> None:
        """Accumulate one batch: ``{task: (B, K) logits}`` and ``{task: LongTensor[B]}`` labels (-1 unlabelled)."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metric's values by key (for example ``{"mean_acc": 0.93}``), from the accumulated states."""
        raise NotImplementedError

    def sync(self) -> None:
        """Sum the states over the processes of a ``torch.distributed`` run (a no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in self._defaults:
            state = getattr(self, name)
            dist.all_reduce(state, op=dist.ReduceOp.SUM)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Accuracy(Metric):
    """Per-task confusion matrices, and from them accuracy, balanced accuracy and their mean and minimum.

    Keys of :meth:`compute`: ``acc/<task>``, ``balanced_acc/<task>``, ``mean_acc``, ``min_acc`` and
    ``mean_balanced_acc`` (means and minimum over tasks with a labelled sample).

    Args:
        tasks: ``{task: number of classes}``.
    """

    name = "accuracy"

    def __init__(self, tasks: Mapping[str, int]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        for t, k in self.tasks.items():
            self.add_state(f"confusion_{t}", torch.zeros(k, k, dtype=torch.long))

    def update(self, logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> None:
        """Count each task's predictions (argmax of its logits) against its labels."""
        for t, k in self.tasks.items():
            pred, target = logits[t].argmax(-1).cpu(), labels[t].cpu()
            setattr(self, f"confusion_{t}", getattr(self, f"confusion_{t}") + confusion_matrix(pred, target, k))

    def confusion(self, task: str) -> torch.Tensor:
        """(K, K) counts of ``task``: rows true classes, columns predicted classes."""
        return getattr(self, f"confusion_{task}")

    def task_metrics(self) -> dict[str, TaskMetrics]:
        """:class:`TaskMetrics` of every task."""
        return {t: metrics_from_confusion(self.confusion(t)) for t in self.tasks}

    def compute(self) -> dict[str, float]:
        """Accuracy and balanced accuracy per task; their mean and minimum over labelled tasks."""
        out: dict[str, float] = {}
        per = self.task_metrics()
        for t, m in per.items():
            if m.n:
                out[f"acc/{t}"], out[f"balanced_acc/{t}"] = m.accuracy, m.balanced_accuracy
        accs = [m.accuracy for m in per.values() if m.n]
        balanced = [m.balanced_accuracy for m in per.values() if m.n]
        out["mean_acc"] = sum(accs) / len(accs) if accs else math.nan
        out["min_acc"] = min(accs) if accs else math.nan
        out["mean_balanced_acc"] = sum(balanced) / len(balanced) if balanced else math.nan
        return out

    def __repr__(self) -> str:
        return f"Accuracy(tasks={self.tasks})"
