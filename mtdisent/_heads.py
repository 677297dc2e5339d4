"""MLP heads for classifiers and adversaries, one module per head or stacked.

:class:`MLPHead` is one head. :class:`StackedHeads` holds G same-shaped heads as stacked weights and runs
them with batched matrix products (one kernel per layer instead of G); its ``state_dict`` uses the same
keys as G separate :class:`MLPHead` modules, so checkpoints do not depend on the execution path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import HeadSpec

__all__ = ["MLPHead", "StackedHeads", "HeadGroup", "HeadView", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """An activation module by spec name."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    factories: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh}
    return factories[name]()


def _layout(spec: HeadSpec) -> list[tuple[int, int | None]]:
    """Positions in ``MLPHead.body`` of each hidden layer's Linear and BatchNorm."""
    out, i = [], 0
    for _ in spec.hidden:
        bn = i + 1 if spec.batchnorm else None
        out.append((i, bn))
        i += 1 + (1 if spec.batchnorm else 0) + 1 + (1 if spec.dropout > 0 else 0)
    return out


class MLPHead(nn.Module):
    """``len(spec.hidden)`` blocks of Linear -> [BatchNorm] -> activation -> [Dropout], then Linear to classes.

    Args:
        in_features: Size D of the input features.
        num_classes: Number of output logits.
        spec: Layer sizes and options.
    """

    def __init__(self, in_features: int, num_classes: int, spec: HeadSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in spec.hidden:
            layers.append(nn.Linear(width, h, bias=spec.bias or not spec.batchnorm))
            if spec.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(make_activation(spec.activation))
            if spec.dropout > 0:
                layers.append(nn.Dropout(spec.dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)
        self.in_features = in_features
        self.num_classes = num_classes
        self.penultimate_features = width

    @staticmethod
    def parameter_count(in_features: int, num_classes: int, spec: HeadSpec) -> int:
        """Trainable parameters of ``MLPHead(in_features, num_classes, spec)``, without building it."""
        count, width = 0, in_features
        for h in spec.hidden:
            count += width * h + (h if spec.bias or not spec.batchnorm else 0) + (2 * h if spec.batchnorm else 0)
            width = h
        return count + width * num_classes + num_classes

    def penultimate(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, H): the output of the last hidden block (the layer the paper plots)."""
        return self.body(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) logits."""
        return self.out(self.body(z))


class StackedHeads(nn.Module):
    """G heads of one shape (same D and hidden sizes; classes may differ) as stacked weights.

    Forward maps (G, B, D) to (G, B, K_max) logits, head g's logits past ``num_classes[g]`` set to ``-inf``.
    BatchNorm over G*H channels of a (B, G*H) view is exactly G independent BatchNorms.

    Args:
        heads: The heads to stack (their current weights are copied), all built from ``spec``.
        spec: Their common spec.
    """

    spec: HeadSpec
    num_classes: list[int]
    in_features: int
    has_bias: bool
    weights: nn.ParameterList
    biases: nn.ParameterList
    bn_weights: nn.ParameterList
    bn_biases: nn.ParameterList
    out_weight: nn.Parameter
    out_bias: nn.Parameter
    padding: torch.Tensor
    act: nn.Module
    momentum: float | None
    """Weight of each batch in the running statistics; ``None``: their plain average since :meth:`reset_batchnorm`."""
    eps: float
    batchnorm_training: bool | None = None
    """BatchNorm on batch statistics (updating the running ones) whatever the module's mode; ``None``: as the mode."""
    keep_first: bool = False
    """Record the first layer's product of each training forward with gradients (the Gram shortcut sets this)."""
    kept_first: tuple[torch.Tensor, int, torch.Tensor] | None = None
    """(X, version of ``weights[0]``, X @ weights[0]) of the last recorded forward, detached: the Gram shortcut's
    first product when its steps read the same X before the weights change."""

    def __init__(self, heads: Sequence[MLPHead], spec: HeadSpec) -> None:
        super().__init__()
        g = len(heads)
        self.spec = spec
        self.num_classes = [h.num_classes for h in heads]
        self.in_features = heads[0].in_features
        k_max = max(self.num_classes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.bn_weights = nn.ParameterList()
        self.bn_biases = nn.ParameterList()
        self.has_bias = spec.bias or not spec.batchnorm
        for layer, (li, bi) in enumerate(_layout(spec)):
            linears = [cast(nn.Linear, h.body[li]) for h in heads]
            self.weights.append(nn.Parameter(torch.stack([m.weight.detach().t() for m in linears])))  # (G, in, out)
            if self.has_bias:
                self.biases.append(nn.Parameter(torch.stack([m.bias.detach() for m in linears])))  # (G, out)
            if bi is not None:
                bns = [cast(nn.BatchNorm1d, h.body[bi]) for h in heads]
                self.bn_weights.append(nn.Parameter(torch.stack([b.weight.detach() for b in bns])))
                self.bn_biases.append(nn.Parameter(torch.stack([b.bias.detach() for b in bns])))
                for stat in ("running_mean", "running_var", "num_batches_tracked"):
                    values = [cast(torch.Tensor, getattr(b, stat)) for b in bns]
                    self.register_buffer(f"{stat}_{layer}", torch.stack(values).clone())
        out_w = torch.zeros(g, heads[0].out.in_features, k_max)
        out_b = torch.zeros(g, k_max)
        for i, h in enumerate(heads):
            out_w[i, :, : h.num_classes] = h.out.weight.detach().t()
            out_b[i, : h.num_classes] = h.out.bias.detach()
        self.out_weight = nn.Parameter(out_w)  # (G, H, K_max); padding columns stay 0 and get no gradient
        self.out_bias = nn.Parameter(out_b)  # (G, K_max)
        classes = torch.arange(k_max)[None, :] >= torch.tensor(self.num_classes)[:, None]
        self.register_buffer("padding", classes, persistent=False)  # (G, K_max) True where no class
        self.act = make_activation(spec.activation)
        self.momentum, self.eps = 0.1, 1e-5

    def _block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What follows hidden layer ``layer``'s matrix product: bias, BatchNorm, activation, dropout."""
        g, b, h = x.shape
        if self.has_bias:
            x = x + self.biases[layer][:, None, :]
        if self.spec.batchnorm:
            flat = x.transpose(0, 1).reshape(b, g * h)  # (B, G*H): G*H channels = G BatchNorms
            rm, rv = getattr(self, f"running_mean_{layer}"), getattr(self, f"running_var_{layer}")
            batch_stats = self.training if self.batchnorm_training is None else self.batchnorm_training
            tracked = getattr(self, f"num_batches_tracked_{layer}")
            if batch_stats:
                tracked.add_(1)
            momentum = self.momentum
            if momentum is None:  # cumulative: every member ran every batch since reset_batchnorm()
                momentum = 1.0 / float(tracked.reshape(-1)[0]) if batch_stats else 0.0
            flat = F.batch_norm(
                flat,
                rm.view(-1),
                rv.view(-1),
                self.bn_weights[layer].reshape(-1),
                self.bn_biases[layer].reshape(-1),
                batch_stats,
                momentum,
                self.eps,
            )
            x = flat.view(b, g, h).transpose(0, 1)  # (G, B, H)
        x = self.act(x)
        if self.spec.dropout > 0:
            x = F.dropout(x, self.spec.dropout, self.training)
        return x

    def reset_batchnorm(self) -> None:
        """Running means 0, variances 1 and batch counts 0, as a new BatchNorm has (nothing without BatchNorm)."""
        for layer in range(len(self.spec.hidden) if self.spec.batchnorm else 0):
            for stat, value in (("running_mean", 0.0), ("running_var", 1.0), ("num_batches_tracked", 0)):
                getattr(self, f"{stat}_{layer}").fill_(value)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """(G, B, D) -> (G, B, H) output of the last hidden block."""
        for layer in range(len(self.spec.hidden)):
            a = torch.bmm(x, self.weights[layer])  # (G, B, H)
            if layer == 0 and self.keep_first and self.training and torch.is_grad_enabled():
                self.kept_first = (x.detach(), self.weights[0]._version, a.detach())
            x = self._block(layer, a)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(G, B, D) -> (G, B, K_max) logits, ``-inf`` past each head's classes."""
        return self._logits(self.penultimate(x))

    def forward_from_first(self, a: torch.Tensor) -> torch.Tensor:
        """The logits given the first hidden layer's product ``a = x @ weights[0]`` (G, B, H).

        The rest of the heads, for the exact reused-feature steps, which compute ``a`` without the (B, D) inputs.
        """
        x = self._block(0, a)
        for layer in range(1, len(self.spec.hidden)):
            x = self._block(layer, torch.bmm(x, self.weights[layer]))
        return self._logits(x)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.baddbmm(self.out_bias[:, None, :], h, self.out_weight)  # (G, B, K_max)
        return logits.masked_fill(self.padding[:, None, :], float("-inf"))

    # -- canonical (per-head) state ------------------------------------------------------------------
    def canonical_items(
        self, names: Sequence[str], indices: Sequence[int] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name.body.i.weight, tensor)`` pairs exactly as separate MLPHead modules would have them.

        ``names[n]`` is head ``indices[n]`` of the stack (by default head ``n``); the tensors are views.
        """
        for gi, name in zip(range(len(names)) if indices is None else indices, names, strict=True):
            k = self.num_classes[gi]
            for layer, (li, bi) in enumerate(_layout(self.spec)):
                yield f"{name}.body.{li}.weight", self.weights[layer][gi].t()
                if self.has_bias:
                    yield f"{name}.body.{li}.bias", self.biases[layer][gi]
                if bi is not None:
                    yield f"{name}.body.{bi}.weight", self.bn_weights[layer][gi]
                    yield f"{name}.body.{bi}.bias", self.bn_biases[layer][gi]
                    yield f"{name}.body.{bi}.running_mean", getattr(self, f"running_mean_{layer}")[gi]
                    yield f"{name}.body.{bi}.running_var", getattr(self, f"running_var_{layer}")[gi]
                    yield f"{name}.body.{bi}.num_batches_tracked", getattr(self, f"num_batches_tracked_{layer}")[gi]
            yield f"{name}.out.weight", self.out_weight[gi, :, :k].t()
            yield f"{name}.out.bias", self.out_bias[gi, :k]

    def load_canonical(
        self, state: dict[str, torch.Tensor], names: Sequence[str], indices: Sequence[int] | None = None
    ) -> None:
        """Copy per-head tensors (as :meth:`canonical_items` names them) into the stacked ones."""
        with torch.no_grad():
            for key, target in self.canonical_items(names, indices):
                target.copy_(state[key].to(target.dtype))


class HeadView(nn.Module):
    """One head of a :class:`StackedHeads`, usable like an :class:`MLPHead` (no weights of its own)."""

    _stack: StackedHeads

    def __init__(self, stack: StackedHeads, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_stack", stack)  # not a submodule: the weights belong to the stack
        self.index = index
        self.in_features = stack.in_features
        self.num_classes = stack.num_classes[index]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) logits. Runs only this head; BatchNorm statistics are not updated."""
        return self._run(z, logits=True)

    def penultimate(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, H)."""
        return self._run(z, logits=False)

    def _run(self, z: torch.Tensor, logits: bool) -> torch.Tensor:
        stack, g = self._stack, self.index
        x = z
        for layer in range(len(stack.spec.hidden)):
            x = x @ stack.weights[layer][g]
            if stack.has_bias:
                x = x + stack.biases[layer][g]
            if stack.spec.batchnorm:
                rm = getattr(stack, f"running_mean_{layer}")[g]
                rv = getattr(stack, f"running_var_{layer}")[g]
                x = F.batch_norm(
                    x,
                    rm.clone(),
                    rv.clone(),
                    stack.bn_weights[layer][g],
                    stack.bn_biases[layer][g],
                    stack.training,
                    0.0,  # the statistics are clones, discarded: nothing is updated
                    stack.eps,
                )
            x = stack.act(x)
            if stack.spec.dropout > 0:
                x = F.dropout(x, stack.spec.dropout, stack.training)
        if not logits:
            return x
        return x @ stack.out_weight[g, :, : self.num_classes] + stack.out_bias[g, : self.num_classes]


class HeadGroup(nn.Module):
    """Named heads, either separate :class:`MLPHead` modules or stacked, with one ``state_dict`` layout.

    Behaves like a read-only ``ModuleDict`` of heads (``group[name]``, ``keys()``, ``items()``, ``in``).

    Args:
        heads: Name -> head, in order.
        specs: Name -> the head's spec.
        stacked: Stack heads that share D and spec into :class:`StackedHeads`.
    """

    def __init__(self, heads: dict[str, MLPHead], specs: dict[str, HeadSpec], stacked: bool) -> None:
        super().__init__()
        self.names = list(heads)
        self.stacked = stacked
        self.separate = nn.ModuleDict()
        self.stacks = nn.ModuleList()
        self._stacks: list[StackedHeads] = []  # the same modules, typed
        self.members: list[list[str]] = []  # names per stack
        self.where: dict[str, tuple[int, int]] = {}  # name -> (stack, index)
        self._register_state_dict_hook(_canonical_state_dict)
        self._register_load_state_dict_pre_hook(_canonical_load_pre_hook, with_module=True)
        if not stacked:
            self.separate.update(heads)
        else:
            groups: dict[tuple[int, str], list[str]] = {}
            for name, head in heads.items():
                groups.setdefault((head.in_features, specs[name].model_dump_json()), []).append(name)
            for si, names in enumerate(groups.values()):
                stack = StackedHeads([heads[n] for n in names], specs[names[0]])
                self.stacks.append(stack)
                self._stacks.append(stack)
                self.members.append(names)
                for gi, n in enumerate(names):
                    self.where[n] = (si, gi)
        self._views = {n: HeadView(self._stacks[s], g) for n, (s, g) in self.where.items()}
        self._num_classes = {n: h.num_classes for n, h in heads.items()}
        self._shapes = {n: (h.in_features, specs[n]) for n, h in heads.items()}

    def reinitialise(self, names: Sequence[str], seed: int) -> None:
        """Give the heads ``names`` fresh weights and BatchNorm statistics, as newly built heads have.

        Deterministic given ``seed``; the other heads are untouched; the global RNG is left as it was.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = {n: MLPHead(self._shapes[n][0], self._num_classes[n], self._shapes[n][1]) for n in names}
        for name, head in fresh.items():
            self.load_head(name, head)

    def head(self, name: str) -> MLPHead:
        """A standalone copy of head ``name`` (weights and BatchNorm statistics), on the group's device."""
        dim, spec = self._shapes[name]
        copy = MLPHead(dim, self._num_classes[name], spec)
        if not self.stacked:
            state = self.separate[name].state_dict()
        else:
            si, gi = self.where[name]
            state = {k[len(name) + 1 :]: v for k, v in self._stacks[si].canonical_items([name], [gi])}
        copy.load_state_dict(state)
        return copy.to(next(iter(state.values())).device)

    def load_head(self, name: str, head: MLPHead) -> None:
        """Copy ``head``'s weights and BatchNorm statistics into head ``name`` (the inverse of :meth:`head`)."""
        with torch.no_grad():
            if not self.stacked:
                self.separate[name].load_state_dict(head.state_dict())
                return
            si, gi = self.where[name]
            state = {f"{name}.{k}": v for k, v in head.state_dict().items()}
            self._stacks[si].load_canonical(state, [name], [gi])

    def load_output_rows(self, name: str, start: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Overwrite output units ``start`` to ``start + k`` of head ``name``: ``weight`` (k, H), ``bias`` (k,)."""
        k = weight.shape[0]
        with torch.no_grad():
            if not self.stacked:
                out = cast(nn.Linear, self.separate[name].out)
                out.weight[start : start + k] = weight.to(out.weight)
                out.bias[start : start + k] = bias.to(out.bias)
                return
            si, gi = self.where[name]
            stack = self._stacks[si]
            stack.out_weight[gi, :, start : start + k] = weight.t().to(stack.out_weight)  # (H, k) of (G, H, K_max)
            stack.out_bias[gi, start : start + k] = bias.to(stack.out_bias)

    def __getitem__(self, name: str) -> nn.Module:
        return self.separate[name] if not self.stacked else self._views[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def keys(self) -> list[str]:
        """Head names in order."""
        return list(self.names)

    def items(self) -> list[tuple[str, nn.Module]]:
        """(name, head) pairs in order."""
        return [(n, self[n]) for n in self.names]

    def run(self, inputs: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{name: (B, D)}`` -> ``{name: (B, K_name)}`` for ``names`` (default all)."""
        names = list(names or self.names)
        if not self.stacked:
            return {n: self.separate[n](inputs[n]) for n in names}
        out = {}
        for si, members in enumerate(self.members):
            chosen = [n for n in members if n in names]
            if not chosen:
                continue
            logits = self._stacks[si](torch.stack([inputs[n] for n in members]))  # (G, B, K_max)
            for gi, n in enumerate(members):
                if n in chosen:
                    out[n] = logits[gi, :, : self._stacks[si].num_classes[gi]]
        return out

    def run_padded(
        self,
        inputs: Sequence[torch.Tensor] | torch.Tensor,
        transform: Any = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One (B, D) input per head, in order -> (P, B, K_max) logits, ``-inf`` past each head's classes.

        ``inputs`` is a sequence of (B, D) tensors or, when all heads share D, one stacked (P, B, D) tensor
        (stack once and reuse it across calls). ``transform(x, w)`` maps stacked inputs (G, B, D) and their
        weights (G, 1, 1) before the heads.
        """
        p_total, b = len(self.names), inputs[0].shape[0]
        k_max = max(self._num_classes.values())
        w = weights.view(-1, 1, 1) if weights is not None else None

        def prepare(idx: list[int]) -> torch.Tensor:
            if isinstance(inputs, torch.Tensor):
                x = inputs if len(idx) == p_total else inputs[idx]  # (G, B, D)
            else:
                x = torch.stack([inputs[i] for i in idx])  # (G, B, D)
            return transform(x, w[idx]) if transform is not None and w is not None else x

        if self.stacked and len(self.stacks) == 1:  # the common case: one stack, already in order
            logits = self._stacks[0](prepare(list(range(p_total))))
            return F.pad(logits, (0, k_max - logits.shape[-1]), value=float("-inf"))
        if not self.stacked:  # ([head], (1, B, K)) per head
            parts = [([i], self.separate[n](prepare([i])[0])[None]) for i, n in enumerate(self.names)]
        else:  # ([heads], (G, B, K)) per stack
            order = {n: i for i, n in enumerate(self.names)}
            parts = []
            for stack, members in zip(self._stacks, self.members, strict=True):
                idx = [order[n] for n in members]
                parts.append((idx, stack(prepare(idx))))
        # in the heads' dtype, not the inputs': under bf16 autocast the logits are bf16 and the features float32
        out = parts[0][1].new_full((p_total, b, k_max), float("-inf"))
        for idx, logits in parts:
            out[idx, :, : logits.shape[-1]] = logits.to(out.dtype)
        return out

    def weight_matrices(self) -> list[nn.Parameter]:
        """The Linear weight matrices (stacked or not): what L2 regularisation applies to."""
        if not self.stacked:
            return [cast(nn.Parameter, m.weight) for m in self.separate.modules() if isinstance(m, nn.Linear)]
        return [cast(nn.Parameter, w) for stack in self._stacks for w in [*stack.weights, stack.out_weight]]

    def penultimate(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: (B, D)}`` -> ``{name: (B, H)}``."""
        if not self.stacked:
            return {n: self.separate[n].penultimate(inputs[n]) for n in self.names}  # type: ignore[operator]
        out = {}
        for si, members in enumerate(self.members):
            h = self._stacks[si].penultimate(torch.stack([inputs[n] for n in members]))
            out.update({n: h[gi] for gi, n in enumerate(members)})
        return out


def _canonical_state_dict(module: HeadGroup, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Present ``name.body.i.weight`` keys whatever the layout (``separate.name...`` or stacked tensors)."""
    for key in [k for k in state if k.startswith(prefix + "separate.")]:
        state[prefix + key[len(prefix + "separate.") :]] = state.pop(key)
    for key in [k for k in state if k.startswith(prefix + "stacks.")]:
        del state[key]
    for si, members in enumerate(module.members):
        for key, value in module._stacks[si].canonical_items(members):
            state[prefix + key] = value.detach()


def _canonical_load_pre_hook(
    module: HeadGroup,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
) -> None:
    """Map canonical keys back to the layout in use."""
    if not module.stacked:
        for name in module.names:
            for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
                state[f"{prefix}separate.{key[len(prefix) :]}"] = state.pop(key)
        return
    for si, members in enumerate(module.members):
        stack = module._stacks[si]
        expected = [k for k, _ in stack.canonical_items(members)]
        absent = [prefix + k for k in expected if prefix + k not in state]
        if absent:
            missing.extend(absent)
            continue
        try:
            stack.load_canonical({k: state.pop(prefix + k) for k in expected}, members)
        except RuntimeError as exc:
            errors.append(f"{prefix}stacks.{si}: {exc}")
    # the stacked tensors were filled directly; tell load_state_dict they are present
    for key, value in module.stacks.state_dict(prefix=prefix + "stacks.").items():
        state[key] = value
