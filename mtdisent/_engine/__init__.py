"""The training engine: alternating main/adversary steps, checkpoints, resume, logging."""

from ._checkpoint import CheckpointError, load
from ._loop import Run, TrainingError, TrainingInterrupted, train

__all__ = ["train", "load", "Run", "TrainingError", "TrainingInterrupted", "CheckpointError"]
