"""The assembled multi-task model and its builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import ComponentError, MtdisentError, SpecError, did_you_mean
from ._heads import HeadGroup, MLPHead
from ._levers import Lever
from ._memory import element_bytes, require_memory
from ._registry import backbones, levers
from ._spec import AdversaryPair, Component, Experiment
from ._torch import eval_mode

__all__ = ["MultiTaskModel", "ModelOutput", "Features", "map_features", "build_model", "build_backbone"]


class AdversaryHead(NamedTuple):
    """One adversary network.

    With ``adversary.layout="pair"`` there is one per pair (and ensemble member); with ``"source"`` one per source
    task (and member) whose output holds the logits of every target it predicts; with ``"pair_shared"`` one per pair
    whose output holds every member's logits (``member`` is then 0).
    """

    name: str
    source: str
    member: int


class ModelOutput(NamedTuple):
    """What one forward pass gives training.

    Attributes:
        features: ``{task: (B, D_task)}`` encoder features.
        logits: ``{task: (B, classes_task)}`` classifier logits.
        adversary_logits: ``{"source->target": (B, classes_target)}`` adversary logits.
    """

    features: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    adversary_logits: dict[str, torch.Tensor]


class Features(dict[str, torch.Tensor]):
    """``{task: (B, D_task)}`` encoder features, as :meth:`MultiTaskModel.encode` returns them.

    A plain dict of the (levers') last features, which the classifiers read. With ``adversary.scales="all"`` it
    also carries what the adversaries read besides them.

    Attributes:
        scales: ``{task: (B, S_task)}`` for every task whose encoder feeds adversaries (``adversary.scales="all"``;
            empty otherwise): the global-average-pooled outputs of the modules the backbone's ``scale_modules()``
            returns, concatenated shallow to deep (``S_task`` = the sum of their channel counts).
    """

    def __init__(self, features: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(features)
        self.scales: dict[str, torch.Tensor] = dict(scales or {})

    def __reduce__(self) -> Any:
        return (Features, (dict(self), self.scales))


def map_features(features: Mapping[str, torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """``fn`` applied to every feature tensor and, for :class:`Features`, to every pooled scale too.

    What detaching, casting or moving features needs so that the adversaries can still read their scales.
    """
    out = {k: fn(v) for k, v in features.items()}
    scales = getattr(features, "scales", None)
    return Features(out, {k: fn(v) for k, v in scales.items()}) if scales is not None else out


def _pool(output: Any) -> torch.Tensor | str:
    """(B, C, *spatial) -> (B, C): the mean over the spatial dimensions of one scale's output (else what it was)."""
    if not isinstance(output, torch.Tensor) or output.ndim < 2:
        return str(tuple(output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__
    return output.mean(dim=tuple(range(2, output.ndim))) if output.ndim > 2 else output  # (B, C)


class _ScaleCapture:
    """Forward hooks that pool the outputs of each encoder's scale modules during one forward pass.

    Used as a context manager around the encoders' forward; :meth:`pooled` then gives ``{task: [(B, C_s), ...]}``
    shallow to deep. Each scale module must run exactly once per forward.
    """

    def __init__(self, modules: Mapping[str, list[nn.Module]], labels: Mapping[str, str]) -> None:
        self.modules, self.labels = modules, labels
        self.slots: dict[str, list[torch.Tensor | str | None]] = {t: [None] * len(m) for t, m in modules.items()}
        self.repeated: list[str] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _ScaleCapture:
        for task, modules in self.modules.items():
            for i, module in enumerate(modules):

                def hook(_m: nn.Module, _in: Any, out: Any, task: str = task, i: int = i) -> None:
                    if self.slots[task][i] is not None:
                        self.repeated.append(task)
                    self.slots[task][i] = _pool(out)

                self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def pooled(self) -> dict[str, list[torch.Tensor]]:
        """``{task: [(B, C_s) per scale]}``; an error naming the backbone if a scale module ran twice or never."""
        out = {}
        for task, slots in self.slots.items():
            if task in self.repeated or any(s is None for s in slots):
                raise ComponentError(
                    f"{self.labels[task]}: each module scale_modules() returns must run exactly once per forward pass "
                    f"(adversary.scales='all'); "
                    + ("one ran twice" if task in self.repeated else "one did not run (or a wrapper skipped its hooks)")
                )
            bad = [s for s in slots if isinstance(s, str)]
            if bad:
                raise ComponentError(
                    f"{self.labels[task]}: a module from scale_modules() returned {bad[0]}; expected (B, C, *spatial)"
                )
            out[task] = [s for s in slots if isinstance(s, torch.Tensor)]
        return out


def _scale_paths(encoder: nn.Module, label: str) -> list[str]:
    """Names (within ``encoder``) of the modules its ``scale_modules()`` returns; a SpecError if it has none."""
    fn = getattr(encoder, "scale_modules", None)
    if not callable(fn):
        raise SpecError(
            f"adversary.scales: 'all' reads every scale of the encoders, but {label} does not expose its scales "
            "(no scale_modules() method); use adversary.scales='last' or a backbone with scales (dltk_residual)"
        )
    modules = list(fn())
    names = {id(m): n for n, m in encoder.named_modules()}
    if not modules or any(not isinstance(m, nn.Module) or id(m) not in names for m in modules):
        raise ComponentError(f"{label}: scale_modules() must return a non-empty list of the backbone's own submodules")
    return [names[id(m)] for m in modules]


def build_backbone(component: Component, in_channels: int, *, what: str = "backbone") -> nn.Module:
    """Instantiate a backbone from its spec; errors name the backbone and the bad argument."""
    return backbones.create(component.name, component.args, what=f"{what} {component.name!r}", in_channels=in_channels)


def _feature_size(
    module: nn.Module, input_shape: tuple[int, int, int], label: str, scales: list[str] | None = None
) -> tuple[int, list[int]]:
    """D of a backbone and the widths of its ``scales`` (module names): a dry forward of two zero images in eval mode.

    D is checked against ``num_features``.
    """
    capture = _ScaleCapture({"": [module.get_submodule(n) for n in scales or []]}, {"": label})
    try:
        with eval_mode(module), torch.no_grad(), capture:
            out = module(torch.zeros(2, *input_shape))  # (2, C, H, W) -> (2, D)
    except Exception as exc:
        raise ComponentError(
            f"{label} failed on input of shape (B, {', '.join(map(str, input_shape))}): {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ComponentError(f"{label} returned {shape} for a batch of 2; a backbone must map (B, C, H, W) to (B, D)")
    declared = getattr(module, "num_features", None)
    if isinstance(declared, int) and declared != out.shape[1]:
        raise ComponentError(f"{label} declares num_features={declared} but returned D={out.shape[1]}")
    return int(out.shape[1]), [int(s.shape[1]) for s in capture.pooled()[""]]


def _networks(
    pairs: list[AdversaryPair], classes: list[int], layout: str
) -> tuple[list[AdversaryHead], list[tuple[int, int, int]], dict[str, int]]:
    """The adversary networks of ``layout``, each pair's ``(network, first logit, classes)`` and each network's outputs.

    ``"pair"``: one network per pair and member; ``"source"``: one per source task (and member) predicting all its
    targets; ``"pair_shared"``: one per pair, its members' output layers side by side on shared hidden layers.
    """
    heads: list[AdversaryHead] = []
    slots: list[tuple[int, int, int]] = []
    outputs: dict[str, int] = {}
    for p, k in zip(pairs, classes, strict=True):
        if layout == "pair":
            name = p.key
        elif layout == "pair_shared":
            name = p.pair_key
        else:
            name = f"{p.source}->*" if p.member == 0 else f"{p.source}->*#{p.member}"
        if name not in outputs:
            outputs[name] = 0
            heads.append(AdversaryHead(name, p.source, 0 if layout == "pair_shared" else p.member))
        slots.append(([h.name for h in heads].index(name), outputs[name], k))
        outputs[name] += k
    return heads, slots, outputs


class MultiTaskModel(nn.Module):
    """Per-task encoders and classifiers plus one adversary per enabled ordered pair.

    Modules are reachable by name: ``model.encoders["plane"]``, ``model.classifiers["plane"]``, and
    ``model.adversary("plane", "shadow")`` for the adversary of a pair whatever the layout; ``model.adversaries``
    holds the networks, named ``"plane->*"`` with ``adversary.layout="source"`` (the default) and
    ``"plane->shadow"`` with ``"pair"``. With stacked heads
    (``experiment.execution.heads``) classifiers and adversaries are views into stacked weights; the
    ``state_dict`` has the same keys either way.

    Args:
        experiment: The validated experiment.
        input_shape: ``(C, H, W)``; defaults to ``experiment.input_shape``.
    """

    _pair_head: torch.Tensor  # (P,) the network of each pair (adversary.layout "source" or "pair_shared")
    _head_pair: torch.Tensor  # (G,) one pair of each network (adversary.layout "source" or "pair_shared")
    _pair_cols: torch.Tensor  # (P, K_max) its logits' columns in that network's output
    _pair_pad: torch.Tensor  # (P, K_max) True past the pair's classes

    def __init__(self, experiment: Experiment, input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        shape = input_shape or experiment.input_shape
        if shape is None:
            raise SpecError(
                "input_shape: not set. Give Experiment(input_shape=(channels, height, width)) or a dataset that "
                "provides it."
            )
        self.experiment = experiment
        self.input_shape: tuple[int, int, int] = tuple(shape)  # type: ignore[assignment]
        self.task_names: list[str] = experiment.task_names
        self.pairs: list[AdversaryPair] = experiment.adversary_pairs()
        self.encoders = nn.ModuleDict()
        self.feature_sizes: dict[str, int] = {}
        # adversary.scales="all": per source task, the names of its encoder's scale modules and their widths
        self.scale_sizes: dict[str, list[int]] = {}
        self._scale_paths: dict[str, list[str]] = {}
        self._backbone_labels: dict[str, str] = {}
        sources = {p.source for p in self.pairs} if experiment.adversary.scales == "all" else set()
        sizes: dict[str, tuple[int, list[int]]] = {}  # per backbone spec, one dry forward per distinct spec
        classifiers: dict[str, MLPHead] = {}
        for task in experiment.tasks:
            comp = experiment.backbone_for(task.name)
            label = f"backbone {comp.name!r} of task {task.name!r}"
            encoder = build_backbone(comp, shape[0], what=f"task {task.name!r}: backbone")
            paths = _scale_paths(encoder, label) if task.name in sources else None
            key = comp.model_dump_json() + str(paths is not None)
            if key not in sizes:
                sizes[key] = _feature_size(encoder, self.input_shape, label, paths)
            self.encoders[task.name] = encoder
            self.feature_sizes[task.name] = sizes[key][0]
            self._backbone_labels[task.name] = label
            if paths is not None:
                self._scale_paths[task.name], self.scale_sizes[task.name] = paths, sizes[key][1]
            classifiers[task.name] = MLPHead(sizes[key][0], task.n_classes, experiment.head_for(task.name))
        self.conditional = experiment.adversary.conditional
        self.pair_classes = [experiment.task(p.target).n_classes for p in self.pairs]
        # the adversary networks and, per pair, (network, first logit, classes): where its logits are
        layout, adv_head = experiment.adversary.layout, experiment.adversary.head
        self.adversary_heads, slots, outputs = _networks(self.pairs, self.pair_classes, layout)
        widths = self.adversary_widths()
        inputs = {h.name: widths[h.source] for h in self.adversary_heads}
        stacked = experiment.execution.heads in {"auto", "stacked"}
        if experiment.execution.memory_check and self.pairs:
            self._check_adversary_memory(inputs, outputs, stacked)
        adversaries = {h.name: MLPHead(inputs[h.name], outputs[h.name], adv_head) for h in self.adversary_heads}
        self.classifiers = HeadGroup(classifiers, {t: experiment.head_for(t) for t in classifiers}, stacked)
        self.levers: list[Lever] = [
            levers.create(c.name, c.args, what=f"levers[{k}] {c.name!r}") for k, c in enumerate(experiment.levers)
        ]
        self.lever_modules = nn.ModuleDict()  # what the levers built, by their index in experiment.levers
        for k, lever in enumerate(self.levers):
            module = lever.build(self)
            if module is not None:
                self.lever_modules[str(k)] = module
        self.adversaries = HeadGroup(adversaries, dict.fromkeys(adversaries, experiment.adversary.head), stacked)
        self._pair_slots = slots
        self._shared = experiment.adversary.layout != "pair"  # a network serves several pairs or members
        if self._shared and self.pairs:  # gather indices from (G, B, sum K) network logits to (P, B, K_max)
            k_max = max(self.pair_classes)
            cols = torch.tensor([[o + min(c, k - 1) for c in range(k_max)] for _, o, k in slots])  # (P, K_max)
            heads = [h for h, _, _ in slots]
            self.register_buffer("_pair_head", torch.tensor(heads), persistent=False)
            first = [heads.index(g) for g in range(len(self.adversary_heads))]
            self.register_buffer("_head_pair", torch.tensor(first), persistent=False)  # (G,) a pair of each network
            self.register_buffer("_pair_cols", cols, persistent=False)
            pad = torch.arange(k_max)[None, :] >= torch.tensor(self.pair_classes)[:, None]
            self.register_buffer("_pair_pad", pad, persistent=False)  # (P, K_max)

    def _check_adversary_memory(self, inputs: dict[str, int], outputs: dict[str, int], stacked: bool) -> None:
        """A one-line error, before anything is allocated, when the adversaries' weights cannot fit in host memory.

        Building stacked adversaries holds two copies of their weights for a moment (the heads, then the stack).
        """
        adv = self.experiment.adversary
        count = sum(MLPHead.parameter_count(inputs[n], k, adv.head) for n, k in outputs.items())
        itemsize = element_bytes()
        advice = [*self._smaller_adversaries(), "so does a backbone with fewer output features (pooled)"]
        require_memory(
            itemsize * count * (2 if stacked else 1),
            torch.device("cpu"),
            f"adversary: {len(outputs)} adversary networks (layout {adv.layout!r}, ensemble {adv.ensemble}, "
            f"head.hidden {adv.head.hidden}, reading up to {max(inputs.values()):,} features) hold "
            f"{count / 1e6:,.0f} M parameters; building them"
            + (" (two copies of their weights while they are stacked)" if stacked else ""),
            "; ".join(advice),
        )

    def _smaller_adversaries(self) -> list[str]:
        """What would hold fewer adversary parameters: each smaller layout with its size, then the other settings."""
        adv, widths = self.experiment.adversary, self.adversary_widths()

        def size(layout: str) -> int:
            heads, _, outputs = _networks(self.pairs, self.pair_classes, layout)
            return sum(MLPHead.parameter_count(widths[h.source], outputs[h.name], adv.head) for h in heads)

        layouts = {"source": "one network per source task", "pair_shared": "ensemble members sharing hidden layers"}
        count = size(adv.layout)
        advice = [
            f"adversary.layout={n!r} ({what}) has {s / 1e6:,.0f} M"
            for n, what in layouts.items()
            if (s := size(n)) < count
        ]
        fewer = "fewer adversary.ensemble members or " if adv.ensemble > 1 and adv.layout != "pair_shared" else ""
        return [*advice, f"{fewer}a narrower adversary.head.hidden shrinks them"]

    def reinitialise_adversaries(self, member: int, seed: int) -> None:
        """Fresh weights for ensemble member ``member`` of every pair, as newly built adversaries have them.

        Deterministic given ``seed``; nothing else moves. With ``adversary.layout="pair_shared"`` member 0 renews
        each pair's whole network (the shared hidden layers and every member's output layer), so with M members the
        shared layers live M re-initialisation periods, and a member m > 0 renews only its own output rows.
        """
        adv = self.experiment.adversary
        if adv.layout != "pair_shared" or member == 0:
            names = [h.name for h in self.adversary_heads if h.member == member]
            self.adversaries.reinitialise(names, seed=seed)
            return
        widths = self.adversary_widths()  # the output layer's fan-in without hidden layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p, (g, offset, k) in zip(self.pairs, self._pair_slots, strict=True):
                if p.member == member:  # fresh output rows, drawn as a newly built output layer draws them
                    fresh = nn.Linear(adv.head.hidden[-1] if adv.head.hidden else widths[p.source], k)  # (k, H)
                    self.adversaries.load_output_rows(self.adversary_heads[g].name, offset, fresh.weight, fresh.bias)

    # -- access --------------------------------------------------------------------------------------
    def adversary(self, source: str, target: str, member: int = 0) -> nn.Module:
        """The adversary predicting ``target`` from ``source``'s features: ``(B, D[+K]) -> (B, classes)``."""
        key = f"{source}->{target}" if member == 0 else f"{source}->{target}#{member}"
        keys = [p.key for p in self.pairs]
        if key not in keys:
            raise ComponentError(f"no adversary {key!r}. {did_you_mean(key, keys)}")
        head, offset, k = self._pair_slots[keys.index(key)]
        module = self.adversaries[self.adversary_heads[head].name]
        return module if not self._shared else _Slice(module, offset, k)

    def adversary_input_size(self, source: str) -> int:
        """Features an adversary of ``source`` reads before any one-hot label: D, plus the scale widths with "all"."""
        return self.feature_sizes[source] + sum(self.scale_sizes.get(source, []))

    def adversary_widths(self) -> dict[str, int]:
        """``{source task: input width of its adversaries}``.

        :meth:`adversary_input_size`, plus the one-hot of the source's own label for conditional adversaries.
        """
        return {
            t.name: self.adversary_input_size(t.name) + (t.n_classes if self.conditional else 0)
            for t in self.experiment.tasks
        }

    def main_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoders, the levers' modules and the classifiers (what the main step optimises)."""
        return [*self.encoders.parameters(), *self.lever_modules.parameters(), *self.classifiers.parameters()]

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Parameters of the adversaries."""
        return list(self.adversaries.parameters())

    def l2_parameters(self, part: str) -> list[nn.Parameter]:
        """Weight matrices and kernels (no biases, no BatchNorm) of ``"main"`` or ``"adversary"``: what L2 acts on."""
        if part == "adversary":
            return self.adversaries.weight_matrices()
        kernels = [p for p in self.encoders.parameters() if p.ndim > 1]
        return [*kernels, *self.classifiers.weight_matrices()]

    # -- computation ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        """Refuse what the encoders cannot read: wrong shape, or integer images (never converted silently).

        Integer images (``uint8`` from an image file, say) are refused rather than cast: whether 255 means 1.0
        depends on how the training data was scaled, which the model does not know.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            c, h, w = self.input_shape
            raise MtdisentError(f"images must have shape (B, {c}, {h}, {w}) (the experiment's input_shape), got {got}")
        if not x.is_floating_point():
            weights = next(self.parameters(), None)
            expected = weights.dtype if weights is not None else torch.get_default_dtype()
            raise MtdisentError(
                f"images must be a floating-point tensor ({expected}, like the model's weights), got {x.dtype}; "
                "scale them as the training images were, e.g. x.float() / 255 for 8-bit images in [0, 1]"
            )

    def encode(self, x: torch.Tensor, labels: dict[str, torch.Tensor] | None = None) -> Features:
        """(B, C, H, W) -> ``{task: (B, D_task)}`` through the encoders and the levers, gradients as the mode allows.

        ``labels`` are for the levers (given by the training main step). With ``adversary.scales="all"`` the
        result also carries the encoders' pooled scales (:class:`Features`).
        """
        self._check_input(x)
        return self.encode_with(self.encoders, x, labels)

    def encode_with(
        self,
        encoders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | nn.ModuleDict,
        x: torch.Tensor,
        labels: dict[str, torch.Tensor] | None = None,
    ) -> Features:
        """:meth:`encode` through other callables for the encoders (compiled ones, for example); input not checked.

        With ``adversary.scales="all"`` forward hooks on the modules each source encoder's ``scale_modules()``
        named pool their outputs during this very forward pass, so features and scales come from the same batch.
        The hooks sit on ``self.encoders``' submodules: ``encoders`` must run those modules and their hooks
        (``torch.compile`` of them does; a wrapper that skips them is reported as a scale module that did not run).
        """
        if not self._scale_paths:
            return Features(self.apply_levers({t: encoders[t](x) for t in self.task_names}, labels))
        modules = {t: [self.encoders[t].get_submodule(n) for n in paths] for t, paths in self._scale_paths.items()}
        with _ScaleCapture(modules, self._backbone_labels) as capture:
            raw = {t: encoders[t](x) for t in self.task_names}  # {task: (B, D)}
        scales = {t: torch.cat(pooled, dim=1) for t, pooled in capture.pooled().items()}  # {task: (B, S_task)}
        return Features(self.apply_levers(raw, labels), scales)

    def lever_module(self, k: int) -> nn.Module | None:
        """What ``levers[k]`` built (:meth:`~mtdisent.Lever.build`), or ``None``."""
        return self.lever_modules[str(k)] if str(k) in self.lever_modules else None

    def apply_levers(
        self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The levers' feature transforms (``Lever.features``), in spec order: ``{task: (B, D)}`` in and out."""
        for k, lever in enumerate(self.levers):
            features = lever.features(self.lever_module(k), features, labels, self.training)
        return features

    def classify(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{task: (B, D)}`` -> ``{task: (B, classes)}`` logits."""
        return self.classifiers.run(features)

    def adversary_inputs(
        self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """What each adversary network reads, in ``self.adversary_heads`` order: G tensors (B, D_source).

        With ``adversary.scales="all"`` the source encoder's pooled scales follow its features,
        (B, D + S_source) (``features`` must then be what :meth:`encode` returned, a :class:`Features`). With
        conditional adversaries (``adversary.conditional``) the source task's one-hot label is appended,
        (B, D [+ S] + K_source), zeros where the label is -1.
        """
        sources = dict.fromkeys(h.source for h in self.adversary_heads)
        inputs = {t: features[t] for t in sources}  # {source: (B, D)}
        if self.scale_sizes:
            scales = getattr(features, "scales", {})
            missing = [t for t in sources if t not in scales]
            if missing:
                raise MtdisentError(
                    f"adversary.scales='all': the adversaries read the pooled scales of task {missing[0]!r}'s encoder, "
                    "which these features do not carry; pass what model.encode or model.features returned (Features)"
                )
            inputs = {t: torch.cat([v, scales[t].to(v.dtype)], dim=1) for t, v in inputs.items()}  # (B, D + S)
        if not self.conditional:
            return [inputs[h.source] for h in self.adversary_heads]
        if labels is None:
            raise MtdisentError(
                "conditional adversaries (adversary.conditional=true) read each source task's label: pass labels"
            )
        onehot = {}
        for t in sources:
            y = labels[t]
            k = self.experiment.task(t).n_classes
            onehot[t] = F.one_hot(y.clamp(min=0), k).to(inputs[t].dtype) * (y >= 0)[:, None]  # (B, K)
        joined = {t: torch.cat([inputs[t], onehot[t]], dim=1) for t in sources}  # (B, D + K), once per source
        return [joined[h.source] for h in self.adversary_heads]

    def stack_adversary_inputs(
        self, features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """(G, B, D) inputs of every adversary network (:meth:`adversary_inputs`) when all share D (else ``None``)."""
        if not self.pairs:
            return None
        inputs = self.adversary_inputs(features, labels)
        if len({x.shape[1] for x in inputs}) != 1:
            return None
        return torch.stack(inputs)

    def adversary_logits(
        self,
        features: dict[str, torch.Tensor] | torch.Tensor,
        transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        weights: torch.Tensor | None = None,
        labels: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """All adversaries at once: ``{task: (B, D)}`` -> (P, B, K_max) logits in ``self.pairs`` order.

        ``features`` may also be the output of :meth:`stack_adversary_inputs`. Pair p's logits past its
        target's classes are ``-inf``. ``transform(x, w)`` (an objective's ``adversary_input``) is applied to
        the (P, B, D) stacked inputs with ``weights`` (P,) reshaped to (P, 1, 1) first; with
        ``adversary.layout`` ``"source"`` or ``"pair_shared"`` a network serves several pairs (or members) and reads its
        input once, transformed with the weight of its pairs (the engine refuses pairs of one network with different
        weights; the members of a pair always share one). ``labels``
        (``{task: (B,)}``) condition conditional adversaries.
        """
        inputs = features if isinstance(features, torch.Tensor) else self.adversary_inputs(features, labels)
        if not self._shared:
            return self.adversaries.run_padded(inputs, transform, weights)
        head_weights = weights[self._head_pair] if weights is not None else None  # (G,)
        return self.pair_logits(self.adversaries.run_padded(inputs, transform, head_weights))

    def pair_logits(self, head_logits: torch.Tensor) -> torch.Tensor:
        """(G, B, K_head) logits of the adversary networks -> (P, B, K_max) per pair, ``-inf`` past its classes."""
        if not self._shared:
            return head_logits
        g, b, _ = head_logits.shape
        rows = head_logits[self._pair_head]  # (P, B, K_head)
        cols = self._pair_cols[:, None, :].expand(-1, b, -1)  # (P, B, K_max)
        return torch.gather(rows, 2, cols).masked_fill(self._pair_pad[:, None, :], float("-inf"))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """(B, C, H, W) -> features, classifier logits and adversary logits."""
        features = self.encode(x)
        logits = self.classify(features)
        adv: dict[str, torch.Tensor] = {}
        if self.pairs:
            # conditional adversaries are given the classifiers' predictions in place of labels
            predicted = {t: v.detach().argmax(-1) for t, v in logits.items()} if self.conditional else None
            padded = self.adversary_logits(features, labels=predicted)  # (P, B, K_max)
            adv = {p.key: padded[i, :, :k] for i, (p, k) in enumerate(zip(self.pairs, self.pair_classes, strict=True))}
        return ModelOutput(features, logits, adv)

    def _inference(self, fn: Any, x: torch.Tensor) -> Any:
        with eval_mode(self), torch.inference_mode():
            return fn(x)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: (B, D)}`` encoder features, computed in eval mode without gradients."""
        return self._inference(self.encode, x)

    def predict_proba(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: (B, classes)}`` class probabilities in eval mode."""
        return self._inference(lambda t: {k: v.softmax(-1) for k, v in self.classify(self.encode(t)).items()}, x)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: LongTensor[B]}`` predicted class indices in eval mode.

        ``x`` is a float tensor ``(B, C, H, W)`` scaled like the training images; integer images (``uint8``)
        raise :class:`~mtdisent.MtdisentError` naming the dtype instead of being converted.
        """
        return self._inference(lambda t: {k: v.argmax(-1) for k, v in self.classify(self.encode(t)).items()}, x)

    def penultimate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: (B, H)}`` the classifiers' last hidden layer (the embedding the paper plots), in eval mode."""
        return self._inference(lambda t: self.classifiers.penultimate(self.encode(t)), x)


class _Slice(nn.Module):
    """The logits of one pair (or member) from a network that predicts several (``adversary.layout`` not ``"pair"``)."""

    def __init__(self, module: nn.Module, offset: int, k: int) -> None:
        super().__init__()
        object.__setattr__(self, "_module", module)  # a view: the weights belong to the adversaries
        self.offset, self.num_classes = offset, k
        self.in_features = getattr(module, "in_features", None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, classes)."""
        return self._module(z)[:, self.offset : self.offset + self.num_classes]  # type: ignore[operator]


def build_model(experiment: Experiment, input_shape: tuple[int, int, int] | None = None) -> MultiTaskModel:
    """Build the multi-task model of ``experiment`` with weights seeded by ``experiment.seed``.

    Args:
        experiment: A validated :class:`~mtdisent.Experiment`.
        input_shape: ``(C, H, W)`` overriding ``experiment.input_shape`` (for example from a dataset).

    Returns:
        A :class:`MultiTaskModel` in training mode on the CPU.
    """
    if not isinstance(experiment, Experiment):
        raise SpecError(f"build_model expects an Experiment, got {type(experiment).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(experiment.seed)
        return MultiTaskModel(experiment, input_shape)
