"""Validation during training, through the same metric objects as ``md.evaluate``, and the best-checkpoint rule.

Each process validates its share of the validation split (every ``world``-th batch); the metrics' states are
summed across processes before they are computed, so the numbers are those of the whole split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed

from .._data import ContractView, make_loader, sequential_batches
from .._errors import SpecError, did_you_mean
from .._model import MultiTaskModel
from .._spec import Experiment, TrainingSpec
from .._torch import eval_mode
from ..evaluation._metric import Metric
from ..evaluation._metrics import majority_rate, normalised_leakage
from ..evaluation._probes import probe_accuracy, train_probe
from ._setup import Setup

__all__ = ["Validator", "Selection", "validation_leakage"]


class Selection:
    """The best-checkpoint rule: which validation metric decides, and the optional leakage limit.

    Without a limit: the better value of ``val_<metric>`` (higher for ``mode="max"``). With ``leakage_limit``:
    a checkpoint within the limit beats one outside it; two within it compare by the metric; two outside it by
    lower ``val_leakage``.

    Args:
        metric: A key of the validation metrics without the ``val_`` prefix (default ``mean_acc``: the mean
            validation accuracy over tasks).
        mode: ``"max"`` or ``"min"``.
        leakage_limit: The leakage limit, or ``None``.
    """

    def __init__(self, metric: str = "mean_acc", mode: str = "max", leakage_limit: float | None = None) -> None:
        if mode not in ("max", "min"):
            raise SpecError(f"training.select_mode: {mode!r}; expected 'max' or 'min'")
        self.metric, self.mode, self.leakage_limit = metric, mode, leakage_limit

    @classmethod
    def from_spec(cls, training: TrainingSpec) -> Selection:
        """The rule a :class:`~mtdisent.TrainingSpec` declares."""
        return cls(training.select_metric, training.select_mode, training.leakage_limit)

    def score(self, val: dict[str, Any]) -> float:
        """The deciding value of validation metrics ``val``; an unknown metric is named with what is available."""
        key = f"val_{self.metric}"
        if key not in val:
            names = sorted(k.removeprefix("val_") for k in val if k.startswith("val_"))
            raise SpecError(
                f"training.select_metric: validation computed no {self.metric!r}. {did_you_mean(self.metric, names)}"
            )
        return float(val[key])

    def _beats(self, a: float, b: float) -> bool:
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.mode == "max" else a < b

    def is_better(self, val: dict[str, Any], best: dict[str, Any] | None) -> bool:
        """Whether validation metrics ``val`` beat ``best`` (``None``: nothing yet, so yes)."""
        if best is None:
            return True
        limit = self.leakage_limit
        if limit is None or "val_leakage" not in val:
            return self._beats(self.score(val), self.score(best))
        ok, best_ok = val["val_leakage"] <= limit, best.get("val_leakage", math.inf) <= limit
        if ok != best_ok:
            return bool(ok)
        if ok:
            return self._beats(self.score(val), self.score(best))
        return bool(val["val_leakage"] < best["val_leakage"])


class Validator:
    """Validation metrics of the model on one split, computed by :class:`~mtdisent.Metric` objects.

    Args:
        model: The model being trained.
        experiment: Its experiment.
        view: The validation split through the data contract.
        setup: Where the model runs.
        metrics: The metrics to compute (the built-in accuracy first, then the user's).
        num_workers: DataLoader workers.
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        experiment: Experiment,
        view: ContractView,
        setup: Setup,
        metrics: Sequence[Metric],
        num_workers: int = 0,
        batch_size: int = 256,
    ) -> None:
        self.model, self.experiment, self.view, self.setup = model, experiment, view, setup
        self.metrics, self.num_workers, self.batch_size = list(metrics), num_workers, batch_size
        self.selection = Selection.from_spec(experiment.training)

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """Validate once.

        Returns:
            ``val_<key>`` for every metric's keys, ``val_score`` (the selection metric) and, with a leakage limit,
            ``val_leakage/<pair>`` and ``val_leakage``.
        """
        model, setup, limit = self.model, self.setup, self.experiment.training.leakage_limit
        for m in self.metrics:
            m.reset()
        kept: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}  # features, for leakage probes
        labels: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}
        batches = sequential_batches(self.view.n, self.batch_size, setup.dist.rank, setup.dist.world)
        loader = make_loader(self.view, batches, num_workers=self.num_workers, pin_memory=setup.device.type == "cuda")
        with eval_mode(model):
            for x, y, _ in loader:
                with setup.autocast():
                    feats = setup.encode(x.to(setup.device))
                    logits = model.classify(feats)
                for m in self.metrics:
                    m.update(logits, y)
                if limit is not None:
                    for t in model.task_names:
                        kept[t].append(feats[t].float().cpu())
                        labels[t].append(y[t])
        out: dict[str, float] = {}
        for m in self.metrics:
            m.sync()
            out.update({f"val_{k}": v for k, v in m.compute().items()})
        if limit is not None and model.pairs:
            feats_all, labels_all = _gathered(kept), _gathered(labels)
            pairs = [
                (p.source, p.target, self.experiment.task(p.target).n_classes) for p in model.pairs if p.member == 0
            ]
            leak = validation_leakage(feats_all, labels_all, pairs, seed=self.experiment.seed)
            out.update({f"val_leakage/{k}": v for k, v in leak.items()})
            out["val_leakage"] = max(leak.values(), default=0.0)
        out["val_score"] = self.selection.score(out)
        return out


def _gathered(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-batch tensors; under torch.distributed, every process's parts in rank order."""
    local = {t: torch.cat(v) for t, v in parts.items() if v}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, local)
    return {t: torch.cat([p[t] for p in everyone if t in p]) for t in parts}


def validation_leakage(
    features: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    pairs: list[tuple[str, str, int]],
    seed: int = 0,
) -> dict[str, float]:
    """Normalised fresh linear-probe leakage per pair on one split, by two-fold cross-fitting.

    The samples are split in two halves at random (from ``seed``); a linear probe trained on one half is
    scored on the other and the other way round; the mean accuracy is normalised against the target's
    majority rate: 0 at the majority rate, 1 when the probe is perfect.

    Args:
        features: ``{task: (N, D)}`` features.
        labels: ``{task: LongTensor[N]}``, -1 where unlabelled.
        pairs: ``(source, target, target classes)`` to probe.
        seed: Seed of the split and the probes.

    Returns:
        ``{"source->target": leakage}``; pairs whose target is constant or unlabelled are left out.
    """
    n = len(next(iter(labels.values())))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))
    halves = (order[: n // 2], order[n // 2 :])
    out = {}
    for source, target, k in pairs:
        y, z = labels[target], features[source]
        accs = []
        for fit, score in (halves, halves[::-1]):
            if int((y[fit] >= 0).sum()) < 2 or int((y[score] >= 0).sum()) < 1:
                continue
            probe = train_probe(z[fit], y[fit], k, "linear", seed=seed)
            accs.append(probe_accuracy(probe, z[score], y[score]))
        value = normalised_leakage(sum(accs) / len(accs), majority_rate(y, k)) if accs else math.nan
        if not math.isnan(value):
            out[f"{source}->{target}"] = value
    return out
