"""mtdisent: N-task adversarial representation disentanglement on PyTorch.

Declare tasks in an :class:`Experiment`, build the model with :func:`build_model`, train it with :func:`train`
and measure it with :func:`evaluate`. Backbones, objectives and datasets are plugins found through entry
points (see :func:`list_plugins`); the training engine's extension points are in :mod:`mtdisent.engine`.
"""

from __future__ import annotations

from ._batchnorm import recompute_batchnorm
from ._data import DataError, DataSource
from ._engine import Callback, CheckpointError, Run, TrainingError, TrainingInterrupted, load, train
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
from ._levers import Lever
from ._machine import machine_info
from ._model import ModelOutput, MultiTaskModel, build_model
from ._objectives import Objective, grad_reverse, masked_pair_cross_entropy
from ._plots import FigureWarning
from ._presets import preset
from ._registry import Registry, backbones, datasets, levers, list_plugins, objectives, register
from ._retrain import retrain_classifiers
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
from .evaluation import Metric

__version__ = "0.2.0"

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
    # data, model, training, evaluation
    "DataSource",
    "build_model",
    "MultiTaskModel",
    "ModelOutput",
    "train",
    "Run",
    "Callback",
    "load",
    "evaluate",
    "recompute_batchnorm",
    "retrain_classifiers",
    "Report",
    "Metric",
    # plugins
    "Registry",
    "register",
    "backbones",
    "objectives",
    "datasets",
    "levers",
    "list_plugins",
    "Objective",
    "Lever",
    "grad_reverse",
    "masked_pair_cross_entropy",
    "did_you_mean",
    "machine_info",
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
    "__version__",
]
