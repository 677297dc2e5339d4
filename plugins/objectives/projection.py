"""Gradient projection (Zhang, Lemoine & Mitchell 2018, "Mitigating unwanted biases with adversarial learning").

The encoders do not add an adversarial term to their loss; their update direction is formed from two gradients.
Per encoder i, over its whole parameter vector flattened, with ``g_task`` the gradient of the task losses and
``g_adv`` the gradient of the adversaries' own loss (their cross-entropy on z_i, what they minimise)::

    direction = g_task - proj_{g_adv}(g_task) - alpha * g_adv,        proj_a(g) = (g . a / |a|^2) a

The projection removes the part of the task gradient that lies along ``g_adv``, so to first order the task part
of the step leaves the adversaries' loss unchanged (it cannot help them); ``-alpha * g_adv`` then moves the
encoder up the adversaries' loss. The classifier heads get their task gradient only. AIF360's
``AdversarialDebiasing`` implements the same update for one protected attribute; here every encoder is projected
against all the adversaries that read it (every target task, every ensemble member), with conditional
adversaries, ensembles and every adversary layout as for the other objectives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mtdisent import ComponentError, Objective
from mtdisent._objectives import masked_pair_cross_entropy

__all__ = ["Projection", "project_out"]


def project_out(task: torch.Tensor, adversary: torch.Tensor, alpha: float) -> torch.Tensor:
    """``task - proj_adversary(task) - alpha * adversary`` for flat vectors (n,); ``task`` when ``adversary`` is 0.

    Args:
        task: (n,) task gradient.
        adversary: (n,) gradient of the adversaries' loss.
        alpha: Weight of the step up the adversaries' loss.
    """
    norm2 = adversary.dot(adversary)
    coefficient = task.dot(adversary) / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)  # 0 / tiny = 0 for a = 0
    return task - (coefficient + alpha) * adversary


class Projection(Objective):
    """The encoder update without the component of the task gradient that helps the adversaries.

    ``g_adv`` is the gradient of the sum over the encoder's adversary pairs of ``c_p * CE(A_p(z), y_target)``;
    the projection itself does not depend on the scale of ``g_adv``, only ``alpha * g_adv`` does.

    Args:
        alpha: Weight of ``-g_adv`` in the update (>= 0; 0 only projects). Zhang et al. suggest growing it
            during training (``adversary.schedule`` does when ``pair_weights`` is true).
        pair_weights: True (default): ``c_p`` is lambda_t times the pair's weight, as for the other objectives
            (``adversary.weight``, its schedule, ``Pair.weight`` and ``1 / adversary.ensemble``), so the effective
            coefficient of ``g_adv`` is ``alpha * lambda_t``. False: ``c_p = 1``, the adversaries' own unweighted
            loss; ``alpha`` is then Zhang's alpha directly and lambda only switches the adversarial part on (the
            main step skips the adversaries while lambda_t is 0, as for every objective).
    """

    combines_gradients = True

    def __init__(self, alpha: float = 1.0, pair_weights: bool = True) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ComponentError(f"alpha={alpha!r}; expected a finite number >= 0")
        if not isinstance(pair_weights, bool):
            raise ComponentError(f"pair_weights={pair_weights!r}; expected true or false")
        self.alpha, self.pair_weights = float(alpha), pair_weights

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """The pair's part of the adversaries' loss: ``weight * CE`` (``CE`` without ``pair_weights``).

        Not a loss the encoders minimise: its gradient is ``g_adv``, which :meth:`combine_gradients` opposes.
        """
        ce = F.cross_entropy(logits.float(), target)
        return weight * ce if self.pair_weights else ce

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """Vectorised :meth:`encoder_term`."""
        ce = masked_pair_cross_entropy(logits, targets)[0]  # (P,)
        return weights * ce if self.pair_weights else ce

    def combine_gradients(self, task: torch.Tensor, adversary: torch.Tensor) -> torch.Tensor:
        """``task - proj_adversary(task) - alpha * adversary`` (:func:`project_out`)."""
        return project_out(task, adversary, self.alpha)
