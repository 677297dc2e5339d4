"""The computational core of evaluation: metrics, fresh probes and combination splits.

* Metrics on label tensors (``-1`` = unlabelled, always excluded): :func:`confusion_matrix`,
  :func:`accuracy`, :func:`balanced_accuracy`, :func:`per_class_accuracy`, :func:`task_metrics`,
  per-factor-combination accuracy (:func:`combination_accuracy`, :func:`combination_summary`), and
  :func:`majority_rate` / :func:`normalised_leakage`.
* Fresh probes reading task j from frozen features of task i, trained to convergence (linear: L2 logistic
  regression by L-BFGS, its L2 strength cross-validated; MLP: early stopping): :func:`train_probe`,
  :func:`probe_accuracy`, :func:`leakage_matrix` (every pair, diagonal included; ``conditional=True`` reads j
  within each class of i) and :func:`collect_features` to run a model over a dataset.
* :func:`combination_split` holds factor combinations out of training; :func:`check_no_leak` verifies it.
"""

from __future__ import annotations

from ._features import LAYERS, collect_features
from ._metric import Accuracy, Metric
from ._metrics import (
    UNLABELLED,
    CombinationSummary,
    EvaluationError,
    TaskMetrics,
    accuracy,
    balanced_accuracy,
    combination_accuracy,
    combination_summary,
    confusion_matrix,
    format_mean_std,
    majority_rate,
    mean_std,
    normalised_leakage,
    per_class_accuracy,
    seen_combinations,
    task_metrics,
)
from ._probes import (
    PROBE_KINDS,
    LeakageMatrix,
    Probe,
    leakage_matrix,
    probe_accuracy,
    train_probe,
)
from ._splits import SPLIT_NAMES, SplitError, SplitWarning, check_no_leak, combination_split

__all__ = [
    # errors
    "EvaluationError",
    "SplitError",
    "SplitWarning",
    # metrics
    "Metric",
    "Accuracy",
    "UNLABELLED",
    "confusion_matrix",
    "accuracy",
    "balanced_accuracy",
    "per_class_accuracy",
    "TaskMetrics",
    "task_metrics",
    "combination_accuracy",
    "seen_combinations",
    "CombinationSummary",
    "combination_summary",
    "majority_rate",
    "normalised_leakage",
    "mean_std",
    "format_mean_std",
    # probes
    "PROBE_KINDS",
    "LAYERS",
    "Probe",
    "train_probe",
    "probe_accuracy",
    "LeakageMatrix",
    "leakage_matrix",
    "collect_features",
    # splits
    "SPLIT_NAMES",
    "combination_split",
    "check_no_leak",
]
