"""The data contract.

A dataset is any ``torch.utils.data.Dataset`` whose items are ``(image, labels)``: ``image`` a float
tensor ``(C, H, W)`` and ``labels`` a ``dict[str, int]`` from task name to class index. A task missing
from ``labels``, or labelled ``-1``, is unlabelled for that sample: its losses are masked.

Dataset plugins (entry-point group ``mtdisent.datasets``) are factories returning a :class:`DataSource`:
named splits (``train``, ``val``, ``test``, and any others such as ``unseen``) plus what the data knows
about its tasks and image shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ._errors import MtdisentError, did_you_mean
from ._registry import datasets
from ._spec import Experiment, Task

__all__ = ["DataError", "DataSource", "check_item", "collate", "resolve_data", "UNLABELLED"]

UNLABELLED = -1


class DataError(MtdisentError, ValueError):
    """A sample or dataset breaks the data contract; the message names the sample index and the task."""


class DataSource(Mapping[str, Dataset]):
    """Named splits of a dataset with optional metadata.

    Args:
        splits: Split name -> dataset in the data contract.
        tasks: The tasks the labels refer to (names and classes), when the data knows them.
        input_shape: ``(C, H, W)`` of every image, when known.
        factors: For synthetic or factor-labelled data, a description of the factors (free-form, JSON-able).
    """

    def __init__(
        self,
        splits: Mapping[str, Dataset],
        *,
        tasks: Sequence[Task] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        factors: Mapping[str, Any] | None = None,
    ) -> None:
        if not splits:
            raise DataError("a DataSource needs at least one split")
        self._splits = dict(splits)
        self.tasks = list(tasks) if tasks is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.factors = dict(factors or {})

    def __getitem__(self, name: str) -> Dataset:
        try:
            return self._splits[name]
        except KeyError:
            raise DataError(f"no split {name!r}. {did_you_mean(name, self._splits)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._splits

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self._splits.items())  # type: ignore[arg-type]
        return f"DataSource({sizes})"


def check_item(item: Any, index: int, experiment: Experiment, input_shape: tuple[int, int, int] | None) -> None:
    """Validate one sample against the contract; raises :class:`DataError` naming ``index`` and the task."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"sample {index}: expected (image, labels), got {type(item).__name__}")
    image, labels = item
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        kind = f"{image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(f"sample {index}: image must be a float tensor (C, H, W), got {kind}")
    if input_shape is not None and tuple(image.shape) != tuple(input_shape):
        raise DataError(f"sample {index}: image has shape {tuple(image.shape)}, expected {tuple(input_shape)}")
    if image.ndim != 3:
        raise DataError(f"sample {index}: image has shape {tuple(image.shape)}, expected (C, H, W)")
    if not torch.isfinite(image).all():
        raise DataError(f"sample {index}: image contains NaN or inf values")
    if not isinstance(labels, Mapping):
        raise DataError(
            f"sample {index}: labels must be a dict from task name to class index, got {type(labels).__name__}"
        )
    names = experiment.task_names
    for key, value in labels.items():
        if key not in names:
            raise DataError(f"sample {index}: label for unknown task {key!r}. {did_you_mean(str(key), names)}")
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            and not (isinstance(value, float) and value.is_integer())
        ):
            raise DataError(f"sample {index}, task {key!r}: label {value!r} is not an integer class index")
        k = experiment.task(key).n_classes
        if not (value == UNLABELLED or 0 <= value < k):
            raise DataError(
                f"sample {index}, task {key!r}: label {int(value)} is out of range; "
                f"expected 0..{k - 1} or -1 (unlabelled)"
            )


def collate(
    items: Sequence[Any],
    indices: Sequence[int],
    experiment: Experiment,
    input_shape: tuple[int, int, int] | None,
    check: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack samples into ``(images (B, C, H, W), {task: LongTensor[B]})`` with -1 for unlabelled."""
    if check:
        for item, idx in zip(items, indices, strict=True):
            check_item(item, idx, experiment, input_shape)
    images = torch.stack([item[0] for item in items]).float()  # (B, C, H, W)
    labels = {
        name: torch.tensor([int(item[1].get(name, UNLABELLED)) for item in items], dtype=torch.long)
        for name in experiment.task_names
    }
    return images, labels


def resolve_data(experiment: Experiment, data: Any = None) -> DataSource:
    """Resolve the data of a run.

    ``data`` if given (a DataSource, a mapping of splits or a single training Dataset), else the spec's
    ``data`` component built from the datasets registry.
    """
    if data is None:
        if experiment.data is None:
            raise DataError(
                "no data: pass data=... (a Dataset or a mapping of splits) or set the spec's data field to a "
                f"registered dataset ({', '.join(datasets.names()) or 'none registered'})"
            )
        factory = datasets.get(experiment.data.name)
        from ._model import check_kwargs

        check_kwargs(factory, experiment.data.args, f"dataset {experiment.data.name!r}")
        try:
            data = factory(**experiment.data.args)
        except MtdisentError:
            raise
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"dataset {experiment.data.name!r} could not be built with {experiment.data.args}: {exc}"
            ) from exc
    if isinstance(data, DataSource):
        return data
    if isinstance(data, Mapping):
        return DataSource(data)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return DataSource({"train": data})
    raise DataError(
        f"data must be a Dataset, a mapping of split name to Dataset, or a DataSource; got {type(data).__name__}"
    )


def dataset_length(ds: Any, name: str) -> int:
    """``len(ds)``, or a :class:`DataError` naming the split when it is empty or has no length."""
    try:
        n = len(ds)
    except TypeError as exc:
        raise DataError(f"split {name!r}: datasets must have a length (map-style Dataset)") from exc
    if n == 0:
        raise DataError(f"split {name!r} is empty")
    return n


def majority_rate(counts: torch.Tensor) -> float:
    """Share of the most frequent class, given class counts."""
    total = float(counts.sum())
    return float(counts.max()) / total if total > 0 else math.nan
