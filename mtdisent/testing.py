"""Conformance checks for plugin authors.

Run them on your own components::

    from mtdisent.testing import check_backbone, check_objective
    check_backbone("my_backbone", args={"width": 8})
    check_objective("my_objective")

or parametrise pytest over every registered component with :func:`backbone_names` /
:func:`objective_names`. Each check raises ``AssertionError`` with a message saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._heads import MLPHead
from ._model import build_backbone
from ._objectives import Objective
from ._registry import backbones, objectives
from ._spec import Component, HeadSpec

__all__ = ["check_backbone", "check_objective", "backbone_names", "objective_names"]


def backbone_names() -> list[str]:
    """Every registered backbone (for ``pytest.mark.parametrize``)."""
    return backbones.list()


def objective_names() -> list[str]:
    """Every registered objective (for ``pytest.mark.parametrize``)."""
    return objectives.list()


def _finite(t: torch.Tensor, what: str) -> None:
    assert torch.isfinite(t).all(), f"{what} contains NaN or inf"


def check_backbone(
    name: str,
    *,
    args: dict[str, Any] | None = None,
    in_channels: int = 1,
    input_size: tuple[int, int] = (32, 32),
    batch_size: int = 3,
    seed: int = 0,
) -> nn.Module:
    """Check the backbone contract: (B, C, H, W) -> (B, D), ``num_features`` honest, gradients everywhere, no NaN.

    Args:
        name: Registered backbone name.
        args: Factory arguments.
        in_channels: Image channels to build with.
        input_size: (H, W) of the test images.
        batch_size: Batch size of the test (>= 2, for BatchNorm).
        seed: Seed for weights and inputs.

    Returns:
        The built module, for further checks.
    """
    torch.manual_seed(seed)
    module = build_backbone(Component(name=name, args=args or {}), in_channels)
    x = torch.randn(batch_size, in_channels, *input_size)
    for mode in ("train", "eval"):
        module.train(mode == "train")
        out = module(x)
        assert isinstance(out, torch.Tensor), f"backbone {name!r} returned {type(out).__name__}, expected a Tensor"
        assert out.ndim == 2 and out.shape[0] == batch_size, (
            f"backbone {name!r} ({mode} mode) returned shape {tuple(out.shape)}; expected (B={batch_size}, D)"
        )
        _finite(out, f"backbone {name!r} output ({mode} mode)")
        declared = getattr(module, "num_features", None)
        if isinstance(declared, int):
            assert declared == out.shape[1], f"backbone {name!r}: num_features={declared} but D={out.shape[1]}"
    module.train()
    module.zero_grad(set_to_none=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"backbone {name!r}: parameters received no gradient: {missing[:10]}"
    for n, p in module.named_parameters():
        if p.grad is not None:
            _finite(p.grad, f"backbone {name!r} gradient of {n}")
    return module


def check_objective(
    name: str | Callable[..., Objective],
    *,
    args: dict[str, Any] | None = None,
    num_classes: int = 3,
    feature_dim: int = 8,
    batch_size: int = 6,
    seed: int = 0,
) -> Objective:
    """Check the objective contract: finite scalar terms, gradients to features and to every adversary weight.

    Args:
        name: Registered objective name, or the objective class itself.
        args: Constructor arguments.
        num_classes: Classes of the target task in the test.
        feature_dim: Feature size in the test.
        batch_size: Batch size of the test.
        seed: Seed.

    Returns:
        The objective instance.
    """
    torch.manual_seed(seed)
    factory = objectives.get(name) if isinstance(name, str) else name
    objective = factory(**(args or {}))
    assert isinstance(objective, Objective), f"objective {name!r} is not an mtdisent.Objective"
    adversary = MLPHead(feature_dim, num_classes, HeadSpec(hidden=[16]))
    z = torch.randn(batch_size, feature_dim, requires_grad=True)
    y = torch.arange(batch_size) % num_classes
    term = objective.encoder_term(adversary, z, y, 0.5)
    assert isinstance(term, torch.Tensor) and term.ndim == 0, f"objective {name!r}: encoder_term must be a scalar"
    _finite(term, f"objective {name!r} encoder_term")
    term.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0, (
        f"objective {name!r}: encoder_term gives no gradient to features"
    )
    _finite(z.grad, f"objective {name!r} feature gradient")
    zero = objective.encoder_term(adversary, z.detach(), y, 0.0)
    _finite(zero, f"objective {name!r} encoder_term at weight 0")
    adversary.zero_grad(set_to_none=True)
    loss = objective.adversary_loss(adversary(z.detach()), y)
    assert loss.ndim == 0, f"objective {name!r}: adversary_loss must be a scalar"
    _finite(loss, f"objective {name!r} adversary_loss")
    loss.backward()
    missing = [n for n, p in adversary.named_parameters() if p.grad is None]
    assert not missing, f"objective {name!r}: adversary parameters received no gradient: {missing}"
    return objective
