"""The objective interface: how encoders oppose the adversaries.

An objective decides what each adversary pair adds to the encoders' loss in the main step, and what the
adversaries minimise in their own steps. Concrete objectives are plugins (entry-point group
``mtdisent.objectives``); this module only defines the contract.

Adversary logits of all pairs travel together as one padded tensor ``(P, B, K_max)``: pair ``p`` has
``num_classes[p]`` real classes, the rest of its logits are ``-inf``; ``targets`` is ``(P, B)`` with ``-1``
for samples unlabelled for that pair's target task. A plugin implements the per-pair
:meth:`Objective.encoder_term`; the batched :meth:`Objective.encoder_terms` defaults to calling it per pair
and may be overridden with a vectorised version.

An objective may also penalise dependence directly, without an adversary: :meth:`Objective.feature_terms`
sees each pair's source features and target labels (an HSIC penalty, for example). One that sets
``uses_adversaries = False`` is not given adversary logits in the main step at all; the adversaries still
train in their own steps and then only monitor leakage.

An objective may instead change how the encoders' gradient is formed (``combines_gradients = True``, as the
gradient projection of Zhang, Lemoine & Mitchell 2018 does): the main step then takes two gradients per encoder,
one of the task losses and one of the adversarial pair terms, and the encoder follows
:meth:`Objective.combine_gradients` of the two. Objectives that leave it ``False`` cost nothing extra.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ._errors import signature_repr

__all__ = ["Objective", "grad_reverse", "masked_pair_cross_entropy"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-scale`` (broadcast) in the backward pass."""
    return _GradReverse.apply(x, scale)


def masked_pair_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair mean cross-entropy over labelled samples.

    Args:
        logits: (P, B, K) padded logits.
        targets: (P, B) class indices, -1 where unlabelled.

    Returns:
        ``(ce, labelled)``: (P,) mean cross-entropy (0 for a pair without labelled samples) and (P,) counts.
    """
    p, b, k = logits.shape
    ce = F.cross_entropy(logits.reshape(p * b, k).float(), targets.reshape(p * b), ignore_index=-1, reduction="none")
    labelled = (targets >= 0).sum(dim=1)  # (P,)
    return ce.view(p, b).sum(dim=1) / labelled.clamp(min=1), labelled


class Objective:
    """Base class of adversarial objectives.

    Subclasses override :meth:`encoder_term` (and optionally :meth:`encoder_terms`, :meth:`adversary_input`,
    :meth:`adversary_loss`, :meth:`feature_terms`, :meth:`combine_gradients`). A subclass's constructor arguments
    are its spec arguments (``{"name": "my_objective", "args": {...}}``); the registry rejects unknown ones by name,
    so a subclass declares them as keyword parameters of ``__init__`` and stores each under the same attribute name.

    Attributes:
        single_pass: If true, the main step's backward also trains the adversaries (gradient reversal):
            the engine steps the adversary optimiser after the main step as well.
        uses_adversaries: If false, the main step skips the adversaries (no :meth:`encoder_terms` call);
            the objective acts through :meth:`feature_terms` alone.
        combines_gradients: If true, the main step forms each encoder's gradient with :meth:`combine_gradients`
            from two gradients (task losses; adversarial pair terms) instead of back-propagating their sum. It
            cannot be combined with ``single_pass``.
    """

    single_pass: ClassVar[bool] = False
    uses_adversaries: bool = True
    combines_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        pass

    def adversary_input(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """What the adversaries see in the main step: the features themselves by default.

        Args:
            features: (P, B, D) source features of each pair, with gradient to the encoders.
            weights: (P, 1, 1) lambda times each pair's weight.
        """
        return features

    def encoder_term(self, logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """The term one pair adds to the main loss, already multiplied by ``weight``.

        Args:
            logits: (n, K) adversary logits of the samples labelled for the target task.
            target: (n,) their labels.
            weight: lambda times the pair's weight, possibly scheduled.

        Returns:
            A scalar tensor.
        """
        raise NotImplementedError

    def encoder_terms(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: list[int]
    ) -> torch.Tensor:
        """All pairs at once: (P, B, K_max) padded logits, (P, B) targets, (P,) weights -> (P,) terms.

        The default calls :meth:`encoder_term` for each pair with labelled samples (0 for the others).
        """
        terms = []
        for p, k in enumerate(num_classes):
            mask = targets[p] >= 0
            if bool(mask.any()):
                terms.append(self.encoder_term(logits[p, mask, :k], targets[p, mask], float(weights[p])))
            else:
                terms.append(logits[p].sum() * 0.0)  # keeps the pair's weights in the graph
        return torch.stack(terms)

    def feature_terms(
        self,
        features: list[torch.Tensor],
        targets: torch.Tensor,
        weights: torch.Tensor,
        num_classes: list[int],
        source_targets: torch.Tensor,
    ) -> torch.Tensor | None:
        """Terms computed from features and labels directly, added to the main loss; ``None`` by default.

        Args:
            features: P tensors (B, D_p): each pair's source features, with gradient to the encoders.
            targets: (P, B) labels of each pair's target task, -1 where unlabelled.
            weights: (P,) lambda times each pair's weight.
            num_classes: Classes of each pair's target task.
            source_targets: (P, B) labels of each pair's source task (for conditional penalties), -1 where
                unlabelled.

        Returns:
            (P,) terms, already weighted, or ``None``.
        """
        return None

    def combine_gradients(self, task: torch.Tensor, adversary: torch.Tensor) -> torch.Tensor:
        """One encoder's gradient from its two parts; called only when ``combines_gradients`` is true.

        The main step then takes, for each encoder (and each lever module with parameters) separately and over
        its whole parameter vector flattened in ``parameters()`` order:

        * ``task``: the gradient of the task losses (and of :meth:`feature_terms`, if any);
        * ``adversary``: the gradient of the sum of the pair terms :meth:`encoder_terms` returns, computed
          from the adversaries' main-step logits (weighted as that method weights them),

        and the module's gradient becomes what this returns; the classifier heads get their task gradient only.
        L2 regularisation is added afterwards and the optimiser steps as usual. The two gradients cost one extra
        backward pass from the adversaries' logits to the encoders. Under DDP both are averaged over the
        processes before this is called.

        Args:
            task: (n,) task gradient of one module.
            adversary: (n,) gradient of the adversarial terms for the same module (zeros when none reach it).

        Returns:
            (n,) the module's gradient. With a zero ``adversary`` it must return ``task`` unchanged
            (:func:`mtdisent.testing.check_objective` checks it). The default, ``task + adversary``, is what
            one backward pass of the summed loss gives.
        """
        return task + adversary

    def adversary_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What the adversaries minimise: (P, B, K_max), (P, B) -> (P,) cross-entropy per pair."""
        return masked_pair_cross_entropy(logits, targets)[0]

    def __repr__(self) -> str:
        return signature_repr(self)
