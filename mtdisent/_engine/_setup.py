"""Where training runs: device, mixed precision, compiled encoders, DDP wrappers, optimisers.

:func:`prepare` turns a built model into a :class:`Setup`: what the step calls to encode images, the module
DDP wraps for the main step (encoders + classifiers) and the one it wraps for the adversary updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .._errors import SpecError
from .._memory import element_bytes, gib, optimizer_states, require_memory
from .._model import MultiTaskModel, map_features
from .._spec import Experiment, OptimizerSpec
from ._distributed import DistInfo

__all__ = ["Setup", "prepare", "resolve_device", "build_optimizer"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``; CUDA asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"training.device: {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


def build_optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser ``spec`` names over ``params`` (foreach implementations)."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, foreach=True)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=True)


class _MainNet(nn.Module):
    """Encoders + classifiers as one module (what DDP wraps for the main step)."""

    def __init__(self, model: MultiTaskModel, encode: Callable[..., dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.encoders, self.classifiers, self.lever_modules = model.encoders, model.classifiers, model.lever_modules
        self._encode, self._classify = encode, model.classify

    def forward(
        self, x: torch.Tensor, labels: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        feats = self._encode(x, labels)  # {task: (B, D)}
        return feats, self._classify(feats)


class _AdvNet(nn.Module):
    """All adversaries as one module (what DDP wraps for the adversary updates)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.adversaries = model.adversaries
        self._logits = model.adversary_logits

    def forward(
        self,
        feats: dict[str, torch.Tensor] | torch.Tensor,
        transform: Any,
        weights: torch.Tensor | None,
        labels: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        inputs = feats.float() if isinstance(feats, torch.Tensor) else map_features(feats, torch.Tensor.float)
        return self._logits(inputs, transform, weights, labels)  # (P, B, K_max)


@dataclass
class Setup:
    """How the model runs on this process.

    Attributes:
        device: This process's device.
        dist: Its place in a distributed run.
        autocast: A context-manager factory: bf16 autocast when mixed precision is on, else a no-op.
        encode: ``(x (B, C, H, W), labels=None) -> {task: (B, D)}`` through the (possibly compiled) encoders and
            the levers (which see the labels in the training main step).
        main_net: Encoders + classifiers, DDP-wrapped when distributed: ``x -> (features, logits)``.
        adversaries: All adversaries, DDP-wrapped when distributed (gradients synchronised).
        adversaries_plain: The same without the wrapper: the main step runs these when the adversaries do not
            learn in it, so no gradient is computed or synchronised for them there.
        channels_last: Whether the encoders run channels-last (``training.channels_last`` resolved here).
    """

    device: torch.device
    dist: DistInfo
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    encode: Callable[..., dict[str, torch.Tensor]]
    main_net: nn.Module
    adversaries: nn.Module
    adversaries_plain: nn.Module
    channels_last: bool = False


def _channels_last(model: MultiTaskModel, setting: bool | str, device: torch.device) -> bool:
    """Whether the encoders run channels-last: ``True``, or ``"auto"`` on a CPU, if every encoder takes it.

    One forward of two blank images in eval mode (no statistics move, nothing random is drawn) finds an encoder
    that cannot (a ``.view`` of a channels-last map); ``"auto"`` then keeps the contiguous layout, ``True`` is refused.
    """
    if setting is False or (setting == "auto" and device.type != "cpu"):
        return False
    x = torch.zeros(2, *model.input_shape, device=device).contiguous(memory_format=torch.channels_last)
    training = model.training
    model.encoders.to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            for task, encoder in model.encoders.items():
                try:
                    encoder(x)
                except RuntimeError as exc:
                    model.encoders.to(memory_format=torch.contiguous_format)
                    if setting is True:
                        raise SpecError(
                            f"training.channels_last=true: the encoder of task {task!r} fails on channels-last "
                            f"inputs ({str(exc).splitlines()[0]}); set it to 'auto' or false"
                        ) from None
                    return False
    finally:
        model.train(training)
    return True


def _check_training_memory(model: MultiTaskModel, experiment: Experiment, device: torch.device, world: int) -> None:
    """A one-line error before training when what it is certain to allocate cannot fit.

    Counted: the weights when they move off the host, the optimisers' state, the adversaries' gradients where the
    Gram shortcut does not replace them, and one copy of a batch's stacked adversary inputs, (G, B, D) (stacked
    heads). Not counted: activations, other gradients, the allocator's slack.
    """
    tr, adv_spec, execution = experiment.training, experiment.adversary, experiment.execution
    main = sum(p.numel() for p in model.main_parameters())
    adv = sum(p.numel() for p in model.adversary_parameters())
    states = main * optimizer_states(tr.optimizer) + adv * optimizer_states(tr.adversary_optimizer)
    moved = device.type != "cpu"  # on the CPU the weights are already in memory
    stacked = model.adversaries.stacked and bool(model.pairs)
    gram = stacked and adv_spec.features == "reuse" and execution.adversary_steps != "plain"
    gram = gram and tr.adversary_optimizer.name == "sgd"
    grads = 0 if gram else adv  # the Gram shortcut moves the large first layers without gradients
    widths = model.adversary_widths()
    batch = sum(widths[h.source] for h in model.adversary_heads) * (tr.batch_size // world) if stacked else 0
    itemsize = element_bytes()
    require_memory(
        itemsize * (states + grads + batch + (main + adv if moved else 0)),
        device,
        f"training: {'the weights, ' if moved else ''}the optimisers' state of the model's "
        f"{(main + adv) / 1e6:,.0f} M parameters ({adv / 1e6:,.0f} M in the adversaries; training.optimizer "
        f"{tr.optimizer.name!r} keeps {optimizer_states(tr.optimizer)} tensor(s) per parameter, "
        f"training.adversary_optimizer {tr.adversary_optimizer.name!r} {optimizer_states(tr.adversary_optimizer)})"
        + (", the adversaries' gradients" if grads else "")
        + (f" and a batch of their stacked inputs ({gib(itemsize * batch)})" if batch else ""),
        "; ".join(model._smaller_adversaries())
        + "; or use SGD without momentum for the adversaries (training.adversary_optimizer)",
    )


def prepare(
    model: MultiTaskModel, experiment: Experiment, device: torch.device, dist: DistInfo
) -> tuple[MultiTaskModel, Setup]:
    """Move ``model`` to ``device`` (SyncBatchNorm when asked) and build its :class:`Setup`.

    Returns:
        ``(model, setup)``: the model to train (converted when SyncBatchNorm is on) and its set-up.
    """
    tr = experiment.training
    if tr.sync_batchnorm and dist.enabled:
        if device.type != "cuda":
            raise SpecError(
                "training.sync_batchnorm: PyTorch's SyncBatchNorm needs CUDA devices; on the CPU each process's "
                "BatchNorm uses its own slice of the batch (set sync_batchnorm=false)"
            )
        model = cast(MultiTaskModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))
    if experiment.execution.memory_check:
        _check_training_memory(model, experiment, device, dist.world)
    model.to(device)
    amp = tr.amp == "bf16" or (tr.amp == "auto" and device.type == "cuda")
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    )
    channels_last = _channels_last(model, tr.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    encoders: dict[str, Any] = dict(model.encoders.items())
    if tr.compile:
        encoders = {t: torch.compile(m) for t, m in encoders.items()}

    def encode(x: torch.Tensor, labels: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        x = x.contiguous(memory_format=memory_format)
        return model.encode_with(encoders, x, labels)  # {task: (B, D)} (+ pooled scales, adversary.scales="all")

    main_net: nn.Module = _MainNet(model, encode)
    plain: nn.Module = _AdvNet(model)
    adversaries = plain
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device] if device.type == "cuda" else None
        main_net = DDP(main_net, device_ids=ids)
        if model.adversary_parameters():
            adversaries = DDP(plain, device_ids=ids)
    return model, Setup(device, dist, autocast, encode, main_net, adversaries, plain, channels_last)
