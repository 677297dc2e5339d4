"""Figures: PCA of embeddings (the paper's Fig. 11 layout), leakage heatmaps, training curves, trade-offs.

matplotlib is optional (``pip install 'mtdisent[plots]'``); without it these functions raise
:class:`PlotsUnavailableError`, and :meth:`mtdisent.Report.save` writes its reports with one
:class:`FigureWarning` instead of figures.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._errors import MtdisentError

__all__ = [
    "FigureWarning",
    "PlotsUnavailableError",
    "PLOTS_HINT",
    "plot_pca",
    "plot_leakage",
    "plot_curves",
    "plot_tradeoff",
    "pca_2d",
]

PLOTS_HINT = "figures need matplotlib, which the plots extra installs: pip install 'mtdisent[plots]'"


class FigureWarning(UserWarning):
    """A figure was not drawn, or drawn from part of its input (matplotlib missing, unreadable metrics lines)."""


class PlotsUnavailableError(MtdisentError, ImportError):
    """matplotlib is not installed; figures need the ``plots`` extra."""


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotsUnavailableError(PLOTS_HINT) from exc
    return plt


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2) projection on the first two principal components."""
    x = x.double() - x.double().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: principal directions
    return (x @ v[:2].T).float()


def plot_pca(
    embeddings: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    class_names: Mapping[str, Sequence[str]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Grid of PCA scatter plots: row i = task i's embedding, column j = coloured by task j's labels.

    The diagonal should separate classes and the off-diagonal panels should mix them (the paper's Fig. 11).
    """
    plt = _plt()
    tasks = list(embeddings)
    n = len(tasks)
    fig, axes = plt.subplots(n, n, figsize=(3.2 * n, 3.0 * n), squeeze=False)
    for i, ti in enumerate(tasks):
        xy = pca_2d(embeddings[ti])
        for j, tj in enumerate(tasks):
            ax = axes[i][j]
            y = labels[tj]
            for k, name in enumerate(class_names[tj]):
                m = y == k
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, label=name)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{ti} features, {tj} labels", fontsize=8)
            if i == 0 or j != i:
                ax.legend(fontsize=6, markerscale=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


UNDEFINED_LEAKAGE_NOTE = (
    "n/a: normalised leakage is undefined where the predicted task has a single class in the scored split "
    "(majority rate 1, so (acc - majority) / (1 - majority) divides by zero)"
)


def plot_leakage(
    matrix: torch.Tensor,
    tasks: Sequence[str],
    path: str | Path,
    title: str = "",
    accuracy: torch.Tensor | None = None,
) -> Path:
    """Heatmap of an N x N leakage matrix (row = features of, column = predicting).

    Cells where ``matrix`` is ``nan`` (normalised leakage undefined: a single-class split) are drawn grey and
    hatched and labelled ``n/a``, with a footnote saying why; ``accuracy`` (the probes' raw accuracies, same
    shape) is annotated in every cell when given, defined or not.
    """
    plt = _plt()
    fig = _leakage_figure(plt, matrix, tasks, title, accuracy)
    return _save(fig, path)


def _leakage_figure(
    plt: Any, matrix: torch.Tensor, tasks: Sequence[str], title: str = "", accuracy: torch.Tensor | None = None
) -> Any:
    import numpy as np
    from matplotlib.patches import Rectangle

    n = len(tasks)
    values = matrix.detach().double().cpu().numpy()
    undefined = np.isnan(values)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.2 * n + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap=cmap)
    ax.set_xticks(range(n), tasks, rotation=45, ha="right"), ax.set_yticks(range(n), tasks)
    ax.set_xlabel("predicting task"), ax.set_ylabel("features of task")
    ax.set_xlim(-0.5, n - 0.5), ax.set_ylim(n - 0.5, -0.5)
    for i in range(n):
        for j in range(n):
            if undefined[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", lw=0))
            text = "n/a" if undefined[i, j] else f"{values[i, j]:+.2f}"
            if accuracy is not None:
                acc = float(accuracy[i, j])
                text += "\nacc " + ("-" if math.isnan(acc) else f"{acc:.2f}")
            colour = "black" if undefined[i, j] or values[i, j] > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "normalised probe leakage")
    if undefined.any():
        fig.text(0.01, 0.01, UNDEFINED_LEAKAGE_NOTE, fontsize=6, wrap=True, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.06 if undefined.any() else 0, 1, 1))
    return fig


def read_metrics(metrics_file: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; unreadable lines (a torn last write) are skipped with a FigureWarning."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(Path(metrics_file).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), (int, float)):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(
            f"{str(metrics_file)!r}: skipped {len(bad)} unreadable line{'s' if len(bad) > 1 else ''} ({lines}; "
            "a write cut short?); the curves use the other lines",
            FigureWarning,
            stacklevel=3,
        )
    return rows


def plot_curves(metrics_file: str | Path, path: str | Path) -> Path:
    """Training curves from a run's metrics.jsonl: task accuracy, adversary accuracy, validation accuracy.

    Lines that are not a JSON object with an ``iteration`` (a torn last line after a crash) are skipped with
    a :class:`FigureWarning` naming the file and the line numbers.
    """
    plt = _plt()
    rows = read_metrics(metrics_file)
    if not rows:
        raise MtdisentError(f"{str(metrics_file)!r} holds no metrics")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, prefix, title in zip(
        axes,
        ("acc/", "adv_acc/", "val_acc/"),
        ("training accuracy", "adversary accuracy", "validation accuracy"),
        strict=True,
    ):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        for k in keys:
            pts = [(r["iteration"], r[k]) for r in rows if k in r]
            marker = "o" if len(pts) < 20 else None  # sparse series (validation) stay visible as points
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=k[len(prefix) :])
        ax.set(title=title, xlabel="iteration", ylim=(-0.02, 1.02))
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Task accuracy against leakage, one point per (lambda, seed), labelled by lambda."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in points:
        axes[0].scatter(p["leakage"], p["accuracy"], c="C0")
        axes[0].annotate(f"{p['weight']:g}", (p["leakage"], p["accuracy"]), fontsize=7)
        if p.get("unseen_accuracy") is not None:
            axes[1].scatter(p["weight"] if p["weight"] > 0 else 1e-4, p["unseen_accuracy"], c="C1")
    axes[0].set(
        xlabel="mean normalised probe leakage (off-diagonal)", ylabel="mean task accuracy", title="accuracy vs leakage"
    )
    axes[1].set(
        xscale="log",
        xlabel="lambda (0 drawn at 1e-4)",
        ylabel="unseen-combination accuracy",
        title="generalisation to unseen combinations",
    )
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
