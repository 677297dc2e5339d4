"""mtdisent: N-task adversarial representation disentanglement on PyTorch.

Declare tasks in an :class:`Experiment`, build the model with :func:`build_model`; backbones, objectives
and datasets are plugins found through entry points (see :func:`list_plugins`).
"""

from __future__ import annotations

from ._data import DataError, DataSource
from ._engine import CheckpointError, Run, TrainingError, TrainingInterrupted, load, train
from ._errors import (
    ComponentError,
    DuplicateComponentError,
    MtdisentError,
    PluginLoadError,
    PluginWarning,
    SpecError,
    UnknownComponentError,
    did_you_mean,
)
from ._evaluate import Report, evaluate
from ._heads import MLPHead
from ._machine import machine_info
from ._model import ModelOutput, MultiTaskModel, build_model
from ._objectives import Objective, grad_reverse
from ._plots import FigureWarning
from ._presets import preset, presets
from ._registry import ComponentInfo, Registry, backbones, datasets, list_plugins, objectives, register
from ._spec import (
    AdversaryPair,
    AdversarySpec,
    Component,
    ExecutionSpec,
    Experiment,
    HeadSpec,
    OptimizerSpec,
    Pair,
    Task,
    TrainingSpec,
    load_spec,
)

__version__ = "0.1.0"

__all__ = [
    # spec
    "Task",
    "Experiment",
    "Component",
    "HeadSpec",
    "Pair",
    "AdversarySpec",
    "AdversaryPair",
    "OptimizerSpec",
    "TrainingSpec",
    "ExecutionSpec",
    "load_spec",
    "preset",
    # data
    "DataSource",
    "presets",
    # registries and plugins
    "Registry",
    "ComponentInfo",
    "register",
    "backbones",
    "objectives",
    "datasets",
    "list_plugins",
    # model, training
    "build_model",
    "train",
    "load",
    "evaluate",
    "Report",
    "machine_info",
    "Run",
    "MultiTaskModel",
    "ModelOutput",
    "MLPHead",
    "Objective",
    "grad_reverse",
    # errors
    "MtdisentError",
    "SpecError",
    "ComponentError",
    "DataError",
    "TrainingError",
    "TrainingInterrupted",
    "CheckpointError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "PluginLoadError",
    "PluginWarning",
    "FigureWarning",
    "did_you_mean",
    "__version__",
]
