"""A rich progress bar: iteration, ETA, per-task loss and accuracy, each adversary's accuracy against chance."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from .._model import MultiTaskModel

__all__ = ["Progress", "format_metrics"]


def format_metrics(metrics: dict[str, Any], model: MultiTaskModel) -> str:
    """One line: ``plane loss 0.41 acc 0.88 | adv plane->shadow 0.52 (chance 0.50)``."""
    parts = []
    for t in model.task_names:
        if f"loss/{t}" in metrics:
            parts.append(f"{t} loss {metrics[f'loss/{t}']:.3f} acc {metrics[f'acc/{t}']:.2f}")
    for p in model.pairs:
        key = f"adv_acc/{p.key}"
        if key in metrics:
            chance = 1.0 / model.experiment.task(p.target).n_classes
            parts.append(f"adv {p.key} {metrics[key]:.2f} (chance {chance:.2f})")
    if "val_score" in metrics:
        parts.append(f"val {metrics['val_score']:.3f}")
    return " | ".join(parts)


class Progress:
    """Context manager showing training progress unless ``quiet``."""

    def __init__(self, model: MultiTaskModel, total: int, start: int = 0, quiet: bool = False) -> None:
        self.model, self.quiet = model, quiet
        self._bar: RichProgress | None = None
        if not quiet:
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def update(self, metrics: dict[str, Any]) -> None:
        """Advance by one iteration and show ``metrics``."""
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=format_metrics(metrics, self.model))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
