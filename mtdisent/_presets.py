"""Named experiment presets, starting points a user adjusts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._errors import UnknownComponentError, did_you_mean
from ._spec import Experiment

__all__ = ["preset", "presets"]


def _paper_synthetic(scale: float = 0.25, **overrides: Any) -> Experiment:
    """The paper's synthetic experiment with its public code's hyper-parameters.

    Two tasks (background colour, shape), DLTK residual encoder (8, 16, 32, 64), heads
    Dense(256) -> BN -> ReLU -> Dense, lambda 0.01, Adam(lr 1e-5, betas (0, 0.9), eps 1e-5), SGD with
    momentum 0.9 at the same rate for 3 adversary steps on fresh batches, L2 1e-5, 10,010 iterations,
    batch 50, random horizontal flips. ``scale`` shrinks the 224 x 288 images (0.25 gives 56 x 72).
    """
    # half-up to multiples of 8, the rule the ``shapes`` dataset uses (Python's round() is half-to-even)
    h, w = (8 * math.floor(base * scale / 8 + 0.5) for base in (224, 288))
    spec: dict[str, Any] = {
        "name": "paper_synthetic",
        "tasks": [
            {"name": "background", "classes": ["black", "white"]},
            {"name": "shape", "classes": ["circle", "rectangle"]},
        ],
        "backbone": {"name": "dltk_residual", "args": {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}},
        "input_shape": (1, h, w),
        "head": {"hidden": [256]},
        "adversary": {
            "objective": "minmax",
            "weight": 0.01,
            "steps": 3,
            "features": "fresh",
            "head": {"hidden": [256]},
            # the paper's single, unconditional adversary per ordered pair (the library's defaults differ)
            "ensemble": 1,
            "reinit_every": 0,
            "conditional": False,
            "layout": "pair",
        },
        "training": {
            "iterations": 10010,
            "batch_size": 50,
            "optimizer": {"name": "adam", "lr": 1e-5, "betas": (0.0, 0.9), "eps": 1e-5},
            "adversary_optimizer": {"name": "sgd", "lr": 1e-5, "momentum": 0.9},
            "l2": 1e-5,
            "hflip": True,
        },
    }
    return Experiment.model_validate(_overridden(spec, overrides))


def _paper_fetal_us(**overrides: Any) -> Experiment:
    """The paper's two-task fetal-ultrasound configuration: plane (3 classes) and shadow (2 classes).

    The plane classifier has three dense layers and the shadow classifier two, as in the paper; images
    are 1 x 224 x 288.
    """
    base = _paper_synthetic(scale=1.0).model_dump()
    base.update(
        name="paper_fetal_us",
        tasks=[
            {"name": "plane", "classes": ["3VV", "LVOT", "Abd"], "head": {"hidden": [256, 256]}},
            {"name": "shadow", "classes": ["without", "with"], "head": {"hidden": [256]}},
        ],
    )
    base["adversary"]["steps"] = 5
    return Experiment.model_validate(_overridden(base, overrides))


def _fetal_us_cpu(
    seed: int = 0, scale: float = 1.0, image_size: tuple[int, int] = (64, 80), iterations: int = 800, **overrides: Any
) -> Experiment:
    """The paper's two-task fetal-US experiment on ``fetal_us_sim``, sized for a CPU (measured in FETAL_SETUP.md).

    Table 1's counts at ``scale`` (1.0: the full 2,000 training images) at 64 x 80; the paper's heads (plane
    classifier three dense layers, shadow two), here without BatchNorm; ``dltk_residual`` with two residual
    units per scale (six in all, as the paper's text has it), globally pooled features and BatchNorm momentum
    0.1; Adam 3e-4 for ``iterations``; the training split under random whole-pixel shifts of up to 6 pixels.
    With lambda = 0 this learns the plane task (seen test accuracy 0.95 for seeds 0 and 1) and still takes the
    shortcut (LVOT with shadow 0.25-0.28), as the paper's baseline does. The adversaries are the library's.
    """
    head = {"hidden": [256], "batchnorm": False}
    spec: dict[str, Any] = {
        "name": "fetal_us_cpu",
        "tasks": [
            {"name": "plane", "classes": ["3VV", "LVOT", "Abd"], "head": {**head, "hidden": [256, 256]}},
            {"name": "shadow", "classes": ["without", "with"], "head": head},
        ],
        "backbone": {
            "name": "dltk_residual",
            "args": {"filters": [8, 16, 32, 64], "units_per_scale": 2, "output": "pool", "bn_momentum": 0.1},
        },
        "input_shape": (1, *image_size),
        "head": head,
        "data": {
            "name": "fetal_us_sim",
            "args": {"scale": scale, "image_size": list(image_size), "seed": seed, "train_shift": 6},
        },
        "training": {
            "iterations": iterations,
            "optimizer": {"name": "adam", "lr": 3e-4},
            "checkpoint_every": iterations,
        },
        "seed": seed,
    }
    return Experiment.model_validate(_overridden(spec, overrides))


def _overridden(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides`` applied, a dict merged into the section (or sub-section) it names.

    So ``adversary={"weight": 0.1}`` keeps the rest of the preset's adversary; a component (``{"name": ...}``)
    naming another component, a component's ``args`` (its keyword arguments, a whole), and any other value (a list,
    a spec object) replace what was there.
    """
    out = dict(spec)
    for key, value in overrides.items():
        old = out.get(key)
        # a component's args are one call's keyword arguments: merged, they could mix settings that belong together
        if key != "args" and isinstance(value, dict) and isinstance(old, dict):
            if value.get("name", old.get("name")) == old.get("name"):
                value = _overridden(old, value)
        out[key] = value
    return out


presets: dict[str, Callable[..., Experiment]] = {
    "paper_synthetic": _paper_synthetic,
    "paper_fetal_us": _paper_fetal_us,
    "fetal_us_cpu": _fetal_us_cpu,
}


def preset(name: str, **kwargs: Any) -> Experiment:
    """Build the named preset experiment; keyword arguments override its fields (or ``scale``, ``seed``, ...).

    A dict merges into the section it names (``md.preset("paper_synthetic", adversary={"weight": 0.1})`` keeps
    the paper's other adversary settings, its per-pair layout included); a component naming another component
    (``backbone={"name": "timm", ...}``), a component's ``args``, a list or a spec object replaces what was there.
    """
    if name not in presets:
        raise UnknownComponentError(f"Unknown preset {name!r}. {did_you_mean(name, presets)}")
    return presets[name](**kwargs)
