"""Recombination of factors in image space: synthesise factor combinations training never shows.

For a ``fraction`` of each main-step batch the lever picks one task j to flip and a target class c != y_j, then
perturbs the image along the input gradient of task j's own classifier, C_j(E_j(x)), toward c::

    x <- x - step_size * sign(grad_x CE(C_j(E_j(x)), c))            (norm="sign")
    x <- x - step_size * grad / rms(grad)                            (norm="l2": per-pixel RMS of the step = step_size)

for at most ``steps`` steps, each sample stopping as soon as C_j predicts c, optionally kept within ``epsilon``
of the original image (L_inf). The synthesised sample keeps every other task's label and is labelled c for task
j when the flip succeeded. On ``shapes`` with j = background, a circle on white pushed until the background
classifier reads "black" stays labelled "circle": an approximation of the circle-on-black combination training
never shows, that the shape classifier (and the adversaries' encoders) then train on.

Decisions (each documented where it acts):

* **The attack sees what inference sees.** The model is put in eval mode for it (BatchNorm reads its running
  statistics; none is updated), the levers' feature transforms run on task j's features alone (``labels=None``,
  as at inference), gradients are taken with ``torch.autograd.grad`` with respect to the images only, so no
  parameter's ``.grad`` is written, and every module's train/eval mode is restored afterwards. It runs on the
  model's own modules, not on the compiled or DDP-wrapped ones (no gradient synchronisation, no recompilation).
* **Failed flips are kept, with task j unlabelled (-1).** The perturbed image still shows the other factors, so
  their labels still hold; it is not known to show class c, nor any longer y_j. Keeping it (rather than dropping
  it) keeps the batch size fixed from step to step. A sample C_j already calls c before any step counts as
  failed too: nothing was changed, so labelling it c would only copy the classifier's mistake.
* **Appended by default** (``mode="append"``): every real sample is still trained on, and the main step's batch
  grows from B to B + round(fraction * B) (its cost grows by the same share). ``mode="replace"`` overwrites the
  chosen samples instead, keeping B. Under DDP every process applies this to its own slice (B / world samples),
  so every process adds the same count and the global batch stays a multiple of the world size; only a batch
  whose samples lack labels for every flippable task can make the counts differ (then fewer are chosen), which
  DDP tolerates (each process's gradient is averaged with equal weight).
* **Seeded and resumable.** Which samples, which task and which target come from a generator seeded by the
  experiment's seed and the number of main steps so far. That count lives in a buffer of a module the lever
  builds, so checkpoints carry it and a resumed run draws exactly what the uninterrupted run would have (the
  saved model holds this one integer too; it does nothing at inference). The draws are the same on every DDP
  process; each process applies them to its own samples.
* **Only the main step's batch is changed.** With ``adversary.features="reuse"`` the adversaries also train on
  the synthesised samples (with the labels above); with ``"fresh"`` they see unaltered batches.
* **Logged.** :meth:`Recombine.metrics` gives ``recombine/synthesised`` (samples synthesised this step) and
  ``recombine/flipped`` (the share whose flip succeeded), logged with the main step's metrics; ``last`` keeps the
  last step's choices (:class:`Synthesis`).

**Feature space: not implemented.** The issue also asks for recombination in feature space: a classifier must
keep task i's label when the other tasks' features come from another sample. In this architecture that
constraint is empty. C_i reads only z_i = E_i(x), and the adversary A_ij reads only z_i (plus, when
conditional, y_i), so replacing z_j (j != i) by another sample's changes nothing that any loss term sees:
every gradient and every prediction is identical. DisEnt (Lee et al., 2021), where swapping works, has one
classifier read the concatenation [z_intrinsic, z_bias]; here there is no such joint reader. Recombining
*inside* z_i is not defined either: z_i is not partitioned into a "task i part" and a "task j part", so there
is no component to swap. The remaining candidate, mixing z_i of two samples that share y_i but differ in y_j,
cannot reach an absent combination: on ``shapes`` no circle is ever on black, so every circle's z_i was
computed from a circle on white, and a mixture of such features is still a feature of circles on white. A
feature-space variant would need a model change (a joint classifier over all tasks' features, or encoders
whose output is partitioned by factor), not a lever; image space is where a new combination can be made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtdisent import ComponentError, Lever
from mtdisent._torch import eval_mode

from ._synthesis import StepCount, check_common, next_step, splice, step_seed

if TYPE_CHECKING:
    from mtdisent import MultiTaskModel
    from mtdisent.engine import AdversarialStep

__all__ = ["Recombine", "Synthesis"]

_NORMS = ("sign", "l2")


class Synthesis(NamedTuple):
    """What one augment synthesised (tensors on the CPU, one row per synthesised sample, n rows).

    Attributes:
        rows: (n,) the positions in the incoming batch of the samples perturbed.
        tasks: (n,) the flipped task of each, as an index into ``Recombine.flip_tasks``.
        targets: (n,) the class each was pushed toward.
        flipped: (n,) bool, whether C_j predicts the target on the returned image (then task j is labelled
            with it; otherwise -1).
        positions: (n,) where each synthesised sample is in the returned batch.
    """

    rows: torch.Tensor
    tasks: torch.Tensor
    targets: torch.Tensor
    flipped: torch.Tensor
    positions: torch.Tensor


class Recombine(Lever):
    """Synthesise unseen factor combinations by flipping one task's classifier with input-gradient steps.

    See the module docstring for what it does and why. Only :meth:`augment` acts in training; features and
    inference are unchanged.

    Args:
        fraction: Share of each main-step batch to synthesise from, in (0, 1]: round(fraction * B) samples.
        tasks: The tasks that may be flipped (default: all). Flip only the nuisance (``["background"]`` on
            ``shapes``) to synthesise new combinations for the other tasks without training a task on its own
            classifier's adversarial examples.
        steps: Most gradient steps per sample (>= 1); a sample stops as soon as C_j predicts the target.
        step_size: Size of each step (> 0), in the images' units (per-pixel change for ``norm="sign"``,
            per-pixel root-mean-square for ``norm="l2"``). The ``shapes`` images are standardised per image,
            so 0.1 is a tenth of an image's standard deviation.
        norm: ``"sign"`` (signed gradient, an L_inf step) or ``"l2"`` (gradient normalised per sample).
        epsilon: Bound of the total change per pixel (L_inf, > 0), or ``None`` for none. Images are not clipped
            to a value range: after per-image standardisation there is none to clip to.
        mode: ``"append"`` the synthesised samples to the batch (B grows by round(fraction * B)) or
            ``"replace"`` the chosen samples with them (B kept).
        start: Main steps to wait before synthesising (>= 0): flipping a classifier that has not learnt its task
            yet synthesises nothing meaningful.
    """

    def __init__(
        self,
        fraction: float = 0.5,
        tasks: Sequence[str] | None = None,
        steps: int = 10,
        step_size: float = 0.1,
        norm: str = "sign",
        epsilon: float | None = None,
        mode: str = "append",
        start: int = 0,
    ) -> None:
        check_common(fraction, mode, start)
        names_ok = isinstance(tasks, Sequence) and not isinstance(tasks, str) and all(isinstance(t, str) for t in tasks)
        if tasks is not None and not (names_ok and tasks):
            raise ComponentError(f"tasks={tasks!r}; expected None (every task) or a non-empty list of task names")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ComponentError(f"steps={steps!r}; expected an integer >= 1")
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
            raise ComponentError(f"step_size={step_size!r}; expected a number > 0")
        if norm not in _NORMS:
            raise ComponentError(f"norm={norm!r}; expected 'sign' or 'l2'")
        if epsilon is not None and (
            isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0
        ):
            raise ComponentError(f"epsilon={epsilon!r}; expected None (unbounded) or a number > 0")
        self.fraction, self.tasks, self.steps, self.step_size = float(fraction), tasks, steps, float(step_size)
        self.norm, self.epsilon, self.mode, self.start = norm, epsilon, mode, start
        self.flip_tasks: list[str] = []  # set by build: the tasks that may be flipped, in the model's order
        self._classes: list[int] = []
        self._count: StepCount | None = None
        self._metrics: dict[str, float] = {}
        self.last: Synthesis | None = None

    def build(self, model: MultiTaskModel) -> nn.Module:
        """Check ``tasks`` against the model's and make the step counter (a buffer the model checkpoints)."""
        names = list(model.task_names)
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in names]
            if unknown:
                raise ComponentError(f"tasks={list(self.tasks)!r}: unknown {unknown!r}; expected names among {names}")
        chosen = set(self.tasks) if self.tasks is not None else set(names)
        self.flip_tasks = [t for t in names if t in chosen]
        self._classes = [model.experiment.task(t).n_classes for t in self.flip_tasks]
        single = [t for t, k in zip(self.flip_tasks, self._classes, strict=True) if k < 2]
        if single:
            raise ComponentError(f"tasks: {single!r} have a single class, so there is no other class to flip to")
        self._count = StepCount()
        return self._count

    def metrics(self) -> dict[str, float]:
        """``recombine/synthesised`` (samples) and ``recombine/flipped`` (their share flipped) of the last step."""
        return dict(self._metrics)

    # -- the hook --------------------------------------------------------------------------------------
    def augment(
        self, step: AdversarialStep, x: torch.Tensor, y: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Synthesise from a ``fraction`` of ``(x (B, C, H, W), {task: (B,)})`` and append or substitute them.

        Uses ``step.model``, ``step.experiment.seed`` and ``step.setup.autocast``. Leaves the model's
        parameters, their gradients, its BatchNorm statistics and its train/eval modes as they were; advances
        the lever's step counter by one.
        """
        count = next_step(self._count, "recombine")
        self._metrics, self.last = {}, None
        if count < self.start:
            return x, y
        seed = step_seed("recombine", int(step.experiment.seed), count)
        rows, tasks, targets = self._draw(x.shape[0], y, seed)  # (n,) each
        n, device = len(rows), x.device
        self._metrics = {"recombine/synthesised": float(n), "recombine/flipped": 0.0}
        if n == 0:
            return x, y
        x_new = x[rows.to(device)].detach().clone()  # (n, C, H, W)
        flipped = torch.zeros(n, dtype=torch.bool)
        with eval_mode(step.model), torch.enable_grad():
            for t, task in enumerate(self.flip_tasks):
                sel = (tasks == t).nonzero().squeeze(1)  # (m,)
                if len(sel):
                    at = sel.to(device)
                    x_new[at], ok = self._flip(
                        step.model, task, x_new[at], targets[sel].to(device), step.setup.autocast
                    )
                    flipped[sel] = ok.cpu()
        y_new = {k: v[rows.to(v.device)].clone() for k, v in y.items()}  # every task keeps its label ...
        for t, task in enumerate(self.flip_tasks):  # ... but the flipped one: the target, or -1 where it failed
            mine = tasks == t
            label = torch.where(flipped[mine], targets[mine], torch.full_like(targets[mine], -1))
            y_new[task][mine.to(y_new[task].device)] = label.to(y_new[task])
        x_out, y_out, positions = splice(x, y, rows, x_new, y_new, self.mode)
        self._metrics["recombine/flipped"] = float(flipped.float().mean())
        self.last = Synthesis(rows, tasks, targets, flipped, positions)
        return x_out, y_out

    def _draw(self, b: int, y: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The seeded choices for a batch of ``b``: rows (n,), the task to flip (n,, into ``flip_tasks``), targets (n,).

        Rows are drawn without replacement among the samples labelled for at least one flippable task; each
        row's task uniformly among its labelled flippable tasks; its target uniformly among the other classes.
        """
        generator = torch.Generator().manual_seed(seed)
        known = torch.stack([y[t].detach().cpu() >= 0 for t in self.flip_tasks], 1)  # (B, T)
        order = torch.randperm(b, generator=generator)  # (B,)
        rows = order[known[order].any(1)][: min(b, math.floor(self.fraction * b + 0.5))]  # (n,)
        n = len(rows)
        options = known[rows]  # (n, T)
        count = options.sum(1)  # (n,) >= 1
        pick = torch.minimum((torch.rand(n, generator=generator) * count).long(), count - 1)  # (n,) the pick-th known
        tasks = ((options.long().cumsum(1) == (pick + 1)[:, None]) & options).long().argmax(1)  # (n,)
        classes = torch.tensor(self._classes, dtype=torch.long)[tasks]  # (n,)
        labels = torch.stack([y[t].detach().cpu() for t in self.flip_tasks], 1)[rows, tasks]  # (n,)
        shift = 1 + torch.minimum((torch.rand(n, generator=generator) * (classes - 1)).long(), classes - 2)
        return rows, tasks, (labels + shift) % classes

    # -- the attack ------------------------------------------------------------------------------------
    @staticmethod
    def _logits(model: MultiTaskModel, task: str, x: torch.Tensor) -> torch.Tensor:
        """C_task(levers(E_task(x))): (m, C, H, W) -> (m, K), what inference computes for that task."""
        z = model.apply_levers({task: model.encoders[task](x)})  # {task: (m, D)}
        return model.classifiers[task](z[task])

    def _flip(
        self, model: MultiTaskModel, task: str, x0: torch.Tensor, target: torch.Tensor, autocast: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Push images ``x0`` (m, C, H, W) until C_task predicts ``target`` (m,); returns the images and success (m,).

        Eval mode is the caller's. The loss is summed over samples, so each sample's gradient is its own (eval
        BatchNorm makes samples independent), and samples stop independently.
        """
        x = x0.detach().clone()
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)  # (m,) still moving
        moved = torch.zeros_like(active)  # (m,) took at least one step
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)  # (a,)
            xa = x[idx].requires_grad_(True)
            with autocast():
                logits = self._logits(model, task, xa).float()  # (a, K)
            reached = logits.argmax(-1) == target[idx]  # (a,)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, target[idx], reduction="sum"), xa)
            if self.norm == "sign":
                direction = grad.sign()
            else:  # per-sample RMS 1, so step_size is the RMS change per pixel
                rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)  # (a,)
                direction = grad / rms.view(-1, *([1] * (grad.ndim - 1)))
            go = ~reached
            new = xa.detach() - self.step_size * direction * go.view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)
            if self.epsilon is not None:
                base = x0[idx]
                new = torch.maximum(torch.minimum(new, base + self.epsilon), base - self.epsilon)
            x[idx] = new.to(x.dtype)
            moved[idx] |= go
            active[idx[reached]] = False
            if not bool(active.any()):
                break
        with torch.no_grad(), autocast():
            success = self._logits(model, task, x).float().argmax(-1) == target  # judged on the returned images
        return x, success & moved
