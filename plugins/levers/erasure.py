"""Erasure layers: closed-form linear erasure of task j from task i's features, fitted while or after the model trains.

For each erased pair (i, j) the layer keeps running means of task i's features z_i (B, D) per *cell* (class c of
task i, class d of task j) and, from them, an orthonormal basis U (D, r) of the directions along which task j's
class means differ. Every sample's features then become::

    z' = z - U (R^T (z - mu))        (B, D) -> (B, D), mu (D,) the running mean of z_i, R = U (orthogonal modes)

a fixed linear map for the gradient (U, R and mu are buffers, never differentiated). In training mode, in the
main step (which passes the labels), the batch first updates the statistics (detached) and the basis is refitted;
elsewhere (adversary steps on fresh batches, validation, inference) the frozen statistics are used. Statistics and
basis are buffers of the module the lever builds, so they are checkpointed and loaded with the model (``md.load``),
move with it between devices, and are the same on every rank of a distributed run (batch sums are all-reduced).

Modes and exactly what they guarantee
-------------------------------------
All guarantees are about the distribution the running statistics describe (recent training batches, through the
encoder as it was when they were seen; with ``momentum=None`` every batch since the start), and about *linear*
read-out. "Usable" cells are those with at least ``min_count`` samples.

``conditional`` (default): U spans, over every class c of task i, the differences between the usable cell means
(c, d) of task j's classes d. One projection for all samples (no label at inference). Guaranteed: within every class
c of task i, task j's usable class-conditional means of z' are equal, so Cov(z', y_j | y_i = c) = 0 and, by the
LEACE equivalence (linear guardedness <=> equal class-conditional means, for every convex loss), no linear predictor
of y_j does better than a constant on the samples of class c: zero conditional linear leakage, what
``md.evaluate(...).conditional_leakage`` measures. Not guaranteed: anything about cells never (or too rarely) seen,
such as circles on black when training shows circles only on white; marginal leakage (where i and j are correlated,
task i's own information still predicts j: intended, that is "what task i itself implies"); non-linear read-out (the
cells' covariances still differ: an MLP probe may read j, as with INLP); held-out data except up to the estimation
error of the means (which grows with D / samples per cell); and since one projection serves every class, directions
found in one class of i are removed for all samples.

``marginal``: U spans the differences of task j's usable class means over all samples, i.e. the column space of
Cov(z_i, y_j). Guaranteed: Cov(z', y_j) = 0, LEACE's marginal linear guardedness. When i and j are correlated this
also removes task i's own information (a perfect shape feature predicts the background when circles are only on
white), which is why ``conditional`` is the default.

``both``: the conditional and the marginal directions together, removed by one orthogonal projection off their
joint span. Guaranteed: both of the above, zero conditional *and* marginal linear leakage (removing a larger span
keeps every mean difference of either kind at zero). It costs what both cost: task i's own information where it
predicts j (as ``marginal``), and the directions found in one class of i for every sample (as ``conditional``). Why
it exists: after training, with the classifier retrained, ``marginal`` generalised to held-out combinations better
than ``conditional`` on three workloads but left conditional leakage (``benchmarks/results/erase_retrain/``);
``both`` keeps the conditional guarantee while erasing the marginal directions too.

``keep_own``: the conditional directions, removed by an *oblique* projection (SPLINCE-like) that maps every offset
m_c - mu of a usable class mean of task i to itself: z' = z - U S^-1 Y^T (z - mu), where U (D, r) are the principal
directions of the conditional span that can be removed, Y (D, r) orthonormal and orthogonal to those offsets, and S
(r,) the sines of the angles between them and the offsets' span. Guaranteed: task i's usable class means are
unchanged, E[z' | c] = E[z | c] (hence Cov(z', y_i) = Cov(z, y_i)), and the conditional guarantee above holds for
every direction kept in U. Not guaranteed: a direction of j that lies in (or within an angle asin(``min_sine``) of)
the span of task i's class-mean offsets cannot be removed without moving those means; it is left in the features and
counted in the buffer ``dropped`` of its source (conditional guardedness holds only where ``dropped`` is 0). In
particular an encoder that tells i *through* j (the background shortcut) keeps it; ``conditional`` removes it. Task
i's accuracy is not guaranteed either: its within-class covariance changes and the oblique map can stretch features
by up to 1 / ``min_sine``.

Samples per cell
----------------
The erased directions are *estimated* mean differences: the estimate of a difference Delta between two cells of n_c
and n_d samples has cos^2 ~ |Delta|^2 / (|Delta|^2 + tr(Sigma) (1/n_c + 1/n_d)) with the true one, and what the
angle misses stays readable on new data. tr(Sigma) grows with D, so flattened maps need many samples per cell: prefer
``momentum=None`` (every sample since the start) or a small momentum there, and a large ``min_count``. The statistics
also lag an encoder that is still moving; at inference they are those of the last training batches.

Cost
----
Per forward and source, O(B D r) for the projection (r <= sum over its pairs of K_i (K_j - 1), or K_j - 1 per pair
for ``marginal``); a training step adds O(B D) per pair for the statistics and a float64 SVD of a (D, m) matrix
(m = sum of the pairs' cells) for the basis, O(D m^2). Memory: O(D) per cell. Nothing is D x D.

Why not the ``concept-erasure`` package (MIT, EleutherAI; read at commit 9f51753, v0.2.5)
------------------------------------------------------------------------------------------
It is not used: (1) its LEACE eraser whitens with a D x D covariance, 16.6 GB in float32 and an O(D^3)
eigendecomposition at D = 64,512 (flattened DLTK maps); whitening buys least-squares optimality, not guardedness,
which only needs the class-conditional means made equal, and an orthogonal projection off the span of the mean
differences does that at O(D r); (2) its ``method="orth"`` variant avoids the covariance but is marginal only (one
cross-covariance with the concept), with no class-conditional or keep-own variant; (3) its fitters are not
``nn.Module`` s: their statistics are plain tensors, not buffers, so they would be neither checkpointed nor moved
with the model nor synchronised across ranks, and they average cumulatively (no momentum); (4) it truncates singular
values below an absolute 0.01 on the cross-covariance's scale, which leaves small directions un-erased at small
feature scales (here the cut is relative, 1e-8 of the largest, in float64). What it would contribute is a few lines
of linear algebra; a dependency for that is not worth it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtdisent import ComponentError, DataSource, Experiment, Lever, MultiTaskModel, build_model, retrain_classifiers
from mtdisent.evaluation import collect_features

__all__ = ["Erasure", "ErasureLayer", "fit_erasure"]

_MODES = ("conditional", "marginal", "both", "keep_own")
_RTOL = 1e-8  # singular values below this fraction of the largest are numerical zeros (float64 SVD)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    """(D, m) float64 columns -> (D, min(D, m)) orthonormal basis of their span, zero columns past its rank."""
    if m.shape[1] == 0:
        return m
    u, s, _ = torch.linalg.svd(m, full_matrices=False)  # u (D, k), s (k,)
    keep = s > s.max() * _RTOL  # (k,) all False when m is zero
    return u * keep


class _Cells(nn.Module):
    """Running means of features per (group, class) cell.

    Buffers:
        mean: (G, K, D) running means (float32).
        count: (G, K) samples seen per cell (int64, never decays).
    """

    mean: torch.Tensor
    count: torch.Tensor

    def __init__(self, groups: int, classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(groups, classes, dim))
        self.register_buffer("count", torch.zeros(groups, classes, dtype=torch.long))

    @torch.no_grad()
    def update(
        self, z: torch.Tensor, group: torch.Tensor, label: torch.Tensor, momentum: float | None, reduce: bool = True
    ) -> None:
        """Fold a batch in: z (B, D) float32, group and label (B,) int64 with -1 for unlabelled rows (skipped).

        ``momentum=None``: exact cumulative means. Otherwise a per-sample exponential moving average: a cell that
        gets n samples of mean x in this batch moves by ``1 - (1 - momentum) ** n`` of the way to x (its first
        samples set it). Under ``torch.distributed`` the batch sums of every rank are added first, unless
        ``reduce`` is false (every rank holds the same whole batch).
        """
        g, k, d = self.mean.shape
        valid = (group >= 0) & (label >= 0)  # (B,)
        cell = torch.where(valid, group.clamp(min=0) * k + label.clamp(min=0), g * k)  # (B,) g*k: the spill bin
        sums = z.new_zeros(g * k + 1, d).index_add_(0, cell, z)[:-1]  # (G*K, D)
        n = torch.bincount(cell, minlength=g * k + 1)[:-1].to(z.dtype)  # (G*K,)
        if reduce and _distributed():  # one all-reduce of sums and counts (exact in float32 up to 2^24 per batch)
            packed = torch.cat([sums.flatten(), n])
            dist.all_reduce(packed)
            sums, n = packed[: -(g * k)].view(g * k, d), packed[-(g * k) :]
        sums, n = sums.view(g, k, d), n.view(g, k)
        old = self.count.double()  # (G, K)
        nd = n.double()
        if momentum is None:
            rate = nd / (old + nd).clamp(min=1.0)
        else:
            rate = torch.where(old > 0, 1.0 - (1.0 - momentum) ** nd, (nd > 0).double())
        batch_mean = sums / n.clamp(min=1.0)[..., None]  # (G, K, D)
        self.mean.add_(rate.to(self.mean.dtype)[..., None] * (batch_mean - self.mean))  # rate 0 where n == 0
        self.count.add_(n.round().long())

    def directions(self, min_count: int) -> torch.Tensor:
        """(G*K, D) float64: per group, each usable cell's mean minus the group's first usable one; zero rows else.

        Their span is the span of every difference between usable cell means of a group (groups with fewer than
        two usable cells contribute nothing).
        """
        g, k, d = self.mean.shape
        ok = self.count >= min_count  # (G, K)
        first = ok.to(torch.uint8).argmax(1)  # (G,) first usable class of each group (0 when none)
        ref = self.mean.gather(1, first[:, None, None].expand(g, 1, d))  # (G, 1, D)
        use = ok & (torch.arange(k, device=ok.device)[None, :] != first[:, None])  # (G, K)
        return ((self.mean.double() - ref.double()) * use[..., None]).reshape(g * k, d)


class _Source(nn.Module):
    """The statistics and erasure map of one source task's features.

    Buffers:
        basis: (R, D) the erased directions U^T (rows), zero rows past ``rank`` (R = min(D, sum of the pairs'
            cells)); rows, so that both products of :meth:`erase` read memory contiguously.
        reader: (R, D) R^T in ``z - U R^T (z - mu)``: U^T itself (orthogonal modes) or S^-1 Y^T (``keep_own``).
        rank: () directions erased; dropped: () directions ``keep_own`` had to keep (see the module docstring).

    Submodules: ``pooled`` (one cell holding every sample: mu, the running mean of the source's features, the
    centre of the map); ``cells[target]`` (:class:`_Cells`, groups = K_i or 1 for ``marginal``); ``marginal[target]``
    (one group) with ``both``; ``own`` (one group of K_i cells: the source's own class means) with ``keep_own``.
    """

    basis: torch.Tensor
    reader: torch.Tensor
    rank: torch.Tensor
    dropped: torch.Tensor

    def __init__(self, dim: int, own_classes: int, targets: dict[str, int], mode: str) -> None:
        super().__init__()
        groups = 1 if mode == "marginal" else own_classes
        self.cells = nn.ModuleDict({t: _Cells(groups, k, dim) for t, k in targets.items()})
        # "both": the marginal cells beside the conditional ones
        self.marginal = nn.ModuleDict({t: _Cells(1, k, dim) for t, k in targets.items()}) if mode == "both" else None
        self.own = _Cells(1, own_classes, dim) if mode == "keep_own" else None
        self.pooled = _Cells(1, 1, dim)
        width = min(dim, sum((groups + (mode == "both")) * k for k in targets.values()))
        self.register_buffer("basis", torch.zeros(width, dim))
        self.register_buffer("reader", torch.zeros(width, dim))
        self.register_buffer("rank", torch.zeros((), dtype=torch.long))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long))

    def tables(self) -> list[tuple[str, _Cells]]:
        """``[(target, its cells)]`` in pair order (the conditional or marginal cells of the mode)."""
        return [(t, cast(_Cells, c)) for t, c in self.cells.items()]

    def marginal_tables(self) -> list[tuple[str, _Cells]]:
        """``[(target, its marginal cells)]`` with ``both``; empty otherwise."""
        return [(t, cast(_Cells, c)) for t, c in self.marginal.items()] if self.marginal is not None else []

    @property
    def mu(self) -> torch.Tensor:
        """(D,) the running mean of the source's features."""
        return self.pooled.mean.view(-1)

    @torch.no_grad()
    def refit(self, min_count: int, min_sine: float | None) -> None:
        """Recompute ``basis``/``reader`` from the statistics (``min_sine`` given: the ``keep_own`` oblique map)."""
        tables = self.tables() + self.marginal_tables()
        rows = torch.cat([cells.directions(min_count) for _, cells in tables])  # (m, D) float64
        u = _orthonormal(rows.t())  # (D, R) orthonormal columns, zero past the rank
        width = self.basis.shape[0]
        u = u[:, :width]  # rank <= min(D, m) = width
        rank = (u.abs().sum(0) > 0).sum()
        reader, dropped = u, torch.zeros_like(rank)
        if min_sine is not None and self.own is not None:
            ok = self.own.count[0] >= min_count  # (K_i,)
            offsets = (self.own.mean[0].double() - self.mu.double()) * ok[:, None]  # (K_i, D)
            v = _orthonormal(offsets.t())  # (D, K_i) orthonormal offsets of the own class means
            x = u - v @ (v.t() @ u)  # (D, R) the part of U orthogonal to them
            y, s, wh = torch.linalg.svd(x, full_matrices=False)  # y (D, R), s (R,) sines to span(v), wh (R, R)
            keep = s > min_sine  # (R,)
            u = (u @ wh.t()) * keep  # (D, R) principal directions of U that can be erased: U W_k
            reader = y * (keep / s.clamp(min=min_sine))  # (D, R) Y_k S_k^-1: zero on span(v), so A v = 0
            kept = keep.sum()
            dropped, rank = rank - kept, kept
        self.basis.copy_(u.t())
        self.reader.copy_(reader.t())
        self.rank.fill_(rank)
        self.dropped.fill_(dropped)

    def erase(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D): ``z - U R^T (z - mu)`` in float32 (autocast off), returned in z's dtype."""
        basis, reader = self.basis, self.reader
        if torch.is_grad_enabled() and z.requires_grad:  # the graph keeps its own copies (D, R): a later update
            basis, reader = basis.clone(), reader.clone()  # of the buffers in place cannot break its backward
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            coef = F.linear(x, reader) - reader @ self.mu  # (B, R) = R^T (z - mu) per row
            return torch.addmm(x, coef, basis, alpha=-1.0).to(z.dtype)  # (B, D) = z - coef U^T


class ErasureLayer(nn.Module):
    """What :class:`Erasure` builds: one :class:`_Source` per erased source task, in ``sources[task]``.

    Args:
        sources: ``{source: {target: K_target}}`` the erased pairs.
        dims: ``{task: D}`` feature sizes.
        classes: ``{task: K}`` class counts.
        mode, momentum, min_count, min_sine: As :class:`Erasure`.
    """

    def __init__(
        self,
        sources: dict[str, dict[str, int]],
        dims: dict[str, int],
        classes: dict[str, int],
        mode: str,
        momentum: float | None,
        min_count: int,
        min_sine: float,
    ) -> None:
        super().__init__()
        self.mode, self.momentum, self.min_count, self.min_sine = mode, momentum, min_count, min_sine
        self.sources = nn.ModuleDict({s: _Source(dims[s], classes[s], t, mode) for s, t in sources.items()})

    def forward(
        self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``{task: (B, D)}`` -> the same with every source erased; ``labels`` ``{task: (B,)}`` update first."""
        if labels is not None:
            self.update(features, labels)
        out = dict(features)
        for name, source in self.items():
            out[name] = source.erase(features[name])
        return out

    def items(self) -> list[tuple[str, _Source]]:
        """``[(source task, its statistics and map)]``."""
        return [(s, cast(_Source, m)) for s, m in self.sources.items()]

    @torch.no_grad()
    def update(self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], reduce: bool = True) -> None:
        """Fold a labelled batch into the statistics (features detached) and refit every source's basis.

        A task missing from ``labels`` counts as unlabelled (-1): its rows update nothing that needs its label.
        ``reduce=False``: the batch is not summed over the processes of a distributed run (each holds all of it).
        """
        for name, source in self.items():
            z = features[name].detach().float()  # (B, D)
            b = z.shape[0]
            missing = torch.full((b,), -1, dtype=torch.long, device=z.device)
            own = labels.get(name, missing).long()  # (B,)
            whole = torch.zeros(b, dtype=torch.long, device=z.device)  # (B,) every row in group/class 0
            source.pooled.update(z, whole, whole, self.momentum, reduce)
            if source.own is not None:
                source.own.update(z, whole, own, self.momentum, reduce)
            group = whole if self.mode == "marginal" else own
            for target, cells in source.tables():
                cells.update(z, group, labels.get(target, missing).long(), self.momentum, reduce)
            for target, cells in source.marginal_tables():
                cells.update(z, whole, labels.get(target, missing).long(), self.momentum, reduce)
            source.refit(self.min_count, self.min_sine if self.mode == "keep_own" else None)


def _parse_pair(item: Any) -> tuple[str, str] | None:
    if isinstance(item, str) and item.count("->") == 1:
        a, b = (s.strip() for s in item.split("->"))
        return (a, b) if a and b else None
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) and s for s in item):
        return item[0], item[1]
    return None


class Erasure(Lever):
    """Closed-form linear erasure of task j from task i's features (LEACE-style), fitted on running statistics.

    See the module docstring for what each mode guarantees and what it does not.

    Args:
        mode: ``"conditional"`` (default: within each class of task i, the directions along which task j's class
            means differ; one projection for every sample), ``"marginal"`` (the directions of Cov(z_i, y_j)),
            ``"both"`` (the two together: both guarantees) or ``"keep_own"`` (conditional, by an oblique projection
            that leaves task i's class means unchanged).
        momentum: Per-sample rate of the running means' exponential moving average (a cell moves by
            ``1 - (1 - momentum) ** n`` towards the mean of its n new samples; memory about 1 / momentum samples
            per cell), or ``None`` for exact cumulative means since the start of training.
        min_count: Samples a cell must have seen before its mean is used.
        pairs: Which (source, target) pairs to erase, as ``"source->target"`` strings or ``[source, target]``
            lists; ``None`` (default): every enabled adversary pair of the experiment (``model.pairs``, member 0).
        min_sine: ``keep_own`` only: erased directions closer than this sine of an angle to the span of task i's
            class-mean offsets are kept (erasing them would stretch features by 1 / sine); in (0, 1).
        frozen: Training never updates the statistics: they are set once by :func:`fit_erasure` on a trained
            model (until then the layer erases nothing).
        fit: ``"running"`` (default): the statistics follow the training batches as above. ``"after"``: erasure
            after training, inside ``md.train``: the layer erases nothing while the model trains (its statistics
            stay zero, the identity) and, when training ends, is fitted once on exact cell means of its input
            features (the final model's) over the training split (:meth:`finish`, what :func:`fit_erasure` does
            to a trained model), so the final model (``run.model``, ``md.load(run_dir)``) erases, in training and
            eval mode alike; checkpoints, ``best`` included, hold the model before it. ``momentum`` is not used;
            ``frozen`` must stay false.
        retrain_epochs: With ``fit="after"``: the classifier of every erased source is then trained again for
            this many epochs on its erased training features (:func:`mtdisent.retrain_classifiers`, seeded by the
            experiment's seed); 0 leaves the classifiers as trained (they then read erased features they never
            saw). Must be 0 with ``fit="running"``.
    """

    def __init__(
        self,
        mode: str = "conditional",
        momentum: float | None = 0.01,
        min_count: int = 10,
        pairs: list[Any] | None = None,
        min_sine: float = 0.05,
        frozen: bool = False,
        fit: str = "running",
        retrain_epochs: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ComponentError(f"mode={mode!r}; expected 'conditional', 'marginal', 'both' or 'keep_own'")
        if momentum is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0
        ):
            raise ComponentError(f"momentum={momentum!r}; expected a number in (0, 1] or None (cumulative means)")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ComponentError(f"min_count={min_count!r}; expected an integer >= 1")
        if isinstance(min_sine, bool) or not isinstance(min_sine, (int, float)) or not 0.0 < min_sine < 1.0:
            raise ComponentError(f"min_sine={min_sine!r}; expected a number in (0, 1)")
        if not isinstance(frozen, bool):
            raise ComponentError(f"frozen={frozen!r}; expected true or false")
        if fit not in ("running", "after"):
            raise ComponentError(
                f"fit={fit!r}; expected 'running' (statistics of the training batches) or 'after' (fitted once on "
                "the final features when training ends)"
            )
        if isinstance(retrain_epochs, bool) or not isinstance(retrain_epochs, int) or retrain_epochs < 0:
            raise ComponentError(f"retrain_epochs={retrain_epochs!r}; expected an integer >= 0")
        if frozen and fit == "after":
            raise ComponentError(
                "frozen=True with fit='after': the layer is fitted once when training ends; drop frozen"
            )
        if retrain_epochs and fit != "after":
            raise ComponentError(
                f"retrain_epochs={retrain_epochs}: the classifiers are retrained only after an erasure fitted after "
                "training; set fit='after' or retrain_epochs=0"
            )
        if pairs is not None:
            if not isinstance(pairs, (list, tuple)) or not pairs:
                raise ComponentError(
                    f"pairs={pairs!r}; expected a non-empty list of 'source->target' strings or [source, target] "
                    "lists, or None (every enabled adversary pair)"
                )
            parsed = []
            for item in pairs:
                pair = _parse_pair(item)
                if pair is None:
                    raise ComponentError(
                        f"pairs: {item!r} is not a pair; expected 'source->target' or [source, target]"
                    )
                if pair[0] == pair[1]:
                    raise ComponentError(f"pairs: {item!r} erases a task from itself; source and target must differ")
                if pair in parsed:
                    raise ComponentError(f"pairs: {pair[0]}->{pair[1]} is listed twice")
                parsed.append(pair)
        self.mode = mode
        self.momentum = None if momentum is None else float(momentum)
        self.min_count = min_count
        self.pairs = pairs
        self.min_sine = float(min_sine)
        self.frozen = frozen
        self.fit = fit
        self.retrain_epochs = retrain_epochs

    def resolve_pairs(self, model: MultiTaskModel) -> list[tuple[str, str]]:
        """The (source, target) pairs this lever erases in ``model``."""
        if self.pairs is None:
            resolved = [(p.source, p.target) for p in model.pairs if p.member == 0]
            if not resolved:
                raise ComponentError(
                    "lever 'erasure': pairs=None erases every enabled adversary pair, and the experiment enables "
                    "none; list them, e.g. pairs=['shape->background']"
                )
            return resolved
        out = []
        for item in self.pairs:
            pair = _parse_pair(item)
            assert pair is not None  # checked in __init__
            for task in pair:
                if task not in model.task_names:
                    names = ", ".join(repr(t) for t in model.task_names)
                    raise ComponentError(f"lever 'erasure': pairs: unknown task {task!r} in {item!r}; tasks: {names}")
            out.append(pair)
        return out

    def build(self, model: MultiTaskModel) -> ErasureLayer:
        """The layer holding the statistics and bases of every erased source (buffers, so they are saved)."""
        sources: dict[str, dict[str, int]] = {}
        classes = {t.name: t.n_classes for t in model.experiment.tasks}
        for source, target in self.resolve_pairs(model):
            sources.setdefault(source, {})[target] = classes[target]
        return ErasureLayer(
            sources, dict(model.feature_sizes), classes, self.mode, self.momentum, self.min_count, self.min_sine
        )

    def features(
        self,
        module: nn.Module | None,
        features: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor] | None,
        training: bool,
    ) -> dict[str, torch.Tensor]:
        """Update the statistics with a labelled training batch (unless ``frozen``), then erase.

        With ``fit="after"`` the statistics never follow the batches: the layer erases what :meth:`finish` fitted
        (nothing before).
        """
        if module is None:
            return features
        return module(features, labels if training and not (self.frozen or self.fit == "after") else None)

    def finishes(self) -> bool:
        """Only ``fit="after"`` changes the final model."""
        return self.fit == "after"

    def finish(self, module: nn.Module | None, model: MultiTaskModel, data: Any) -> None:
        """With ``fit="after"``: fit the layer on its input features over ``data`` (the training split).

        Exact cell means over one pass of the final model, as :func:`fit_erasure` fits them; then the erased
        sources' classifiers are retrained ``retrain_epochs`` epochs.
        """
        if self.fit != "after" or module is None:
            return
        tr = model.experiment.training
        _fit_layer(
            model,
            cast(ErasureLayer, module),
            data,
            batch_size=tr.batch_size,
            num_workers=tr.num_workers,
            retrain_epochs=self.retrain_epochs,
            retrain_lr=None,
            seed=model.experiment.seed,
        )


def fit_erasure(
    model: MultiTaskModel,
    data: Any,
    *,
    mode: str = "conditional",
    pairs: list[Any] | None = None,
    min_count: int = 10,
    min_sine: float = 0.05,
    batch_size: int = 256,
    num_workers: int = 0,
    retrain_epochs: int = 0,
    retrain_lr: float | None = None,
    seed: int = 0,
) -> MultiTaskModel:
    """A copy of a trained model with an erasure layer fitted, after training, on its features over ``data``.

    LEACE as its authors use it: the statistics are exact class-conditional means of the *final* features over one
    pass of ``data`` (usually the training split), not running means of an encoder that kept moving. On ``data``
    every erased pair's usable cell means are then equal within each class of the source (``conditional``; see the
    module docstring for each mode), so a linear probe fitted on ``data`` can do no better than a constant there.
    The copy's experiment is the model's plus an ``erasure`` lever with ``fit="after"`` (these arguments), placed
    after the model's own levers; its weights are the model's, and the model itself is unchanged. By default the
    classifiers are not retrained: they read the erased features as they are, so check their accuracy
    (``md.evaluate``) on the copy. With ``retrain_epochs``, :func:`mtdisent.retrain_classifiers` then trains the
    classifier of every erased source again on its erased features of ``data`` (from its weights; encoders and other
    heads frozen). The erasure is fitted first and is not changed by the retraining, so the linear guarantee on the
    features holds whatever the heads learn.

    Args:
        model: A trained :class:`~mtdisent.MultiTaskModel` (for example ``md.load(run_dir)``).
        data: One split following the data contract, e.g. ``data["train"]``.
        mode: As :class:`Erasure` (``"conditional"``, ``"marginal"``, ``"both"`` or ``"keep_own"``).
        pairs: As :class:`Erasure`: ``"source->target"`` strings; default every enabled adversary pair.
        min_count: As :class:`Erasure`: samples a cell needs before its mean is used.
        min_sine: As :class:`Erasure` (``keep_own`` only).
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes.
        retrain_epochs: ``retrain_classifiers``' ``epochs`` (0: the classifiers are not retrained).
        retrain_lr: Its ``lr`` (default the experiment's ``training.optimizer.lr``).
        seed: Seeds the feature pass (whatever the data draws from torch's global generator) and the retraining
            (``retrain_classifiers``' ``seed``).

    In a distributed program every process must pass the whole of ``data`` (the statistics are not summed over
    processes); each then computes the same layer.

    Returns:
        The new model, on the model's device, in the model's train/eval mode.

    Raises:
        ComponentError: a bad argument, or ``data`` holds several splits.
    """
    if not isinstance(model, MultiTaskModel):
        raise ComponentError(f"fit_erasure: model must be a MultiTaskModel, got {type(model).__name__}")
    if isinstance(data, (DataSource, Mapping)):
        raise ComponentError(f"fit_erasure: data: pass one split (for example data['train']), not {sorted(data)}")
    args = {"mode": mode, "momentum": None, "min_count": min_count, "pairs": pairs, "min_sine": min_sine}
    try:  # every argument checked, in one line, before any work
        Erasure(**args, fit="after", retrain_epochs=retrain_epochs)
    except ComponentError as exc:
        raise ComponentError(f"fit_erasure: {exc}") from None
    if retrain_lr is not None and (
        isinstance(retrain_lr, bool) or not isinstance(retrain_lr, (int, float)) or not retrain_lr > 0
    ):
        raise ComponentError(f"fit_erasure: retrain_lr={retrain_lr!r}: expected a number > 0 or None")
    spec = model.experiment.model_dump(mode="json")
    index = len(spec["levers"])
    spec["levers"].append({"name": "erasure", "args": {**args, "fit": "after", "retrain_epochs": retrain_epochs}})
    experiment = Experiment.model_validate(spec, context={"skip_registry_checks": ("objective", "dataset")})
    device = next(model.parameters()).device
    fitted = build_model(experiment, model.input_shape).to(device)
    result = fitted.load_state_dict(model.state_dict(), strict=False)
    prefix = f"lever_modules.{index}."
    assert not result.unexpected_keys and all(k.startswith(prefix) for k in result.missing_keys), result
    fitted.train(model.training)
    layer = cast(ErasureLayer, fitted.lever_modules[str(index)])  # erases nothing yet: basis and mu are zero
    _fit_layer(
        fitted,
        layer,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        retrain_epochs=retrain_epochs,
        retrain_lr=retrain_lr,
        seed=seed,
    )
    return fitted


def _fit_layer(
    model: MultiTaskModel,
    layer: ErasureLayer,
    data: Any,
    *,
    batch_size: int,
    num_workers: int,
    retrain_epochs: int,
    retrain_lr: float | None,
    seed: int,
) -> None:
    """Fit ``layer`` (one of ``model``'s) on exact cell means of its input features over ``data``, in place.

    The statistics start again from zero (the identity), so fitting twice gives the same layer. The layer's input
    is what the encoders and the levers before it give in eval mode (levers after it do not change what it is
    fitted on). Then, with ``retrain_epochs``, the erased sources' classifiers are retrained on what they read.
    """
    device = next(model.parameters()).device
    for buffer in layer.buffers():
        buffer.zero_()  # the identity, and cells that count from zero: exact means (momentum does not apply)
    sources = [name for name, _ in layer.items()]
    batches: list[dict[str, torch.Tensor]] = []

    def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:  # its own copy: nothing else aliases it
        batches.append({t: args[0][t].detach().to("cpu", torch.float32, copy=True) for t in sources})  # (B, D)

    hook = layer.register_forward_pre_hook(keep_input)
    try:
        with torch.random.fork_rng(devices=[]):  # a dataset's random augmentation draws the same images every time
            torch.manual_seed(seed)
            labels = collect_features(model, data, batch_size, num_workers=num_workers)[1]  # {task: (N,)}, CPU
    finally:
        hook.remove()
    n, seen = len(next(iter(labels.values()))), sum(len(b[sources[0]]) for b in batches)
    if n == 0 or seen != n:
        raise ComponentError(
            f"fitting the erasure: the data gave {n} samples and the layer saw {seen} rows; it needs at least one "
            "sample, and to be called once per batch"
        )
    features = {t: torch.cat([b[t] for b in batches]).to(device) for t in sources}  # {source: (N, D)}
    batches.clear()
    # every process of a distributed run read the whole of data: nothing to sum over them
    layer.update(features, {t: y.to(device) for t, y in labels.items()}, reduce=False)
    if retrain_epochs:
        retrain_classifiers(
            model,
            data,
            tasks=[t for t, _ in layer.items()],
            epochs=retrain_epochs,
            lr=retrain_lr,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
