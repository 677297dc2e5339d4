"""The three first-party objectives: the paper's min-max, confusion, and gradient reversal.

Each implements the per-pair :meth:`encoder_term` (the reference) and a vectorised :meth:`encoder_terms`
over all pairs; the tests check that the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtdisent import Objective, grad_reverse
from mtdisent._objectives import masked_pair_cross_entropy

__all__ = ["MinMax", "Confusion", "GradientReversal"]


class MinMax(Objective):
    """The paper's objective: encoders maximise the adversaries' cross-entropy.

    Main loss term per pair: ``-weight * CE(A(z), y)``. Unbounded below: an encoder can win by making
    the adversary confidently wrong, which still encodes the label; see :class:`Confusion`.
    """

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """``-weight * CE(logits, target)``."""
        return -weight * F.cross_entropy(logits.float(), target)

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """Vectorised :meth:`encoder_term`."""
        return -weights * masked_pair_cross_entropy(logits, targets)[0]


class Confusion(Objective):
    """Encoders push each adversary's prediction toward the uniform distribution.

    Main loss term per pair: ``weight * CE(A(z), uniform)`` = ``-weight * mean_k log p_k`` over the samples
    labelled for the target task, minimal exactly when the prediction is uniform. Bounded, unlike
    :class:`MinMax`.
    """

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """``weight * CE(logits, uniform)``; ``target`` only selects the samples."""
        return -weight * F.log_softmax(logits.float(), dim=-1).mean()

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """Vectorised :meth:`encoder_term` (padded classes excluded)."""
        k = torch.tensor(num_classes, device=logits.device)  # (P,)
        valid = torch.arange(logits.shape[-1], device=logits.device)[None, :] < k[:, None]  # (P, K_max)
        log_p = F.log_softmax(logits.float(), dim=-1).masked_fill(~valid[:, None, :], 0.0)  # (P, B, K_max)
        per_sample = log_p.sum(-1) / k[:, None]  # (P, B) mean log-probability over real classes
        labelled = targets >= 0
        mean = (per_sample * labelled).sum(1) / labelled.sum(1).clamp(min=1)  # (P,)
        return -weights * mean


class GradientReversal(Objective):
    """DANN-style: one backward pass through a gradient-reversal layer trains encoders and adversaries.

    The adversaries see ``grad_reverse(z, weight)``: they minimise their cross-entropy while the encoders
    receive ``-weight`` times that gradient. Pair it with ``adversary.schedule="sigmoid"`` for DANN's ramp.
    """

    single_pass = True

    def adversary_input(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``grad_reverse(features, weights)``."""
        return grad_reverse(features, weights)

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """``CE(logits, target)``: the weight already sits in the reversal layer."""
        return F.cross_entropy(logits.float(), target)

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """Vectorised :meth:`encoder_term`."""
        return masked_pair_cross_entropy(logits, targets)[0]
