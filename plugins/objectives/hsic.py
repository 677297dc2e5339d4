"""A dependence penalty that needs no adversary: normalised HSIC between features and another task's labels.

For a pair (i, j) and the B samples of a batch labelled for task j, with K the kernel matrix of task i's
features and L = Y Y^T that of task j's one-hot labels, both double-centred (Kc = H K H)::

    nHSIC = <Kc, Lc> / (|Kc| |Lc|)          (Frobenius; the kernel alignment of Gretton et al. / CKA)

It lies in [0, 1] and is 0 when, within the batch, the features' similarity structure carries nothing of the
labels. With the Gaussian kernel (bandwidth from the median heuristic, not differentiated) it sees non-linear
dependence an adversary of limited capacity can miss, and it cannot be fooled by the encoder "hiding" from
one particular classifier: it is a property of the features alone. Being a batch estimate, it has a small
positive bias for independent variables (of order 1 / B).

``conditional=True`` (the default) measures it within each class of task i's own labels and averages by
class size: z_i independent of y_j *given* y_i. This matters when the factors are correlated in the training
data, as they are whenever disentanglement is needed: if circles are always on white, features that encode
the shape and nothing else still predict the background, so the marginal penalty can only be met by
forgetting the shape. The conditional one asks exactly for "nothing about j beyond what task i itself
implies" (equalised-odds style), which a perfect shape feature satisfies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtdisent import ComponentError, Objective

__all__ = ["HSIC", "normalised_hsic"]

_ADVERSARIAL = ("minmax", "confusion")


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H for H = I - 11^T / n: (n, n) -> (n, n)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def normalised_hsic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, kernel: str = "gaussian"
) -> torch.Tensor:
    """Normalised HSIC between ``features`` (n, D) and class ``labels`` (n,), differentiable in the features.

    Args:
        features: (n, D) features.
        labels: (n,) class indices in ``[0, num_classes)``.
        num_classes: Classes of the labels.
        kernel: ``"gaussian"`` (median-heuristic bandwidth) or ``"linear"`` on the features.

    Returns:
        A scalar in [0, 1]; 0 when fewer than two samples or a single class is present.
    """
    z = features.float()
    if kernel == "linear":
        k = z @ z.t()  # (n, n)
    else:
        sq = (z * z).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.t()).clamp_min(0.0)  # (n, n) squared distances
        n = z.shape[0]
        off = d2.detach()[~torch.eye(n, dtype=torch.bool, device=z.device)]
        bandwidth = off.median().clamp_min(1e-12) if off.numel() else d2.new_tensor(1.0)
        k = torch.exp(-d2 / bandwidth)
    y = F.one_hot(labels, num_classes).float()  # (n, K)
    kc, lc = _centre(k), _centre(y @ y.t())
    return (kc * lc).sum() / (kc.norm() * lc.norm()).clamp_min(1e-12)


class HSIC(Objective):
    """Penalise normalised HSIC between each pair's source features and its target labels.

    Main loss term per pair: ``weight * hsic_weight * nHSIC(z_i, y_j)``, optionally plus an adversarial term.

    Args:
        kernel: ``"gaussian"`` (default; non-linear dependence) or ``"linear"`` kernel on the features.
        adversary: ``None`` (HSIC alone: the adversaries still train in their own steps but only monitor
            leakage; set ``adversary.steps=0`` to skip them), or ``"minmax"`` / ``"confusion"`` to add that
            adversarial term as well.
        hsic_weight: Multiplier of the HSIC term relative to lambda (the adversarial term gets lambda).
        conditional: Measure dependence within each class of the source task's own labels (default), or
            over the whole batch (``False``: marginal independence).
        min_group: Smallest class group (samples) that contributes in the conditional form.
    """

    def __init__(
        self,
        kernel: str = "gaussian",
        adversary: str | None = None,
        hsic_weight: float = 1.0,
        conditional: bool = True,
        min_group: int = 4,
    ) -> None:
        super().__init__()
        if kernel not in ("gaussian", "linear"):
            raise ComponentError(f"kernel={kernel!r}; expected 'gaussian' or 'linear'")
        if adversary is not None and adversary not in _ADVERSARIAL:
            raise ComponentError(f"adversary={adversary!r}; expected None, 'minmax' or 'confusion'")
        if not isinstance(hsic_weight, (int, float)) or hsic_weight < 0:
            raise ComponentError(f"hsic_weight={hsic_weight!r}; expected a number >= 0")
        if not isinstance(min_group, int) or min_group < 2:
            raise ComponentError(f"min_group={min_group!r}; expected an integer >= 2")
        self.kernel, self.adversary, self.hsic_weight = kernel, adversary, float(hsic_weight)
        self.conditional, self.min_group = bool(conditional), min_group
        self.uses_adversaries = adversary is not None
        self._adversarial: Objective | None = None
        if adversary is not None:
            from .adversarial import Confusion, MinMax

            self._adversarial = MinMax() if adversary == "minmax" else Confusion()

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """The adversarial term of ``adversary`` (never called when there is none)."""
        if self._adversarial is None:
            return logits.sum() * 0.0
        return self._adversarial.encoder_term(logits, target, weight)

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """Vectorised :meth:`encoder_term`."""
        if self._adversarial is None:
            return logits.new_zeros(logits.shape[0])
        return self._adversarial.encoder_terms(logits, targets, weights, num_classes)

    def feature_terms(
        self,
        features: list[torch.Tensor],
        targets: torch.Tensor,
        weights: torch.Tensor,
        num_classes: list[int],
        source_targets: torch.Tensor,
    ) -> torch.Tensor:
        """``weights * hsic_weight * nHSIC`` per pair, over the samples labelled for the pair's target.

        Conditional: the class-size-weighted mean of nHSIC within each class of the source's own labels
        (groups smaller than ``min_group`` and unlabelled samples left out).
        """
        terms = []
        for z, y, own, k in zip(features, targets, source_targets, num_classes, strict=True):
            zero = z.float().sum() * 0.0  # keeps the encoder in the graph when nothing counts
            if not self.conditional:
                mask = y >= 0
                terms.append(normalised_hsic(z[mask], y[mask], k, self.kernel) if int(mask.sum()) >= 2 else zero)
                continue
            total, count = zero, 0
            for c in torch.unique(own[own >= 0]).tolist():
                group = (own == c) & (y >= 0)
                n = int(group.sum())
                if n >= self.min_group:
                    total = total + n * normalised_hsic(z[group], y[group], k, self.kernel)
                    count += n
            terms.append(total / count if count else total)
        return weights * self.hsic_weight * torch.stack(terms)
