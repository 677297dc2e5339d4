"""The objective interface: how encoders oppose the adversaries.

An objective decides the encoder-side term of the main step for one adversary pair, and the loss the
adversaries minimise in their own steps. Concrete objectives are plugins (entry-point group
``mtdisent.objectives``); this module only defines the contract.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import ComponentError, did_you_mean

__all__ = ["Objective", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-scale`` in the backward pass."""
    return _GradReverse.apply(x, scale)


class Objective:
    """Base class of adversarial objectives.

    Subclasses override :meth:`encoder_term` (and optionally :meth:`adversary_loss`). Keyword arguments
    a subclass does not consume are rejected by name.

    Attributes:
        single_pass: If true, the main step's backward also trains the adversaries (gradient reversal):
            the engine steps the adversary optimiser after the main step as well.
    """

    single_pass: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            valid = list(getattr(type(self), "arguments", ()))
            names = ", ".join(repr(k) for k in sorted(kwargs))
            hint = " ".join(did_you_mean(k, valid) for k in sorted(kwargs)) if valid else "It takes no arguments."
            raise ComponentError(f"objective {type(self).__name__}: unknown argument(s) {names}. {hint}")

    def encoder_term(
        self, adversary: nn.Module, features: torch.Tensor, target: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """The term one pair adds to the main loss, already multiplied by ``weight``.

        Args:
            adversary: The adversary module (its weights are not updated by the main step unless
                ``single_pass``).
            features: (B, D) features of the source task, with gradient to the encoder.
            target: (B,) labels of the target task (only labelled samples are passed).
            weight: lambda times the pair's weight, possibly scheduled.

        Returns:
            A scalar tensor.
        """
        raise NotImplementedError

    def adversary_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss an adversary minimises in its own steps: cross-entropy by default."""
        return F.cross_entropy(logits, target)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in getattr(type(self), "arguments", ()))
        return f"{type(self).__name__}({args})"
