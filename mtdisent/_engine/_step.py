"""The step contract: what one training iteration does, and the paper's adversarial step.

A :class:`Step` owns its optimisers and its per-iteration logic (in the manner of DomainBed's
``Algorithm.update``): :meth:`Step.update` runs one iteration and returns its metrics; :meth:`Step.state_dict` /
:meth:`Step.load_state_dict` carry everything it needs to continue exactly. The loop only calls these.

:class:`AdversarialStep` is the default: one main step, then ``adversary.steps`` (k) adversary steps.

Main step (encoders + classifiers; adversary weights untouched)::

    sum_i w_i CE(C_i(z_i), y_i) + sum_(i,j) objective terms (lambda_t * lambda_ij) + l2 * |W|^2

For the paper's ``minmax`` objective the pair term is ``-lambda CE(A_ij(z_i), y_j)``. An objective with
``combines_gradients`` (``projection``) is not back-propagated as one sum: two ``torch.autograd.grad`` calls give,
per encoder (and lever module), the gradient of the task terms and that of the adversarial pair terms, and
``objective.combine_gradients`` of the two flattened vectors becomes the encoder's gradient (classifiers: the task
gradient); L2 and the optimiser follow as usual. Adversary steps minimise
``sum_(i,j) CE(A_ij(z_i), y_j) + l2 * |W_adv|^2`` on detached features: the main step's (``features="reuse"``)
or a fresh batch encoded without gradients (``features="fresh"``). Every ``adversary.reinit_every`` iterations
one ensemble member per pair gets fresh weights.

BatchNorm: every step runs in train mode. The adversaries' running statistics are restored after the main
step, so it leaves the adversaries exactly as they were; fresh adversary passes restore the encoders' running
statistics, so those see each main-step batch exactly once, whatever k is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ComponentError, MtdisentError, SpecError
from .._model import MultiTaskModel, map_features
from .._objectives import Objective
from .._spec import Experiment
from ._distributed import all_true
from ._gram import gram_applicable, gram_steps
from ._setup import Setup, build_optimizer
from ._stream import TrainFeed

__all__ = ["Step", "AdversarialStep", "TrainingError", "lambda_schedule", "masked_cross_entropy"]


class TrainingError(MtdisentError):
    """Training cannot go on (a non-finite loss, for example); the last good checkpoint stays."""


class Step:
    """The contract of one training iteration. Subclass it to change what an iteration does.

    The loop calls :meth:`update` once per iteration with the 0-based iteration index, logs the returned
    metrics, and saves :meth:`state_dict` in checkpoints (tensors anywhere inside are stored in safetensors,
    the rest as JSON) to hand back to :meth:`load_state_dict` on resume.
    """

    def update(self, iteration: int) -> dict[str, float]:
        """Run iteration ``iteration`` (0-based); return its metrics (``{"loss/main": ..., ...}``)."""
        raise NotImplementedError

    def augment(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What this step does to a training batch ``(x (B, C, H, W), {task: (B,)})`` before its forward.

        The engine replays it on the training split when it recomputes BatchNorm statistics
        (``training.batchnorm_stats="recompute"``), so the statistics are those of the batches training
        normalised (the adversaries' too: with ``adversary.features="fresh"`` their steps trained on other,
        unchanged batches, so theirs are then an approximation); what it changes in the levers is put back
        afterwards. Default: no change.
        """
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model weights needed to continue exactly (optimiser states, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


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


def _undonated() -> contextlib.AbstractContextManager[Any]:
    """While compiled encoders are first traced: a backward that keeps its saved tensors (``retain_graph``).

    torch.compile (AOTAutograd, torch >= 2.6) may "donate" the buffers saved for the backward pass, which then
    refuses ``retain_graph=True``; the setting is read when the training graph is compiled, in the main step.
    """
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "donated_buffer"):
        return contextlib.nullcontext()
    return cast(contextlib.AbstractContextManager[Any], functorch_config.patch(donated_buffer=False))


def _filled(grads: list[torch.Tensor | None], params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Gradients with zeros where a parameter got none."""
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]


def _all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average every tensor over the processes (one flat all-reduce), as DDP averages gradients."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    return [v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)]


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore the module's buffers (BatchNorm running statistics) when the block ends."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


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


class AdversarialStep(Step):
    """The paper's iteration, generalised to N tasks: one main step, then k adversary steps.

    Args:
        model: The multi-task model (on ``setup.device``).
        experiment: Its experiment (adversary and training settings).
        objective: The objective plugin: what the encoders add to their loss for each adversary pair.
        setup: Device, mixed precision and the (DDP-wrapped) modules to call.
        feed: Where training batches come from.

    Attributes:
        main_optimizer: Optimiser of the encoders and classifiers (``training.optimizer``).
        adversary_optimizer: Optimiser of the adversaries (``training.adversary_optimizer``), ``None`` without any.
    """

    def __init__(
        self, model: MultiTaskModel, experiment: Experiment, objective: Objective, setup: Setup, feed: TrainFeed
    ) -> None:
        tr = experiment.training
        self.model, self.experiment, self.objective, self.setup, self.feed = model, experiment, objective, setup, feed
        self.main_params, self.adversary_params = model.main_parameters(), model.adversary_parameters()
        self.l2_main, self.l2_adv = model.l2_parameters("main"), model.l2_parameters("adversary")
        self.main_optimizer = build_optimizer(tr.optimizer, self.main_params)
        self.adversary_optimizer = (
            build_optimizer(tr.adversary_optimizer, self.adversary_params) if self.adversary_params else None
        )
        self._iteration = 0  # of the current update, for messages
        self.combine = type(objective).combines_gradients
        if self.combine and type(objective).single_pass:
            raise ComponentError(
                f"objective {experiment.adversary.objective.name!r} sets both single_pass and combines_gradients; "
                "an objective that combines the encoders' gradients cannot also train the adversaries in the main step"
            )
        # what combine_gradients acts on, each over its own flattened parameters: the encoders, the levers' modules
        self._groups: list[tuple[str, list[nn.Parameter]]] = [
            *((t, list(model.encoders[t].parameters())) for t in model.task_names),
            *((f"lever{k}", list(m.parameters())) for k, m in model.lever_modules.items()),
        ]
        overridden = type(objective).adversary_input is not Objective.adversary_input
        self._transform = objective.adversary_input if overridden else None
        if overridden and experiment.adversary.layout == "source":  # one transform per network: one weight
            for source in model.task_names:
                weights = {p.key: p.weight for p in model.pairs if p.source == source}
                if len(set(weights.values())) > 1:
                    raise SpecError(
                        f"pairs: objective {experiment.adversary.objective.name!r} transforms each adversary "
                        f"network's input with its pairs' weight, and adversary.layout 'source' gives task "
                        f"{source!r} one network whose pairs have different weights ({weights}); give them one "
                        "weight or use layout 'pair' or 'pair_shared'"
                    )
        # exact (B, B) algebra for the k steps on reused features, where it is exact (see _gram.py)
        mode = experiment.execution.adversary_steps
        self.gram = mode != "plain" and experiment.adversary.features == "reuse" and gram_applicable(self)
        if mode == "gram" and not self.gram:
            raise SpecError(
                "execution.adversary_steps: 'gram' needs adversary.features='reuse', stacked heads with one "
                "feature size and an SGD adversary optimiser without Nesterov or dampening; use 'auto'"
            )
        for stack in model.adversaries._stacks if self.gram else []:
            stack.keep_first = True  # the main step's X W_0 starts the steps when they read the same X and W
        self._main_inputs: torch.Tensor | None = None  # the main step's stacked adversary inputs, detached

    def augment(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The levers' :meth:`~mtdisent.Lever.augment`, in spec order."""
        for lever in self.model.levers:
            x, y = lever.augment(self, x, y)
        return x, y

    # -- helpers -------------------------------------------------------------------------------------
    def _targets(self, y: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P, B) labels of each pair's target task, -1 where unlabelled."""
        return torch.stack([y[p.target] for p in self.model.pairs])

    def _check_finite(self, terms: dict[str, torch.Tensor], step: str, pair_terms: torch.Tensor | None) -> None:
        named = dict(terms)
        if pair_terms is not None:  # name the pairs rather than their sum
            named.pop("adversaries", None)
            named.update({f"adv/{p.key}": v for p, v in zip(self.model.pairs, pair_terms, strict=True)})
        values = torch.stack([v.detach().float() for v in terms.values()])
        finite = bool(torch.isfinite(values).all())
        if all_true(finite, self.setup.dist, self.setup.device):
            return
        where = f"iteration {self._iteration + 1}, {step} step"
        if finite:
            raise TrainingError(
                f"{where}: a loss term is not finite on another process; the last good checkpoint is kept."
            )
        bad = [k for k, v in named.items() if not torch.isfinite(v.detach()).all()]
        names = ", ".join(repr(b) for b in bad)
        shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in named.items())
        plural = len(bad) > 1
        raise TrainingError(
            f"{where}: loss term{'s' if plural else ''} {names} {'are' if plural else 'is'} not finite ({shown}). "
            "Lower the learning rate or lambda; the last good checkpoint is kept."
        )

    # -- the two steps -------------------------------------------------------------------------------
    def main_step(self, lam: float) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One update of encoders and classifiers on a new batch; returns metrics, detached features and labels."""
        model, tr, single, setup = self.model, self.experiment.training, self.objective.single_pass, self.setup
        model.train()
        x, y = self.augment(*self.feed.next())
        metrics: dict[str, float] = {"lambda": lam}
        for lever in model.levers:
            metrics.update(lever.metrics())
        terms: dict[str, torch.Tensor] = {}
        adversaries_frozen = contextlib.nullcontext() if single else _frozen_buffers(model.adversaries)
        # combined gradients are averaged over processes by hand (DDP's hooks see no .backward())
        manual_sync = self.combine and setup.dist.enabled
        unsynced = cast(Any, setup.main_net).no_sync() if manual_sync else contextlib.nullcontext()
        # two gradient passes retain the graph, which compiled encoders allow only without donated buffers
        retained = _undonated() if self.combine and tr.compile else contextlib.nullcontext()
        with adversaries_frozen, unsynced:  # the main step leaves the adversaries' BatchNorm statistics untouched
            with _no_grad_params([] if single else self.adversary_params), setup.autocast(), retained:
                feats, logits = setup.main_net(x, y)  # {task: (B, D)}, {task: (B, K)}
                for task in model.task_names:
                    ce = masked_cross_entropy(logits[task].float(), y[task])
                    if ce is None:  # nobody labelled: a zero term keeps every parameter in the graph (DDP needs it)
                        terms[f"task/{task}"] = logits[task].float().sum() * 0.0
                    else:
                        terms[f"task/{task}"] = self.experiment.task(task).loss_weight * ce
                        mask = y[task] >= 0
                        metrics[f"acc/{task}"] = float((logits[task][mask].argmax(-1) == y[task][mask]).float().mean())
                        metrics[f"loss/{task}"] = float(ce.detach())
                adversarial, direct = (None, None)
                if model.pairs and (lam > 0 or single):
                    adversarial, direct = self._pair_parts(feats, y, lam)
                parts = [v for v in (adversarial, direct) if v is not None]
                pair_terms = torch.stack(parts).sum(0) if parts else None  # (P,)
                if pair_terms is not None:
                    terms["adversaries"] = pair_terms.sum()
            self._check_finite(terms, "main", pair_terms)
            self.main_optimizer.zero_grad(set_to_none=True)
            if single and self.adversary_optimizer is not None:
                self.adversary_optimizer.zero_grad(set_to_none=True)
            loss = torch.stack(list(terms.values())).sum()
            if self.combine:
                rest = [v for k, v in terms.items() if k != "adversaries"]  # the task terms, then any direct ones
                rest += [direct.sum()] if direct is not None else []
                metrics.update(self._combined_backward(torch.stack(rest).sum(), adversarial))
            else:
                loss.backward()
            if tr.l2 > 0:
                _add_l2_gradient(self.l2_main + (self.l2_adv if single else []), tr.l2)
            self.main_optimizer.step()
            if single and self.adversary_optimizer is not None:
                self.adversary_optimizer.step()
        metrics["loss/main"] = float(loss.detach())
        return metrics, map_features(feats, torch.Tensor.detach), y

    def _combined_backward(self, task_loss: torch.Tensor, adversarial: torch.Tensor | None) -> dict[str, float]:
        """Set ``.grad`` of the main parameters for an objective with ``combines_gradients``.

        Two ``torch.autograd.grad`` calls: the adversarial pair terms to the encoders (and lever modules), then the
        task terms to every main parameter. Each encoder's gradient is ``objective.combine_gradients`` of its two
        flattened gradients; the classifiers keep the task gradient. Returns ``{"grad_cos/<task>": ...}``, the
        cosine between each encoder's two gradients (0 when either is zero).
        """
        groups = [(name, [p for p in params if p.requires_grad]) for name, params in self._groups]
        upstream = [p for _, params in groups for p in params]
        seen = {id(p) for p in upstream}
        params = upstream + [p for p in self.main_params if p.requires_grad and id(p) not in seen]
        g_adv: list[torch.Tensor | None] = [None] * len(upstream)
        if adversarial is not None and adversarial.requires_grad and upstream:
            g_adv = list(torch.autograd.grad(adversarial.sum(), upstream, retain_graph=True, allow_unused=True))
        g_task: list[torch.Tensor | None] = list(torch.autograd.grad(task_loss, params, allow_unused=True))
        if self.setup.dist.enabled:  # average over processes, as DDP would have
            g_task = list(_all_reduce_mean(_filled(g_task, params)))
            g_adv = list(_all_reduce_mean(_filled(g_adv, upstream)))
        for p, g in zip(params[len(upstream) :], g_task[len(upstream) :], strict=True):
            p.grad = g
        cosines: dict[str, torch.Tensor] = {}
        start = 0
        for name, members in groups:
            t_parts, a_parts = g_task[start : start + len(members)], g_adv[start : start + len(members)]
            start += len(members)
            if all(g is None for g in t_parts) and all(g is None for g in a_parts):
                continue  # nothing reached this module: no gradient, as a plain backward would leave it
            task = torch.cat([g.reshape(-1) for g in _filled(t_parts, members)])  # (n,)
            adv = torch.cat([g.reshape(-1) for g in _filled(a_parts, members)])  # (n,)
            combined = self.objective.combine_gradients(task, adv)  # (n,)
            if combined.shape != task.shape:
                raise MtdisentError(
                    f"objective {self.experiment.adversary.objective.name!r}: combine_gradients returned shape "
                    f"{tuple(combined.shape)} for a gradient of shape {tuple(task.shape)}; it must keep the shape"
                )
            for p, g in zip(members, torch.split(combined, [p.numel() for p in members]), strict=True):
                p.grad = g.view_as(p).to(p.dtype)
            if name in self.model.encoders:
                norms = task.norm() * adv.norm()
                cosines[name] = task.dot(adv) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        if not cosines:
            return {}
        values = torch.stack(list(cosines.values())).tolist()  # one host sync for all encoders
        return {f"grad_cos/{name}": v for name, v in zip(cosines, values, strict=True)}

    def _pair_parts(
        self, feats: dict[str, torch.Tensor], y: dict[str, torch.Tensor], lam: float
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P,) each adversary pair's adversarial term (``encoder_terms``) and direct term (``feature_terms``)."""
        model, single = self.model, self.objective.single_pass
        weights = torch.tensor([lam * p.weight for p in model.pairs], device=self.setup.device)  # (P,)
        targets = self._targets(y)  # (P, B)
        adversarial = None
        if self.objective.uses_adversaries:
            net = self.setup.adversaries if single else self.setup.adversaries_plain  # no sync for frozen ones
            # (G, B, D) for stacked heads (None where widths differ); the reused steps read it too. Separate heads
            # take their inputs one by one (indexing one stack would cost a full-size gradient per head)
            stacked = model.stack_adversary_inputs(feats, y) if model.adversaries.stacked else None
            if stacked is not None and self.experiment.adversary.features == "reuse":  # fresh: freed with the graph
                self._main_inputs = stacked.detach()
            adv_logits = net(feats if stacked is None else stacked, self._transform, weights, y)  # (P, B, K_max)
            adversarial = self.objective.encoder_terms(adv_logits, targets, weights, model.pair_classes)
        sources = [feats[p.source] for p in model.pairs]  # P x (B, D)
        own = torch.stack([y[p.source] for p in model.pairs])  # (P, B) the sources' own labels
        direct = self.objective.feature_terms(sources, targets, weights, model.pair_classes, own)
        return adversarial, direct

    def _pair_terms(
        self, feats: dict[str, torch.Tensor], y: dict[str, torch.Tensor], lam: float
    ) -> torch.Tensor | None:
        """(P,) what each adversary pair adds to the main loss: the objective's adversarial and direct terms."""
        parts = [v for v in self._pair_parts(feats, y, lam) if v is not None]
        return torch.stack(parts).sum(0) if parts else None  # (P,)

    def adversary_step(
        self, feats: dict[str, torch.Tensor] | torch.Tensor | None, y: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """One update of the adversaries on detached features (a fresh batch when ``feats`` is None).

        ``feats`` may be ``{task: (B, D)}`` or, to reuse one copy across steps, the model's stacked
        (P, B, D) adversary inputs.
        """
        model, tr, setup = self.model, self.experiment.training, self.setup
        if self.adversary_optimizer is None:
            raise MtdisentError("this experiment has no adversaries to train")
        model.train()
        if feats is None or y is None:
            x, y = self.feed.next()
            with torch.no_grad(), _frozen_buffers(model.encoders), setup.autocast():
                feats = setup.encode(x)
        targets = self._targets(y)  # (P, B)
        with setup.autocast():
            logits = setup.adversaries(feats, None, None, y).float()  # (P, B, K_max)
        pair_losses = self.objective.adversary_loss(logits, targets)  # (P,)
        terms = {"adversaries": pair_losses.sum()}
        self._check_finite(terms, "adversary", pair_losses)
        self.adversary_optimizer.zero_grad(set_to_none=True)
        terms["adversaries"].backward()
        if tr.l2 > 0:
            _add_l2_gradient(self.l2_adv, tr.l2)
        self.adversary_optimizer.step()
        return self._adversary_accuracy(logits.detach(), targets)

    def _adversary_accuracy(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """``{"adv_acc/<pair>": accuracy}`` of (P, B, K_max) logits on (P, B) targets (labelled samples only)."""
        labelled = targets >= 0
        correct = ((logits.argmax(-1) == targets) & labelled).sum(1)  # (P,)
        counts = labelled.sum(1)
        accuracy = (correct / counts.clamp(min=1)).tolist()
        pairs = self.model.pairs
        return {f"adv_acc/{p.key}": a for p, a, c in zip(pairs, accuracy, counts.tolist(), strict=True) if c}

    def reinitialise_adversaries(self, iteration: int) -> int:
        """Fresh weights for one ensemble member of every pair (round robin) and a restarted adversary optimiser.

        Due every ``adversary.reinit_every`` iterations; deterministic given the seed and the iteration, so
        resumed runs re-initialise exactly as uninterrupted ones. Returns the member re-initialised.
        """
        adv = self.experiment.adversary
        member = (iteration // adv.reinit_every - 1) % adv.ensemble
        self.model.reinitialise_adversaries(member, seed=self.experiment.seed * 1_000_003 + iteration)
        if self.adversary_optimizer is not None:
            self.adversary_optimizer.state.clear()  # momentum / Adam moments of the old weights do not fit the new
        return member

    # -- the contract ----------------------------------------------------------------------------------
    def update(self, iteration: int) -> dict[str, float]:
        """One iteration: a main step, then ``adversary.steps`` adversary steps."""
        adv, tr = self.experiment.adversary, self.experiment.training
        self._iteration = iteration
        lam = adv.weight * lambda_schedule(adv.schedule, iteration, adv.warmup, tr.iterations)
        t0 = time.perf_counter()
        self._main_inputs = None
        metrics, feats, y = self.main_step(lam)
        if adv.reinit_every and iteration and iteration % adv.reinit_every == 0 and self.model.pairs:
            metrics["adv_reinit"] = self.reinitialise_adversaries(iteration)  # then trained by this iteration's steps
        t1 = time.perf_counter()
        if self.adversary_optimizer is not None:
            reuse = adv.features == "reuse"
            # reused features: stack the adversaries' inputs once for all k steps
            stacked = self._main_inputs if reuse else None
            if stacked is None and reuse and adv.steps > 1:
                stacked = self.model.stack_adversary_inputs(feats, y)
            if self.gram and adv.steps > 0:
                heads = stacked if stacked is not None else self.model.adversary_inputs(feats, y)
                metrics.update(gram_steps(self, heads, y, adv.steps))
            else:
                inputs = stacked if stacked is not None else feats
                for _ in range(adv.steps):
                    metrics.update(self.adversary_step(inputs if reuse else None, y if reuse else None))
        metrics.update({"time/main": t1 - t0, "time/adversary": time.perf_counter() - t1})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """The optimisers' states."""
        state: dict[str, Any] = {"optimizer": self.main_optimizer.state_dict()}
        if self.adversary_optimizer is not None:
            state["adversary_optimizer"] = self.adversary_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimisers' states."""
        self.main_optimizer.load_state_dict(state["optimizer"])
        if self.adversary_optimizer is not None:
            self.adversary_optimizer.load_state_dict(state["adversary_optimizer"])
