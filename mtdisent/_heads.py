"""MLP heads used for classifiers and adversaries."""

from __future__ import annotations

import torch
from torch import nn

from ._spec import HeadSpec

__all__ = ["MLPHead", "make_activation"]


def make_activation(name: str) -> nn.Module:
    """An activation module by spec name."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    factories: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh}
    return factories[name]()


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

    def penultimate(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, H): the output of the last hidden block (the layer the paper plots)."""
        return self.body(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes) logits."""
        return self.out(self.body(z))
