"""Fresh probes: how much of task j can be read from the frozen features of task i.

A probe is a small classifier (linear, or a one-hidden-layer MLP) trained from scratch with Adam on
features standardised by the training mean and standard deviation; it carries that standardisation so it
applies to evaluation features unchanged. Training is deterministic given ``seed`` (and the thread count)
and needs no gradient through the model that produced the features.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import did_you_mean
from ._metrics import (
    UNLABELLED,
    EvaluationError,
    as_labels,
    check_num_classes,
    check_targets,
    majority_rate,
    normalised_leakage,
)

__all__ = [
    "PROBE_KINDS",
    "Probe",
    "LeakageMatrix",
    "train_probe",
    "probe_accuracy",
    "leakage_matrix",
]

PROBE_KINDS = ("linear", "mlp")
# Per-kind defaults. With minibatches of 256, a probe on N=2000, D=4032 trains in about 0.4 s (linear) and
# 0.8 s (MLP) on one busy CPU core. Default epochs: enough for about _DEFAULT_STEPS Adam steps, at least
# _MIN_EPOCHS, so small datasets are not under-trained.
_DEFAULTS: dict[str, dict[str, float]] = {
    "linear": {"lr": 1e-2, "weight_decay": 1e-4},
    "mlp": {"lr": 3e-3, "weight_decay": 1e-4},
}
_DEFAULT_STEPS = 150
_MIN_EPOCHS = 15
# Below this many multiply-adds per minibatch (batch x D x width), a CPU probe trains on one thread: worker
# threads cost more than they save on such small ops, and on a busy machine every multi-threaded op can stall
# for milliseconds waiting for a descheduled worker (observed: 15 s instead of 0.1 s for a small MLP probe).
_SMALL_WORK = 1 << 23
_EPS = 1e-6


class Probe(nn.Module):
    """A probe classifier with the standardisation of its training features built in.

    Args:
        mean: ``(D,)`` training-feature mean.
        std: ``(D,)`` training-feature standard deviation (constant features get 1).
        net: The classifier on standardised features, ``(B, D) -> (B, K)`` logits.
        kind: ``"linear"`` or ``"mlp"``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.net = net
        self.kind = kind

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the training statistics."""
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) raw features -> (B, K) logits."""
        return self.net(self.standardise(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """(B, D) raw features -> ``LongTensor[B]`` predicted classes (eval mode, no gradients)."""
        was = self.training
        self.eval()
        try:
            if len(x) == 0:
                return torch.zeros(0, dtype=torch.long, device=x.device)
            return torch.cat([self(chunk).argmax(-1) for chunk in x.split(batch_size)])
        finally:
            self.train(was)


@contextlib.contextmanager
def _single_thread(enabled: bool) -> Iterator[None]:
    """Run the body with one intra-op thread when ``enabled``, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if not enabled or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Adam:
    """Adam with L2 weight decay (as ``torch.optim.Adam``), in a few tensor ops.

    ``torch.optim`` imports ``torch._dynamo`` on its first step, seconds of one-time cost; probes avoid it.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
        self.params = params
        self.lr, self.weight_decay = lr, weight_decay
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One update of every parameter from its gradient (a handful of fused multi-tensor ops)."""
        self.t += 1
        bc1, bc2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        g = list(grads)
        if self.weight_decay:
            g = list(torch._foreach_add(g, self.params, alpha=self.weight_decay))
        torch._foreach_lerp_(self.m, g, 1 - self.beta1)
        torch._foreach_mul_(self.v, self.beta2)
        torch._foreach_addcmul_(self.v, g, g, value=1 - self.beta2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denom, self.eps * math.sqrt(bc2))
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-self.lr * math.sqrt(bc2) / bc1)


def _check_features(x: Any, name: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise EvaluationError(f"{name}: expected a float tensor (N, D), got {got}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise EvaluationError(f"{name}: expected a real-valued tensor (N, D), got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise EvaluationError(f"{name}: has D={x.shape[1]} features but the probe was trained on D={dim}")
    x = x.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _check_length(x: torch.Tensor, y: torch.Tensor, xname: str, yname: str) -> None:
    if x.shape[0] != y.numel():
        raise EvaluationError(f"{xname} has {x.shape[0]} rows but {yname} has {y.numel()} labels; they must match")


def train_probe(
    features_train: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    kind: str = "linear",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    hidden: int = 64,
    seed: int = 0,
    batch_size: int | None = 256,
) -> Probe:
    """Train a fresh probe predicting ``y_train`` from frozen ``features_train``.

    Rows labelled ``-1`` are skipped. Features are standardised with the mean and standard deviation of the
    labelled training rows (stored in the returned :class:`Probe`). Training is Adam on the cross-entropy,
    in minibatches reshuffled each epoch (full batch when ``batch_size`` is ``None`` or at least N), on the
    device of ``features_train``. The weight initialisation and the shuffling are drawn from ``seed`` only,
    without touching the global random state. Small CPU problems (minibatch x D x width below about 8M
    multiply-adds) train on one thread, the previous thread count restored afterwards: faster, and immune to
    the stalls multi-threaded tiny ops suffer on a busy machine.

    Args:
        features_train: ``(N, D)`` features.
        y_train: ``LongTensor[N]`` classes, ``-1`` for unlabelled.
        num_classes: Number of classes K of the probed task.
        kind: ``"linear"`` (one Linear layer) or ``"mlp"`` (Linear -> ReLU -> Linear with ``hidden`` units).
        epochs: Passes over the data (default: enough for about 150 Adam steps, at least 15 epochs).
        lr: Adam learning rate (default 1e-2 linear, 3e-3 MLP).
        weight_decay: Adam (L2) weight decay (default 1e-4).
        hidden: Hidden units of the MLP probe.
        seed: Seed of the initialisation and the shuffling.
        batch_size: Minibatch size; ``None`` for full batch.

    Returns:
        The trained :class:`Probe`, in eval mode.

    Raises:
        EvaluationError: Bad shapes or labels, an unknown ``kind``, or no labelled row.
    """
    if kind not in PROBE_KINDS:
        raise EvaluationError(f"kind: unknown probe kind {kind!r}. {did_you_mean(str(kind), PROBE_KINDS)}")
    k = check_num_classes(num_classes)
    x = _check_features(features_train, "features_train")
    y = as_labels(y_train, "y_train")
    _check_length(x, y, "features_train", "y_train")
    check_targets(y, k, "y_train")
    defaults = _DEFAULTS[kind]
    rate = float(defaults["lr"] if lr is None else lr)
    decay = float(defaults["weight_decay"] if weight_decay is None else weight_decay)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise EvaluationError(f"epochs: expected a non-negative integer or None (default), got {epochs!r}")
    if not rate > 0 or not decay >= 0:
        raise EvaluationError(f"lr > 0 and weight_decay >= 0 are required; got lr={rate}, weight_decay={decay}")
    if kind == "mlp" and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise EvaluationError(f"hidden: expected a positive integer, got {hidden!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise EvaluationError(f"batch_size: expected a positive integer or None (full batch), got {batch_size!r}")

    mask = (y != UNLABELLED).to(x.device)
    x, y = x[mask], y.to(x.device)[mask]
    n, d = x.shape
    if n == 0:
        raise EvaluationError("y_train has no labelled row (all -1): a probe cannot be trained")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > _EPS, std, torch.ones_like(std))
    z = (x - mean) / std  # (N, D) standardised once

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net: nn.Module
        if kind == "linear":
            net = nn.Linear(d, k)
        else:
            net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))
    probe = Probe(mean, std, net, kind).to(device=x.device, dtype=z.dtype)
    gen = torch.Generator().manual_seed(seed)
    opt = _Adam(list(net.parameters()), lr=rate, weight_decay=decay)
    bs = n if batch_size is None else min(batch_size, n)
    n_epochs = max(_MIN_EPOCHS, math.ceil(_DEFAULT_STEPS / math.ceil(n / bs))) if epochs is None else epochs
    width = hidden if kind == "mlp" else k
    small = x.device.type == "cpu" and bs * d * width < _SMALL_WORK
    net.train()
    with torch.enable_grad(), _single_thread(small):
        for _ in range(n_epochs):
            zs, ys = z, y
            if bs < n:  # one shuffled copy per epoch, then contiguous minibatch views
                order = torch.randperm(n, generator=gen).to(x.device)
                zs, ys = z[order], y[order]
            for start in range(0, n, bs):
                loss = F.cross_entropy(net(zs[start : start + bs]), ys[start : start + bs])
                grads = torch.autograd.grad(loss, opt.params)
                opt.step(grads)
    probe.eval()
    return probe


def probe_accuracy(probe: nn.Module, features: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``probe`` on raw ``features`` over the rows whose label is not ``-1``.

    Args:
        probe: A probe from :func:`train_probe` (any module mapping ``(N, D)`` to logits works).
        features: ``(N, D)`` raw features (the probe standardises them).
        y: ``LongTensor[N]`` classes, ``-1`` for unlabelled.

    Returns:
        The accuracy, ``nan`` when no row is labelled.
    """
    x = _check_features(features, "features")
    labels = as_labels(y, "y")
    _check_length(x, labels, "features", "y")
    mask = labels != UNLABELLED
    if not bool(mask.any()):
        return math.nan
    x, labels = x[mask.to(x.device)], labels[mask]
    param = next(iter(probe.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    was = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            pred = torch.cat([probe(chunk).argmax(-1).cpu() for chunk in x.split(8192)])
    finally:
        probe.train(was)
    return float((pred == labels).double().mean())


def _key(i: str, j: str) -> str:
    return f"{i}->{j}"


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


@dataclass
class LeakageMatrix:
    """Fresh-probe accuracies for every (features of task i, predicting task j), diagonal included.

    Attributes:
        tasks: Task names, the order of rows (features) and columns (predicted task).
        accuracy: ``{(i, j): accuracy}`` on the evaluation data (``nan`` where nothing could be measured).
        majority: ``{j: majority rate}`` of task j on the evaluation labels.
        normalised: ``{(i, j): (acc - majority_j) / (1 - majority_j)}`` (``nan`` when task j is constant).
        kind: The probe kind.
    """

    tasks: list[str]
    accuracy: dict[tuple[str, str], float]
    majority: dict[str, float]
    normalised: dict[tuple[str, str], float]
    kind: str = "linear"
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: pairs keyed ``"i->j"``, ``nan`` written as ``None``."""
        return {
            "kind": self.kind,
            "tasks": list(self.tasks),
            "accuracy": {_key(i, j): _json_float(v) for (i, j), v in self.accuracy.items()},
            "majority": {j: _json_float(v) for j, v in self.majority.items()},
            "normalised": {_key(i, j): _json_float(v) for (i, j), v in self.normalised.items()},
            "info": dict(self.info),
        }

    def as_tensor(self, normalised: bool = False) -> torch.Tensor:
        """``(T, T)`` float tensor, row i = features of ``tasks[i]``, column j = predicting ``tasks[j]``."""
        source = self.normalised if normalised else self.accuracy
        return torch.tensor([[source[(i, j)] for j in self.tasks] for i in self.tasks], dtype=torch.float64)


def leakage_matrix(
    train_feats: Mapping[str, torch.Tensor],
    train_labels: Mapping[str, torch.Tensor],
    eval_feats: Mapping[str, torch.Tensor],
    eval_labels: Mapping[str, torch.Tensor],
    num_classes: Mapping[str, int],
    kind: str = "linear",
    *,
    tasks: Sequence[str] | None = None,
    **probe_kwargs: Any,
) -> LeakageMatrix:
    """Train a fresh probe for every ordered pair (i, j), i == j included, and score it on evaluation data.

    The probe of (i, j) is trained on ``train_feats[i]`` to predict ``train_labels[j]`` and scored on
    ``eval_feats[i]`` against ``eval_labels[j]``. Every probe uses the same ``seed`` (so each cell is
    reproducible on its own). A cell whose task j has no labelled training or evaluation row is ``nan``.

    Args:
        train_feats: ``{task: (N, D_task)}`` features the probes are trained on.
        train_labels: ``{task: LongTensor[N]}``, ``-1`` for unlabelled.
        eval_feats: ``{task: (M, D_task)}`` features the probes are scored on.
        eval_labels: ``{task: LongTensor[M]}``, ``-1`` for unlabelled.
        num_classes: ``{task: K}`` for every task.
        kind: ``"linear"`` or ``"mlp"``.
        tasks: Task order (default: the order of ``train_feats``).
        **probe_kwargs: Passed to :func:`train_probe` (``epochs``, ``lr``, ``weight_decay``, ``hidden``,
            ``seed``, ``batch_size``).

    Returns:
        A :class:`LeakageMatrix`.

    Raises:
        EvaluationError: A task is missing from one of the mappings, shapes disagree, or bad probe settings.
    """
    if kind not in PROBE_KINDS:
        raise EvaluationError(f"kind: unknown probe kind {kind!r}. {did_you_mean(str(kind), PROBE_KINDS)}")
    allowed = {"epochs", "lr", "weight_decay", "hidden", "seed", "batch_size"}
    for key in probe_kwargs:
        if key not in allowed:
            raise EvaluationError(f"unknown probe argument {key!r}. {did_you_mean(key, allowed)}")
    names = list(train_feats) if tasks is None else list(tasks)
    if not names:
        raise EvaluationError("leakage_matrix needs at least one task")
    for what, mapping in (
        ("train_feats", train_feats),
        ("train_labels", train_labels),
        ("eval_feats", eval_feats),
        ("eval_labels", eval_labels),
        ("num_classes", num_classes),
    ):
        for t in names:
            if t not in mapping:
                raise EvaluationError(f"{what} has no entry for task {t!r}; it has {sorted(mapping)}")
    ytr = {t: as_labels(train_labels[t], f"train_labels[{t!r}]") for t in names}
    yev = {t: as_labels(eval_labels[t], f"eval_labels[{t!r}]") for t in names}
    ks = {t: check_num_classes(num_classes[t], f"num_classes[{t!r}]") for t in names}
    for t in names:
        check_targets(ytr[t], ks[t], f"train_labels[{t!r}]")
        check_targets(yev[t], ks[t], f"eval_labels[{t!r}]")
    xtr = {t: _check_features(train_feats[t], f"train_feats[{t!r}]") for t in names}
    xev = {t: _check_features(eval_feats[t], f"eval_feats[{t!r}]", xtr[t].shape[1]) for t in names}
    for t in names:
        for j in names:
            _check_length(xtr[t], ytr[j], f"train_feats[{t!r}]", f"train_labels[{j!r}]")
            _check_length(xev[t], yev[j], f"eval_feats[{t!r}]", f"eval_labels[{j!r}]")

    majority = {j: majority_rate(yev[j], ks[j]) for j in names}
    acc: dict[tuple[str, str], float] = {}
    for i in names:
        for j in names:
            if not bool((ytr[j] != UNLABELLED).any()) or math.isnan(majority[j]):
                acc[(i, j)] = math.nan
                continue
            probe = train_probe(xtr[i], ytr[j], ks[j], kind, **probe_kwargs)
            acc[(i, j)] = probe_accuracy(probe, xev[i], yev[j])
    norm = {(i, j): normalised_leakage(a, majority[j]) for (i, j), a in acc.items()}
    info: dict[str, Any] = {"n_train": int(ytr[names[0]].numel()), "n_eval": int(yev[names[0]].numel())}
    info.update({k: v for k, v in probe_kwargs.items() if isinstance(v, (int, float, str)) or v is None})
    return LeakageMatrix(names, acc, majority, norm, kind, info)
