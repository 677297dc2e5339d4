"""Any 2-D MONAI classifier (``monai.networks.nets``) as a backbone, with features taken before its classifier.

The network is looked up by name in ``monai.networks.nets``, built with ``spatial_dims=2`` and the image
channels (MONAI calls them ``in_channels`` or, for ``ResNet``, ``n_input_channels``), and cut before its
classification layer. How the layer is cut depends on the MONAI family (subclasses and MONAI's aliases,
such as ``densenet121`` or ``SEresnet50``, included):

* ``DenseNet``, ``DenseNet121/169/201/264``: ``class_layers.out`` (the Linear) becomes ``Identity``; the
  features are ``class_layers`` relu -> global average pool -> flatten, D = ``class_layers.out.in_features``.
* ``ResNet``, ``resnet10/18/34/50/101/152/200``: built with ``feed_forward=False``, MONAI's own switch that
  leaves out ``fc``; the features are ``avgpool`` flattened, D = the width of ``layer4`` times the block expansion.
* ``EfficientNetBN`` (and ``EfficientNet``): ``_fc`` becomes ``Identity``; the features are the pooled,
  flattened ``_conv_head`` output after ``_dropout``, D = ``_fc.in_features``.
* ``SENet``, ``SENet154``, ``SEResNet50/101/152``, ``SEResNext50/101``: ``last_linear`` becomes ``Identity``;
  the features are pooled (then ``dropout``, when the network has one) and flattened, D = ``last_linear.in_features``.
* ``ViT``: built with ``classification=True``; ``classification_head`` becomes ``Identity`` and the features are
  the class token after the final LayerNorm, D = ``hidden_size``. ``img_size`` must be given and equal the input size.
  The per-block ``norm_cross_attn`` LayerNorms, which MONAI builds but does not use without cross-attention,
  are frozen (``requires_grad=False``) so that every trainable parameter gets a gradient.

Other MONAI networks (segmentation, generative, multi-scale feature extractors such as ``ResNetFeatures``,
3-D-only networks) are refused with a :class:`~mtdisent.ComponentError` listing the supported ones.
"""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mtdisent import ComponentError, did_you_mean

__all__ = ["MonaiEncoder", "monai_backbone", "supported_networks"]


@dataclass(frozen=True)
class _Family:
    """How one MONAI family is built and cut before its classification layer."""

    base: str  # the MONAI class every member derives from
    channels: str  # the constructor's name for the image channels
    fixed: dict[str, Any]  # arguments the backbone sets so that the head can be cut
    head: str  # attribute holding the classification layer (replaced by Identity, or left out by ``fixed``)
    excluded: tuple[str, ...] = field(default=())  # subclasses that return multi-scale features, not pooled ones


_FAMILIES = (
    _Family("DenseNet", "in_channels", {"out_channels": 1}, "class_layers.out"),
    _Family(
        "ResNet",
        "n_input_channels",
        {"feed_forward": False, "num_classes": 1},
        "fc",
        excluded=("ResNetFeatures", "ResNetEncoder"),
    ),
    _Family(
        "EfficientNet",
        "in_channels",
        {"num_classes": 1},
        "_fc",
        excluded=("EfficientNetBNFeatures", "EfficientNetEncoder"),
    ),
    _Family("SENet", "in_channels", {"num_classes": 1}, "last_linear"),
    _Family("ViT", "in_channels", {"classification": True, "num_classes": 1}, "classification_head"),
)


class MonaiEncoder(nn.Module):
    """A MONAI classifier cut before its classification layer: (B, C, H, W) -> (B, num_features).

    Args:
        net: The MONAI network, already cut (its classification layer is ``Identity`` or left out).
        num_features: Feature size D.
        network: The MONAI name it was built from (for messages and ``repr``).
    """

    def __init__(self, net: nn.Module, num_features: int, network: str) -> None:
        super().__init__()
        self.net = net
        self.num_features = int(num_features)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) features."""
        out = self.net(x)
        if isinstance(out, (tuple, list)):  # ViT returns (features, hidden states of every block)
            out = out[0]
        return out


def _nets() -> ModuleType:
    try:
        import monai.networks.nets as nets  # imported on use: listing plugins stays cheap
    except ImportError as exc:
        raise ComponentError(
            f"the monai backbone needs MONAI ({exc}); install it with pip install 'mtdisent[monai]'"
        ) from exc
    return nets


def _constructed_class(obj: Any) -> type | None:
    """The class a MONAI name builds: the class itself, or the return annotation of a factory (``resnet10``)."""
    if isinstance(obj, type):
        return obj
    if callable(obj):
        try:
            ret = typing.get_type_hints(obj).get("return")
        except Exception:  # annotations that do not resolve: not a classifier factory we know
            return None
        return ret if isinstance(ret, type) else None
    return None


def _family(nets: ModuleType, obj: Any) -> tuple[_Family | None, str | None]:
    """(family, None) for a supported network; (None, name of the excluded class) or (None, None) otherwise."""
    cls = _constructed_class(obj)
    if cls is None or not issubclass(cls, nn.Module):
        return None, None
    for fam in _FAMILIES:
        if any(issubclass(cls, getattr(nets, ex)) for ex in fam.excluded):
            return None, cls.__name__
        if issubclass(cls, getattr(nets, fam.base)):
            return fam, None
    return None, None


def supported_networks() -> list[str]:
    """The MONAI names the backbone supports, without MONAI's lower-case and alternative-spelling aliases."""
    nets = _nets()
    names = []
    for name in dir(nets):
        obj = getattr(nets, name)
        if not name.startswith("_") and getattr(obj, "__name__", None) == name and _family(nets, obj)[0] is not None:
            names.append(name)
    return sorted(names, key=str.lower)


def _parameters(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword parameter names of ``fn`` (a class: its ``__init__``) and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _accepted(nets: ModuleType, ctor: Callable[..., Any], fam: _Family) -> list[str]:
    """Every argument ``ctor`` accepts, following ``**kwargs`` into the family's base class."""
    names, var_kw = _parameters(ctor)
    if var_kw:
        names += [n for n in _parameters(getattr(nets, fam.base))[0] if n not in names]
    return names


def _unsupported(nets: ModuleType, network: str, obj: Any) -> ComponentError:
    supported = ", ".join(supported_networks())
    _, excluded = _family(nets, obj)
    if excluded is not None:
        reason = f"it is a {excluded}, which returns multi-scale feature maps rather than pooled features"
    elif "3d" in network.lower() and callable(obj) and "spatial_dims" not in _parameters(obj)[0]:
        reason = "it is 3-D only (it takes no spatial_dims)"
    else:
        reason = "it is not one of MONAI's 2-D classifiers whose classification layer the backbone knows how to cut"
    return ComponentError(f"monai network {network!r} is not supported: {reason}. Supported: {supported}.")


def _check_args(network: str, fam: _Family, accepted: list[str], args: dict[str, Any]) -> None:
    reserved = {
        "spatial_dims": "always 2",
        "in_channels": "the image channels come from the experiment's input_shape",
        "n_input_channels": "the image channels come from the experiment's input_shape",
        "pretrained": "use the backbone's own pretrained argument",
        **{k: f"set to {v!r} so that features are taken before the classification layer" for k, v in fam.fixed.items()},
    }
    for key in args:
        if key in reserved:
            raise ComponentError(
                f"monai network {network!r}: argument {key!r} is set by the backbone ({reserved[key]}); remove it"
            )
        if key not in accepted:
            choices = [a for a in accepted if a not in reserved and a != "self"]
            raise ComponentError(f"monai network {network!r} has no argument {key!r}. {did_you_mean(key, choices)}")


def _cut(net: nn.Module, fam: _Family) -> int:
    """Replace the classification layer by Identity (or check it was left out); return the feature size D."""
    if fam.base == "ResNet":  # built with feed_forward=False: no fc; D is layer4's output width
        assert getattr(net, "fc", None) is None
        return int(net.in_planes)  # type: ignore[arg-type]  # set by ResNet._make_layer to planes * expansion
    if fam.base == "ViT":  # MONAI builds a LayerNorm for cross-attention in every block even when it is unused:
        for block in net.modules():  # freeze it, keeping the state dict MONAI's, so no parameter goes without gradient
            if hasattr(block, "norm_cross_attn") and not getattr(block, "with_cross_attention", True):
                block.norm_cross_attn.requires_grad_(False)
    parent_name, _, attr = fam.head.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    head = getattr(parent, attr)
    linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    setattr(parent, attr, nn.Identity())
    return int(linear.in_features)


def _load_checkpoint(net: nn.Module, network: str, path: str, fam: _Family) -> None:
    """Load a state dict of the MONAI network from ``path``; its classification-layer weights are ignored."""
    if not Path(path).is_file():
        raise ComponentError(f"monai network {network!r}: checkpoint_path {path!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ComponentError(f"monai network {network!r}: checkpoint_path {path!r} could not be read: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ComponentError(f"monai network {network!r}: checkpoint_path {path!r} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k != fam.head and not k.startswith(fam.head + ".")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())
        raise ComponentError(f"monai network {network!r}: checkpoint_path {path!r} does not fit: {detail}") from exc
    if missing or unexpected:
        raise ComponentError(
            f"monai network {network!r}: checkpoint_path {path!r} does not fit the network built from these args: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _check_pretrained_available(network: str, ctor: Any, fam: _Family, args: dict[str, Any]) -> None:
    """Refuse ``pretrained=True`` where MONAI would silently load nothing or has no weights at all."""
    if "pretrained" not in _parameters(ctor)[0]:
        raise ComponentError(
            f"monai network {network!r} has no pretrained weights in MONAI; give pretrained=true with "
            "checkpoint_path=<a state_dict of this MONAI network>, or set pretrained=false"
        )
    if fam.base == "EfficientNet" and "model_name" in args:  # MONAI only prints a line for names without weights
        from monai.networks.nets.efficientnet import url_map

        name = str(args["model_name"])
        key = name.split("efficientnet-")[-1] + "-ap" if args.get("adv_prop") else name
        if key not in url_map:
            have = sorted(k for k in url_map if k.startswith("efficientnet-"))
            raise ComponentError(
                f"monai network {network!r}: MONAI has no pretrained weights for model_name={name!r}"
                f"{' with adv_prop' if args.get('adv_prop') else ''}; it has them for {', '.join(have)}"
            )


def monai_backbone(
    in_channels: int,
    network: str = "DenseNet121",
    args: dict[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
) -> MonaiEncoder:
    """A 2-D MONAI classifier by name, cut before its classification layer (registered as backbone ``monai``).

    Supported: MONAI's DenseNet, ResNet (with the ``resnet10`` ... ``resnet200`` factories), EfficientNet(BN),
    SENet / SE-ResNet(X)t and ViT families; see the module docstring for how each head is cut. Requires
    ``pip install 'mtdisent[monai]'``.

    Args:
        in_channels: Image channels, passed as MONAI's ``in_channels`` (``n_input_channels`` for ResNet).
        network: Name in ``monai.networks.nets``, for example ``"DenseNet121"``, ``"resnet18"``,
            ``"EfficientNetBN"``, ``"SEResNet50"`` or ``"ViT"``.
        args: Further constructor arguments of that network, for example ``{"model_name": "efficientnet-b0"}``
            for ``EfficientNetBN`` or ``{"img_size": 224, "patch_size": 16}`` for ``ViT``. ``spatial_dims``, the
            channels, ``pretrained`` and the classification-layer arguments are set by the backbone.
        pretrained: Load MONAI's published weights (ImageNet for DenseNet121/169/201, EfficientNetBN b0-b7
            and the SENet family). They are downloaded into the torch hub cache unless already there, or read
            from ``checkpoint_path``. Off by default: nothing is downloaded. MONAI skips weights whose shape
            differs, such as the first convolution of a 3-channel model used with ``in_channels != 3`` (warned).
        checkpoint_path: A local state dict of this MONAI network (as ``torch.save(net.state_dict(), path)``
            writes; the classification layer's entries are ignored) for ``pretrained=True``; nothing is
            downloaded.

    Returns:
        The cut network, mapping (B, in_channels, H, W) to (B, num_features).

    Raises:
        ComponentError: MONAI is not installed, the name is unknown or unsupported, an argument is unknown or
            set by the backbone, the network cannot be built from ``args``, or the weights cannot be loaded.
    """
    if not isinstance(network, str):
        raise ComponentError(f"network must be the name of a MONAI network, such as 'DenseNet121', got {network!r}")
    if args is not None and not isinstance(args, dict):
        raise ComponentError(f"args must be a mapping of {network}'s constructor arguments, got {args!r}")
    nets = _nets()
    obj = getattr(nets, network, None) if not network.startswith("_") else None
    if obj is None or not callable(obj):
        raise ComponentError(f"MONAI has no network {network!r}. {did_you_mean(network, supported_networks())}")
    fam, _ = _family(nets, obj)
    if fam is None:
        raise _unsupported(nets, network, obj)
    args = dict(args or {})
    _check_args(network, fam, _accepted(nets, obj, fam), args)
    if checkpoint_path is not None and not pretrained:
        raise ComponentError("checkpoint_path is only used with pretrained=True")
    download = pretrained and checkpoint_path is None
    if download:
        _check_pretrained_available(network, obj, fam, args)
    kwargs: dict[str, Any] = {"spatial_dims": 2, fam.channels: in_channels, **fam.fixed, **args}
    if "pretrained" in _parameters(obj)[0]:
        kwargs["pretrained"] = download  # EfficientNetBN defaults to True in MONAI: always say it
    try:
        net = obj(**kwargs)
    except (OSError, NotImplementedError) as exc:
        if not download:
            raise ComponentError(f"monai network {network!r} could not be built with args {args}: {exc}") from exc
        if isinstance(exc, NotImplementedError):  # MONAI has no weights for this network or dimensionality
            raise ComponentError(
                f"monai network {network!r} has no 2-D pretrained weights in MONAI ({exc}); give "
                "checkpoint_path=<a state_dict of this MONAI network>, or set pretrained=false"
            ) from exc
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise ComponentError(
            f"pretrained weights for monai network {network!r} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Without network access, download MONAI's weight file elsewhere into {hub}, or pass "
            "checkpoint_path=<a state_dict of this MONAI network>, or set pretrained=false."
        ) from exc
    except Exception as exc:  # MONAI raises TypeError, ValueError, AssertionError... for bad values
        raise ComponentError(
            f"monai network {network!r} could not be built with args {args}: {type(exc).__name__}: {exc}"
        ) from exc
    num_features = _cut(net, fam)
    if checkpoint_path is not None:
        _load_checkpoint(net, network, checkpoint_path, fam)
    elif download and in_channels != 3:
        warnings.warn(
            f"monai network {network!r}: MONAI's pretrained weights are for 3-channel images, so with "
            f"in_channels={in_channels} the first convolution keeps its random initialisation",
            UserWarning,
            stacklevel=2,
        )
    return MonaiEncoder(net, num_features, network)
