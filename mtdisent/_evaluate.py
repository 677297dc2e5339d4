"""``md.evaluate``: per-task accuracy, per-combination accuracy, trained-adversary and fresh-probe leakage.

Evaluation reads a model and data; it never reaches into the engine.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._data import DataError, DataSource, resolve_data, task_classes
from ._engine import Run
from ._engine._checkpoint import load_with_provenance
from ._errors import MtdisentError
from ._levers import change_after_training
from ._model import MultiTaskModel, map_features
from ._torch import eval_mode
from .evaluation import (
    Accuracy,
    LeakageMatrix,
    Metric,
    TaskMetrics,
    collect_features,
    combination_accuracy,
    combination_summary,
    leakage_matrix,
    majority_rate,
    seen_combinations,
)

__all__ = ["Report", "evaluate", "resolve_model"]


def resolve_model(source: Any, which: str = "best") -> tuple[MultiTaskModel, dict[str, Any]]:
    """A model from a :class:`Run`, a run or checkpoint directory, or a model, and where it came from.

    Returns:
        ``(model, provenance)``: provenance holds ``model`` (the run directory or ``"in-memory model"``),
        ``checkpoint`` and ``iteration`` where known, as :meth:`Report.describe` takes them.
    """
    if isinstance(source, MultiTaskModel):
        return source, {"model": "in-memory model"}
    if isinstance(source, Run):
        model = source.model_at(which)
        at_best = which == "best" and source.best is not None
        checkpoint = which if which != "best" or at_best else "final (the run has no best checkpoint)"
        where = str(source.out_dir) if source.out_dir is not None else "in-memory model"
        iteration = source.best["iteration"] if at_best and source.best is not None else source.iteration
        _warn_before_finish(model, checkpoint, where)
        return model, {"model": where, "checkpoint": checkpoint, "iteration": iteration}
    if isinstance(source, (str, Path)):
        model, info = load_with_provenance(source, which=which)
        _warn_before_finish(model, info["checkpoint"], str(source))
        return model, {"model": str(source), "checkpoint": info["checkpoint"], "iteration": info["iteration"]}
    raise MtdisentError(f"evaluate expects a Run, a run directory or a MultiTaskModel, got {type(source).__name__}")


def _warn_before_finish(model: MultiTaskModel, checkpoint: str, where: str) -> None:
    """Warn when a checkpoint is read from a run whose final model was changed after its last iteration."""
    what = change_after_training(model)
    if what is None or checkpoint.startswith("final"):
        return
    warnings.warn(
        f"{where}: the {checkpoint} checkpoint holds the model before {what} at the end of training; which='final' "
        "is the model training ended with",
        stacklevel=4,  # the caller of evaluate
    )


def _key(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


_PROVENANCE = ("model", "checkpoint", "checkpoint_iteration", "split", "probe_split")


@dataclass
class Report:
    """What :func:`evaluate` measured.

    Attributes:
        tasks: Task names in order.
        metrics: Per task: accuracy, balanced accuracy, per-class accuracy, confusion matrix.
        adversary_accuracy: ``{(source, target): accuracy}`` of the trained adversaries on the data (with an
            ensemble, its most accurate member).
        probes: ``{layer: {kind: LeakageMatrix}}`` fresh-probe leakage (layers ``features`` and
            ``penultimate``; kinds ``linear`` and ``mlp``, including i == j, and ``linear_conditional`` /
            ``mlp_conditional``, the probes within each class of the source task).
        combinations: Per task, accuracy per factor combination with seen/unseen flags and a summary.
        values: Every metric's values on the evaluation data by key (``acc/<task>``, ``mean_acc``, ... and
            those of the extra metrics passed to :func:`evaluate`).
        info: Where the numbers came from. The keys the markdown report names in its header (set them
            with :meth:`describe`, or the same keyword arguments of :meth:`save` / :meth:`to_markdown`):
            ``model`` (the run directory, or ``"in-memory model"``), ``checkpoint`` (``best``, ``final`` or
            ``latest``), ``checkpoint_iteration``, ``split`` (the split scored), ``probe_split`` (the split the
            probes were fitted on), ``n_eval``, ``n_probe``; any other key is listed as is.
        class_names: ``{task: [class name, ...]}`` as the spec declares them (``experiment.task(t).class_names``);
            per-class and factor-combination rows use them, and ``report.json`` stores them under
            ``info["class_names"]``. Indices are printed for a task without names.
    """

    tasks: list[str]
    metrics: dict[str, TaskMetrics]
    adversary_accuracy: dict[tuple[str, str], float] = field(default_factory=dict)
    adversary_majority: dict[tuple[str, str], float] = field(default_factory=dict)
    probes: dict[str, dict[str, LeakageMatrix]] = field(default_factory=dict)
    combinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    labels: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    class_names: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def off_diagonal_leakage(self, layer: str = "features", kind: str = "linear", conditional: bool = True) -> float:
        """Mean normalised probe leakage over pairs i != j (nan where undefined is skipped).

        The headline leakage: conditional by default (see :attr:`conditional_leakage`), the unconditional probes'
        with ``conditional=False``; a report without conditional probes falls back to the unconditional ones.
        """
        probe = self._probe(layer, f"{kind}_conditional") if conditional else None
        probe = probe or self._probe(layer, kind)
        if probe is None:
            return math.nan
        vals = [v for (i, j), v in probe.normalised.items() if i != j and not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def accuracy(self) -> dict[str, float]:
        """``{task: accuracy}``."""
        return {t: m.accuracy for t, m in self.metrics.items()}

    @property
    def balanced_accuracy(self) -> dict[str, float]:
        """``{task: balanced accuracy}``."""
        return {t: m.balanced_accuracy for t, m in self.metrics.items()}

    def _probe(self, layer: str = "features", kind: str = "linear") -> LeakageMatrix | None:
        return self.probes.get(layer, {}).get(kind)

    @property
    def leakage(self) -> dict[tuple[str, str], float]:
        """Fresh linear-probe accuracy ``{(i, j): acc}`` predicting task j from task i's encoder features."""
        probe = self._probe()
        return dict(probe.accuracy) if probe is not None else {}

    @property
    def leakage_normalised(self) -> dict[tuple[str, str], float]:
        """The same, normalised: (acc - majority) / (1 - majority)."""
        probe = self._probe()
        return dict(probe.normalised) if probe is not None else {}

    @property
    def conditional_leakage(self) -> dict[tuple[str, str], float]:
        """Normalised conditional linear-probe leakage ``{(i, j): value}`` on the encoder features.

        A probe reads task j from task i's features within each class of task i, and its accuracy is normalised
        against the majority rate of j within that class (weighted over classes). When the factors are
        correlated in the data, an unconditional probe reads j *through* task i's own information (a perfect
        shape feature tells the background when circles are only ever on white); the conditional one measures
        only what the features carry beyond their own task: 0 when they carry nothing more, 1 when they tell j
        perfectly within every class of i.
        """
        probe = self._probe("features", "linear_conditional")
        return dict(probe.normalised) if probe is not None else {}

    def describe(
        self,
        *,
        model: str | Path | None = None,
        checkpoint: str | None = None,
        iteration: int | None = None,
        split: str | None = None,
        probe_split: str | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> Report:
        """Record where the numbers came from (only the arguments given); returns the report.

        Args:
            model: The run directory the model was loaded from, or ``"in-memory model"``.
            checkpoint: Which model of the run: ``"best"``, ``"final"`` or ``"latest"``.
            iteration: The training iteration of that checkpoint, when known.
            split: The split that was scored.
            probe_split: The split the fresh probes were fitted on.
            class_names: ``{task: names}`` as the spec declares them.
        """
        self.info.update(self._provenance(model, checkpoint, iteration, split, probe_split))
        if class_names is not None:
            self.class_names = {t: list(v) for t, v in class_names.items()}
        return self

    @staticmethod
    def _provenance(
        model: str | Path | None,
        checkpoint: str | None,
        iteration: int | None,
        split: str | None,
        probe_split: str | None,
    ) -> dict[str, Any]:
        given = {
            "model": str(model) if model is not None else None,
            "checkpoint": checkpoint,
            "checkpoint_iteration": iteration,
            "split": split,
            "probe_split": probe_split,
        }
        return {k: v for k, v in given.items() if v is not None}

    def _names(self, task: str, class_names: Mapping[str, Sequence[str]] | None = None) -> list[str] | None:
        for source in (class_names or {}, self.class_names, self.info.get("class_names") or {}):
            if source.get(task):
                return list(source[task])
        return None

    def _class_label(self, task: str, index: Any, class_names: Mapping[str, Sequence[str]] | None = None) -> str:
        names = self._names(task, class_names)
        if names is not None and isinstance(index, int) and 0 <= index < len(names):
            return names[index]
        return str(index)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``info["class_names"]`` holds the class names when known."""
        info = dict(self.info)
        if self.class_names and "class_names" not in info:
            info["class_names"] = {t: list(v) for t, v in self.class_names.items()}
        return {
            "tasks": self.tasks,
            "metrics": {t: m.to_dict() for t, m in self.metrics.items()},
            "adversary_accuracy": {_key(k): v for k, v in self.adversary_accuracy.items()},
            "adversary_majority": {_key(k): v for k, v in self.adversary_majority.items()},
            "probes": {layer: {kind: m.to_dict() for kind, m in kinds.items()} for layer, kinds in self.probes.items()},
            "combinations": self.combinations,
            "values": self.values,
            "info": info,
        }

    def to_json(self, indent: int = 1) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def _header(self, info: Mapping[str, Any]) -> list[str]:
        model = info.get("model") or "not recorded"
        checkpoint = info.get("checkpoint")
        iteration = info.get("checkpoint_iteration")
        if checkpoint is None:
            checkpoint = "the model as given" if model == "in-memory model" else "not recorded"
        if iteration is not None:
            checkpoint = f"{checkpoint} (iteration {iteration})"
        n_eval = f" ({info['n_eval']} samples)" if info.get("n_eval") is not None else ""
        lines = [
            f"- model: {model}",
            f"- checkpoint: {checkpoint}",
            f"- scored on split: {info.get('split') or 'not recorded'}{n_eval}",
        ]
        if self.probes:
            n_probe = f" ({info['n_probe']} samples)" if info.get("n_probe") is not None else ""
            lines.append(f"- probes fitted on split: {info.get('probe_split') or 'not recorded'}{n_probe}")
        else:
            lines.append("- probes: none fitted")
        shown = {*_PROVENANCE, "n_eval", "n_probe", "class_names"}
        others = [f"{k}: {v}" for k, v in info.items() if k not in shown]
        if others:
            lines.append("- " + "; ".join(others))
        return lines

    def to_markdown(
        self,
        *,
        model: str | Path | None = None,
        checkpoint: str | None = None,
        iteration: int | None = None,
        split: str | None = None,
        probe_split: str | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> str:
        """The report as markdown: a header saying what was scored, then tables.

        The keyword arguments (see :meth:`describe`) override what :attr:`info` records, for this text only.
        """
        from ._plots import UNDEFINED_LEAKAGE_NOTE

        info = {**self.info, **self._provenance(model, checkpoint, iteration, split, probe_split)}
        lines = ["# mtdisent evaluation", "", *self._header(info), ""]
        lines += [
            "## Per task",
            "",
            "| task | accuracy | balanced accuracy | per-class accuracy | n |",
            "|---|---|---|---|---|",
        ]
        for t, m in self.metrics.items():
            per_class = ", ".join(
                f"{self._class_label(t, k, class_names)} {'-' if a is None else f'{a:.3f}'}"
                for k, a in enumerate(m.per_class_accuracy)
            )
            lines.append(f"| {t} | {_fmt(m.accuracy)} | {_fmt(m.balanced_accuracy)} | {per_class} | {m.n} |")
        if self.combinations:
            lines += [
                "",
                "## Factor combinations",
                "",
                "| task | seen accuracy | unseen accuracy | worst combination | worst accuracy |",
                "|---|---|---|---|---|",
            ]
            for t, c in self.combinations.items():
                s = c["summary"]
                worst = s.get("worst_combination")
                named = (
                    ", ".join(
                        f"{f}={self._class_label(f, v, class_names)}" for f, v in zip(c["factors"], worst, strict=True)
                    )
                    if worst
                    else "-"
                )
                lines.append(
                    f"| {t} | {_fmt(s.get('seen_accuracy'))} (n={s['seen_n']}) | {_fmt(s.get('unseen_accuracy'))} "
                    f"(n={s['unseen_n']}) | {named} | {_fmt(s.get('worst_accuracy'))} |"
                )
        if self.adversary_accuracy:
            lines += ["", "## Trained adversaries", "", "| adversary | accuracy | majority rate |", "|---|---|---|"]
            for k, v in self.adversary_accuracy.items():
                lines.append(f"| {_key(k)} | {_fmt(v)} | {_fmt(self.adversary_majority.get(k, math.nan))} |")
        for layer, kinds in self.probes.items():
            for matrix in sorted(kinds.values(), key=lambda m: not m.conditional):
                name = f"{matrix.kind} probes" + (" within each class of the row's task" if matrix.conditional else "")
                lines += ["", f"## Fresh {name} on {layer} (rows: features of; columns: predicting)", ""]
                if matrix.info.get("fit_split") and matrix.info.get("score_split"):
                    fit, score = matrix.info["fit_split"], matrix.info["score_split"]
                    lines += [f"Fitted on split {fit!r}, scored on split {score!r}.", ""]
                lines.append("| | " + " | ".join(matrix.tasks) + " |")
                lines.append("|---" * (len(matrix.tasks) + 1) + "|")
                undefined = False
                for i in matrix.tasks:
                    cells = []
                    for j in matrix.tasks:
                        acc, norm = matrix.accuracy[(i, j)], matrix.normalised[(i, j)]
                        undefined = undefined or math.isnan(norm)
                        acc_text = "-" if math.isnan(acc) else f"{acc:.3f}"
                        cells.append(f"{acc_text} ({'n/a' if math.isnan(norm) else f'{norm:+.2f}'})")
                    lines.append(f"| {i} | " + " | ".join(cells) + " |")
                lines.append("")
                lines.append("Cells: probe accuracy (normalised leakage (acc - majority) / (1 - majority)).")
                if undefined:
                    lines.append("")
                    lines.append(f"{UNDEFINED_LEAKAGE_NOTE}.")
        return "\n".join(lines) + "\n"

    def save(
        self,
        directory: str | Path,
        figures: bool = False,
        metrics_file: str | Path | None = None,
        *,
        model: str | Path | None = None,
        checkpoint: str | None = None,
        iteration: int | None = None,
        split: str | None = None,
        probe_split: str | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> Path:
        """Write report.json and report.md into ``directory``; with ``figures``, also PNGs.

        Figures: ``pca.png`` (penultimate embeddings, the paper's Fig. 11 layout), ``leakage_<layer>_<kind>.png``
        heatmaps, and ``curves.png`` from ``metrics_file`` when given. They need matplotlib (the ``plots``
        extra); without it the reports are still written and one :class:`~mtdisent.FigureWarning` says so.
        The keyword arguments are recorded in :attr:`info` first (see :meth:`describe`).
        """
        self.describe(
            model=model,
            checkpoint=checkpoint,
            iteration=iteration,
            split=split,
            probe_split=probe_split,
            class_names=class_names,
        )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(self.to_json(), encoding="utf-8")
        (out / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        if figures:
            import warnings

            from ._plots import FigureWarning, PlotsUnavailableError

            try:
                self._save_figures(out, metrics_file)
            except PlotsUnavailableError as exc:
                warnings.warn(f"{exc}; the reports in {str(out)!r} were written without figures", FigureWarning, 2)
        return out

    def _save_figures(self, out: Path, metrics_file: str | Path | None) -> None:
        import warnings

        from ._plots import FigureWarning, PlotsUnavailableError, plot_curves, plot_leakage, plot_pca

        if self.embeddings:
            names = {
                t: self._names(t) or list(map(str, range(len(self.metrics[t].per_class_accuracy)))) for t in self.tasks
            }
            plot_pca(self.embeddings, self.labels, names, out / "pca.png", "penultimate layer, PCA")
        for layer, kinds in self.probes.items():
            for kind, matrix in kinds.items():
                plot_leakage(
                    matrix.as_tensor(normalised=True).float(),
                    matrix.tasks,
                    out / f"leakage_{layer}_{kind}.png",
                    f"normalised {kind}-probe leakage, {layer}",
                    accuracy=matrix.as_tensor(normalised=False).float(),
                )
        if metrics_file is not None and Path(metrics_file).is_file():
            try:
                plot_curves(metrics_file, out / "curves.png")
            except PlotsUnavailableError:
                raise
            except MtdisentError as exc:  # e.g. nothing readable yet: the other figures stand
                warnings.warn(f"no curves.png: {exc}", FigureWarning, 3)


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _has_splits(data: Any) -> bool:
    """Whether ``data`` names its splits (spec data, a mapping or a DataSource), rather than being one dataset."""
    return data is None or isinstance(data, (DataSource, Mapping))


def _split(data: Any, model: MultiTaskModel, split: str | None, default: str) -> Any:
    if data is None or isinstance(data, (DataSource, Mapping)):
        source = data if isinstance(data, DataSource) else resolve_data(model.experiment, data)
        name = split or default
        if name not in source:
            raise DataError(f"the data has no split {name!r} (it has {sorted(source)})")
        return source[name]
    return data


@torch.no_grad()
def _adversary_accuracy(
    model: MultiTaskModel, feats: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    if not model.pairs:
        return {}, {}
    with eval_mode(model):
        logits = model.adversary_logits(feats, labels=labels)  # (P, B, K_max)
    acc: dict[tuple[str, str], float] = {}
    maj: dict[tuple[str, str], float] = {}
    for p, pair in enumerate(model.pairs):
        y = labels[pair.target]
        m = y >= 0
        if bool(m.any()):
            key = (pair.source, pair.target)
            value = float((logits[p][m].argmax(-1) == y[m]).float().mean())
            acc[key] = max(value, acc.get(key, 0.0))  # an ensemble leaks what its best member reads
            maj[key] = majority_rate(y, model.pair_classes[p])
    return acc, maj


def evaluate(
    source: Any,
    data: Any = None,
    *,
    split: str | None = None,
    probe_data: Any = None,
    probe_split: str = "train",
    probes: Sequence[str] = ("linear", "mlp"),
    layers: Sequence[str] = ("features", "penultimate"),
    which: str = "best",
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    metrics: Sequence[Metric] = (),
    conditional: bool = True,
    probe_pairs: Sequence[tuple[str, str]] | None = None,
) -> Report:
    """Evaluate a trained model.

    Args:
        source: A :class:`~mtdisent.Run`, a run or checkpoint directory, or a :class:`~mtdisent.MultiTaskModel`.
        data: The evaluation data: a Dataset, a mapping of splits or a DataSource; ``None`` uses the spec's data.
        split: Which split of mapping/spec data to evaluate (default ``test``), e.g. ``"unseen"``.
        probe_data: Data the fresh probes are trained on (default: the ``probe_split`` of the spec's data,
            or of ``data`` when it is a mapping); ``False`` skips probes.
        probe_split: Split used for probes and to decide which factor combinations were seen in training.
        probes: Probe kinds: ``linear`` and/or ``mlp``.
        layers: Feature layers probed: ``features`` (encoder output) and/or ``penultimate`` (classifier).
        which: For a run or run directory: ``best``, ``final`` or ``latest`` model.
        batch_size: Batch size of the forward passes.
        seed: Seed of the probes.
        device: Where to run the model: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
        metrics: Extra :class:`~mtdisent.Metric` objects computed on the evaluation data (in ``report.values``
            next to the built-in accuracy keys).
        conditional: Also fit the conditional probes (kinds ``<kind>_conditional``, the headline leakage).
        probe_pairs: Probe only these ordered pairs ``(i, j)`` (task i's features, task j's labels); the other
            cells are ``nan``. Default every pair. Each cell is the one the full matrix has (same probe seed).

    Returns:
        A :class:`Report`.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, provenance = resolve_model(source, which)
    model = model.to(device)
    tasks = model.task_names
    eval_set = _split(data, model, split, "test")
    split_name = split or "test" if _has_splits(data) else "given dataset"
    feats, labels = collect_features(model, eval_set, batch_size=batch_size, layer="features", device=device)
    on_device = map_features(feats, lambda f: f.to(device))  # keeps the pooled scales (adversary.scales="all")
    with torch.no_grad(), eval_mode(model):
        logits = model.classify(on_device)
    preds = {t: logits[t].argmax(-1).cpu() for t in tasks}
    accuracy = Accuracy(task_classes(model.experiment))  # the metric objects validation uses too
    values: dict[str, float] = {}
    for m in (accuracy, *metrics):
        m.reset()
        m.update(logits, labels)
        values.update(m.compute())
    adv_acc, adv_maj = _adversary_accuracy(model, on_device, {t: v.to(device) for t, v in labels.items()})
    report = Report(tasks, accuracy.task_metrics(), adv_acc, adv_maj, info={"n_eval": len(next(iter(labels.values())))})
    report.values = values
    report.labels = labels
    report.describe(
        **provenance, split=split_name, class_names={t: model.experiment.task(t).class_names for t in tasks}
    )

    probe_set = None
    if probe_data is not False:
        if probe_data is None:
            if isinstance(data, (DataSource, Mapping)) or (data is None and model.experiment.data is not None):
                probe_set = _split(data, model, probe_split, probe_split)
        else:
            probe_set = _split(probe_data, model, probe_split, probe_split)
    if probe_set is not None:
        n_classes = {t: model.experiment.task(t).n_classes for t in tasks}
        fit_name = probe_split if (probe_data is None or _has_splits(probe_data)) else "given dataset"
        names = (
            {"fit_split": fit_name, "score_split": split_name} if "given dataset" not in (fit_name, split_name) else {}
        )
        report.describe(probe_split=fit_name)
        for layer in layers:
            tr_f, tr_y = collect_features(model, probe_set, batch_size=batch_size, layer=layer, device=device)
            ev_f = feats
            if layer != "features":
                ev_f, _ = collect_features(model, eval_set, batch_size=batch_size, layer=layer, device=device)
            if layer == "penultimate":
                report.embeddings = ev_f
            report.probes[layer] = {}
            for kind in probes:
                for cond in (False, True) if conditional else (False,):
                    key = f"{kind}_conditional" if cond else kind
                    report.probes[layer][key] = leakage_matrix(
                        tr_f,
                        tr_y,
                        ev_f,
                        labels,
                        n_classes,
                        kind=kind,
                        seed=seed,
                        conditional=cond,
                        pairs=probe_pairs,
                        **names,
                    )
        report.info["n_probe"] = len(next(iter(tr_y.values())))
        seen = seen_combinations(tr_y, tasks)  # factor combinations present in the probe (training) data
        for t in tasks:
            per = combination_accuracy(preds, labels, t, tasks)
            report.combinations[t] = {
                "factors": list(tasks),
                "per_combination": {
                    ",".join(map(str, c)): {"accuracy": a, "n": n, "seen": c in seen} for c, (a, n) in per.items()
                },
                "summary": combination_summary(per, seen).to_dict(),
            }
    return report
