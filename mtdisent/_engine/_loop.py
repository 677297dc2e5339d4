"""The training loop: per iteration one main step, then k adversary steps.

Main step (encoders + classifiers; adversary weights untouched)::

    sum_i w_i CE(C_i(z_i), y_i) + sum_(i,j) objective.encoder_term(A_ij, z_i, y_j, lambda_t * lambda_ij) + l2 * |W|^2

For the paper's ``minmax`` objective the pair term is ``-lambda CE(A_ij(z_i), y_j)``. Adversary steps
minimise ``sum_(i,j) CE(A_ij(z_i), y_j) + l2 * |W_adv|^2`` on detached features: the main step's
(``features="reuse"``) or a fresh batch encoded without gradients (``features="fresh"``).

BatchNorm: the main step runs everything in train mode; the adversaries' running statistics are restored
afterwards, so the main step leaves the adversaries exactly as they were. Fresh adversary passes run the
encoders in train mode (batch statistics, as in the main step) and restore the encoders' running
statistics, so those see each main-step batch exactly once, whatever k is.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from .._data import DataError, DataSource, resolve_data
from .._errors import ComponentError, MtdisentError, SpecError
from .._model import MultiTaskModel, build_model, check_kwargs
from .._objectives import Objective
from .._registry import objectives
from .._spec import Experiment, OptimizerSpec
from ..evaluation._metrics import majority_rate, normalised_leakage
from ..evaluation._probes import probe_accuracy, train_probe
from ._checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_which,
    export_model,
    latest_checkpoint,
    load,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from ._distributed import DistInfo, all_true, any_true, setup, teardown
from ._progress import Progress
from ._stream import Batches, BatchStream

__all__ = ["train", "Run", "TrainingError", "TrainingInterrupted", "lambda_schedule", "masked_cross_entropy", "Trainer"]


class TrainingError(MtdisentError):
    """Training cannot go on (a non-finite loss, for example); the last good checkpoint stays."""


class TrainingInterrupted(MtdisentError):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint; ``resume=True`` continues it.

    Attributes:
        signal: The signal number received.
        iteration: The last completed iteration.
        checkpoint: The checkpoint written, or ``None`` for an in-memory run.
    """

    def __init__(self, message: str, signal: int, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signal, self.iteration, self.checkpoint = signal, iteration, checkpoint


class _GracefulStop:
    """Turns the first SIGINT/SIGTERM into a flag checked between iterations; a second one stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second signal: give up waiting for the iteration to end
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class Run:
    """The result of :func:`train`.

    Attributes:
        experiment: The experiment trained.
        model: The trained model (training mode, on the training device).
        out_dir: The run directory, or ``None`` for an in-memory run.
        iteration: Iterations completed.
        history: The logged metrics, one dict per logged iteration.
        best: Validation metrics of the best checkpoint, when validation data was given.
        best_state: For a run without ``out_dir``: the model weights of the best checkpoint (a run with a
            directory keeps them in ``checkpoints/best``). Use :meth:`model_at` rather than reading it.
    """

    experiment: Experiment
    model: MultiTaskModel
    out_dir: Path | None
    iteration: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def model_at(self, which: str = "best") -> MultiTaskModel:
        """The model at the final, latest or best checkpoint.

        Args:
            which: ``"final"`` or ``"latest"`` (the trained model, :attr:`model`), or ``"best"`` (the checkpoint
                chosen on validation data; :attr:`model` when there was no validation or the last one won).

        Returns:
            The model; a separate copy (or a model loaded from ``checkpoints/best``) for an earlier best.

        Raises:
            CheckpointError: ``which`` is not one of the three. MtdisentError: the best weights were not kept.
        """
        check_which(which)
        if which != "best" or self.best is None or self.best.get("iteration") == self.iteration:
            return self.model
        if self.best_state is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(self.best_state)
            return model
        if self.out_dir is not None and (self.out_dir / "checkpoints" / "best").is_dir():
            return load(self.out_dir, which="best").to(next(self.model.parameters()).device)
        raise MtdisentError(
            f"the best checkpoint (iteration {self.best.get('iteration')}) of this run was not kept; "
            "pass which='final', or train with out_dir to keep it"
        )


def lambda_schedule(kind: str, iteration: int, warmup: int, total: int) -> float:
    """Multiplier in [0, 1] of the adversarial weight at ``iteration`` (0-based).

    ``constant``: 1. ``linear``: (t + 1) / warmup until warmup, then 1. ``sigmoid`` (DANN):
    2 / (1 + exp(-10 p)) - 1 with p = t / warmup (or t / total when warmup is 0), capped at 1.
    """
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return 1.0 if warmup == 0 else min(1.0, (iteration + 1) / warmup)
    if kind == "sigmoid":
        p = min(1.0, iteration / (warmup or total))
        return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
    raise SpecError(f"adversary.schedule: unknown schedule {kind!r}; expected 'constant', 'linear' or 'sigmoid'")


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy over labelled rows (target >= 0); ``None`` when no row is labelled."""
    mask = target >= 0
    if not bool(mask.any()):
        return None
    return F.cross_entropy(logits[mask], target[mask])


def _make_optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, foreach=True)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=True)


def _add_l2_gradient(weights: list[nn.Parameter], l2: float) -> None:
    """Add the gradient of ``l2 * sum ||W||^2`` (TF's kernel regularisers) to ``W.grad``: ``2 * l2 * W``.

    Identical to putting the penalty in the loss, without materialising W**2 and its backward (three passes
    over every weight); one fused foreach operation instead.
    """
    with torch.no_grad():
        pairs = [(w.grad, w) for w in weights if w.grad is not None]
        if pairs:
            grads, params = zip(*pairs, strict=True)
            torch._foreach_add_(list(grads), list(params), alpha=2.0 * l2)


def _snapshot_buffers(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of a module's buffers (BatchNorm running statistics), for :func:`_restore_buffers`."""
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, v in saved:
            b.copy_(v)


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Run in train mode but restore BatchNorm running statistics afterwards (no-grad passes only)."""
    saved = _snapshot_buffers(module)
    try:
        yield
    finally:
        _restore_buffers(saved)


@contextlib.contextmanager
def _no_grad_params(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"training.device: {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


def build_objective(experiment: Experiment) -> Objective:
    """Instantiate the spec's objective plugin; errors name it."""
    comp = experiment.adversary.objective
    factory = objectives.get(comp.name)
    check_kwargs(factory, comp.args, f"adversary.objective {comp.name!r}")
    objective = factory(**comp.args)
    if not isinstance(objective, Objective):
        raise ComponentError(f"objective {comp.name!r} built {type(objective).__name__}, not an mtdisent.Objective")
    return objective


class _MainNet(nn.Module):
    """Encoders + classifiers as one module (what DDP wraps for the main step)."""

    def __init__(self, model: MultiTaskModel, encode: Any) -> None:
        super().__init__()
        self.encoders, self.classifiers = model.encoders, model.classifiers
        self._encode, self._classify = encode, model.classify

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats = self._encode(x)  # {task: (B, D)}
        return feats, self._classify(feats)


class _AdvNet(nn.Module):
    """All adversaries as one module (what DDP wraps for the adversary updates)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.adversaries = model.adversaries
        self._logits = model.adversary_logits

    def forward(
        self,
        feats: dict[str, torch.Tensor] | torch.Tensor,
        transform: Any,
        weights: torch.Tensor | None,
        labels: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        inputs = feats.float() if isinstance(feats, torch.Tensor) else {k: v.float() for k, v in feats.items()}
        return self._logits(inputs, transform, weights, labels)  # (P, B, K_max)


class Trainer:
    """State of one training run: model, optimisers, data streams, RNGs. :func:`train` drives it."""

    def __init__(
        self, experiment: Experiment, data: DataSource, device: torch.device, dist_info: DistInfo | None = None
    ) -> None:
        tr = experiment.training
        self.experiment, self.device = experiment, device
        self.dist = dist_info or DistInfo()
        if tr.batch_size % self.dist.world:
            raise SpecError(
                f"training.batch_size: {tr.batch_size} is not divisible by the {self.dist.world} processes; "
                "each process trains on an equal slice of every global batch"
            )
        if tr.train_split not in data:
            raise DataError(f"training.train_split: the data has no split {tr.train_split!r} (it has {sorted(data)})")
        train_set = data[tr.train_split]
        shape: tuple[int, int, int] = experiment.input_shape or data.input_shape or _first_shape(train_set)  # type: ignore[assignment]
        self.model = build_model(experiment, shape)
        if tr.sync_batchnorm and self.dist.enabled:
            if device.type != "cuda":
                raise SpecError(
                    "training.sync_batchnorm: PyTorch's SyncBatchNorm needs CUDA devices; on the CPU each process's "
                    "BatchNorm uses its own slice of the batch (set sync_batchnorm=false)"
                )
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(device)
        self.objective = build_objective(experiment)
        self.train_batches = Batches(train_set, experiment, self.model.input_shape, tr.train_split)
        self.val_batches = (
            Batches(data[tr.val_split], experiment, self.model.input_shape, tr.val_split)
            if tr.val_split in data
            else None
        )
        self.stream = BatchStream(self.train_batches.n, tr.batch_size, experiment.seed)
        self.flip_rng = torch.Generator().manual_seed(experiment.seed + 7919)
        self.main_params = self.model.main_parameters()
        self.adv_params = self.model.adversary_parameters()
        self.l2_main, self.l2_adv = self.model.l2_parameters("main"), self.model.l2_parameters("adversary")
        self.main_opt = _make_optimizer(tr.optimizer, self.main_params)
        self.adv_opt = _make_optimizer(tr.adversary_optimizer, self.adv_params) if self.adv_params else None
        self.iteration = 0
        self.best: dict[str, Any] | None = None
        amp = tr.amp == "bf16" or (tr.amp == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        encoders: dict[str, Any] = dict(self.model.encoders.items())
        if tr.compile:
            encoders = {t: torch.compile(m) for t, m in encoders.items()}
        self.encode = lambda x: {t: encoders[t](x) for t in self.model.task_names}  # {task: (B, D)}
        # What the main step calls: encoders + classifiers, one DDP wrapper when distributed. Adversaries get
        # their own wrappers, used only where their gradients must be synchronised (adversary steps, and the
        # main step of single-pass objectives); elsewhere the plain modules run, with no gradient sync.
        self.main_net: nn.Module = _MainNet(self.model, self.encode)
        self.adv_plain: nn.Module = _AdvNet(self.model)
        self.adv_net: nn.Module = self.adv_plain
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device] if device.type == "cuda" else None
            self.main_net = DDP(self.main_net, device_ids=ids)
            if self.adv_params:
                self.adv_net = DDP(self.adv_plain, device_ids=ids)
        self.pair_classes = self.model.pair_classes

    # -- data ----------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next training batch on the device, randomly flipped when ``training.hflip``."""
        indices = self.stream.next()  # the global batch, identical on every rank
        flip = torch.rand(len(indices), generator=self.flip_rng) < 0.5  # (B,)
        rank, world = self.dist.rank, self.dist.world
        x, y = self.train_batches.get(indices[rank::world])  # this rank's slice (B / world)
        if self.experiment.training.hflip:
            x = torch.where(flip[rank::world, None, None, None], x.flip(-1), x)
        return x.to(self.device, non_blocking=True), {k: v.to(self.device) for k, v in y.items()}

    def _targets(self, y: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P, B) labels of each pair's target task, -1 where unlabelled."""
        return torch.stack([y[p.target] for p in self.model.pairs])

    # -- steps ---------------------------------------------------------------------------------------
    def _check_finite(self, terms: dict[str, torch.Tensor], step: str, pair_terms: torch.Tensor | None) -> None:
        named = dict(terms)
        if pair_terms is not None:  # name the pairs rather than their sum
            named.pop("adversaries", None)
            named.update({f"adv/{p.key}": v for p, v in zip(self.model.pairs, pair_terms, strict=True)})
        values = torch.stack([v.detach().float() for v in terms.values()])
        finite = bool(torch.isfinite(values).all())
        if not all_true(finite, self.dist, self.device):
            if finite:
                raise TrainingError(
                    f"iteration {self.iteration + 1}, {step} step: a loss term is not finite on another process; "
                    "the last good checkpoint is kept."
                )
            bad = [k for k, v in named.items() if not torch.isfinite(v.detach()).all()]
            names = ", ".join(repr(b) for b in bad)
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in named.items())
            raise TrainingError(
                f"iteration {self.iteration + 1}, {step} step: loss term{'s' if len(bad) > 1 else ''} {names} "
                f"{'are' if len(bad) > 1 else 'is'} not finite ({shown}). Lower the learning rate or lambda; the last "
                "good checkpoint is kept."
            )

    def main_step(self, lam: float) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One update of encoders and classifiers; returns metrics, detached features and labels."""
        model, tr, single = self.model, self.experiment.training, self.objective.single_pass
        model.train()
        x, y = self.next_batch()
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {"lambda": lam}
        # restored after the update: the main step leaves the adversaries' statistics untouched
        saved = None if single else _snapshot_buffers(model.adversaries)
        with _no_grad_params([] if single else self.adv_params), self.autocast():
            feats, logits = self.main_net(x)  # {task: (B, D)}, {task: (B, K)}
            for task in model.task_names:
                ce = masked_cross_entropy(logits[task].float(), y[task])
                if ce is None:  # nobody labelled: a zero term keeps every parameter in the graph (DDP needs it)
                    terms[f"task/{task}"] = logits[task].float().sum() * 0.0
                else:
                    terms[f"task/{task}"] = self.experiment.task(task).loss_weight * ce
                    mask = y[task] >= 0
                    metrics[f"acc/{task}"] = float((logits[task][mask].argmax(-1) == y[task][mask]).float().mean())
                    metrics[f"loss/{task}"] = float(ce.detach())
            pair_terms = None
            if model.pairs and (lam > 0 or single):
                weights = torch.tensor([lam * p.weight for p in model.pairs], device=x.device)  # (P,)
                targets, parts = self._targets(y), []  # (P, B), P-vectors of terms
                if self.objective.uses_adversaries:
                    net = self.adv_net if single else self.adv_plain  # no gradient sync for frozen adversaries
                    adv_logits = net(feats, self.objective.adversary_input, weights, y)  # (P, B, K_max)
                    parts.append(self.objective.encoder_terms(adv_logits, targets, weights, self.pair_classes))
                sources = [feats[p.source] for p in model.pairs]  # P x (B, D)
                own = torch.stack([y[p.source] for p in model.pairs])  # (P, B) the sources' own labels
                direct = self.objective.feature_terms(sources, targets, weights, self.pair_classes, own)
                if direct is not None:
                    parts.append(direct)
                if parts:
                    pair_terms = torch.stack(parts).sum(0)  # (P,)
                    terms["adversaries"] = pair_terms.sum()
        self._check_finite(terms, "main", pair_terms)
        self.main_opt.zero_grad(set_to_none=True)
        if single and self.adv_opt is not None:
            self.adv_opt.zero_grad(set_to_none=True)
        loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        if tr.l2 > 0:
            _add_l2_gradient(self.l2_main + (self.l2_adv if single else []), tr.l2)
        self.main_opt.step()
        if single and self.adv_opt is not None:
            self.adv_opt.step()
        if saved is not None:
            _restore_buffers(saved)
        metrics["loss/main"] = float(loss.detach())
        return metrics, {t: f.detach() for t, f in feats.items()}, y

    def adversary_step(
        self, feats: dict[str, torch.Tensor] | torch.Tensor | None, y: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """One update of the adversaries on detached features (fresh ones when ``feats`` is None).

        ``feats`` may be ``{task: (B, D)}`` or, to reuse one copy across steps, the model's stacked
        (P, B, D) adversary inputs.
        """
        model, tr = self.model, self.experiment.training
        assert self.adv_opt is not None
        model.train()
        if feats is None or y is None:
            x, y = self.next_batch()
            with torch.no_grad(), _frozen_buffers(model.encoders), self.autocast():
                feats = self.encode(x)
        targets = self._targets(y)  # (P, B)
        with self.autocast():
            logits = self.adv_net(feats, None, None, y).float()  # (P, B, K_max)
        pair_losses = self.objective.adversary_loss(logits, targets)  # (P,)
        terms = {"adversaries": pair_losses.sum()}
        self._check_finite(terms, "adversary", pair_losses)
        self.adv_opt.zero_grad(set_to_none=True)
        torch.stack(list(terms.values())).sum().backward()
        if tr.l2 > 0:
            _add_l2_gradient(self.l2_adv, tr.l2)
        self.adv_opt.step()
        labelled = targets >= 0
        correct = ((logits.detach().argmax(-1) == targets) & labelled).sum(1)  # (P,)
        counts = labelled.sum(1)
        accuracy = (correct / counts.clamp(min=1)).tolist()
        return {f"adv_acc/{p.key}": a for p, a, c in zip(model.pairs, accuracy, counts.tolist(), strict=True) if c}

    def reinitialise_adversaries(self) -> int:
        """Fresh weights for one ensemble member of every pair (round robin) and a restarted adversary optimiser.

        Called every ``adversary.reinit_every`` iterations; deterministic given the seed and the iteration, so
        resumed runs re-initialise exactly as uninterrupted ones. Returns the member re-initialised.
        """
        adv = self.experiment.adversary
        member = (self.iteration // adv.reinit_every - 1) % adv.ensemble
        names = [p.key for p in self.model.pairs if p.member == member]
        self.model.adversaries.reinitialise(names, seed=self.experiment.seed * 1_000_003 + self.iteration)
        if self.adv_opt is not None:
            self.adv_opt.state.clear()  # momentum / Adam moments of the old weights do not fit the new ones
        return member

    def iterate(self) -> dict[str, float]:
        """One iteration: a main step, then ``adversary.steps`` adversary steps."""
        adv, tr = self.experiment.adversary, self.experiment.training
        lam = adv.weight * lambda_schedule(adv.schedule, self.iteration, adv.warmup, tr.iterations)
        t0 = time.perf_counter()
        metrics, feats, y = self.main_step(lam)
        if adv.reinit_every and self.iteration and self.iteration % adv.reinit_every == 0 and self.model.pairs:
            metrics["adv_reinit"] = self.reinitialise_adversaries()  # then trained by this iteration's steps
        t1 = time.perf_counter()
        if self.adv_opt is not None:
            reuse = adv.features == "reuse"
            # reused features: stack the adversaries' inputs once for all k steps
            stacked = self.model.stack_adversary_inputs(feats, y) if reuse and adv.steps > 1 else None
            inputs = stacked if stacked is not None else feats
            for _ in range(adv.steps):
                metrics.update(self.adversary_step(inputs if reuse else None, y if reuse else None))
        self.iteration += 1
        metrics.update({"iteration": self.iteration, "time/main": t1 - t0, "time/adversary": time.perf_counter() - t1})
        return metrics

    # -- validation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """Per-task accuracy on the validation split (eval mode); ``score`` is their mean."""
        if self.val_batches is None:
            return None
        model, vb = self.model, self.val_batches
        limit = self.experiment.training.leakage_limit
        correct = {t: 0 for t in model.task_names}
        total = {t: 0 for t in model.task_names}
        kept: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}  # features, for leakage probes
        labels: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}
        was = model.training
        model.eval()
        try:
            for start in range(0, vb.n, 256):
                x, y = vb.get(torch.arange(start, min(start + 256, vb.n)))
                with self.autocast():
                    feats = self.encode(x.to(self.device))
                    logits = model.classify(feats)
                for t in model.task_names:
                    yt = y[t].to(self.device)
                    m = yt >= 0
                    correct[t] += int((logits[t][m].argmax(-1) == yt[m]).sum())
                    total[t] += int(m.sum())
                    if limit is not None:
                        kept[t].append(feats[t].float().cpu())
                        labels[t].append(y[t])
        finally:
            model.train(was)
        out = {f"val_acc/{t}": correct[t] / total[t] for t in model.task_names if total[t]}
        out["val_score"] = sum(out.values()) / max(len(out), 1)
        if limit is not None and model.pairs:
            leak = validation_leakage(
                {t: torch.cat(v) for t, v in kept.items()},
                {t: torch.cat(v) for t, v in labels.items()},
                [(p.source, p.target, self.experiment.task(p.target).n_classes) for p in model.pairs if p.member == 0],
                seed=self.experiment.seed,
            )
            out.update({f"val_leakage/{k}": v for k, v in leak.items()})
            out["val_leakage"] = max(leak.values(), default=0.0)
        return out

    def is_better(self, val: dict[str, Any]) -> bool:
        """Whether validation metrics ``val`` beat the best so far.

        Without ``training.leakage_limit``: higher ``val_score``. With it, a checkpoint within the limit beats
        one outside it; two within it compare by ``val_score``; two outside it by lower ``val_leakage``.
        """
        best, limit = self.best, self.experiment.training.leakage_limit
        if best is None:
            return True
        if limit is None or "val_leakage" not in val:
            return bool(val["val_score"] > best["val_score"])
        ok, best_ok = val["val_leakage"] <= limit, best.get("val_leakage", math.inf) <= limit
        if ok != best_ok:
            return ok
        return bool(val["val_score"] > best["val_score"]) if ok else bool(val["val_leakage"] < best["val_leakage"])

    # -- checkpoint state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: tensors and a JSON-able dict."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "experiment": json.loads(self.experiment.model_dump_json()),
            "input_shape": list(self.model.input_shape),
            "stream": self.stream.state_dict(),
            "best": self.best,
        }
        for name, opt in (("main", self.main_opt), ("adversary", self.adv_opt)):
            if opt is None:
                continue
            sd = opt.state_dict()
            opt_state: dict[str, dict[str, Any]] = {}  # tensors replaced by "<tensor>" markers
            for idx, slots in sd["state"].items():
                opt_state[str(idx)] = {}
                for slot, value in slots.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optim.{name}.{idx}.{slot}"] = value
                        opt_state[str(idx)][slot] = "<tensor>"
                    else:
                        opt_state[str(idx)][slot] = value
            state[f"optim_{name}"] = {"param_groups": sd["param_groups"], "state": opt_state}
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.flip"] = self.flip_rng.get_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], where: Path) -> None:
        """Restore what :meth:`state` saved."""
        model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{str(where)!r} does not fit this experiment's model: {exc}") from exc
        for name, opt in (("main", self.main_opt), ("adversary", self.adv_opt)):
            if opt is None:
                continue
            saved = state[f"optim_{name}"]
            opt_state = {
                int(idx): {
                    slot: (tensors[f"optim.{name}.{idx}.{slot}"] if value == "<tensor>" else value)
                    for slot, value in slots.items()
                }
                for idx, slots in saved["state"].items()
            }
            opt.load_state_dict({"state": opt_state, "param_groups": saved["param_groups"]})
        self.stream.load_state_dict(state["stream"])
        torch.set_rng_state(tensors["rng.torch"])
        self.flip_rng.set_state(tensors["rng.flip"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.iteration = int(state["iteration"])
        self.best = state.get("best")


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


def _first_shape(dataset: Any) -> tuple[int, int, int]:
    try:
        image = dataset[0][0]
        return tuple(image.shape)
    except Exception as exc:
        raise DataError(f"cannot infer input_shape from the first training sample: {exc}") from exc


def _specs_match(saved: dict[str, Any], experiment: Experiment) -> list[str]:
    """Fields that differ between a checkpoint's experiment and ``experiment`` (training length may change)."""
    current = json.loads(experiment.model_dump_json())
    saved = dict(saved)
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "training" and isinstance(a, dict) and isinstance(b, dict):
            a, b = {k: v for k, v in a.items() if k != "iterations"}, {k: v for k, v in b.items() if k != "iterations"}
        if a != b:
            diffs.append(key)
    return diffs


def train(
    experiment: Experiment,
    data: Any = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
    device: str | None = None,
) -> Run:
    """Train ``experiment``: per iteration one main step, then ``adversary.steps`` adversary steps.

    Args:
        experiment: The experiment.
        data: A Dataset (used as the training split), a mapping of split name to Dataset, or a
            :class:`~mtdisent.DataSource`; ``None`` builds the spec's ``data`` from the datasets registry.
        out_dir: Run directory for spec.json, metrics.jsonl, checkpoints and the final model; ``None``
            keeps everything in memory.
        resume: Continue from the latest valid checkpoint in ``out_dir`` (exactly: on CPU the result is
            bitwise equal to an uninterrupted run). Without it, an ``out_dir`` holding checkpoints is refused.
        quiet: No progress bar (metrics are still written to metrics.jsonl).
        device: Overrides ``training.device``.

    Returns:
        A :class:`Run` with the trained model.
    """
    if not isinstance(experiment, Experiment):
        raise SpecError(f"train expects an Experiment, got {type(experiment).__name__}")
    tr = experiment.training
    source = resolve_data(experiment, data)
    info, rank_device = setup(device or tr.device)
    try:
        return _train(
            experiment, source, out_dir, resume, quiet, rank_device or _resolve_device(device or tr.device), info
        )
    finally:
        teardown(info)


def _train(
    experiment: Experiment,
    source: DataSource,
    out_dir: str | Path | None,
    resume: bool,
    quiet: bool,
    dev: torch.device,
    info: DistInfo,
) -> Run:
    tr = experiment.training
    trainer = Trainer(experiment, source, dev, info)
    run_dir = Path(out_dir) if out_dir is not None else None
    main = info.is_main  # only rank 0 writes files and shows progress
    history: list[dict[str, Any]] = []
    if run_dir is not None:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        _barrier(info)
        latest = latest_checkpoint(run_dir)  # every rank reads the same checkpoint
        if resume and latest is not None:
            tensors, state = read_checkpoint(latest)
            diffs = _specs_match(state["experiment"], experiment)
            if diffs:
                raise CheckpointError(
                    f"cannot resume from {str(latest)!r}: the experiment differs in {', '.join(diffs)} "
                    "(only training.iterations may change on resume)"
                )
            trainer.load_state(tensors, state, latest)
        elif latest is not None and not resume:
            raise CheckpointError(
                f"{str(run_dir)!r} already holds checkpoints (latest {latest.name}); pass resume=True (--resume) "
                "to continue, or choose another out_dir"
            )
        _barrier(info)  # nobody writes before every rank has read
        if main:
            atomic_write_text(run_dir / "spec.json", experiment.model_dump_json(indent=1))
    files = run_dir if (run_dir is not None and main) else None
    writer = _TensorBoard(files) if (tr.tensorboard and files is not None) else None
    eval_every = tr.eval_every or tr.checkpoint_every
    best_state: dict[str, torch.Tensor] | None = None

    def checkpoint() -> None:
        if files is None:
            return
        tensors, state = trainer.state()
        write_checkpoint(files / "checkpoints" / f"iter-{trainer.iteration:08d}", tensors, state)
        prune_checkpoints(files, tr.keep_last)

    with (
        _GracefulStop() as stop,
        Progress(trainer.model, tr.iterations, start=trainer.iteration, quiet=quiet or not main) as progress,
    ):
        metrics_file = open(files / "metrics.jsonl", "a", encoding="utf-8") if files is not None else None
        try:
            while trainer.iteration < tr.iterations:
                metrics = trainer.iterate()
                it = trainer.iteration
                if it % eval_every == 0 or it == tr.iterations:
                    val = trainer.validate()
                    if val is not None:
                        metrics.update(val)
                        if trainer.is_better(val):
                            trainer.best = {"iteration": it, **val}
                            if run_dir is None:  # no directory to hold it: keep the weights in memory
                                best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                            if files is not None:
                                tensors, state = trainer.state()
                                write_checkpoint(files / "checkpoints" / "best", tensors, state)
                if it % tr.log_every == 0 or it == tr.iterations or "val_score" in metrics:
                    history.append(metrics)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(metrics) + "\n")
                        metrics_file.flush()
                    if writer is not None:
                        writer.log(metrics, it)
                progress.update(metrics)
                stopping = any_true(stop.received is not None, info, dev)  # every rank stops at the same iteration
                if it % tr.checkpoint_every == 0 or it == tr.iterations or stopping:
                    checkpoint()
                if stopping:
                    signum = stop.received or signal.SIGTERM
                    name = signal.Signals(signum).name
                    path = run_dir / "checkpoints" / f"iter-{it:08d}" if run_dir is not None else None
                    where = f"; checkpoint {str(path)!r}" if path is not None else ""
                    raise TrainingInterrupted(
                        f"stopped by {name} after iteration {it}{where}; train again with resume=True to continue",
                        int(signum),
                        it,
                        path,
                    )
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
    if info.enabled:  # DDP broadcasts buffers before each forward; align the statistics of the last one too
        for buffer in trainer.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    if files is not None:
        export_model(files, trainer.model, {"iteration": trainer.iteration, "best": trainer.best})
    _barrier(info)
    return Run(experiment, trainer.model, run_dir, trainer.iteration, history, trainer.best, best_state)


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        torch.distributed.barrier()


class _TensorBoard:
    """Optional TensorBoard logging; silently absent when tensorboard is not installed."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
