"""Loaders of the public fetal ultrasound plane datasets, read in the formats they are distributed in.

* :func:`fetal_planes_db`: FETAL_PLANES_DB (Burgos-Artizzu et al. 2020, Zenodo 3904280, CC BY 4.0): 12,400
  images of 1,792 patients, ``FETAL_PLANES_DB_data.csv`` (``;``-separated) and ``Images/<Image_name>.png``. Tasks
  from the Plane, Brain_plane, US_Machine and Operator columns; held-out (plane, machine) cells make an ``unseen``
  split of combinations training never shows.
* :func:`african_fetal_planes`: maternal-fetal planes from five African countries (Sendra-Balcells et al. 2023,
  Zenodo 7540448): ``African_planes_database.csv`` and ``<Center>/<Filename>.png``; tasks ``plane`` and ``center``.

Images are read when indexed (lazily; ``cache=True`` keeps them after the first read), converted to grayscale,
resized bilinearly to ``image_size`` and standardised per image. Missing files are found when the data source is
built; an unreadable file raises :class:`~mtdisent.DataError` naming it and its CSV line when it is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mtdisent import ComponentError, DataError, DataSource, did_you_mean

from ._imageio import (
    Table,
    build_source,
    check_common_args,
    check_flag,
    existing_root,
    generator,
    parse_holdout,
    read_table,
)

__all__ = ["FETAL_PLANES_CSV", "AFRICAN_CSV", "fetal_planes_db", "african_fetal_planes"]

FETAL_PLANES_CSV = "FETAL_PLANES_DB_data.csv"
AFRICAN_CSV = "African_planes_database.csv"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _find_csv(root: Path, name: str) -> Path:
    """``root/name`` (or ``root`` itself when it is that file); DataError listing the CSVs found otherwise."""
    if root.is_file():
        return root
    path = root / name
    if path.is_file():
        return path
    nested = sorted(root.glob(f"*/{name}"))
    if len(nested) == 1:
        return nested[0]
    found = sorted(p.name for p in root.glob("*.csv"))
    raise DataError(
        f"{name} not found in {str(root)!r}; point root at the extracted dataset folder that holds it"
        + (f" (CSV files there: {found})" if found else "")
    )


def _image_file(folder: Path, name: str) -> Path:
    return folder / (name if name.lower().endswith(_IMAGE_SUFFIXES) else f"{name}.png")


def _train_flags(table: Table, column: str) -> list[str]:
    """``"train"`` (flag 1) or ``"test"`` (flag 0) per row; DataError naming the line otherwise."""
    out = []
    for i, row in enumerate(table.rows):
        value = row[column]
        try:
            flag = int(float(value))
        except ValueError:
            flag = -1
        if flag not in (0, 1):
            raise DataError(f"{table.where(i)}: column {column!r} is {value!r}; expected 1 (train) or 0 (test)")
        out.append("train" if flag == 1 else "test")
    return out


def _task_columns(table: Table, tasks: Any, structural: Sequence[str], default_valid: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
        raise ComponentError(
            f"tasks must be a non-empty list of column names, e.g. {list(default_valid)[:2]}; got {tasks!r}"
        )
    valid = [c for c in table.columns if c not in structural]
    cols = []
    for name in tasks:
        if not isinstance(name, str):
            raise ComponentError(f"tasks entries must be column names (strings), got {name!r}")
        try:
            col = table.column(name, what="task column")
        except DataError:
            raise DataError(f"{table.path.name} has no task column {name!r}. {did_you_mean(name, valid)}") from None
        if col in structural:
            raise DataError(f"column {col!r} of {table.path.name} cannot be a task. Task columns: {valid}")
        if col in cols:
            raise ComponentError(f"tasks lists column {col!r} twice")
        cols.append(col)
    return cols


def _sample_rows(n: int, max_samples: int | None, *keys: Any) -> list[int]:
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator(*keys))[:max_samples].tolist())


def fetal_planes_db(
    root: str,
    tasks: Sequence[str] = ("Plane", "US_Machine"),
    image_size: tuple[int, int] = (224, 288),
    holdout: Sequence[Mapping[str, str]] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_missing: str = "error",
    max_samples: int | None = None,
    standardize: bool = True,
    cache: bool = False,
) -> DataSource:
    """FETAL_PLANES_DB (Burgos-Artizzu et al. 2020) as distributed on Zenodo (record 3904280).

    Reads ``<root>/FETAL_PLANES_DB_data.csv`` (separator ``;``; header
    ``Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train`` with names stripped, so the trailing
    space of ``"Train "`` does not matter) and the images ``<root>/Images/<Image_name>.png`` (RGB, RGBA, 8- or
    16-bit grayscale; converted to grayscale).

    Splits: ``Train == 1`` rows form ``train``, from which ``val`` takes whole patients (``Patient_num``) until it
    holds ``val_fraction`` of the images (chosen by ``seed``); ``Train == 0`` rows form ``test`` (the published
    patient-disjoint split). Rows matching a ``holdout`` cell are removed from all three and collected, from train
    and test alike, into ``unseen``; ``test`` keeps only the seen combinations.

    Args:
        root: The extracted dataset folder (``FETAL_PLANES_ZENODO``), or the CSV file itself.
        tasks: Columns that become tasks, any of Plane, Brain_plane, US_Machine, Operator (case-insensitive; task
            names are lower-case snake case: ``plane``, ``brain_plane``, ``us_machine``, ``operator``). Classes are
            the column's distinct values in the file, sorted.
        image_size: ``(H, W)`` of the images after bilinear resizing (the files have varying sizes).
        holdout: Held-out cells, e.g. ``[{"Plane": "Fetal brain", "US_Machine": "Aloka"}]``: a row matching every
            entry of a cell goes to ``unseen``. Columns need not be tasks; values must occur in the file.
        val_fraction: Share of the training images moved, by whole patients, to ``val`` (0 for no ``val``).
        seed: Seed of the validation split and of ``max_samples``.
        on_missing: ``"error"`` (default): a missing image raises :class:`~mtdisent.DataError` naming it and its
            CSV line. ``"skip"``: missing images are left out, listed in ``source.skipped`` and counted in
            ``source.factors["skipped"]``.
        max_samples: Use a random subset of this many CSV rows (by ``seed``), e.g. for a quick run.
        standardize: Standardise each image per image; ``False`` gives values in ``[0, 1]``.
        cache: Keep images in memory after their first read.

    Returns:
        A :class:`~mtdisent.DataSource` with splits ``train``, ``val``, ``test`` (and ``unseen``) of lazily read
        images, input shape ``(1, H, W)``, ``factors`` describing classes, split sizes, patients and skipped files.

    Raises:
        DataError: The CSV or a column is missing, a Train flag is not 0/1, a holdout value never occurs, or image
            files are missing (with ``on_missing="error"``).
        ComponentError: An argument is malformed.
    """
    size = check_common_args(image_size, val_fraction, seed, on_missing, max_samples)
    base = existing_root(root, "root") if not Path(str(root)).is_file() else Path(str(root))
    csv_path = _find_csv(base, FETAL_PLANES_CSV)
    folder = csv_path.parent
    table = read_table(csv_path, delimiters=";,\t")
    name_col, patient_col, train_col = (table.column(c) for c in ("Image_name", "Patient_num", "Train"))
    task_cols = _task_columns(table, tasks, (name_col, patient_col, train_col), ("Plane", "US_Machine"))
    cells = parse_holdout(holdout, table)
    split = _train_flags(table, train_col)
    images = folder / "Images"
    paths = [_image_file(images, row[name_col]) for row in table.rows]
    groups = [row[patient_col] for row in table.rows]
    return build_source(
        table,
        _sample_rows(len(table.rows), max_samples, "fetal_planes_db", seed, "rows"),
        paths,
        groups,
        task_cols,
        split,
        cells,
        {"val": val_fraction},
        seed=seed,
        on_missing=on_missing,
        image_size=size,
        channels=1,
        standardize=check_flag("standardize", standardize),
        cache=check_flag("cache", cache),
        dataset="fetal_planes_db",
        hint=f"Images are expected at {str(images)!r}/<Image_name>.png. ",
        factors={"root": str(folder), "max_samples": max_samples, "val_fraction": val_fraction},
    )


def african_fetal_planes(
    root: str,
    tasks: Sequence[str] = ("Plane", "Center"),
    image_size: tuple[int, int] = (224, 288),
    holdout: Sequence[Mapping[str, str]] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_missing: str = "error",
    max_samples: int | None = None,
    standardize: bool = True,
    cache: bool = False,
) -> DataSource:
    """Maternal-fetal planes from five African countries (Sendra-Balcells et al. 2023, Zenodo 7540448).

    Reads ``<root>/African_planes_database.csv`` (columns Patient_num, Plane, Train, Center, Filename; the separator,
    ``,`` or ``;``, is detected) and the images ``<root>/<Center>/<Filename>.png``. Patient numbers restart in every
    centre, so a patient is the pair (Center, Patient_num): ``val`` takes whole such patients from the
    ``Train == 1`` rows; ``Train == 0`` rows form ``test``.

    Args:
        root: The extracted dataset folder (``Zenodo_dataset``), or the CSV file itself.
        tasks: Columns that become tasks (default Plane and Center: tasks ``plane`` and ``center``).
        image_size: ``(H, W)`` after bilinear resizing.
        holdout: Held-out cells, e.g. ``[{"Plane": "Fetal brain", "Center": "Malawi"}]``, collected into ``unseen``.
        val_fraction: Share of the training images moved, by whole patients, to ``val``.
        seed: Seed of the validation split and of ``max_samples``.
        on_missing: ``"error"`` or ``"skip"``, as in :func:`fetal_planes_db`.
        max_samples: Use a random subset of this many CSV rows.
        standardize: Standardise each image per image.
        cache: Keep images in memory after their first read.

    Returns:
        A :class:`~mtdisent.DataSource` with splits ``train``, ``val``, ``test`` (and ``unseen``), input shape
        ``(1, H, W)``.

    Raises:
        DataError: The CSV or a column is missing, a Train flag is not 0/1, or image files are missing.
        ComponentError: An argument is malformed.
    """
    size = check_common_args(image_size, val_fraction, seed, on_missing, max_samples)
    base = existing_root(root, "root") if not Path(str(root)).is_file() else Path(str(root))
    csv_path = _find_csv(base, AFRICAN_CSV)
    folder = csv_path.parent
    table = read_table(csv_path, delimiters=",;\t")
    patient_col, train_col, center_col, file_col = (
        table.column(c) for c in ("Patient_num", "Train", "Center", "Filename")
    )
    task_cols = _task_columns(table, tasks, (patient_col, train_col, file_col), ("Plane", "Center"))
    cells = parse_holdout(holdout, table)
    split = _train_flags(table, train_col)
    paths = [_image_file(folder / row[center_col], row[file_col]) for row in table.rows]
    groups = [(row[center_col], row[patient_col]) for row in table.rows]
    return build_source(
        table,
        _sample_rows(len(table.rows), max_samples, "african_fetal_planes", seed, "rows"),
        paths,
        groups,
        task_cols,
        split,
        cells,
        {"val": val_fraction},
        seed=seed,
        on_missing=on_missing,
        image_size=size,
        channels=1,
        standardize=check_flag("standardize", standardize),
        cache=check_flag("cache", cache),
        dataset="african_fetal_planes",
        hint=f"Images are expected at {str(folder)!r}/<Center>/<Filename>.png. ",
        factors={"root": str(folder), "max_samples": max_samples, "val_fraction": val_fraction},
    )
