"""Any timm model as a backbone, with features taken before its classifier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtdisent import ComponentError, did_you_mean

__all__ = ["TimmEncoder", "timm_backbone"]


class TimmEncoder(nn.Module):
    """Wraps a timm model created with ``num_classes=0``: (B, C, H, W) -> (B, num_features) pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) pooled features."""
        return self.model(x)  # type: ignore[no-any-return]


def timm_backbone(
    in_channels: int,
    model: str = "resnet18",
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> TimmEncoder:
    """A timm model by name (registered as backbone ``timm``).

    Args:
        in_channels: Image channels; passed to timm as ``in_chans``.
        model: timm model name, for example ``"resnet18"``.
        pretrained: Load pretrained weights. This downloads from the model hub unless ``checkpoint_path``
            is given; offline, it fails with a clear message. Off by default: nothing is downloaded.
        checkpoint_path: A local weights file for ``pretrained=True`` (no download).
        model_args: Further keyword arguments for ``timm.create_model`` (for example ``drop_rate``).
    """
    import timm  # imported on use: listing plugins stays cheap

    if not timm.is_model(model):
        raise ComponentError(f"timm has no model {model!r}. {did_you_mean(model, timm.list_models())}")
    kwargs = dict(model_args or {})
    if checkpoint_path is not None:
        if not pretrained:
            raise ComponentError("checkpoint_path is only used with pretrained=True")
        kwargs["pretrained_cfg_overlay"] = {"file": checkpoint_path}
    try:
        net = timm.create_model(model, pretrained=pretrained, in_chans=in_channels, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ComponentError(f"timm model {model!r} rejected model_args {model_args}: {exc}") from exc
    except Exception as exc:
        if pretrained:
            raise ComponentError(
                f"pretrained weights for timm model {model!r} could not be loaded ({type(exc).__name__}: {exc}). "
                "Without network access, download them elsewhere and pass checkpoint_path=..., or set pretrained=false."
            ) from exc
        raise
    return TimmEncoder(net)
