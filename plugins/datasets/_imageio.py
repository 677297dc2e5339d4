"""Shared helpers of the file-based dataset loaders: tables, image reading, lazy datasets and splits.

Private to ``mtdisent_plugins.datasets``; the public loaders are :mod:`.fetal_planes` and :mod:`.csv_images`.
Images are read with Pillow (imported when the first image is read), converted to float, resized with
bilinear filtering (antialiased when shrinking) and standardised per image. No numpy is needed.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mtdisent import ComponentError, DataError, DataSource, Task, did_you_mean

__all__ = [
    "ImageFileDataset",
    "Table",
    "read_table",
    "read_image",
    "task_name",
    "sort_classes",
    "check_common_args",
    "check_flag",
    "check_fraction",
    "check_files",
    "group_split",
    "parse_holdout",
    "matches_any",
    "build_tasks",
    "generator",
    "standardize_image",
    "existing_root",
    "build_source",
]

MIN_SIZE = 8
ON_MISSING = ("error", "skip")
_NUMBER = re.compile(r"^[+-]?\d+$")


# ----------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------
def check_common_args(
    image_size: Any, val_fraction: Any, seed: Any, on_missing: Any, max_samples: Any = None
) -> tuple[int, int]:
    """Validate the arguments every loader shares; returns ``(H, W)``. Raises :class:`ComponentError`."""
    ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x >= MIN_SIZE for x in image_size)
    if not ok:
        raise ComponentError(f"image_size must be (height, width), integers >= {MIN_SIZE}; got {image_size!r}")
    check_fraction("val_fraction", val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ComponentError(f"seed must be an integer >= 0, got {seed!r}")
    if on_missing not in ON_MISSING:
        raise ComponentError(f"on_missing must be one of {list(ON_MISSING)}, got {on_missing!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ComponentError(f"max_samples must be an integer >= 1 or None, got {max_samples!r}")
    return int(image_size[0]), int(image_size[1])


def check_flag(name: str, value: Any) -> bool:
    """A bool, else :class:`ComponentError` (a string such as ``"false"`` is refused, not read as true)."""
    if not isinstance(value, bool):
        raise ComponentError(f"{name} must be true or false, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """A number in ``[0, 1)``, else :class:`ComponentError`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= value < 1:
        raise ComponentError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def generator(*keys: Any) -> torch.Generator:
    """A CPU generator seeded from a stable hash of ``keys``."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------
class Table:
    """A CSV file read into memory: stripped column names and cells, and each row's line in the file.

    Attributes:
        path: The file.
        columns: Column names, whitespace stripped.
        rows: One dict per data row (column -> stripped cell).
        lines: The line number (1-based, header = line 1) where each row starts.
        delimiter: The separator found.
        row_names: For tables built in memory (e.g. from a folder listing), a description of every row.
    """

    def __init__(
        self,
        path: Path,
        columns: list[str],
        rows: list[dict[str, str]],
        lines: list[int],
        delimiter: str = ",",
        row_names: list[str] | None = None,
    ) -> None:
        self.path, self.columns, self.rows, self.lines, self.delimiter = path, columns, rows, lines, delimiter
        self.row_names = row_names

    def where(self, i: int) -> str:
        """``"<file name> line <n>"`` of row ``i`` (or the row's own name for in-memory tables), for messages."""
        if self.row_names is not None:
            return self.row_names[i]
        return f"{self.path.name} line {self.lines[i]}"

    def column(self, name: str, what: str = "column") -> str:
        """The column called ``name`` (exactly, else case-insensitively, else snake-case); DataError otherwise."""
        if name in self.columns:
            return name
        for col in self.columns:
            if col.lower() == name.lower() or task_name(col) == task_name(name):
                return col
        raise DataError(f"{self.path.name} has no {what} {name!r}. {did_you_mean(name, self.columns)}")


def read_table(path: str | Path, delimiters: str = ",;\t") -> Table:
    """Read a CSV file whose separator is one of ``delimiters`` (sniffed from the header line).

    Column names and cells are stripped of surrounding whitespace (a header may carry a trailing space); a UTF-8
    byte-order mark is ignored; blank lines are skipped.

    Raises:
        DataError: The file is missing or unreadable, has no header, repeats a column name, or a row has more
            cells than the header (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"table {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"cannot read table {str(path)!r}: {exc}") from exc
    header_line = next((line for line in text.splitlines() if line.strip()), "")
    if not header_line:
        raise DataError(f"table {str(path)!r} is empty")
    delimiter = max(delimiters, key=lambda d: header_line.count(d))
    if header_line.count(delimiter) == 0:
        delimiter = delimiters[0]
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    start = 1
    for cells in reader:
        line = start
        start = reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            dup = sorted({c for c in header if header.count(c) > 1 and c})
            if dup:
                raise DataError(f"{path.name}: column name(s) {dup} appear more than once in the header")
            continue
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header) :]):
            raise DataError(
                f"{path.name} line {line}: {len(cells)} cells but the header has {len(header)} columns "
                f"(separator {delimiter!r})"
            )
        cells = cells + [""] * (len(header) - len(cells))
        rows.append({name: cell.strip() for name, cell in zip(header, cells, strict=False) if name})
        lines.append(line)
    assert header is not None
    return Table(path, [c for c in header if c], rows, lines, delimiter)


def task_name(column: str) -> str:
    """Lower-case snake-case task name of a column, e.g. ``"US_Machine"`` -> ``us_machine``."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", column.strip()).strip("_").lower()
    if not name or name[0].isdigit():
        name = f"t_{name}"
    return name


def sort_classes(values: Sequence[str]) -> list[str]:
    """Distinct non-empty values, sorted numerically when all are integers, else as strings."""
    distinct = {v for v in values if v != ""}
    if distinct and all(_NUMBER.match(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def build_tasks(
    table: Table, columns: Sequence[str], row_ids: Sequence[int]
) -> tuple[list[Task], dict[str, list[str]]]:
    """One :class:`Task` per column, classes counted from rows ``row_ids`` of the table (sorted; empty cells ignored).

    Raises:
        DataError: A column has fewer than two classes.
    """
    tasks, classes = [], {}
    for col in columns:
        names = sort_classes([table.rows[i][col] for i in row_ids])
        if len(names) < 2:
            raise DataError(
                f"{table.path.name}: column {col!r} has {len(names)} distinct non-empty value(s) {names}; "
                "a task needs at least 2 classes"
            )
        tasks.append(Task(name=task_name(col), classes=names))
        classes[col] = names
    return tasks, classes


# ----------------------------------------------------------------------------------------------------
# holdout cells and splits
# ----------------------------------------------------------------------------------------------------
def parse_holdout(holdout: Any, table: Table) -> list[dict[str, str]]:
    """Validate held-out cells ``[{column: value}, ...]`` against the table; columns resolved as :meth:`Table.column`.

    Raises:
        ComponentError: ``holdout`` is not a list of non-empty mappings of strings.
        DataError: A column or value does not occur in the file (the message lists what does).
    """
    if holdout is None:
        return []
    if not isinstance(holdout, (list, tuple)):
        raise ComponentError(f"holdout must be a list of {{column: value}} cells, got {type(holdout).__name__}")
    cells = []
    for k, cell in enumerate(holdout):
        if not isinstance(cell, Mapping) or not cell:
            raise ComponentError(f"holdout[{k}] must be a non-empty mapping {{column: value}}, got {cell!r}")
        parsed = {}
        for col, value in cell.items():
            name = table.column(str(col), what=f"holdout[{k}] column")
            value = str(value).strip()
            present = sort_classes([row[name] for row in table.rows])
            if value not in present:
                raise DataError(
                    f"holdout[{k}]: value {value!r} never occurs in column {name!r} of {table.path.name}. "
                    f"{did_you_mean(value, present)}"
                )
            parsed[name] = value
        cells.append(parsed)
    return cells


def matches_any(row: Mapping[str, str], cells: Sequence[Mapping[str, str]]) -> bool:
    """Whether ``row`` matches every entry of at least one cell."""
    return any(all(row.get(col) == value for col, value in cell.items()) for cell in cells)


def group_split(
    ids: Sequence[int], groups: Sequence[Any], fractions: Sequence[float], g: torch.Generator
) -> list[list[int]]:
    """Split ``ids`` into ``len(fractions) + 1`` parts with no group in two parts.

    Groups are shuffled by ``g`` and given in turn to part 1, 2, ... until each holds at least its fraction of
    the images (whole groups, so a part may hold a little more); at least one group always stays in part 0, which
    keeps the rest. Parts keep the original order of ``ids``.
    """
    order: list[Any] = []
    members: dict[Any, list[int]] = {}
    for i, grp in zip(ids, groups, strict=True):
        if grp not in members:
            members[grp] = []
            order.append(grp)
        members[grp].append(i)
    perm = torch.randperm(len(order), generator=g).tolist()
    shuffled = [order[p] for p in perm]
    total = len(ids)
    assigned: dict[Any, int] = {}
    cursor = 0
    for part, frac in enumerate(fractions, start=1):
        count = 0
        while cursor < len(shuffled) - 1 and count < frac * total:  # always leave a group for part 0
            assigned[shuffled[cursor]] = part
            count += len(members[shuffled[cursor]])
            cursor += 1
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for i, grp in zip(ids, groups, strict=True):
        parts[assigned.get(grp, 0)].append(i)
    return parts


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------
def check_files(
    paths: Sequence[Path], where: Callable[[int], str], on_missing: str, hint: str = ""
) -> tuple[list[int], list[dict[str, str]]]:
    """Indices of existing files and the skipped ones (``{"path", "where"}``).

    Raises:
        DataError: Files are missing and ``on_missing == "error"``: names the first few and how many in all.
    """
    kept, skipped = [], []
    for i, p in enumerate(paths):
        if p.is_file():
            kept.append(i)
        else:
            skipped.append({"path": str(p), "where": where(i)})
    if skipped and on_missing == "error":
        shown = "; ".join(f"{s['path']!r} ({s['where']})" for s in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise DataError(
            f"{len(skipped)} image file(s) listed are missing: {shown}{more}. {hint}"
            "Pass on_missing='skip' to leave them out."
        )
    return kept, skipped


def read_image(path: str | Path, image_size: tuple[int, int], channels: int = 1) -> torch.Tensor:
    """Read an image as a float tensor ``(channels, H, W)`` in ``[0, 1]``, resized bilinearly to ``image_size``.

    Grayscale, RGB, RGBA (composited on black), palette, 1-bit and 16-bit (``I;16``) PNGs and other Pillow formats
    are accepted; colour becomes luma (ITU-R 601) for one channel, grayscale is repeated for three.

    Raises:
        DataError: Pillow is missing, or the file cannot be read or decoded.
        OSError: Propagated from Pillow for unreadable files (callers wrap it with the file's row).
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is in the test extras
        raise DataError("reading image files needs Pillow: pip install pillow") from exc
    h, w = image_size
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            lo, hi = img.getextrema()
            planes, full = [img.convert("F")], (65535.0 if (mode != "I" or hi > 255) else 255.0)
        elif mode == "F":
            planes, full = [img], max(1.0, float(img.getextrema()[1]))
        else:
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(base, rgba).convert("RGB")
            if channels == 1:
                planes = [img.convert("L").convert("F")]
            else:
                planes = [p.convert("F") for p in img.convert("RGB").split()]
            full = 255.0
    out = []
    for plane in planes:
        if plane.size != (w, h):
            plane = plane.resize((w, h), Image.Resampling.BILINEAR)
        out.append(torch.frombuffer(bytearray(plane.tobytes()), dtype=torch.float32).view(h, w))
    x = torch.stack(out) / full
    if x.shape[0] != channels:
        x = x.mean(0, keepdim=True) if channels == 1 else x.expand(channels, h, w).contiguous()
    return x.clamp_(0, 1)


def standardize_image(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the whole image (population std); a constant image becomes all zeros."""
    std = x.std(correction=0)
    if float(std) < 1e-6:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


class ImageFileDataset(Dataset):
    """Images read from files when indexed (lazily), with integer labels: the data contract's items.

    Args:
        paths: One image file per sample.
        labels: Task name -> ``LongTensor[N]`` class indices (``-1`` = unlabelled).
        where: One description per sample for error messages (e.g. ``"data.csv line 7"``).
        image_size: ``(H, W)`` the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        standardize: Standardise each image (``(x - mean) / std``); else values in ``[0, 1]``.
        cache: Keep each image after its first read (as float16 before standardisation). With a multi-process
            ``DataLoader`` every worker keeps its own cache.
        groups: Optional group (e.g. patient) of every sample, kept as :attr:`groups`.

    Raises:
        DataError: When indexed, if the file cannot be read: names the file and its row.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Mapping[str, torch.Tensor],
        where: Sequence[str],
        image_size: tuple[int, int],
        channels: int = 1,
        standardize: bool = True,
        cache: bool = False,
        groups: Sequence[Any] | None = None,
    ) -> None:
        n = len(paths)
        if len(where) != n or any(v.shape != (n,) for v in labels.values()):
            raise DataError(f"ImageFileDataset: {n} paths but {len(where)} row descriptions or labels of other sizes")
        self.paths = [Path(p) for p in paths]
        self.labels = {k: v.long() for k, v in labels.items()}
        self.where = list(where)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = channels
        self.standardize = standardize
        self.groups = list(groups) if groups is not None else None
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The image ``index`` in ``[0, 1]``, ``(C, H, W)``, before standardisation."""
        if self._cache is not None and index in self._cache:
            return self._cache[index].float()
        path = self.paths[index]
        try:
            x = read_image(path, self.image_size, self.channels)
        except DataError:
            raise
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise DataError(f"cannot read image {str(path)!r} ({self.where[index]}): {exc}") from exc
        if self._cache is not None:
            self._cache[index] = x.half()
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        x = self.load(index)
        if self.standardize:
            x = standardize_image(x)
        return x, {name: int(v[index]) for name, v in self.labels.items()}

    def __repr__(self) -> str:
        return f"ImageFileDataset(n={len(self)}, image={(self.channels, *self.image_size)}, tasks={list(self.labels)})"


def make_split(
    ids: Sequence[int],
    paths: Sequence[Path],
    table: Table,
    columns: Sequence[str],
    classes: Mapping[str, list[str]],
    image_size: tuple[int, int],
    channels: int,
    standardize: bool,
    cache: bool,
    groups: Sequence[Any] | None = None,
) -> ImageFileDataset:
    """An :class:`ImageFileDataset` of table rows ``ids`` (``paths`` indexed by row), labels from ``columns``."""
    labels = {}
    for col in columns:
        index = {name: k for k, name in enumerate(classes[col])}
        labels[task_name(col)] = torch.tensor([index.get(table.rows[i][col], -1) for i in ids], dtype=torch.long)
    return ImageFileDataset(
        [paths[i] for i in ids],
        labels,
        [table.where(i) for i in ids],
        image_size,
        channels,
        standardize,
        cache,
        [groups[i] for i in ids] if groups is not None else None,
    )


def existing_root(root: Any, what: str) -> Path:
    """``root`` as an existing folder, else :class:`DataError`."""
    if not isinstance(root, (str, os.PathLike)):
        raise ComponentError(f"{what} must be a folder path, got {root!r}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {str(path)!r} is not an existing folder")
    return path


def build_source(
    table: Table,
    row_ids: Sequence[int],
    paths: Sequence[Path],
    groups: Sequence[Any],
    task_columns: Sequence[str],
    base_split: Sequence[str],
    holdout: Sequence[Mapping[str, str]],
    carve: Mapping[str, float],
    *,
    seed: int,
    on_missing: str,
    image_size: tuple[int, int],
    channels: int,
    standardize: bool,
    cache: bool,
    dataset: str,
    hint: str = "",
    factors: Mapping[str, Any] | None = None,
) -> DataSource:
    """Assemble a :class:`~mtdisent.DataSource` from table rows.

    ``row_ids`` are the rows used; ``paths``, ``groups`` and ``base_split`` are indexed by row. Missing files are
    checked here (``on_missing``); rows matching a ``holdout`` cell go to ``unseen`` (from every split); each split
    named in ``carve`` that ``base_split`` does not already give is cut from ``train`` group-disjointly with that
    fraction of the training rows. Classes are counted from every row of the table.

    Raises:
        DataError: Files missing (with ``on_missing="error"``), a task column with fewer than two classes, or no
            training rows left.
    """
    ids = list(row_ids)
    kept_pos, skipped = check_files([paths[i] for i in ids], lambda k: table.where(ids[k]), on_missing, hint)
    kept = [ids[k] for k in kept_pos]
    tasks, classes = build_tasks(table, task_columns, range(len(table.rows)))
    held = [i for i in kept if matches_any(table.rows[i], holdout)] if holdout else []
    held_set = set(held)
    by_split: dict[str, list[int]] = {}
    for i in kept:
        if i not in held_set:
            by_split.setdefault(base_split[i], []).append(i)
    train = by_split.get("train", [])
    todo = [(name, frac) for name, frac in carve.items() if frac > 0 and name not in by_split]
    if train and todo:
        parts = group_split(train, [groups[i] for i in train], [f for _, f in todo], generator(dataset, seed, "split"))
        by_split["train"] = parts[0]
        for (name, _), part in zip(todo, parts[1:], strict=True):
            if part:
                by_split[name] = part
    if not by_split.get("train"):
        raise DataError(
            f"{table.path.name}: no training images left "
            f"({len(ids)} rows used, {len(skipped)} missing files skipped, {len(held)} held out)"
        )
    if held:
        by_split["unseen"] = held
    order = ["train", "val", "test"] + sorted(k for k in by_split if k not in ("train", "val", "test", "unseen"))
    order += ["unseen"] if held else []
    splits = {
        name: make_split(
            by_split[name], paths, table, task_columns, classes, image_size, channels, standardize, cache, groups
        )
        for name in order
        if by_split.get(name)
    }
    info = {
        "dataset": dataset,
        "table": str(table.path),
        "image_size": list(image_size),
        "channels": channels,
        "seed": seed,
        "standardize": "per_image" if standardize else "none",
        "tasks": {task_name(c): {"column": c, "classes": classes[c]} for c in task_columns},
        "holdout": [dict(c) for c in holdout],
        "splits": {name: len(ds) for name, ds in splits.items()},
        "groups": {name: len(set(ds.groups or [])) for name, ds in splits.items()},
        "skipped": len(skipped),
        **dict(factors or {}),
    }
    source = DataSource(splits, tasks=tasks, input_shape=(channels, *image_size), factors=info)
    source.skipped = skipped  # type: ignore[attr-defined]
    return source
