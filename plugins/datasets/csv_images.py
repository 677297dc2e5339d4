"""Generic image datasets: a CSV table of image paths and label columns, or a folder per class.

* :func:`csv_images`: one column of image paths plus any number of label columns, each becoming a task whose
  classes are the column's distinct values (sorted; an empty cell is ``-1``, unlabelled). Splits come from a split
  column or are drawn at random (optionally keeping groups such as patients together).
* :func:`folder_images`: ``root/<class>/<image>`` (or ``root/<split>/<class>/<image>``): one task, class = folder.

Images are read lazily, resized bilinearly and standardised per image (see :mod:`._imageio`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtdisent import ComponentError, DataError, DataSource

from ._imageio import (
    Table,
    build_source,
    check_common_args,
    check_flag,
    check_fraction,
    existing_root,
    generator,
    parse_holdout,
    read_table,
    task_name,
)

__all__ = ["SPLIT_ALIASES", "IMAGE_EXTENSIONS", "csv_images", "folder_images"]

SPLIT_ALIASES = {
    "training": "train",
    "tr": "train",
    "validation": "val",
    "valid": "val",
    "dev": "val",
    "testing": "test",
    "te": "test",
}
"""Split-column values (lower-cased) read as the canonical split names ``train``, ``val``, ``test``."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def _split_name(value: str) -> str:
    low = value.strip().lower()
    return SPLIT_ALIASES.get(low, low)


def _check_channels(channels: Any) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ComponentError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(channels)


def csv_images(
    csv: str,
    image_column: str,
    label_columns: Sequence[str],
    root: str | None = None,
    split_column: str | None = None,
    image_size: tuple[int, int] = (224, 224),
    channels: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    on_missing: str = "error",
    holdout: Sequence[Mapping[str, str]] | None = None,
    group_column: str | None = None,
    image_suffix: str = "",
    max_samples: int | None = None,
    standardize: bool = True,
    cache: bool = False,
) -> DataSource:
    """Images listed in a CSV table, one task per label column.

    The separator (``,``, ``;`` or tab) is detected from the header; names and cells are stripped of surrounding
    whitespace. Each label column becomes a task named in lower-case snake case (``"US Machine"`` ->
    ``us_machine``) with the column's distinct values as classes (sorted, numerically if all are integers); an
    empty cell is ``-1`` (unlabelled for that task).

    Splits: with ``split_column``, its values name the splits (``training``/``validation``/``testing`` and similar
    are read as ``train``/``val``/``test``; other values become splits of their own name); a ``val`` split is then
    cut from ``train`` only if the column gives none. Without it, ``val_fraction`` and ``test_fraction`` of the
    rows are drawn at random by ``seed``. With ``group_column`` (e.g. a patient id) every drawn split keeps whole
    groups. Rows matching a ``holdout`` cell go to ``unseen`` instead.

    Args:
        csv: The CSV file.
        image_column: Column holding image paths, relative to ``root`` (or absolute).
        label_columns: Columns that become tasks (at least one).
        root: Folder the image paths are relative to (default: the CSV file's folder).
        split_column: Column naming each row's split.
        image_size: ``(H, W)`` after bilinear resizing.
        channels: 1 (grayscale; colour is converted to luma) or 3 (RGB; grayscale is repeated).
        val_fraction: Share of the training rows drawn into ``val``.
        test_fraction: Share of the rows drawn into ``test`` when there is no ``split_column``.
        seed: Seed of the drawn splits and of ``max_samples``.
        on_missing: ``"error"``: a missing image raises :class:`~mtdisent.DataError` naming it and its line;
            ``"skip"``: left out, listed in ``source.skipped`` and counted in ``source.factors["skipped"]``.
        holdout: Held-out cells ``[{column: value}, ...]`` collected into ``unseen``.
        group_column: Column whose values must not be split across drawn splits (e.g. patient id).
        image_suffix: Appended to every image path (e.g. ``".png"`` when the table lists names without extension).
        max_samples: Use a random subset of this many rows.
        standardize: Standardise each image; ``False`` gives values in ``[0, 1]``.
        cache: Keep images in memory after their first read.

    Returns:
        A :class:`~mtdisent.DataSource` of lazily read images, input shape ``(channels, H, W)``.

    Raises:
        DataError: The file, a column or images are missing, or a label column has fewer than two classes.
        ComponentError: An argument is malformed.
    """
    table = read_table(csv)
    return _table_source(
        table,
        image_column,
        label_columns,
        root=root,
        split_column=split_column,
        image_size=image_size,
        channels=channels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        on_missing=on_missing,
        holdout=holdout,
        group_column=group_column,
        image_suffix=image_suffix,
        max_samples=max_samples,
        standardize=standardize,
        cache=cache,
        dataset="csv_images",
    )


def _table_source(
    table: Table,
    image_column: str,
    label_columns: Sequence[str],
    *,
    root: str | None,
    split_column: str | None,
    image_size: Any,
    channels: Any,
    val_fraction: Any,
    test_fraction: Any,
    seed: Any,
    on_missing: Any,
    holdout: Any,
    group_column: str | None,
    image_suffix: Any,
    max_samples: Any,
    standardize: Any,
    cache: Any,
    dataset: str,
) -> DataSource:
    size = check_common_args(image_size, val_fraction, seed, on_missing, max_samples)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ComponentError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    channels = _check_channels(channels)
    standardize, cache = check_flag("standardize", standardize), check_flag("cache", cache)
    if not isinstance(image_suffix, str):
        raise ComponentError(f"image_suffix must be a string, got {image_suffix!r}")
    if isinstance(label_columns, str) or not isinstance(label_columns, (list, tuple)) or not label_columns:
        raise ComponentError(f"label_columns must be a non-empty list of column names, got {label_columns!r}")
    image_col = table.column(str(image_column), what="image column")
    split_col = table.column(str(split_column), what="split column") if split_column is not None else None
    group_col = table.column(str(group_column), what="group column") if group_column is not None else None
    structural = {c for c in (image_col, split_col, group_col) if c}
    label_cols: list[str] = []
    for name in label_columns:
        col = table.column(str(name), what="label column")
        if col in structural:
            raise ComponentError(f"label column {col!r} is also the image, split or group column")
        if col in label_cols:
            raise ComponentError(f"label_columns lists {col!r} twice")
        label_cols.append(col)
    names = [task_name(c) for c in label_cols]
    if len(set(names)) != len(names):
        raise ComponentError(f"label columns {label_cols} give the same task names {names}; rename a column")
    cells = parse_holdout(holdout, table)
    if root is not None:
        folder = existing_root(root, "root")
    else:
        folder = table.path.parent

    paths = []
    for i, row in enumerate(table.rows):
        value = row[image_col]
        if not value:
            raise DataError(f"{table.where(i)}: image column {image_col!r} is empty")
        p = Path(value + image_suffix).expanduser()
        paths.append(p if p.is_absolute() else folder / p)
    groups: list[Any] = [row[group_col] for row in table.rows] if group_col else list(range(len(table.rows)))
    if split_col:
        base = [_split_name(row[split_col]) for row in table.rows]
        for i, value in enumerate(base):
            if not value:
                raise DataError(f"{table.where(i)}: split column {split_col!r} is empty")
        carve = {"val": val_fraction}
    else:
        base = ["train"] * len(table.rows)
        carve = {"test": test_fraction, "val": val_fraction / (1 - test_fraction)}
    row_ids = list(range(len(table.rows)))
    if max_samples is not None and max_samples < len(row_ids):
        pick = torch.randperm(len(row_ids), generator=generator(dataset, seed, "rows"))[:max_samples]
        row_ids = sorted(pick.tolist())
    return build_source(
        table,
        row_ids,
        paths,
        groups,
        label_cols,
        base,
        cells,
        carve,
        seed=seed,
        on_missing=on_missing,
        image_size=size,
        channels=channels,
        standardize=standardize,
        cache=cache,
        dataset=dataset,
        hint=f"Image paths are read relative to {str(folder)!r}. ",
        factors={"root": str(folder), "image_column": image_col, "split_column": split_col, "group_column": group_col},
    )


def folder_images(
    root: str,
    tasks: Sequence[str] = ("label",),
    image_size: tuple[int, int] = (224, 224),
    channels: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    holdout: Sequence[Mapping[str, str]] | None = None,
    standardize: bool = True,
    cache: bool = False,
) -> DataSource:
    """Images in nested class folders: one folder level per task, e.g. ``root/<machine>/<plane>/<image>``.

    With ``tasks=["machine", "plane"]`` the first folder level gives the ``machine`` class and the second the
    ``plane`` class (one level and one task by default). When ``root`` holds a ``train`` (or ``training``) folder,
    the first level instead names splits (``val``, ``test`` and aliases as in :data:`SPLIT_ALIASES`) and a ``val``
    split is cut from ``train`` if none is given; otherwise ``val_fraction`` / ``test_fraction`` of the images are
    drawn at random. Files with the extensions of :data:`IMAGE_EXTENSIONS` are used, also in deeper folders
    (hidden files and folders are ignored); classes are the folder names, sorted. An experiment needs at least
    two tasks, so a single level is for combining with other data or for checks.

    Args:
        root: The top folder.
        tasks: Task name of every folder level (lower-case identifiers), outermost first.
        image_size: ``(H, W)`` after bilinear resizing.
        channels: 1 (grayscale) or 3 (RGB).
        val_fraction: Share of the training images drawn into ``val``.
        test_fraction: Share of the images drawn into ``test`` when the folders give no splits.
        seed: Seed of the drawn splits.
        holdout: Held-out cells ``[{task: folder name}, ...]`` collected into ``unseen``.
        standardize: Standardise each image.
        cache: Keep images in memory after their first read.

    Returns:
        A :class:`~mtdisent.DataSource` with one task per level, input shape ``(channels, H, W)``.

    Raises:
        DataError: No images are found, or a level has a single class.
        ComponentError: An argument is malformed.
    """
    top = existing_root(root, "root")
    ok = isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, str) and task_name(t) == t for t in tasks)
    if not ok or len(set(tasks)) != len(tasks) or "path" in tasks or "split" in tasks:
        raise ComponentError(f"tasks must be distinct lower-case identifiers such as ['label'], got {tasks!r}")

    def subdirs(p: Path) -> list[Path]:
        return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))

    split_dirs = {_split_name(d.name): d for d in subdirs(top)}
    by_split = "train" in split_dirs
    layout = split_dirs if by_split else {"train": top}
    rows: list[dict[str, str]] = []

    def walk(folder: Path, classes: list[str], split: str) -> None:
        if len(classes) == len(tasks):
            for f in sorted(folder.rglob("*")):
                rel = f.relative_to(top)
                hidden = any(part.startswith(".") for part in rel.parts)
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not hidden:
                    rows.append({"path": str(rel), **dict(zip(tasks, classes, strict=True)), "split": split})
            return
        for sub in subdirs(folder):
            walk(sub, [*classes, sub.name], split)

    for split, folder in layout.items():
        walk(folder, [], split)
    if not rows:
        levels = "/".join(f"<{t}>" for t in tasks)
        raise DataError(
            f"no images found under {str(top)!r}: expected {levels}/<image> or <split>/{levels}/<image> "
            f"with extensions {list(IMAGE_EXTENSIONS)}"
        )
    table = Table(
        top / "<folders>",
        ["path", *tasks, "split"],
        rows,
        list(range(2, len(rows) + 2)),
        row_names=[f"file {r['path']!r}" for r in rows],
    )
    return _table_source(
        table,
        "path",
        list(tasks),
        root=str(top),
        split_column="split" if by_split else None,
        image_size=image_size,
        channels=channels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        on_missing="error",
        holdout=holdout,
        group_column=None,
        image_suffix="",
        max_samples=None,
        standardize=standardize,
        cache=cache,
        dataset="folder_images",
    )
