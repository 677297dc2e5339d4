"""Typed contracts of the plugin kinds: what a backbone or dataset factory must provide.

Objectives are classes (subclasses of :class:`~mtdisent.Objective`), so their contract is the base class.
The data contract itself (items, label tables, tensor-backed datasets) lives in ``_data.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from ._data import DataSource

__all__ = ["Backbone", "BackboneFactory", "DatasetFactory"]


@runtime_checkable
class Backbone(Protocol):
    """An encoder: an ``nn.Module`` mapping images (B, C, H, W) to features (B, D).

    Attributes:
        num_features: D, when the backbone knows it (as timm models do); ``None`` or absent otherwise, then
            mtdisent finds D with a dry forward pass. A declared value must be the truth.

    Optional method ``scale_modules() -> list[nn.Module]`` (needed only for ``adversary.scales="all"``): the
    backbone's own submodules whose outputs are its scales, shallow to deep, each output (B, C_s, *spatial) and
    each module run exactly once per forward pass. mtdisent captures their outputs with forward hooks and pools
    each over its spatial dimensions to (B, C_s). ``dltk_residual`` returns its stem and the last residual unit of
    every further scale.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Any: ...


class BackboneFactory(Protocol):
    """Registered under ``mtdisent.backbones``: ``factory(in_channels=C, **args) -> nn.Module``.

    ``args`` are the spec's ``backbone.args``: keyword parameters of the factory, checked by name.
    """

    def __call__(self, *, in_channels: int, **args: Any) -> nn.Module: ...


class DatasetFactory(Protocol):
    """Registered under ``mtdisent.datasets``: ``factory(**args)`` returns the data of an experiment.

    Preferably a :class:`~mtdisent.DataSource` (named splits, tasks, input shape); a mapping of split names to
    datasets, or one training dataset, are accepted too. Nothing may be downloaded.
    """

    def __call__(self, **args: Any) -> DataSource | Mapping[str, Dataset[Any]] | Dataset[Any]: ...
