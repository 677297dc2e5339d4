"""Deterministic, resumable batch streams over a map-style dataset."""

from __future__ import annotations

from typing import Any

import torch

from .._data import DataError, check_item, collate, dataset_length
from .._spec import Experiment

__all__ = ["BatchStream", "Batches"]


class BatchStream:
    """An endless stream of index batches: seeded permutations, epoch after epoch.

    The state is ``(epoch, offset)``; permutation ``e`` is ``randperm(n)`` under seed ``(seed, e)``, so a
    restored stream continues exactly where it stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        """The next ``batch_size`` indices, continuing into the next epoch's permutation when needed."""
        parts, need = [], self.batch_size
        while need > 0:
            take = self._perm[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        """JSON-able position."""
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        if state["n"] != self.n:
            raise DataError(f"the training data has {self.n} samples but the checkpoint was made with {state['n']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


class Batches:
    """Fetches batches from a dataset in the data contract, validating samples.

    Datasets exposing ``images`` (N, C, H, W) and ``labels`` ({task: LongTensor[N]}) tensors are checked
    once, vectorised, and then indexed directly; others are checked sample by sample as they are fetched.
    """

    def __init__(self, dataset: Any, experiment: Experiment, input_shape: tuple[int, int, int], split: str) -> None:
        self.dataset, self.experiment, self.input_shape, self.split = dataset, experiment, input_shape, split
        self.n = dataset_length(dataset, split)
        self.fast = isinstance(getattr(dataset, "images", None), torch.Tensor) and isinstance(
            getattr(dataset, "labels", None), dict
        )
        if self.fast:
            self._check_tensors()

    def _check_tensors(self) -> None:
        images, labels = self.dataset.images, self.dataset.labels
        where = f"split {self.split!r}"
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape) or len(images) != self.n:
            raise DataError(
                f"{where}: images tensor has shape {tuple(images.shape)}, expected ({self.n}, *{self.input_shape})"
            )
        bad = (~torch.isfinite(images.flatten(1))).any(dim=1).nonzero()
        if len(bad):
            raise DataError(f"{where}, sample {int(bad[0])}: image contains NaN or inf values")
        for name, y in labels.items():
            if name not in self.experiment.task_names:
                continue
            k = self.experiment.task(name).n_classes
            wrong = ((y < -1) | (y >= k)).nonzero()
            if len(wrong):
                i = int(wrong[0])
                raise DataError(
                    f"{where}, sample {i}, task {name!r}: label {int(y[i])} is out of range; expected 0..{k - 1} or -1"
                )

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(images (B, C, H, W), {task: LongTensor[B]})`` for the given dataset indices."""
        if self.fast:
            labels = self.dataset.labels
            unlabelled = torch.full((len(indices),), -1, dtype=torch.long)
            ys = {t: labels[t][indices].long() if t in labels else unlabelled for t in self.experiment.task_names}
            return self.dataset.images[indices].float(), ys
        idx = indices.tolist()
        items = [self.dataset[i] for i in idx]
        for item, i in zip(items, idx, strict=True):
            try:
                check_item(item, i, self.experiment, self.input_shape)
            except DataError as exc:
                raise DataError(f"split {self.split!r}, {exc}") from None
        return collate(items, idx, self.experiment, self.input_shape, check=False)
