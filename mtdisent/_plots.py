"""Figures: PCA of embeddings (the paper's Fig. 11 layout), leakage heatmaps, training curves, trade-offs.

matplotlib is optional (``pip install 'mtdisent[plots]'``); without it these functions raise a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._errors import MtdisentError

__all__ = ["plot_pca", "plot_leakage", "plot_curves", "plot_tradeoff", "pca_2d"]


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MtdisentError("figures need matplotlib: pip install 'mtdisent[plots]' (or matplotlib)") from exc
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


def plot_leakage(matrix: torch.Tensor, tasks: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Heatmap of an N x N leakage matrix (row = features of, column = predicting)."""
    plt = _plt()
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 1.5))
    im = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), tasks, rotation=45, ha="right"), ax.set_yticks(range(n), tasks)
    ax.set_xlabel("predicting task"), ax.set_ylabel("features of task")
    for i in range(n):
        for j in range(n):
            v = float(matrix[i, j])
            ax.text(j, i, "nan" if v != v else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "normalised probe leakage")
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(metrics_file: str | Path, path: str | Path) -> Path:
    """Training curves from a run's metrics.jsonl: task accuracy, adversary accuracy, validation accuracy."""
    plt = _plt()
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
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
