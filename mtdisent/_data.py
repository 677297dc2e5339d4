"""The data contract, and the one path by which training and evaluation read data.

A dataset is any map-style ``torch.utils.data.Dataset`` whose items are ``(image, labels)``: ``image`` a float
tensor ``(C, H, W)`` and ``labels`` a ``dict[str, int]`` from task name to class index. A declared task missing
from ``labels``, or labelled ``-1`` (:data:`UNLABELLED`), is unlabelled for that sample: its losses are masked.
Labels of tasks the experiment does not declare are ignored (a dataset may carry more factors than a study
uses). Training refuses a declared task without a single label in the training split.

Two optional attributes make a dataset cheaper to use (both are part of the contract, checked once):

* ``labels``: ``{task: LongTensor[N]}``, the label table. Labels are then checked once, up front.
* ``images``: ``FloatTensor[N, C, H, W]`` next to ``labels``: the dataset is *tensor-backed*; batches are
  sliced from the tensors directly and ``dataset[i]`` must equal ``(images[i], labels at i)``.

Dataset plugins (entry-point group ``mtdisent.datasets``) are factories returning a :class:`DataSource`:
named splits (``train``, ``val``, ``test``, and any others such as ``unseen``) plus what the data knows about
its tasks and image shape.

Batches come from a :class:`ContractView` of a split through ``torch.utils.data.DataLoader`` (worker processes,
pinned memory on CUDA): :func:`make_loader`. The training stream, validation and :func:`mtdisent.evaluate`
all read data this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset

from ._errors import MtdisentError, did_you_mean
from ._registry import datasets
from ._spec import Experiment, Task

__all__ = [
    "UNLABELLED",
    "DataError",
    "DataSource",
    "TensorBacked",
    "ContractView",
    "Batch",
    "check_item",
    "make_loader",
    "sequential_batches",
    "resolve_data",
    "task_classes",
]

UNLABELLED = -1
"""The label of a sample not labelled for a task."""

Shape = tuple[int, int, int]


def _shape(shape: Sequence[int] | None) -> Shape | None:
    return cast(Shape, tuple(int(d) for d in shape)) if shape is not None else None


class DataError(MtdisentError, ValueError):
    """A sample or dataset breaks the data contract; the message names the split, the sample index and the task."""


@runtime_checkable
class TensorBacked(Protocol):
    """A dataset held as tensors: ``images`` (N, C, H, W) and ``labels`` ``{task: LongTensor[N]}``."""

    images: torch.Tensor
    labels: Mapping[str, torch.Tensor]

    def __len__(self) -> int: ...


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
        self.input_shape = _shape(input_shape)
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

    def with_transform(
        self, transform: Callable[[torch.Tensor], Any], splits: Iterable[str] = ("train",)
    ) -> DataSource:
        """The same data with a per-sample image transform applied to ``splits`` (the training split by default).

        ``transform`` maps one image ``(C, H, W)`` to an image of the same shape: a torchvision ``v2``
        transform, a MONAI array transform (``monai.transforms.Compose([RandFlip(...), ...])``) or any callable.
        Its output is converted with ``torch.as_tensor`` (MONAI's ``MetaTensor`` and NumPy arrays work). The
        transformed splits are read item by item (the tensor-backed fast path is off for them). Random
        transforms draw from the global RNGs of the worker that loads the sample, so a resumed run continues
        with other augmentation draws than an uninterrupted one.

        Raises:
            DataError: ``splits`` names a split the data does not have.
        """
        names = list(splits)
        for name in names:
            if name not in self._splits:
                raise DataError(f"with_transform: no split {name!r}. {did_you_mean(name, self._splits)}")
        wrapped = {k: TransformedDataset(v, transform) if k in names else v for k, v in self._splits.items()}
        return DataSource(wrapped, tasks=self.tasks, input_shape=self.input_shape, factors=self.factors)


class TransformedDataset(Dataset):
    """``dataset`` with ``transform`` applied to each image; labels (and the label table) pass through."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], Any]) -> None:
        self.dataset, self.transform = dataset, transform
        table = label_table(dataset)
        if table is not None:
            self.labels = table

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, labels = self.dataset[index]
        try:
            out = self.transform(image)
        except Exception as exc:
            name = getattr(self.transform, "__name__", type(self.transform).__name__)
            raise DataError(f"sample {index}: the transform {name} failed: {type(exc).__name__}: {exc}") from exc
        return torch.as_tensor(out), labels


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def task_classes(experiment: Experiment) -> dict[str, int]:
    """``{task: number of classes}`` in declaration order: what the data contract checks labels against."""
    return {t.name: t.n_classes for t in experiment.tasks}


def label_table(dataset: Any) -> dict[str, torch.Tensor] | None:
    """The dataset's ``labels`` table ``{task: (N,) integer tensor}`` when it has a well-formed one."""
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, Mapping):
        return None
    try:
        n = len(dataset)
    except TypeError:
        return None
    if not all(isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == n for v in labels.values()):
        return None
    return {str(k): v for k, v in labels.items()}


def is_tensor_backed(dataset: Any) -> bool:
    """Whether ``dataset`` exposes ``images`` (N, C, H, W) and a label table of the same length."""
    images = getattr(dataset, "images", None)
    return (
        isinstance(images, torch.Tensor)
        and images.ndim == 4
        and label_table(dataset) is not None
        and len(images) == len(dataset)
    )


def _label_value(value: Any, index: int, task: str, k: int) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise DataError(f"sample {index}, task {task!r}: label {value!r} is not an integer class index")
    if not (value == UNLABELLED or 0 <= value < k):
        raise DataError(
            f"sample {index}, task {task!r}: label {int(value)} is out of range; expected 0..{k - 1} or -1 (unlabelled)"
        )
    return int(value)


def _image_problem(image: Any, input_shape: tuple[int, int, int] | None) -> str | None:
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        kind = f"{image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__
        return f"image must be a float tensor (C, H, W), got {kind}"
    if input_shape is not None and tuple(image.shape) != tuple(input_shape):
        return f"image has shape {tuple(image.shape)}, expected {tuple(input_shape)}"
    if image.ndim != 3:
        return f"image has shape {tuple(image.shape)}, expected (C, H, W)"
    if not torch.isfinite(image).all():
        return "image contains NaN or inf values"
    return None


def check_item(
    item: Any, index: int, tasks: Mapping[str, int] | Experiment, input_shape: tuple[int, int, int] | None
) -> dict[str, int]:
    """Validate one sample against the contract; returns its labels of the declared tasks (-1 where missing).

    Args:
        item: ``dataset[index]``.
        index: Its index, for messages.
        tasks: ``{task: classes}`` of the declared tasks (or the experiment).
        input_shape: Expected ``(C, H, W)``, or ``None`` to accept any 3-D shape.

    Raises:
        DataError: naming the sample index, the task and what was expected.
    """
    classes = task_classes(tasks) if isinstance(tasks, Experiment) else tasks
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"sample {index}: expected (image, labels), got {type(item).__name__}")
    image, labels = item
    problem = _image_problem(image, input_shape)
    if problem is not None:
        raise DataError(f"sample {index}: {problem}")
    if not isinstance(labels, Mapping):
        raise DataError(
            f"sample {index}: labels must be a dict from task name to class index, got {type(labels).__name__}"
        )
    return {t: _label_value(labels.get(t, UNLABELLED), index, t, k) for t, k in classes.items()}


def _check_table(table: Mapping[str, torch.Tensor], classes: Mapping[str, int], where: str) -> None:
    for name, k in classes.items():
        y = table.get(name)
        if y is None:
            continue
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{where}, task {name!r}: labels must be integer class indices, got dtype {y.dtype}")
        wrong = ((y < UNLABELLED) | (y >= k)).nonzero()
        if len(wrong):
            i = int(wrong[0])
            raise DataError(
                f"{where}, sample {i}, task {name!r}: label {int(y[i])} is out of range; expected 0..{k - 1} or -1"
            )


def _no_labels_message(split: str, task: str) -> str:
    return (
        f"split {split!r}: task {task!r} has no labelled sample, so it cannot be trained; label it, or remove the "
        "task from the experiment"
    )


# ----------------------------------------------------------------------------------------------------
# the one data path: a checked view of a split, batches through a DataLoader
# ----------------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """A collated batch.

    Attributes:
        images: (B, C, H, W) float.
        labels: ``{task: LongTensor[B]}``, -1 where unlabelled.
        indices: (B,) the dataset indices the batch came from.
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    indices: torch.Tensor


class _Failed(NamedTuple):
    """A contract violation found in a DataLoader worker, re-raised as one clean line in the main process."""

    message: str


class ContractView(Dataset):
    """One split seen through the data contract: fetches whole batches (``__getitems__``), checked and collated.

    Tensor-backed datasets are checked once here and sliced directly; datasets with a label table have their
    labels checked once here; others are checked sample by sample as they are fetched.

    Args:
        dataset: The split.
        tasks: ``{task: classes}`` of the declared tasks.
        input_shape: Expected ``(C, H, W)`` (``None``: any, taken from the data).
        split: Its name, for messages.
        require_labels: Refuse a declared task with no labelled sample (known up front when the dataset has a
            label table; otherwise the training stream checks after its first pass).
    """

    def __init__(
        self,
        dataset: Any,
        tasks: Mapping[str, int],
        input_shape: Sequence[int] | None,
        split: str,
        require_labels: bool = False,
    ) -> None:
        self.dataset, self.tasks, self.split = dataset, dict(tasks), split
        self.input_shape = _shape(input_shape)
        try:
            self.n = len(dataset)
        except TypeError as exc:
            raise DataError(f"split {split!r}: datasets must have a length (map-style Dataset)") from exc
        if self.n == 0:
            raise DataError(f"split {split!r} is empty")
        self.table = label_table(dataset)
        self.tensor_backed = is_tensor_backed(dataset)
        where = f"split {split!r}"
        if self.table is not None:
            _check_table(self.table, self.tasks, where)
            if require_labels:
                for name in self.tasks:
                    y = self.table.get(name)
                    if y is None or not bool((y >= 0).any()):
                        raise DataError(_no_labels_message(split, name))
        if self.tensor_backed:
            images = dataset.images
            shape = self.input_shape or tuple(images.shape[1:])
            if tuple(images.shape[1:]) != tuple(shape):
                expected = ", ".join(map(str, (self.n, *shape)))
                raise DataError(f"{where}: images tensor has shape {tuple(images.shape)}, expected ({expected})")
            bad = (~torch.isfinite(images.flatten(1))).any(dim=1).nonzero()
            if len(bad):
                raise DataError(f"{where}, sample {int(bad[0])}: image contains NaN or inf values")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Batch | _Failed:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch | _Failed:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        try:
            if self.tensor_backed:
                assert self.table is not None
                none = torch.full((len(idx),), UNLABELLED, dtype=torch.long)
                labels = {t: self.table[t][idx].long() if t in self.table else none for t in self.tasks}
                return Batch(self.dataset.images[idx].float(), labels, idx)
            items = [self.dataset[int(i)] for i in idx]
            rows = [check_item(item, int(i), self.tasks, self.input_shape) for item, i in zip(items, idx, strict=True)]
            shapes = {tuple(item[0].shape) for item in items}
            if len(shapes) > 1:
                raise DataError(f"samples {idx.tolist()[:8]} have different image shapes {sorted(shapes)}")
        except DataError as exc:
            return _Failed(f"split {self.split!r}, {exc}")
        images = torch.stack([item[0] for item in items]).float()  # (B, C, H, W)
        labels = {t: torch.tensor([r[t] for r in rows], dtype=torch.long) for t in self.tasks}
        return Batch(images, labels, idx)


def _identity(batch: Any) -> Any:
    return batch


def make_loader(
    view: ContractView,
    batch_sampler: Iterable[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> Iterator[Batch]:
    """Batches of ``view`` in the order ``batch_sampler`` gives, through a ``DataLoader``.

    The workers' seeds come from ``seed`` (not from the global RNG, which training owns). A contract violation
    found in a worker is raised here as the same one-line :class:`DataError`.
    """
    loader = DataLoader(
        view,
        batch_sampler=batch_sampler,  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    for batch in loader:
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        yield batch


def sequential_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Consecutive index batches covering ``range(n)``.

    With ``world`` > 1 only every ``world``-th batch from ``rank`` on, so that the processes share the pass.
    """
    starts = range(0, n, batch_size)
    return [list(range(s, min(s + batch_size, n))) for i, s in enumerate(starts) if i % world == rank]


# ----------------------------------------------------------------------------------------------------
# resolving a run's data
# ----------------------------------------------------------------------------------------------------
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
        data = datasets.create(
            experiment.data.name, experiment.data.args, what=f"data: dataset {experiment.data.name!r}"
        )
    if isinstance(data, DataSource):
        return data
    if isinstance(data, Mapping):
        return DataSource(data)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return DataSource({"train": data})
    raise DataError(
        f"data must be a Dataset, a mapping of split name to Dataset, or a DataSource; got {type(data).__name__}"
    )
