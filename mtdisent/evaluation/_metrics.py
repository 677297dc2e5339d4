"""Classification metrics on tensors: confusion matrix, (balanced) accuracy, per-combination accuracy, leakage.

Every function takes integer label tensors in which ``-1`` marks an unlabelled sample; such samples are
excluded before anything is counted (their prediction is ignored, whatever it is). A quantity that is
undefined because nothing is left to count (no labelled sample, no class present) is ``nan``; the
``to_dict`` methods write it as ``None`` so the result is strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._data import UNLABELLED
from .._errors import MtdisentError

__all__ = [
    "EvaluationError",
    "UNLABELLED",
    "TaskMetrics",
    "CombinationSummary",
    "confusion_matrix",
    "accuracy",
    "balanced_accuracy",
    "per_class_accuracy",
    "task_metrics",
    "metrics_from_confusion",
    "combination_accuracy",
    "seen_combinations",
    "combination_summary",
    "majority_rate",
    "normalised_leakage",
    "mean_std",
    "format_mean_std",
]


class EvaluationError(MtdisentError, ValueError):
    """Inputs to an evaluation function are malformed; the message names the argument and what would be valid."""


# ----------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------
def as_labels(value: Any, name: str) -> torch.Tensor:
    """``value`` as a 1-D int64 CPU tensor, or an :class:`EvaluationError` naming ``name``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EvaluationError(f"{name}: expected a 1-D integer tensor, got {type(value).__name__}") from exc
        if value.numel() == 0:
            value = value.long()
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise EvaluationError(f"{name}: expected a 1-D integer tensor of class indices, got dtype {value.dtype}")
    if value.ndim != 1:
        raise EvaluationError(f"{name}: expected a 1-D tensor of class indices, got shape {tuple(value.shape)}")
    return value.detach().to(device="cpu", dtype=torch.long)


def check_num_classes(num_classes: Any, name: str = "num_classes") -> int:
    """``num_classes`` as a positive int, or an :class:`EvaluationError`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EvaluationError(f"{name}: expected a positive integer, got {num_classes!r}")
    return num_classes


def check_targets(target: torch.Tensor, num_classes: int, name: str = "target") -> None:
    """Raise unless every entry of ``target`` is -1 (unlabelled) or in ``0..num_classes-1``."""
    bad = (target < UNLABELLED) | (target >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise EvaluationError(
            f"{name}[{i}] = {int(target[i])} is out of range; expected 0..{num_classes - 1} or -1 (unlabelled)"
        )


def _pair(pred: Any, target: Any, num_classes: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validated ``(pred, target)`` restricted to labelled samples, and ``num_classes``."""
    k = check_num_classes(num_classes)
    p, t = as_labels(pred, "pred"), as_labels(target, "target")
    if p.shape != t.shape:
        raise EvaluationError(f"pred has {p.numel()} entries but target has {t.numel()}; they must match")
    check_targets(t, k)
    mask = t != UNLABELLED
    p, t = p[mask], t[mask]
    bad = (p < 0) | (p >= k)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise EvaluationError(
            f"pred contains class {int(p[i])} for a labelled sample; expected 0..{k - 1} (num_classes={k})"
        )
    return p, t, k


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------
# per-task metrics
# ----------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count predictions per (true class, predicted class).

    Args:
        pred: ``LongTensor[N]`` predicted classes (ignored where ``target`` is -1).
        target: ``LongTensor[N]`` true classes, ``-1`` for unlabelled samples (excluded).
        num_classes: Number of classes K.

    Returns:
        ``LongTensor[K, K]``: entry ``[t, p]`` counts labelled samples of true class ``t`` predicted as ``p``
        (rows are true classes). It sums to the number of labelled samples.

    Raises:
        EvaluationError: Shapes differ, a label is out of range, or ``num_classes`` is not a positive int.
    """
    p, t, k = _pair(pred, target, num_classes)
    return torch.bincount(t * k + p, minlength=k * k).view(k, k)


def accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> float:
    """Share of labelled samples predicted correctly (``trace / sum`` of the confusion matrix).

    Args:
        pred: ``LongTensor[N]`` predicted classes.
        target: ``LongTensor[N]`` true classes, ``-1`` for unlabelled samples (excluded).
        num_classes: If given, labels are checked against ``0..num_classes-1``.

    Returns:
        The accuracy in ``[0, 1]``, ``nan`` when no sample is labelled.
    """
    if num_classes is not None:
        p, t, _ = _pair(pred, target, num_classes)
    else:
        p, t = as_labels(pred, "pred"), as_labels(target, "target")
        if p.shape != t.shape:
            raise EvaluationError(f"pred has {p.numel()} entries but target has {t.numel()}; they must match")
        if bool((t < UNLABELLED).any()):
            raise EvaluationError("target: class indices must be >= 0, or -1 for unlabelled")
        mask = t != UNLABELLED
        p, t = p[mask], t[mask]
    if t.numel() == 0:
        return math.nan
    return float((p == t).double().mean())


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """Recall of each class: the share of its labelled samples predicted as that class.

    Args:
        pred: ``LongTensor[N]`` predicted classes.
        target: ``LongTensor[N]`` true classes, ``-1`` for unlabelled samples (excluded).
        num_classes: Number of classes K.

    Returns:
        K entries; ``None`` for a class with no labelled sample in ``target``.
    """
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes)).per_class_accuracy


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in ``target`` (classes with no labelled sample are skipped).

    Args:
        pred: ``LongTensor[N]`` predicted classes.
        target: ``LongTensor[N]`` true classes, ``-1`` for unlabelled samples (excluded).
        num_classes: Number of classes K.

    Returns:
        The balanced accuracy in ``[0, 1]``, ``nan`` when no sample is labelled.
    """
    recalls = [r for r in per_class_accuracy(pred, target, num_classes) if r is not None]
    return sum(recalls) / len(recalls) if recalls else math.nan


@dataclass
class TaskMetrics:
    """Classification metrics of one task.

    Attributes:
        accuracy: Share of labelled samples predicted correctly (``nan`` if none is labelled).
        balanced_accuracy: Mean recall over classes present (``nan`` if none is labelled).
        per_class_accuracy: Recall per class, ``None`` for classes absent from the labels.
        confusion: ``K x K`` counts, rows are true classes, columns predicted classes.
        n: Number of labelled samples counted.
    """

    accuracy: float
    balanced_accuracy: float
    per_class_accuracy: list[float | None]
    confusion: list[list[int]]
    n: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the fields (``nan`` written as ``None``)."""
        return _nan_to_none(asdict(self))


def metrics_from_confusion(cm: torch.Tensor) -> TaskMetrics:
    """:class:`TaskMetrics` from a (K, K) confusion matrix (rows true classes, columns predicted classes)."""
    n = int(cm.sum())
    support = cm.sum(1)
    per_class = [float(cm[c, c]) / float(support[c]) if support[c] > 0 else None for c in range(cm.shape[0])]
    present = [r for r in per_class if r is not None]
    return TaskMetrics(
        accuracy=float(cm.trace()) / n if n else math.nan,
        balanced_accuracy=sum(present) / len(present) if present else math.nan,
        per_class_accuracy=per_class,
        confusion=cm.tolist(),
        n=n,
    )


def task_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> TaskMetrics:
    """All per-task metrics at once.

    Args:
        pred: ``LongTensor[N]`` predicted classes.
        target: ``LongTensor[N]`` true classes, ``-1`` for unlabelled samples (excluded).
        num_classes: Number of classes K.

    Returns:
        A :class:`TaskMetrics`.
    """
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes))


# ----------------------------------------------------------------------------------------------------
# factor combinations
# ----------------------------------------------------------------------------------------------------
def _stack_factors(labels: Mapping[str, Any], factors: Sequence[str], what: str) -> torch.Tensor:
    """``(N, F)`` labels of ``factors`` in order; errors name the missing factor."""
    if isinstance(factors, str) or not len(factors):
        raise EvaluationError(f"factors: expected a non-empty list of task names, got {factors!r}")
    if len(set(factors)) != len(factors):
        raise EvaluationError(f"factors: {list(factors)} names a task twice")
    cols = []
    for f in factors:
        if f not in labels:
            raise EvaluationError(f"{what} has no labels for factor {f!r}; it has {sorted(labels)}")
        cols.append(as_labels(labels[f], f"{what}[{f!r}]"))
    n = cols[0].numel()
    for f, c in zip(factors, cols, strict=True):
        if c.numel() != n:
            raise EvaluationError(f"{what}[{f!r}] has {c.numel()} entries but {what}[{factors[0]!r}] has {n}")
    return torch.stack(cols, dim=1)


def combination_accuracy(
    preds: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    task: str,
    factors: Sequence[str],
) -> dict[tuple[int, ...], tuple[float, int]]:
    """Accuracy of ``task`` within each combination of the factor labels.

    A sample counts when ``task`` and every factor are labelled (not -1). ``factors`` may include ``task``.

    Args:
        preds: ``{task: LongTensor[N]}`` predicted classes (only ``preds[task]`` is used).
        labels: ``{task: LongTensor[N]}`` true classes, ``-1`` for unlabelled.
        task: The task whose predictions are scored.
        factors: Tasks whose label combination groups the samples, in the order of the returned keys.

    Returns:
        ``{(v_1, ..., v_F): (accuracy, n)}`` for each combination that occurs, sorted by combination.

    Raises:
        EvaluationError: ``task`` or a factor has no labels/predictions, or lengths differ.
    """
    if task not in preds:
        raise EvaluationError(f"preds has no predictions for task {task!r}; it has {sorted(preds)}")
    if task not in labels:
        raise EvaluationError(f"labels has no labels for task {task!r}; it has {sorted(labels)}")
    combos = _stack_factors(labels, factors, "labels")  # (N, F)
    p = as_labels(preds[task], f"preds[{task!r}]")
    t = as_labels(labels[task], f"labels[{task!r}]")
    if p.numel() != t.numel() or t.numel() != combos.shape[0]:
        raise EvaluationError(
            f"preds[{task!r}] has {p.numel()} entries, labels[{task!r}] has {t.numel()} and the factor labels "
            f"{list(factors)} have {combos.shape[0]}; they must match"
        )
    mask = (t != UNLABELLED) & (combos != UNLABELLED).all(1)
    combos, correct = combos[mask], (p[mask] == t[mask])
    if combos.shape[0] == 0:
        return {}
    keys, inverse = torch.unique(combos, dim=0, return_inverse=True)  # sorted lexicographically
    n = torch.bincount(inverse, minlength=keys.shape[0])
    hits = torch.bincount(inverse, weights=correct.double(), minlength=keys.shape[0])
    return {
        tuple(int(v) for v in key): (float(h) / int(c), int(c))
        for key, h, c in zip(keys.tolist(), hits.tolist(), n.tolist(), strict=True)
    }


def seen_combinations(labels: Mapping[str, torch.Tensor], factors: Sequence[str]) -> set[tuple[int, ...]]:
    """The factor combinations that occur among fully labelled samples (e.g. of the training split).

    Args:
        labels: ``{task: LongTensor[N]}``, ``-1`` for unlabelled.
        factors: The factor tasks, in the order of the returned tuples.

    Returns:
        A set of ``(v_1, ..., v_F)`` tuples.
    """
    combos = _stack_factors(labels, factors, "labels")
    combos = combos[(combos != UNLABELLED).all(1)]
    if combos.shape[0] == 0:
        return set()
    return {tuple(int(v) for v in row) for row in torch.unique(combos, dim=0).tolist()}


@dataclass
class CombinationSummary:
    """Seen-versus-unseen summary of per-combination accuracy.

    Attributes:
        seen_accuracy: Accuracy pooled over samples of seen combinations (``nan`` if none).
        unseen_accuracy: Accuracy pooled over samples of unseen combinations (``nan`` if none).
        seen_n: Samples in seen combinations.
        unseen_n: Samples in unseen combinations.
        worst_combination: The combination with the lowest accuracy (ties: the first in sorted order),
            ``None`` if there is no combination.
        worst_accuracy: Its accuracy (``nan`` if none).
        unseen_combinations: The combinations counted as unseen, sorted.
    """

    seen_accuracy: float
    unseen_accuracy: float
    seen_n: int
    unseen_n: int
    worst_combination: tuple[int, ...] | None
    worst_accuracy: float
    unseen_combinations: list[tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples written as lists, ``nan`` as ``None``)."""
        return _nan_to_none(asdict(self))


def combination_summary(
    per_combination: Mapping[tuple[int, ...], tuple[float, int]], seen: Iterable[tuple[int, ...]]
) -> CombinationSummary:
    """Summarise :func:`combination_accuracy` given which combinations were seen in training.

    Args:
        per_combination: ``{combination: (accuracy, n)}`` as returned by :func:`combination_accuracy`.
        seen: Combinations present in training, e.g. :func:`seen_combinations` of the training labels
            (same factor order). Every other combination counts as unseen.

    Returns:
        A :class:`CombinationSummary`; seen/unseen accuracies are pooled over samples (weighted by ``n``).
    """
    seen_set = {tuple(int(v) for v in c) for c in seen}
    hits = {True: 0.0, False: 0.0}
    count = {True: 0, False: 0}
    for combo, (acc, n) in per_combination.items():
        s = tuple(combo) in seen_set
        hits[s] += acc * n
        count[s] += n
    worst = min(sorted(per_combination), key=lambda c: per_combination[c][0]) if per_combination else None
    return CombinationSummary(
        seen_accuracy=hits[True] / count[True] if count[True] else math.nan,
        unseen_accuracy=hits[False] / count[False] if count[False] else math.nan,
        seen_n=count[True],
        unseen_n=count[False],
        worst_combination=tuple(worst) if worst is not None else None,
        worst_accuracy=per_combination[worst][0] if worst is not None else math.nan,
        unseen_combinations=sorted(tuple(c) for c in per_combination if tuple(c) not in seen_set),
    )


# ----------------------------------------------------------------------------------------------------
# leakage
# ----------------------------------------------------------------------------------------------------
def majority_rate(target: torch.Tensor, num_classes: int) -> float:
    """Share of the most frequent class among labelled samples: the accuracy of always guessing it.

    Args:
        target: ``LongTensor[N]`` classes, ``-1`` for unlabelled (excluded).
        num_classes: Number of classes K.

    Returns:
        The majority rate in ``[1/K, 1]``, ``nan`` when no sample is labelled.
    """
    k = check_num_classes(num_classes)
    t = as_labels(target, "target")
    check_targets(t, k)
    t = t[t != UNLABELLED]
    if t.numel() == 0:
        return math.nan
    return float(torch.bincount(t, minlength=k).max()) / t.numel()


def normalised_leakage(acc: float, majority: float) -> float:
    """``(acc - majority) / (1 - majority)``: 0 at the majority rate, 1 at perfect accuracy.

    Below-majority accuracy gives a negative value (not clipped). When ``majority == 1`` the target is
    constant on the evaluation data, so nothing about it can be read or hidden: the leakage is undefined and
    this returns ``nan`` (rather than 0.0, which would wrongly certify "no leakage"). ``nan`` inputs give ``nan``.

    Args:
        acc: Probe (or adversary) accuracy.
        majority: Majority rate of the target on the same data (:func:`majority_rate`).

    Returns:
        The normalised leakage, or ``nan`` as above.
    """
    acc, majority = float(acc), float(majority)
    if math.isnan(acc) or math.isnan(majority) or majority >= 1.0:
        return math.nan
    return (acc - majority) / (1.0 - majority)


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (n - 1) of the finite values; ``None`` and ``nan`` are skipped.

    Returns:
        ``(mean, std, n)`` with ``n`` the number of values used; ``(nan, nan, 0)`` when none is left and a
        standard deviation of 0.0 for a single value.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def format_mean_std(values: Iterable[float | None], digits: int = 3) -> str:
    """``"mean ± std"`` of :func:`mean_std`; the value alone when there is one, ``"-"`` when none is finite."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
