"""Intervention on a nuisance factor: a known image transform that changes one task's class and no other.

Where the user knows how a nuisance factor looks in the image (an acoustic shadow darkens a sector behind an
occluder; a background's polarity is inverted by negating a standardised image), training can be shown the
factor combinations the data never has: for a ``fraction`` of each main-step batch, images of task j's
``source`` classes are transformed to show its ``target`` class, labelled with it for task j, and keep every
other task's label. On ``fetal_us_sim``, an LVOT image without shadow given a synthetic shadow stays "LVOT":
an instance of the LVOT-with-shadow combination that the plane classifier (and the adversaries reading its
features) then train on. This is the "latent intervention" of del Río et al. (2025) done in image space with
the user's knowledge of the factor, and counterfactual data augmentation (Kaushik et al., 2020) for images.

How it differs from :class:`~mtdisent_plugins.levers.recombine.Recombine`: recombination searches for an image
the model's own task-j classifier calls c, which may fool that classifier without showing the factor (measured on
``shapes``: 96-98 % of its flips succeed, unseen accuracy stays at lambda = 0's). An intervention shows the
factor as the user defines it, so it is only as good as the transform: a shadow drawn unlike real shadows teaches
the classifiers that drawing.

Transforms: ``transform`` names a built-in (:data:`TRANSFORMS`: ``"negate"``, ``"shadow"``, ``"background"``) or a
user function as ``"package.module:function"``. A transform is called as ``fn(x, generator, **args)`` with the
chosen images ``x (n, C, H, W)`` and a seeded ``torch.Generator`` (CPU) for its random draws, and returns the
transformed images, same shape. It must not change ``x`` in place.

Decisions (as in ``Recombine``, and shared with it through ``_synthesis``): rows are drawn without replacement
among the samples labelled with a ``source`` class, with a generator seeded by the experiment's seed and the
number of main steps so far (a buffer the model checkpoints, so resumes are exact; the saved model holds that one
integer and does nothing at inference); ``mode="append"`` adds them to the batch (B grows by round(fraction * B)
at most), ``"replace"`` overwrites the chosen rows; only the main step's batch changes, so with
``adversary.features="reuse"`` the adversaries see the new samples too. Metrics: ``intervene/synthesised``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtdisent import ComponentError, Lever, did_you_mean

from ._synthesis import StepCount, check_common, next_step, splice, step_seed

if TYPE_CHECKING:
    from mtdisent import MultiTaskModel
    from mtdisent.engine import AdversarialStep

__all__ = ["Intervene", "TRANSFORMS", "background", "negate", "shadow"]

Range = tuple[float, float]


def negate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``-x``: inverts the polarity of per-image standardised images (a white background becomes black).

    For an image standardised per image, ``-standardise(v) == standardise(1 - v)``: exactly the image whose
    intensities in [0, 1] were inverted. On ``shapes`` (a 0.5 gray shape on a 0 or 1 background) that is the
    same shape on the other background. ``generator`` is unused (the transform is deterministic).
    """
    return -x


def _uniform(lo_hi: Range, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def shadow(
    x: torch.Tensor,
    generator: torch.Generator,
    apex: tuple[float, float] = (-0.15, 0.5),
    spread: float = 30.0,
    width: Range = (3.0, 10.0),
    depth: Range = (0.3, 0.7),
    strength: Range = (0.05, 0.4),
    sectors: tuple[int, int] = (1, 3),
    edge: float = 2.0,
) -> torch.Tensor:
    """Acoustic shadows: angular sectors, seen from a probe's apex, darkened beyond a depth.

    Each image gets ``sectors[0]..sectors[1]`` sectors. A sector has a centre angle uniform in ``[-spread +
    half width, spread - half width]`` degrees from straight down, a half width uniform in ``width`` degrees, and
    starts at a depth uniform in ``depth`` (fraction of the image height below the top row, measured from the
    apex). Beyond it, every pixel is pulled toward the image's darkest value (per channel) by a factor uniform in
    ``strength``: ``lo + (v - lo) * s`` (soft edges ``edge`` degrees wide across the beam, ``edge`` pixels along
    it). Works on standardised images (the darkest value is then the background outside the fan). This is a
    generic shadow drawn on finished images, not the simulator's physics (which attenuates the echo amplitude
    before log compression), so on ``fetal_us_sim`` it is a different drawing of the same factor.

    Args:
        x: Images ``(n, C, H, W)``.
        generator: Seeded CPU generator for every random draw.
        apex: Apex position as fractions of ``(H, W)`` (row, column); rows above the image are negative.
        spread: Half angle of the fan the sectors stay inside, in degrees.
        width: Range of a sector's half width, in degrees.
        depth: Range of the row (fraction of H) at which a sector's shadow starts, on its centre line.
        strength: Range of the remaining amplitude factor ``s`` (0: black; 1: no shadow).
        sectors: Least and most sectors per image.
        edge: Softness of the sector's edges (degrees across, pixels along the beam).
    """
    n, c, h, w = x.shape
    k = sectors[1]
    count = torch.randint(sectors[0], sectors[1] + 1, (n,), generator=generator)  # (n,)
    half = _uniform(width, (n, k), generator)  # (n, k) degrees
    centre = (2 * torch.rand((n, k), generator=generator) - 1) * (spread - half).clamp_min(0)  # (n, k)
    ar, ac = apex[0] * h, apex[1] * (w - 1)
    start = _uniform(depth, (n, k), generator) * h - ar  # (n, k) pixels from the apex
    s = _uniform(strength, (n, k), generator)  # (n, k)
    used = torch.arange(k)[None, :] < count[:, None]  # (n, k)
    rows = torch.arange(h, dtype=torch.float32)[:, None] - ar  # (h, 1)
    cols = torch.arange(w, dtype=torch.float32)[None, :] - ac  # (1, w)
    radius = torch.sqrt(rows**2 + cols**2)  # (h, w)
    theta = torch.rad2deg(torch.atan2(cols, rows))  # (h, w), 0 straight down
    e = max(float(edge), 1e-6)
    across = torch.sigmoid((half[..., None, None] - (theta - centre[..., None, None]).abs()) / e)  # (n, k, h, w)
    along = torch.sigmoid((radius - start[..., None, None]) / e)  # (n, k, h, w)
    gate = across * along * used[..., None, None]  # (n, k, h, w) 1 inside a shadow
    keep = (1 - (1 - s[..., None, None]) * gate).prod(1)  # (n, h, w) remaining amplitude
    lo = x.flatten(2).amin(2)[..., None, None]  # (n, C, 1, 1)
    return lo + (x - lo) * keep[:, None].to(x)


def background(x: torch.Tensor, generator: torch.Generator, level: float, tol: float = 1e-3) -> torch.Tensor:
    """The background set to ``level``: every pixel within ``tol`` of the image's darkest value (per channel).

    For images whose background is a flat region darker than anything drawn on it, in the image's own units
    (standardised units where the data is standardised: ``level = (v - mean) / std`` for a raw level ``v``). On
    ``shapes_n`` (background 0.0 or 0.3, shapes 0.4 and brighter, one global standardisation, no noise below
    K = 8) this is exactly the same image on the other background. ``generator`` is unused (deterministic).

    Args:
        x: Images ``(n, C, H, W)``.
        generator: Unused; part of the transform contract.
        level: The background's new value.
        tol: Pixels within this of the darkest value count as background.
    """
    lo = x.flatten(2).amin(2)[..., None, None]  # (n, C, 1, 1)
    return torch.where(x <= lo + tol, torch.full_like(x, float(level)), x)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {"negate": negate, "shadow": shadow, "background": background}
"""The built-in transforms, by the name ``Intervene(transform=...)`` takes."""


def _resolve(transform: str) -> Callable[..., torch.Tensor]:
    """A built-in name or ``"package.module:function"`` -> the function; one-line errors otherwise."""
    if ":" not in transform:
        if transform not in TRANSFORMS:
            hint = did_you_mean(transform, TRANSFORMS)
            raise ComponentError(f"transform={transform!r} is not a built-in. {hint} Or give 'package.module:function'")
        return TRANSFORMS[transform]
    module, _, name = transform.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ComponentError(f"transform={transform!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ComponentError(f"transform={transform!r} is not callable")
    return fn


class Intervene(Lever):
    """Show training the combinations it lacks: transform images of one task's classes into another of its classes.

    See the module docstring for what it does and why. Only :meth:`augment` acts in training; features and
    inference are unchanged.

    Args:
        task: The task whose factor the transform changes (the nuisance: ``"shadow"``, ``"background"``).
        transform: A built-in (``"negate"``, ``"shadow"``, ``"background"``) or ``"package.module:function"``.
        target: The class (name or index) of ``task`` the transformed images show.
        source: The classes (names or indices) the transform applies to; default every class but ``target``.
        args: Keyword arguments of the transform (its signature is checked when the lever is built).
        fraction: At most round(fraction * B) samples per batch are transformed, in (0, 1].
        mode: ``"append"`` them to the batch or ``"replace"`` the chosen rows with them.
        start: Main steps to wait before intervening (>= 0).
    """

    def __init__(
        self,
        task: str,
        transform: str,
        target: str | int,
        source: Sequence[str | int] | None = None,
        args: dict[str, Any] | None = None,
        fraction: float = 0.5,
        mode: str = "append",
        start: int = 0,
    ) -> None:
        check_common(fraction, mode, start)
        if not isinstance(task, str) or not task:
            raise ComponentError(f"task={task!r}; expected the name of the task whose factor the transform changes")
        if not isinstance(transform, str) or not transform:
            raise ComponentError(f"transform={transform!r}; expected a built-in name {sorted(TRANSFORMS)} or 'pkg:fn'")
        if args is not None and not isinstance(args, dict):
            raise ComponentError(f"args={args!r}; expected a mapping of the transform's keyword arguments")
        if source is not None and (isinstance(source, (str, int)) or not source):
            raise ComponentError(f"source={source!r}; expected None (every other class) or a non-empty list")
        self.task, self.transform, self.target, self.source = task, transform, target, source
        self.args = dict(args or {})
        self.fraction, self.mode, self.start = float(fraction), mode, start
        self.fn = _resolve(transform)
        self.target_index = -1  # set by build
        self.source_indices: list[int] = []
        self._count: StepCount | None = None
        self._metrics: dict[str, float] = {}
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, positions) of the last augment

    def build(self, model: MultiTaskModel) -> nn.Module:
        """Resolve the task and classes against the model's, check the transform's arguments, make the counter."""
        names = list(model.task_names)
        if self.task not in names:
            raise ComponentError(f"task={self.task!r} is not a task of the model. {did_you_mean(self.task, names)}")
        classes = list(model.experiment.task(self.task).classes or range(model.experiment.task(self.task).n_classes))

        def index(c: str | int, what: str) -> int:
            if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(classes):
                return c
            if isinstance(c, str) and c in classes:
                return classes.index(c)
            raise ComponentError(f"{what}={c!r} is not a class of task {self.task!r}; expected one of {classes}")

        self.target_index = index(self.target, "target")
        given = self.source if self.source is not None else [i for i in range(len(classes)) if i != self.target_index]
        self.source_indices = sorted({index(c, "source") for c in given})
        if self.target_index in self.source_indices:
            raise ComponentError(f"source={self.source!r} includes the target {self.target!r}; nothing would change")
        try:  # a wrong argument fails now, in one line, not at the first training step
            out = self.fn(torch.zeros(1, *model.input_shape), torch.Generator().manual_seed(0), **self.args)
        except TypeError as exc:
            raise ComponentError(f"transform={self.transform!r} with args={self.args!r}: {exc}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, *model.input_shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ComponentError(f"transform={self.transform!r} returned {got}; expected images of the input's shape")
        self._count = StepCount()
        return self._count

    def metrics(self) -> dict[str, float]:
        """``intervene/synthesised``: the samples transformed in the last main step."""
        return dict(self._metrics)

    def augment(
        self, step: AdversarialStep, x: torch.Tensor, y: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Transform the chosen samples of ``(x (B, C, H, W), {task: (B,)})``, relabel ``task``, append or replace."""
        count = next_step(self._count, "intervene")
        self._metrics, self.last = {}, None
        if count < self.start:
            return x, y
        g = torch.Generator().manual_seed(step_seed("intervene", int(step.experiment.seed), count))
        labels = y[self.task].detach().cpu()  # (B,)
        eligible = torch.isin(labels, torch.tensor(self.source_indices))  # (B,)
        b = x.shape[0]
        order = torch.randperm(b, generator=g)  # (B,)
        rows = order[eligible[order]][: min(b, math.floor(self.fraction * b + 0.5))]  # (n,)
        self._metrics = {"intervene/synthesised": float(len(rows))}
        if len(rows) == 0:
            return x, y
        with torch.no_grad():
            x_new = self.fn(x[rows.to(x.device)].detach(), g, **self.args)  # (n, C, H, W)
        y_new = {k: v[rows.to(v.device)].clone() for k, v in y.items()}  # every task keeps its label but one
        y_new[self.task].fill_(self.target_index)
        x_out, y_out, positions = splice(x, y, rows, x_new.to(x), y_new, self.mode)
        self.last = (rows, positions)
        return x_out, y_out
