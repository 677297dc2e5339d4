"""The training engine: setup, the step contract, callbacks, validation, checkpoints and a short loop."""

from ._callbacks import Callback, Checkpointer, GracefulStop, MetricsLog, Progress
from ._checkpoint import CheckpointError, CheckpointWarning, load
from ._loop import Loop, TrainingInterrupted, train
from ._run import Run
from ._step import AdversarialStep, Step, TrainingError
from ._validation import Selection

__all__ = [
    "train",
    "load",
    "Run",
    "Loop",
    "Step",
    "AdversarialStep",
    "Callback",
    "Checkpointer",
    "MetricsLog",
    "Progress",
    "GracefulStop",
    "Selection",
    "TrainingError",
    "TrainingInterrupted",
    "CheckpointError",
    "CheckpointWarning",
]
