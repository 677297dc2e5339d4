"""The three first-party objectives: the paper's min-max, confusion, and gradient reversal."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtdisent import Objective, grad_reverse

__all__ = ["MinMax", "Confusion", "GradientReversal"]


class MinMax(Objective):
    """The paper's objective: encoders maximise the adversaries' cross-entropy.

    Main loss term per pair: ``-weight * CE(A(z), y)``. Unbounded below: an encoder can win by making
    the adversary confidently wrong, which still encodes the label; see :class:`Confusion`.
    """

    def encoder_term(
        self, adversary: nn.Module, features: torch.Tensor, target: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """``-weight * CE(adversary(features), target)``."""
        return -weight * F.cross_entropy(adversary(features), target)


class Confusion(Objective):
    """Encoders push each adversary's prediction toward the uniform distribution.

    Main loss term per pair: ``weight * CE(A(z), uniform)`` = ``-weight * mean_k log p_k``, minimal
    exactly when the adversary's prediction is uniform. Bounded, unlike :class:`MinMax`.
    """

    def encoder_term(
        self, adversary: nn.Module, features: torch.Tensor, target: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """``weight * CE(adversary(features), uniform)``; ``target`` is not used."""
        log_p = F.log_softmax(adversary(features), dim=-1)  # (B, K)
        return -weight * log_p.mean()


class GradientReversal(Objective):
    """DANN-style: one backward pass through a gradient-reversal layer trains encoders and adversaries.

    The adversary sees ``grad_reverse(z, weight)``: it minimises its cross-entropy while the encoder
    receives ``-weight`` times that gradient. Pair it with ``adversary.schedule="sigmoid"`` for DANN's ramp.
    """

    single_pass = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def encoder_term(
        self, adversary: nn.Module, features: torch.Tensor, target: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """``CE(adversary(grad_reverse(features, weight)), target)``."""
        return F.cross_entropy(adversary(grad_reverse(features, weight)), target)
