"""Exact shortcut for the k adversary steps on reused features: the first layer through the Gram matrix.

With ``adversary.features="reuse"`` the k adversary steps of an iteration read the same inputs: X (B, D) for each
adversary network (stacked: X (G, B, D)). Under SGD with momentum mu, learning rate eta and a coefficient c on
the weights (c = 2 * training.l2 + the optimiser's weight_decay), the first layer's weight W (D, H) and its
momentum buffer m move only within span{W_0, m_0, rows of X}. With Delta_t = dL/d(X W_t) (B, H)::

    m_{t+1} = mu m_t + X^T Delta_t + c W_t,        W_{t+1} = W_t - eta m_{t+1}

and, multiplied by X, for A_t = X W_t and M_t = X m_t (B, H) and the Gram matrix K = X X^T (B, B)::

    M_{t+1} = mu M_t + K Delta_t + c A_t,          A_{t+1} = A_t - eta M_{t+1}.

So the k steps need only (B, B) and (B, H) products, and W and m are materialised once at the end as
``a W_0 + b m_0 + X^T P`` and ``a' W_0 + b' m_0 + X^T Q`` (scalars a, b, a', b' and (B, H) matrices P, Q follow the
same recursion). The large (B x D x H) products drop from 2k per iteration (a forward and a weight gradient per
step) to four (A_0, M_0 and the two materialisations), three when the main step's forward already computed A_0
(it read the same stacked X with the same W_0: :attr:`StackedHeads.kept_first`, checked by storage and the
weights' version counter), and networks that read the same source share one K. Everything runs in place on the
(G, D, H) tensors (no copies of W). The rest of each network (BatchNorm, further layers, output layer) is
updated by the optimiser as usual.

It is exact in exact arithmetic (floating-point sums are reordered; ``benchmarks/speed.py`` gates it against the
plain path). It is not exact, so not used, for other optimisers (Adam's per-coordinate scaling leaves the row
space), Nesterov momentum, dampening or ``maximize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .._heads import StackedHeads

if TYPE_CHECKING:
    from ._step import AdversarialStep

__all__ = ["gram_applicable", "gram_steps"]


def gram_applicable(step: AdversarialStep) -> bool:
    """Whether the shortcut is exact for ``step``: stacked adversaries and plain SGD (with or without momentum)."""
    opt = step.adversary_optimizer
    if not isinstance(opt, torch.optim.SGD) or len(opt.param_groups) != 1 or not step.model.adversaries.stacked:
        return False
    group = opt.param_groups[0]
    return not (group.get("nesterov") or group.get("dampening") or group.get("maximize"))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory with the same layout (the same values)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class _Block:
    """One stack of adversary networks (same input size) and the state of its first layer's recursion."""

    def __init__(self, stack: StackedHeads, idx: list[int], x: torch.Tensor, sources: list[str], m0: Any) -> None:
        self.stack, self.idx, self.x = stack, idx, x  # x: (G, B, D)
        first = {s: sources.index(s) for s in dict.fromkeys(sources)}
        gram = {s: x[i] @ x[i].t() for s, i in first.items()}  # (B, B) per source: K = X X^T
        self.kk = torch.stack([gram[s] for s in sources])  # (G, B, B)
        self.w, self.m0 = stack.weights[0], m0  # (G, D, H)
        kept, stack.kept_first = stack.kept_first, None
        if kept is not None and _same(kept[0], x) and kept[1] == self.w._version and kept[2].dtype == x.dtype:
            self.a_t = kept[2].clone()  # (G, B, H): X W_0, as the main step's forward computed it
        else:
            self.a_t = torch.bmm(x, self.w)  # (G, B, H): X W_0
        self.m_t = torch.bmm(x, m0) if m0 is not None else torch.zeros_like(self.a_t)  # X m_0
        self.p_t, self.q_t = torch.zeros_like(self.a_t), torch.zeros_like(self.a_t)
        # W_t = a W_0 + b m_0 + X^T P_t and m_t = a2 W_0 + b2 m_0 + X^T Q_t
        self.a, self.b, self.a2, self.b2 = 1.0, 0.0, 0.0, 1.0 if m0 is not None else 0.0
        self.leaf = self.a_t
        self.new_momentum: torch.Tensor | None = None

    def update(self, delta: torch.Tensor, lr: float, mu: float, c: float) -> None:
        """One step of the recursion given Delta = dL/dA (G, B, H), in place (each step reads the old A and P)."""
        self.m_t.baddbmm_(self.kk, delta, beta=mu)  # M <- mu M + K Delta (+ c A)
        if c:
            self.m_t.add_(self.a_t, alpha=c)
        self.a_t.sub_(self.m_t, alpha=lr)  # A <- A - eta M
        self.q_t.mul_(mu).add_(delta)  # Q <- mu Q + Delta (+ c P)
        if c:
            self.q_t.add_(self.p_t, alpha=c)
        self.p_t.sub_(self.q_t, alpha=lr)  # P <- P - eta Q
        self.a2, self.b2 = mu * self.a2 + c * self.a, mu * self.b2 + c * self.b
        self.a, self.b = self.a - lr * self.a2, self.b - lr * self.b2

    def materialise(self, momentum: bool) -> None:
        """Write the first layer's weights (and momentum buffer) after the steps, in place.

        Only in-place batched (G, D, B) x (G, B, H) products and scaled additions on the (G, D, H) tensors: no
        (G, D, H) temporary and no copy of W (an out-of-place ``baddbmm`` copies its (G, D, H) input first). The new
        momentum is written into the old buffer's storage, expressed through the new W (W_0 is overwritten first):
        with r = a2 / a, m_k = r W_k + (b2 - r b) m_0 + X^T (Q - r P).
        """
        xt = self.x.transpose(1, 2)  # (G, D, B)
        w, m0, m = self.w, self.m0, None
        if momentum and abs(self.a) < 0.5:  # W_0 nearly gone from W_k (huge lr * weight decay): m_k from W_0 first
            m = torch.bmm(xt, self.q_t).add_(w, alpha=self.a2)  # a2 W_0 + X^T Q (+ b2 m_0)
            if m0 is not None:
                m.add_(m0, alpha=self.b2)
        w.baddbmm_(xt, self.p_t, beta=self.a)  # W <- a W_0 + X^T P (+ b m_0)
        if m0 is not None and self.b:
            w.add_(m0, alpha=self.b)
        if momentum and m is None:
            r = self.a2 / self.a
            q = self.q_t.sub_(self.p_t, alpha=r) if r else self.q_t  # (G, B, H): Q - r P
            m = torch.bmm(xt, q) if m0 is None else m0.baddbmm_(xt, q, beta=self.b2 - r * self.b)
            if r:
                m.add_(w, alpha=r)
        self.new_momentum = m


def gram_steps(
    step: AdversarialStep, inputs: Sequence[torch.Tensor] | torch.Tensor, y: dict[str, torch.Tensor], k: int
) -> dict[str, float]:
    """Run ``k`` adversary steps on fixed inputs exactly as ``k`` plain steps would.

    Args:
        step: The step whose adversaries train.
        inputs: The adversary networks' inputs, G tensors (B, D_g) or one stacked (G, B, D).
        y: The batch's labels.
        k: Steps.

    Returns:
        The last step's adversary accuracies, as the plain steps report them.
    """
    from ._step import _add_l2_gradient  # the same L2 gradient as the plain path

    model, opt, tr = step.model, step.adversary_optimizer, step.experiment.training
    assert opt is not None
    heads = model.adversaries
    group = opt.param_groups[0]
    lr, mu = float(group["lr"]), float(group["momentum"])
    c = 2.0 * tr.l2 + float(group["weight_decay"])
    targets = step._targets(y)  # (P, B)
    order = {n: i for i, n in enumerate(heads.names)}
    sources = [h.source for h in model.adversary_heads]
    with torch.no_grad():
        blocks = []
        for stack, members in zip(heads._stacks, heads.members, strict=True):
            idx = [order[n] for n in members]
            if isinstance(inputs, torch.Tensor):  # one stack reads them all in order: no copy
                x = inputs if idx == list(range(len(inputs))) else inputs[idx]
            else:
                x = torch.stack([inputs[i] for i in idx])
            m0 = opt.state.get(stack.weights[0], {}).get("momentum_buffer")
            blocks.append(_Block(stack, idx, x.float(), [sources[i] for i in idx], m0))
    first_layers = {id(blk.w) for blk in blocks}
    others = [p for p in step.l2_adv if id(p) not in first_layers]
    b = targets.shape[1]
    k_max = max(max(blk.stack.num_classes) for blk in blocks)
    metrics: dict[str, float] = {}
    for _ in range(k):
        out = targets.new_full((len(heads.names), b, k_max), float("-inf"), dtype=torch.float32)
        for blk in blocks:
            blk.leaf = blk.a_t.detach().requires_grad_(True)
            logits = blk.stack.forward_from_first(blk.leaf)  # (G_s, B, K_s)
            out[blk.idx, :, : logits.shape[-1]] = logits.float()
        pair = model.pair_logits(out)  # (P, B, K_max)
        pair_losses = step.objective.adversary_loss(pair, targets)  # (P,)
        step._check_finite({"adversaries": pair_losses.sum()}, "adversary", pair_losses)
        opt.zero_grad(set_to_none=True)
        pair_losses.sum().backward()
        for blk in blocks:
            blk.w.grad = None  # moved below, exactly; the optimiser skips a parameter without gradient
        if tr.l2 > 0:
            _add_l2_gradient(others, tr.l2)
        opt.step()
        with torch.no_grad():
            for blk in blocks:
                assert blk.leaf.grad is not None
                blk.update(blk.leaf.grad, lr, mu, c)
        metrics = step._adversary_accuracy(pair.detach(), targets)
    with torch.no_grad():
        for blk in blocks:
            blk.materialise(momentum=mu != 0)  # SGD keeps a buffer only with momentum
            if blk.new_momentum is not None:
                opt.state[blk.w]["momentum_buffer"] = blk.new_momentum
    return metrics
