"""Fresh probes: how much of task j can be read from the frozen features of task i.

A probe is a small classifier trained from scratch on features standardised by the mean and standard deviation of
its fit data; it carries that standardisation, so it applies to evaluation features unchanged. Both kinds train
until their own stopping rule is met, not for a hand-set budget, so their accuracy (the leakage number) does not
depend on a learning rate or an epoch count:

* ``linear``: multinomial logistic regression with an L2 penalty, solved full batch with L-BFGS (strong-Wolfe line
  search) until the gradient norm is below ``tol``. The L2 strength is chosen by stratified k-fold cross-validation
  on the fit data from a log-spaced grid, then the probe is refitted on all of it. When the features outnumber the
  rows (D > N) the problem is solved, exactly, in the row space of the standardised features (:class:`_Design`).
* ``mlp``: one hidden layer, Adam on minibatches, early stopping on a stratified held-out part of the fit data,
  the best weights restored.

Both are deterministic given ``seed`` (and the thread count) and need no gradient through the model that produced
the features. Solved in torch rather than with scikit-learn, to add no dependency.
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
from .._registry import check_arguments
from .._torch import eval_mode
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
_PROBE_DATA = ("features_train", "y_train", "num_classes", "kind")  # train_probe's own, not probe settings
# The settings of each kind and their defaults (see train_probe).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"l2": None, "cv_folds": 3, "tol": 1e-5, "max_iter": 1000},
    "mlp": {
        "hidden": 64,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "max_epochs": 500,
        "patience": 20,
        "val_fraction": 0.2,
    },
}
# Default L2 grid, in units of D / N (D non-constant features, N fit rows): scikit-learn's C = 1e-2 .. 1e4 on features
# scaled to unit mean squared norm. From nearly unpenalised to a probe that predicts the majority class when the
# features are pure noise, whatever D.
_L2_GRID = tuple(10.0**e for e in range(-4, 3))
_LBFGS_HISTORY = 30
_MIN_DELTA = 1e-4  # an MLP epoch counts as an improvement when it lowers the best validation loss by this (nats)
_ABSENT = -1e9  # bias of a class absent from the fit data of a linear probe: never predicted
# Below this many multiply-adds per step (rows x D x width), a CPU probe trains on one thread: worker threads cost
# more than they save on such small ops, and on a busy machine every multi-threaded op can stall for milliseconds
# waiting for a descheduled worker (observed: 15 s instead of 0.1 s for a small MLP probe).
_SMALL_WORK = 1 << 23
_EPS = 1e-6


class Probe(nn.Module):
    """A probe classifier with the standardisation of its fit features built in.

    Args:
        mean: ``(D,)`` fit-feature mean.
        std: ``(D,)`` fit-feature standard deviation (constant features get 1).
        net: The classifier on standardised features, ``(B, D) -> (B, K)`` logits.
        kind: ``"linear"`` or ``"mlp"``.
        info: How the fit went (JSON-able); see :func:`train_probe`.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, mean: torch.Tensor, std: torch.Tensor, net: nn.Module, kind: str, info: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.net = net
        self.kind = kind
        self.info: dict[str, Any] = dict(info or {})

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the fit statistics."""
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) raw features -> (B, K) logits."""
        return self.net(self.standardise(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """(B, D) raw features -> ``LongTensor[B]`` predicted classes (eval mode, no gradients)."""
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        with eval_mode(self):
            return torch.cat([self(chunk).argmax(-1) for chunk in x.split(batch_size)])


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

    ``torch.optim.Adam`` imports ``torch._dynamo`` on its first step, seconds of one-time cost; probes avoid it.
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


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _options(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a ``kind`` probe: the given values (``None``: default) checked, over the defaults."""
    if kind not in PROBE_KINDS:
        raise EvaluationError(f"kind: unknown probe kind {kind!r}. {did_you_mean(str(kind), PROBE_KINDS)}")
    own = _DEFAULTS[kind]
    for key, value in given.items():
        if value is not None and key not in own:
            other = next(k for k in PROBE_KINDS if key in _DEFAULTS[k])
            raise EvaluationError(f"{key}: a setting of the {other!r} probe; kind={kind!r} does not take it")
    opts = {key: default if given.get(key) is None else given[key] for key, default in own.items()}

    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise EvaluationError(f"{key}: expected {what}, got {opts[key]!r}")

    if kind == "linear":
        l2 = opts["l2"]
        if l2 is not None:
            grid = [l2] if _is_real(l2) else list(l2) if isinstance(l2, Sequence) and not isinstance(l2, str) else []
            require(bool(grid) and all(_is_real(v) and v > 0 for v in grid), "l2", "a positive number or a list")
            opts["l2"] = float(grid[0]) if _is_real(l2) else [float(v) for v in grid]
        require(_is_int(opts["cv_folds"]) and opts["cv_folds"] >= 2, "cv_folds", "an integer >= 2")
        require(_is_real(opts["tol"]) and opts["tol"] > 0, "tol", "a positive number")
        require(_is_int(opts["max_iter"]) and opts["max_iter"] >= 1, "max_iter", "a positive integer")
    else:
        for key in ("hidden", "batch_size", "max_epochs", "patience"):
            require(_is_int(opts[key]) and opts[key] >= 1, key, "a positive integer")
        require(_is_real(opts["lr"]) and opts["lr"] > 0, "lr", "a positive number")
        require(_is_real(opts["weight_decay"]) and opts["weight_decay"] >= 0, "weight_decay", "a number >= 0")
        require(_is_real(opts["val_fraction"]) and 0 <= opts["val_fraction"] < 1, "val_fraction", "a number in [0, 1)")
    return opts


def _check_seed(seed: Any) -> int:
    if not _is_int(seed):
        raise EvaluationError(f"seed: expected an integer, got {seed!r}")
    return seed


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(D,)`` mean and standard deviation of the rows of ``x`` (1 where constant), and the non-constant count."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    varying = std > _EPS
    return mean, torch.where(varying, std, torch.ones_like(std)), int(varying.sum())


def _stratified_parts(y: torch.Tensor, parts: int, gen: torch.Generator) -> torch.Tensor:
    """``(N,)`` part index of each row: every class shuffled and dealt round-robin, continuing where the last left."""
    part = torch.empty_like(y)
    offset = 0
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        part[rows] = (torch.arange(len(rows)) + offset) % parts
        offset += len(rows)
    return part


def _holdout(y: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """``(N,)`` bool: ``floor(fraction * n_c)`` random rows of each class c."""
    held = torch.zeros_like(y, dtype=torch.bool)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        held[rows[torch.randperm(len(rows), generator=gen)[: int(fraction * len(rows))]]] = True
    return held


# ----------------------------------------------------------------------------------------------------
# linear probe: L2-penalised multinomial logistic regression, solved to convergence
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Design:
    """The standardised fit features of a linear probe, in coordinates of their row space.

    With ``z = (x - mean) / std`` ``(N, D)``: when D <= N the coordinates are ``z`` itself. When D > N, the thin QR
    ``z^T = Q R`` (``Q`` ``(D, N)`` orthonormal) gives the coordinates ``z Q = R^T`` ``(N, N)``. The optimal weights
    of an L2-penalised logistic regression on ``z`` lie in its row space (the loss gradient is a combination of rows
    of ``z``, the penalty only shrinks), and ``w = Q a`` gives ``z w = R^T a`` and ``|w| = |a|``: solving for ``a``
    is the same problem, exactly, with evaluations in N^2 instead of N D. Any subset of the rows (a CV fold) has its
    row space inside this one, so one design serves the folds and the refit.
    """

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    coords: torch.Tensor  # (N, r) float64, r = min(N, D)
    qr: tuple[torch.Tensor, torch.Tensor] | None  # geqrf factors of z^T (Householder form) when D > N
    n_varying: int  # non-constant features

    @classmethod
    def of(cls, x: torch.Tensor) -> _Design:
        mean, std, varying = _moments(x)
        z = (x - mean).div_(std)  # (N, D)
        n, d = z.shape
        if d <= n:
            return cls(mean, std, z.double(), None, varying)
        h, tau = torch.geqrf(z.T)  # z^T (D, N) = Q R
        del z
        return cls(mean, std, h[:n].triu().T.double().contiguous(), (h, tau), varying)  # coords (N, N) = R^T

    def weights(self, a: torch.Tensor) -> torch.Tensor:
        """``(r, K)`` coefficients in the coordinates -> ``(D, K)`` weights on the standardised features."""
        if self.qr is None:
            return a.to(self.mean.dtype)
        h, tau = self.qr
        padded = h.new_zeros(h.shape[0], a.shape[1])  # (D, K) = [a; 0]
        padded[: a.shape[0]] = a.to(h.dtype)
        return torch.ormqr(h, tau, padded)  # (D, K) = Q a


class _Converged(Exception):
    """Raised by the L-BFGS closure at a point whose gradient norm is within the tolerance."""


def _solve(
    coords: torch.Tensor,
    y: torch.Tensor,
    k: int,
    l2: float,
    tol: float,
    max_iter: int,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Minimise ``mean CE(coords a + b, y) + l2 / 2 |a|^2`` over ``a`` ``(r, k)`` and ``b`` ``(k,)`` with L-BFGS.

    Stops at the first evaluated point whose gradient (over ``a`` and ``b``) has a 2-norm ``<= tol``, or after
    ``max_iter`` iterations (then ``converged`` is false). Starts from zero or from ``start``.
    """
    n, r = coords.shape
    onehot = F.one_hot(y, k).to(coords.dtype)  # (n, k)
    a = coords.new_zeros(r, k) if start is None else start[0].clone()
    b = coords.new_zeros(k) if start is None else start[1].clone()

    def evaluate() -> tuple[torch.Tensor, float]:
        logp = torch.addmm(b, coords, a).log_softmax(1)  # (n, k)
        g = (logp.exp() - onehot) / n  # (n, k): gradient of the loss wrt the logits
        a.grad = (g.T @ coords).T.contiguous() + l2 * a  # (r, k)
        b.grad = g.sum(0)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * a.square().sum()
        return loss, math.sqrt(float(a.grad.square().sum() + b.grad.square().sum()))

    def closure() -> torch.Tensor:
        loss, norm = evaluate()
        if norm <= tol:
            raise _Converged  # the parameters hold the point just evaluated
        return loss

    opt = torch.optim.LBFGS(
        [a, b],
        lr=1,
        max_iter=max_iter,
        max_eval=4 * max_iter,
        tolerance_grad=0.0,
        tolerance_change=1e-15,
        history_size=_LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
    )
    try:
        opt.step(closure)
    except _Converged:
        converged = True
    else:
        converged = False
    norm = evaluate()[1]
    a.grad = b.grad = None
    info = {"n_iter": int(opt.state[a]["n_iter"]), "converged": converged or norm <= tol, "grad_norm": norm}
    return a, b, info


def _cross_validate(
    design: _Design, y: torch.Tensor, grid: list[float], opts: Mapping[str, Any], seed: int
) -> tuple[int, list[float], bool]:
    """Index in ``grid`` of the L2 strength with the best pooled held-out accuracy over stratified folds.

    Ties go to the lower held-out log-loss, then to the stronger penalty. Each fold solves the grid from the
    strongest penalty down, each solve starting from the previous solution. Also returns the CV accuracy of each
    grid value and whether every solve converged.
    """
    parts = _stratified_parts(y, opts["cv_folds"], torch.Generator().manual_seed(seed))
    order = sorted(range(len(grid)), key=lambda i: -grid[i])
    correct, loss, converged = [0] * len(grid), [0.0] * len(grid), True
    dev = design.coords.device
    for f in range(opts["cv_folds"]):
        fit, held = parts != f, parts == f
        if not bool(held.any()) or not bool(fit.any()):
            continue
        present = y[fit].unique()
        yf, yh = torch.searchsorted(present, y[fit]).to(dev), y[held]
        known = torch.isin(yh, present)  # held-out rows of a class this fold saw (the others score alike for all)
        xf, xh = design.coords[fit.to(dev)], design.coords[held.to(dev)]
        start = None
        for i in order:
            if len(present) == 1:
                logits = torch.zeros(len(yh), 1, dtype=xh.dtype)
            else:
                a, b, info = _solve(xf, yf, len(present), grid[i], opts["tol"], opts["max_iter"], start)
                start, converged = (a, b), converged and info["converged"]
                logits = torch.addmm(b, xh, a).cpu()  # (n_held, k_present)
            correct[i] += int((present[logits.argmax(1)] == yh).sum())
            target = torch.searchsorted(present, yh[known])
            loss[i] -= float(logits.log_softmax(1)[known].gather(1, target[:, None]).sum())
    best = max(order, key=lambda i: (correct[i], -loss[i]))  # max keeps the first: the strongest on a tie
    return best, [c / len(y) for c in correct], converged


def _fit_linear(design: _Design, y: torch.Tensor, k: int, opts: Mapping[str, Any], seed: int) -> tuple[nn.Linear, dict]:
    """A converged L2 logistic regression on ``design`` for labels ``y`` (CPU, no -1), as a ``Linear(D, k)``."""
    n, r = design.coords.shape
    l2 = opts["l2"]
    grid = [v * max(design.n_varying, 1) / n for v in _L2_GRID] if l2 is None else l2 if isinstance(l2, list) else [l2]
    present = y.unique()  # classes of the fit data; the others are never predicted
    local = torch.searchsorted(present, y).to(design.coords.device)
    info: dict[str, Any] = {"n_fit": n, "l2_grid": grid, "cv_accuracy": None, "cv_converged": None}
    small = design.coords.device.type == "cpu" and n * r * len(present) < _SMALL_WORK
    with _single_thread(small):
        if len(present) == 1:
            a, b = design.coords.new_zeros(r, 1), design.coords.new_zeros(1)
            info.update(l2=None, n_iter=0, converged=True, grad_norm=0.0)
        else:
            best = 0
            if len(grid) > 1:
                best, info["cv_accuracy"], info["cv_converged"] = _cross_validate(design, y, grid, opts, seed)
            a, b, solution = _solve(design.coords, local, len(present), grid[best], opts["tol"], opts["max_iter"])
            info.update(l2=grid[best], **solution)
    w = design.weights(a)  # (D, k_present)
    net = nn.Linear(w.shape[0], k, device="meta", dtype=w.dtype).to_empty(device=w.device)  # no random init
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(_ABSENT)
        index = present.to(w.device)
        net.weight[index] = w.T
        net.bias[index] = b.to(w.dtype)
    return net, info


# ----------------------------------------------------------------------------------------------------
# MLP probe: Adam with early stopping
# ----------------------------------------------------------------------------------------------------
def _fit_mlp(x: torch.Tensor, y: torch.Tensor, k: int, opts: Mapping[str, Any], seed: int) -> tuple[Probe, dict]:
    """An MLP probe on ``x`` ``(N, D)`` for labels ``y`` (CPU, no -1), early-stopped on a held-out part."""
    mean, std, _ = _moments(x)
    z = (x - mean) / std  # (N, D) standardised once
    gen = torch.Generator().manual_seed(seed)
    held = _holdout(y, opts["val_fraction"], gen)
    dev = x.device
    zf, yf = z[(~held).to(dev)], y[~held].to(dev)
    zv, yv = z[held.to(dev)], y[held].to(dev)
    n, d = zf.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, opts["hidden"]), nn.ReLU(), nn.Linear(opts["hidden"], k))
    probe = Probe(mean, std, net, "mlp").to(device=dev, dtype=z.dtype)
    params: list[torch.Tensor] = list(net.parameters())
    opt = _Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    bs = min(opts["batch_size"], n)
    small = dev.type == "cpu" and bs * d * opts["hidden"] < _SMALL_WORK
    best_loss, best_epoch, best, waited, epoch = math.inf, 0, [p.detach().clone() for p in params], 0, 0
    net.train()
    with torch.enable_grad(), _single_thread(small):
        for epoch in range(1, opts["max_epochs"] + 1):
            order = torch.randperm(n, generator=gen).to(dev)
            zs, ys = zf[order], yf[order]  # one shuffled copy per epoch, then contiguous minibatch views
            for start in range(0, n, bs):
                loss = F.cross_entropy(net(zs[start : start + bs]), ys[start : start + bs])
                opt.step(torch.autograd.grad(loss, params))
            if not len(yv):
                continue
            with torch.no_grad():
                val = float(F.cross_entropy(net(zv), yv))
            if val < best_loss - _MIN_DELTA:
                best_loss, best_epoch, best, waited = val, epoch, [p.detach().clone() for p in params], 0
            else:
                waited += 1
                if waited >= opts["patience"]:
                    break
    if len(yv):
        with torch.no_grad():
            for p, value in zip(params, best, strict=True):
                p.copy_(value)
    stopped = waited >= opts["patience"]
    info = {
        "n_fit": n,
        "n_val": len(yv),
        "epochs": epoch,
        "best_epoch": best_epoch if len(yv) else epoch,
        "stopped_early": stopped,
        "val_loss": best_loss if len(yv) else None,
    }
    return probe, info


# ----------------------------------------------------------------------------------------------------
# public probe API
# ----------------------------------------------------------------------------------------------------
def _fit(
    x: torch.Tensor, y: torch.Tensor, k: int, kind: str, opts: Mapping[str, Any], seed: int, design: _Design | None
) -> Probe:
    """A probe on the labelled rows ``x`` ``(N, D)``, ``y`` (CPU, no -1); ``design`` reuses a linear one of ``x``."""
    if kind == "linear":
        design = _Design.of(x) if design is None else design
        net, info = _fit_linear(design, y, k, opts, seed)
        probe = Probe(design.mean, design.std, net, kind, info)
    else:
        probe, info = _fit_mlp(x, y, k, opts, seed)
        probe.info = info
    probe.eval()
    return probe


def train_probe(
    features_train: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    kind: str = "linear",
    *,
    seed: int = 0,
    l2: float | Sequence[float] | None = None,
    cv_folds: int | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    hidden: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    max_epochs: int | None = None,
    patience: int | None = None,
    val_fraction: float | None = None,
) -> Probe:
    """Train a fresh probe predicting ``y_train`` from frozen ``features_train``, to convergence.

    Rows labelled ``-1`` are skipped. Features are standardised with the mean and standard deviation of the labelled
    rows (stored in the returned :class:`Probe`). Settings left ``None`` take their defaults; a setting of the other
    kind is an error.

    ``linear``: multinomial logistic regression with the penalty ``l2 / 2 |W|^2`` on the weights of the
    standardised features (not the biases) added to the mean cross-entropy, solved full batch by L-BFGS with a
    strong-Wolfe line search until the 2-norm of the gradient is at most ``tol``. Unless ``l2`` is one number, it is
    chosen from a grid by stratified ``cv_folds``-fold cross-validation (best pooled held-out accuracy; ties: lower
    log-loss, then stronger penalty), then the probe is refitted on all rows. The default grid is
    ``10^-4 .. 10^2`` times ``D / N`` (D non-constant features, N rows). When D > N the problem is solved in the row
    space of the standardised features (exact; the weights are mapped back). Classes absent from the rows are never
    predicted. ``probe.info``: ``l2``, ``l2_grid``, ``cv_accuracy`` (per grid value), ``n_iter``, ``converged``,
    ``grad_norm``, ``cv_converged``, ``n_fit``.

    ``mlp``: Linear -> ReLU -> Linear with ``hidden`` units, Adam on shuffled minibatches. ``val_fraction`` of each
    class is held out; training stops when the validation cross-entropy has not improved for ``patience`` epochs
    (or after ``max_epochs``) and the best weights are restored. ``val_fraction=0`` trains for ``max_epochs``.
    ``probe.info``: ``epochs``, ``best_epoch``, ``stopped_early``, ``val_loss``, ``n_fit``, ``n_val``.

    Everything random (folds, held-out rows, initialisation, shuffling) is drawn from ``seed`` without touching the
    global random state. Small CPU problems run on one thread, the previous thread count restored afterwards.

    Args:
        features_train: ``(N, D)`` features.
        y_train: ``LongTensor[N]`` classes, ``-1`` for unlabelled.
        num_classes: Number of classes K of the probed task.
        kind: ``"linear"`` or ``"mlp"``.
        seed: Seed of everything random.
        l2: Linear: one L2 strength (no cross-validation) or the grid to choose from (default: as above).
        cv_folds: Linear: folds of the cross-validation (default 3).
        tol: Linear: gradient-norm tolerance (default 1e-5).
        max_iter: Linear: L-BFGS iterations allowed per solve (default 1000).
        hidden: MLP: hidden units (default 64).
        lr: MLP: Adam learning rate (default 1e-3).
        weight_decay: MLP: Adam (L2) weight decay (default 1e-4).
        batch_size: MLP: minibatch size (default 64).
        max_epochs: MLP: epoch budget (default 500).
        patience: MLP: epochs without improvement before stopping (default 20).
        val_fraction: MLP: share of each class held out for early stopping (default 0.2).

    Returns:
        The trained :class:`Probe`, in eval mode.

    Raises:
        EvaluationError: Bad shapes or labels, an unknown ``kind``, a bad setting, or no labelled row.
    """
    given = {
        "l2": l2,
        "cv_folds": cv_folds,
        "tol": tol,
        "max_iter": max_iter,
        "hidden": hidden,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "max_epochs": max_epochs,
        "patience": patience,
        "val_fraction": val_fraction,
    }
    opts = _options(kind, given)
    seed = _check_seed(seed)
    k = check_num_classes(num_classes)
    x = _check_features(features_train, "features_train")
    y = as_labels(y_train, "y_train")
    _check_length(x, y, "features_train", "y_train")
    check_targets(y, k, "y_train")
    mask = y != UNLABELLED
    if not bool(mask.any()):
        raise EvaluationError("y_train has no labelled row (all -1): a probe cannot be trained")
    return _fit(x[mask.to(x.device)], y[mask], k, kind, opts, seed, None)


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
    with eval_mode(probe), torch.no_grad():
        pred = torch.cat([probe(chunk).argmax(-1).cpu() for chunk in x.split(8192)])
    return float((pred == labels).double().mean())


# ----------------------------------------------------------------------------------------------------
# leakage matrices
# ----------------------------------------------------------------------------------------------------
def _key(i: str, j: str) -> str:
    return f"{i}->{j}"


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


@dataclass
class LeakageMatrix:
    """Fresh-probe accuracies for every (features of task i, predicting task j), diagonal included.

    Attributes:
        tasks: Task names, the order of rows (features) and columns (predicted task).
        accuracy: ``{(i, j): accuracy}`` on the score data (``nan`` where nothing could be measured). Conditional:
            the mean over the classes c of task i of the accuracy within c, weighted by the score rows of c.
        majority: ``{j: majority rate}`` of task j on the score labels.
        normalised: ``{(i, j): (acc - base) / (1 - base)}``, ``nan`` when ``base`` is 1 (nothing to read). ``base``
            is ``majority[j]``; conditional: the within-class majority rate of j, averaged with the same weights
            as the accuracy (``info["cells"]["i->j"]["majority"]``).
        kind: The probe kind.
        info: JSON-able: ``fit_split``/``score_split`` names, ``n_fit``/``n_score`` rows, the probe settings
            (``probe``), and per cell (``cells``, keyed ``"i->j"``) the rows used and how each probe fit (linear:
            ``l2``, ``converged``, ``n_iter``; MLP: ``epochs``, ``best_epoch``, ``stopped_early``), or ``reason`` why
            a cell is ``nan``; conditional cells list these per class (``classes``) and the classes ``skipped``.
        conditional: Whether the probes read task j within each class of task i.
    """

    tasks: list[str]
    accuracy: dict[tuple[str, str], float]
    majority: dict[str, float]
    normalised: dict[tuple[str, str], float]
    kind: str = "linear"
    info: dict[str, Any] = field(default_factory=dict)
    conditional: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: pairs keyed ``"i->j"``, ``nan`` written as ``None``."""
        return {
            "kind": self.kind,
            "conditional": self.conditional,
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


_CELL_KEYS = {"linear": ("l2", "converged", "n_iter", "cv_converged"), "mlp": ("epochs", "best_epoch", "stopped_early")}


@dataclass
class _RowProbes:
    """Fits and scores the probes that read other tasks from the features of one task (a row of the matrix).

    Linear probes fitted on the same rows share one :class:`_Design` (one QR when D > N).
    """

    x_fit: torch.Tensor  # (N, D)
    x_score: torch.Tensor  # (M, D)
    y_fit: Mapping[str, torch.Tensor]
    y_score: Mapping[str, torch.Tensor]
    num_classes: Mapping[str, int]
    kind: str
    opts: Mapping[str, Any]
    seed: int
    designs: dict[bytes, _Design] = field(default_factory=dict)

    def __call__(self, fit: torch.Tensor, held: torch.Tensor, j: str) -> tuple[float, dict[str, Any]]:
        """Accuracy of a probe of task j fitted on the fit rows ``fit`` and scored on the score rows ``held``."""
        x = self.x_fit[fit.to(self.x_fit.device)]
        design = None
        if self.kind == "linear":
            key = fit.numpy().tobytes()
            design = self.designs[key] = self.designs[key] if key in self.designs else _Design.of(x)
        probe = _fit(x, self.y_fit[j][fit], self.num_classes[j], self.kind, self.opts, self.seed, design)
        summary = {"n_fit": int(fit.sum()), "n_score": int(held.sum())}
        summary.update({k: probe.info[k] for k in _CELL_KEYS[self.kind]})
        return probe_accuracy(probe, self.x_score[held.to(self.x_score.device)], self.y_score[j][held]), summary


def leakage_matrix(
    train_feats: Mapping[str, torch.Tensor],
    train_labels: Mapping[str, torch.Tensor],
    eval_feats: Mapping[str, torch.Tensor],
    eval_labels: Mapping[str, torch.Tensor],
    num_classes: Mapping[str, int],
    kind: str = "linear",
    *,
    tasks: Sequence[str] | None = None,
    conditional: bool = False,
    fit_split: str | None = None,
    score_split: str | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    **probe_kwargs: Any,
) -> LeakageMatrix:
    """Fit a fresh probe for every ordered pair (i, j), i == j included, and score it on other data.

    The probe of (i, j) is fitted on ``train_feats[i]`` to predict ``train_labels[j]`` and scored on
    ``eval_feats[i]`` against ``eval_labels[j]``, over the rows labelled for j. Every probe uses the same ``seed``
    (so each cell is reproducible on its own). A cell whose task j has no labelled fit or score row is ``nan``.

    ``conditional=True`` measures what task i's features say about task j beyond task i's own label: for each class
    c of task i, a probe is fitted on the fit rows of class c and scored on the score rows of class c (rows labelled
    for both tasks). A class where task j takes a single value in its fit rows or in its score rows is skipped
    (nothing to measure). The accuracy is the mean over classes weighted by their score rows, normalised against
    the within-class majority rate of j averaged alike: 0 when task i's features say nothing about j that task
    i's label does not, 1 when they give j exactly. A cell with no measurable class, and the diagonal, are ``nan``;
    ``info["cells"]`` says why.

    Args:
        train_feats: ``{task: (N, D_task)}`` features the probes are fitted on.
        train_labels: ``{task: LongTensor[N]}``, ``-1`` for unlabelled.
        eval_feats: ``{task: (M, D_task)}`` features the probes are scored on.
        eval_labels: ``{task: LongTensor[M]}``, ``-1`` for unlabelled.
        num_classes: ``{task: K}`` for every task.
        kind: ``"linear"`` or ``"mlp"``.
        tasks: Task order (default: the order of ``train_feats``).
        conditional: Probe task j within each class of task i (see above).
        fit_split: Name of the split of ``train_*`` (recorded in ``info``).
        score_split: Name of the split of ``eval_*`` (recorded in ``info``); must differ from ``fit_split``.
        pairs: Only these ordered pairs ``(i, j)`` are probed (each cell as the full matrix has it: every probe
            uses the same seed); the others are ``nan``. Default every pair.
        **probe_kwargs: Passed to :func:`train_probe` (``seed`` and the settings of ``kind``).

    Returns:
        A :class:`LeakageMatrix`.

    Raises:
        EvaluationError: A task is missing from one of the mappings, shapes disagree, bad probe settings, or the
            same split named for fitting and scoring.
    """
    check_arguments(train_probe, probe_kwargs, "probe", skip=_PROBE_DATA, error=EvaluationError)
    opts = _options(kind, {k: v for k, v in probe_kwargs.items() if k != "seed"})
    seed = _check_seed(probe_kwargs.get("seed", 0))
    for what, split in (("fit_split", fit_split), ("score_split", score_split)):
        if split is not None and not isinstance(split, str):
            raise EvaluationError(f"{what}: expected a split name (str) or None, got {split!r}")
    if fit_split is not None and fit_split == score_split:
        raise EvaluationError(
            f"fit_split and score_split are both {fit_split!r}: probes must be scored on other data than they are "
            "fitted on; pass the names of two different splits"
        )
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
    wanted = _check_pairs(pairs, names)

    majority = {j: majority_rate(yev[j], ks[j]) for j in names}
    acc: dict[tuple[str, str], float] = {}
    norm: dict[tuple[str, str], float] = {}
    cells: dict[str, dict[str, Any]] = {}
    for i in names:
        score = _RowProbes(xtr[i], xev[i], ytr, yev, ks, kind, opts, seed)
        for j in names:
            fit, held = ytr[j] != UNLABELLED, yev[j] != UNLABELLED
            cell: dict[str, Any]
            if (i, j) not in wanted:
                a = base = math.nan
                cell = {"reason": "not requested (pairs)"}
            elif not conditional:
                base = majority[j]
                if not bool(fit.any()) or not bool(held.any()):
                    a, cell = math.nan, {"reason": f"task {j!r} has no labelled {'fit' if held.any() else 'score'} row"}
                else:
                    a, cell = score(fit, held, j)
            elif i == j:
                a = base = math.nan
                cell = {"reason": "diagonal: a task is constant within its own classes"}
            else:
                a, base, cell = _conditional(i, j, fit, held, score)
            acc[(i, j)], norm[(i, j)], cells[_key(i, j)] = a, normalised_leakage(a, base), cell
    info: dict[str, Any] = {
        "fit_split": fit_split,
        "score_split": score_split,
        "n_fit": int(ytr[names[0]].numel()),
        "n_score": int(yev[names[0]].numel()),
        "probe": {"seed": seed, **opts},
        "cells": cells,
    }
    return LeakageMatrix(names, acc, majority, norm, kind, info, conditional)


def _check_pairs(pairs: Any, names: list[str]) -> set[tuple[str, str]]:
    """``pairs`` as a set of ordered task pairs (every pair when ``None``); one-line errors for anything else."""
    if pairs is None:
        return {(i, j) for i in names for j in names}
    out = set()
    for p in pairs if isinstance(pairs, (list, tuple)) else [pairs]:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(t in names for t in p)):
            raise EvaluationError(f"pairs: {p!r} is not a pair (i, j) of tasks; tasks: {names}")
        out.add((p[0], p[1]))
    return out


def _conditional(i: str, j: str, fit: torch.Tensor, held: torch.Tensor, score: _RowProbes) -> tuple[float, float, dict]:
    """Class-weighted accuracy and majority rate of task j within the classes of task i, and the cell's info.

    ``fit``/``held``: the fit/score rows labelled for j; ``score`` fits and scores the probes of task i's features.
    """
    ytr, yev = score.y_fit, score.y_score
    classes: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for c in range(score.num_classes[i]):
        fit_c, held_c = fit & (ytr[i] == c), held & (yev[i] == c)  # rows of class c labelled for both tasks
        if not bool(fit_c.any()) and not bool(held_c.any()):
            continue
        values = {"fit": len(ytr[j][fit_c].unique()), "score": len(yev[j][held_c].unique())}
        where = next((w for w, v in values.items() if v < 2), None)
        if where is not None:
            skipped[str(c)] = f"task {j!r} takes {values[where]} value(s) in the {where} rows of class {c}"
            continue
        a, summary = score(fit_c, held_c, j)
        classes[str(c)] = {"accuracy": a, "majority": majority_rate(yev[j][held_c], score.num_classes[j]), **summary}
    cell: dict[str, Any] = {"classes": classes, "skipped": skipped}
    if not classes:
        cell["reason"] = f"no class of {i!r} in which task {j!r} varies in both the fit and the score rows"
        return math.nan, math.nan, cell
    total = sum(c["n_score"] for c in classes.values())
    a = sum(c["n_score"] * c["accuracy"] for c in classes.values()) / total
    base = sum(c["n_score"] * c["majority"] for c in classes.values()) / total
    cell.update(accuracy=a, majority=base, n_score=total)
    return a, base, cell
