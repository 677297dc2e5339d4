"""Command line: ``mtdisent plugins | build | train | eval | compare | sweep | demo`` (``python -m mtdisent`` too)."""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import runpy
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from ._data import DataError
from ._engine import TrainingInterrupted
from ._errors import MtdisentError, SpecError
from ._plots import FigureWarning, PlotsUnavailableError
from ._registry import list_plugins
from ._spec import Experiment, load_spec_file, saved_experiment
from .evaluation import format_mean_std

__all__ = ["main", "apply_overrides"]

SPEC_SOURCE = "spec_source.json"
"""Written by ``mtdisent train`` into the run directory: where the Python spec file was and its SHA-256, so
that ``eval`` and ``compare`` can re-run it for its ``data`` when the spec names no registered dataset."""


def apply_overrides(experiment: Experiment, overrides: Sequence[str]) -> Experiment:
    """Apply ``key.path=value`` overrides (value parsed as JSON, else taken as a string).

    List items are addressed by index (``tasks.1.loss_weight=2``). Raises :class:`SpecError` naming the key.
    """
    data: dict[str, Any] = experiment.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, for example training.iterations=500")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"--set {key}: {where!r} must be an index below {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise SpecError(f"--set {key}: {'.'.join(parts[:depth])!r} is a value, not a section")
    return Experiment.model_validate(data)


def _head_parameters(group: nn.Module) -> dict[str, int]:
    """Parameters per head of a HeadGroup, counted through its canonical (per-head) ``state_dict``.

    A stacked group's ``group[name]`` is a view with no parameters of its own; its canonical entries are views
    of the stacked parameters, while buffers (BatchNorm statistics) live in other storage and are not counted.
    """
    storages = {p.untyped_storage().data_ptr() for p in group.parameters()}
    counts: dict[str, int] = {}
    for key, tensor in group.state_dict().items():
        if tensor.untyped_storage().data_ptr() in storages:
            name = key.split(".", 1)[0]
            counts[name] = counts.get(name, 0) + tensor.numel()
    return counts


def _summary(console: Console, experiment: Experiment, input_shape: tuple[int, int, int] | None = None) -> None:
    from ._model import build_model

    model = build_model(experiment, input_shape)
    n_classifier, n_adversary = _head_parameters(model.classifiers), _head_parameters(model.adversaries)
    table = Table(title=f"mtdisent model: {experiment.name or 'experiment'} ({len(model.task_names)} tasks)")
    for col in ("module", "input", "output", "parameters"):
        table.add_column(col)
    for t in model.task_names:
        n_enc = sum(p.numel() for p in model.encoders[t].parameters())
        table.add_row(f"encoder {t}", "x".join(map(str, model.input_shape)), str(model.feature_sizes[t]), f"{n_enc:,}")
        n_cls = n_classifier.get(t, 0)
        table.add_row(f"classifier {t}", str(model.feature_sizes[t]), str(experiment.task(t).n_classes), f"{n_cls:,}")
    for g, h in enumerate(model.adversary_heads):  # per pair (and member), per source, or per pair with its members
        pairs = [p for p, (head, _, _) in zip(model.pairs, model._pair_slots, strict=True) if head == g]
        weights = ", ".join(  # target (and member) of each output: "b w=0.1", "b#1 w=0.0333"
            f"{p.key.split('->', 1)[1]} w={p.weight:.3g}" if len(pairs) > 1 else f"w={p.weight:.3g}" for p in pairs
        )
        out = sum(experiment.task(p.target).n_classes for p in pairs)
        inputs, n_adv = model.adversaries[h.name].in_features, n_adversary.get(h.name, 0)
        table.add_row(f"adversary {h.name} ({weights})", str(inputs), str(out), f"{n_adv:,}")
    n_encoders = sum(q.numel() for q in model.encoders.parameters())
    total = n_encoders + sum(n_classifier.values()) + sum(n_adversary.values())  # without stacking's class padding
    table.add_row("total", "", "", f"{total:,}")
    console.print(table)


def _input_shape(experiment: Experiment, data: Any, spec: str) -> tuple[int, int, int]:
    """``experiment.input_shape``, else the shape the data declares, else the first training image's."""
    if experiment.input_shape is not None:
        return experiment.input_shape
    if data is None and experiment.data is None:
        raise SpecError(
            f"input_shape: not set, and {spec!r} has no data to take it from; give "
            "input_shape=(channels, height, width), a registered dataset in data, or define data in the Python spec"
        )
    from ._data import resolve_data

    source = resolve_data(experiment, data)
    if source.input_shape is not None:
        return tuple(source.input_shape)  # type: ignore[return-value]
    split = experiment.training.train_split
    if split not in source:
        raise DataError(f"input_shape: not set, and the data has no split {split!r} to read an image from")
    try:
        image = source[split][0][0]
        shape = tuple(int(d) for d in image.shape)
    except Exception as exc:
        raise DataError(f"input_shape: not set, and the first image of split {split!r} cannot be read: {exc}") from exc
    if len(shape) != 3:
        raise DataError(
            f"input_shape: not set, and the first image of split {split!r} has shape {shape}, not (C, H, W)"
        )
    return shape[0], shape[1], shape[2]


def _cmd_plugins(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="mtdisent plugins")
    for col in ("kind", "name", "distribution", "factory"):
        table.add_column(col)
    for info in list_plugins(args.kind):
        table.add_row(info.kind, info.name, info.source, info.value)
    console.print(table)
    return 0


def _cmd_build(args: argparse.Namespace, console: Console) -> int:
    experiment, namespace = load_spec_file(args.spec)
    experiment = apply_overrides(experiment, args.set)
    _summary(console, experiment, _input_shape(experiment, namespace.get("data"), args.spec))
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _record_spec_source(run_dir: Path, spec: str | Path) -> None:
    """Write SPEC_SOURCE into a run directory: the Python file whose ``data`` the run was trained on."""
    path = Path(spec).resolve()
    if path.suffix != ".py" or not run_dir.is_dir() or os.environ.get("RANK", "0") != "0":
        return  # JSON specs carry no data; under torchrun rank 0 writes
    record = {"path": str(path), "sha256": _sha256(path)}
    _write_atomic(run_dir / SPEC_SOURCE, json.dumps(record, indent=1) + "\n")


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    from ._engine import train

    experiment, namespace = load_spec_file(args.spec)
    experiment = apply_overrides(experiment, args.set)
    out = Path(args.out_dir)
    try:
        run = train(
            experiment,
            data=namespace.get("data"),
            out_dir=out,
            resume=args.resume,
            restart=args.restart,
            quiet=args.quiet,
            device=args.device,
        )
    except TrainingInterrupted:
        _record_spec_source(out, args.spec)  # the checkpoints written so far can be evaluated too
        raise
    _record_spec_source(out, args.spec)
    last = run.history[-1] if run.history else {}
    console.print(f"trained {run.iteration} iterations into {args.out_dir}")
    for key in sorted(k for k in last if k.startswith(("acc/", "adv_acc/", "val_"))):
        console.print(f"  {key}: {last[key]:.4f}")
    return 0


@dataclass
class _RunDir:
    """A run directory (or one of its checkpoint directories) given on the command line, read and checked."""

    path: Path  # what was given: a run directory or a checkpoint directory
    root: Path  # the run directory (metrics.jsonl, spec_source.json)
    spec: dict[str, Any]  # the experiment as JSON
    experiment: Experiment


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtdisentError(f"{str(path)!r} is not valid JSON ({exc}); {what}") from exc
    except OSError as exc:
        raise MtdisentError(f"{str(path)!r} cannot be read: {exc}") from exc


def _run_dir(arg: str | Path) -> _RunDir:
    """Check that ``arg`` is a run directory of ``mtdisent train`` (or a checkpoint directory) and read its spec."""
    path = Path(arg)
    if not path.exists():
        if glob.has_magic(str(arg)):
            raise MtdisentError(f"{str(arg)!r} matches no run directory")
        raise MtdisentError(f"run directory {str(arg)!r} does not exist")
    if not path.is_dir():
        raise MtdisentError(f"{str(arg)!r} is a file, not a run directory (give the --out-dir of mtdisent train)")
    if (path / "state.json").is_file():  # a checkpoint directory: checkpoints/<name> of a run
        root = path.parent.parent if path.parent.name == "checkpoints" else path
        state = _read_json(path / "state.json", "the checkpoint is damaged")
        spec = state.get("experiment") if isinstance(state, dict) else None
        where = path / "state.json"
    else:
        root, where = path, path / "spec.json"
        if not where.is_file():
            raise MtdisentError(
                f"{str(arg)!r} holds no spec.json: not a run directory (give the --out-dir of mtdisent train)"
            )
        spec = _read_json(where, "the run directory is damaged")
    if not isinstance(spec, dict):
        raise MtdisentError(f"{str(where)!r} does not hold an experiment (a JSON object); the run directory is damaged")
    try:  # objective and dataset plugins need not be installed to evaluate
        experiment = saved_experiment(spec)
    except SpecError as exc:
        problems = "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)
        raise SpecError(f"{str(where)!r} holds an invalid experiment: {problems}", exc.errors) from exc
    return _RunDir(path, root, spec, experiment)


def _expand_runs(args: Sequence[str]) -> list[_RunDir]:
    """Run directories from the command line; a pattern the shell did not expand is expanded here."""
    runs = []
    for arg in args:
        if not Path(arg).exists() and glob.has_magic(arg):
            matches = sorted(p for p in glob.glob(arg) if Path(p).is_dir() and (Path(p) / "spec.json").is_file())
            if not matches:
                raise MtdisentError(f"{arg!r} matches no run directory (no directory holding spec.json)")
            runs += [_run_dir(m) for m in matches]
        else:
            runs.append(_run_dir(arg))
    return runs


def _load_data_file(path: Path) -> Any:
    """Run a Python file and return its ``data`` variable."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (expected a Python file defining data)")
    if path.suffix != ".py":
        raise DataError(f"data file {str(path)!r} is not a Python file; --data expects a .py file defining data")
    try:
        namespace = runpy.run_path(str(path), run_name="__mtdisent_spec__")
    except MtdisentError as exc:
        raise DataError(f"data file {str(path)!r}: {exc}") from exc
    except Exception as exc:
        raise DataError(f"data file {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    if namespace.get("data") is None:
        raise DataError(f"data file {str(path)!r} defines no variable named 'data' (a Dataset or a mapping of splits)")
    return namespace["data"]


class _DataFiles:
    """The data of each run: ``--data``, the spec's registered dataset, or the recorded spec file (run once each)."""

    def __init__(self, explicit: str | None) -> None:
        self.explicit = Path(explicit) if explicit else None
        self._loaded: dict[Path, Any] = {}

    def _load(self, path: Path) -> Any:
        key = path.resolve()
        if key not in self._loaded:
            self._loaded[key] = _load_data_file(path)
        return self._loaded[key]

    def for_run(self, run: _RunDir) -> Any:
        """What to pass to ``evaluate(data=...)``: ``None`` for a registered dataset, else a DataSource."""
        from ._data import resolve_data

        if self.explicit is not None:
            return resolve_data(run.experiment, self._load(self.explicit))
        if run.experiment.data is not None:
            return None
        record_file = run.root / SPEC_SOURCE
        if not record_file.is_file():
            raise DataError(
                f"no data for {str(run.path)!r}: its spec names no registered dataset (data is None) and the run "
                "records no Python spec file; pass --data SPEC.py (a Python file defining data)"
            )
        record = _read_json(record_file, "pass --data SPEC.py (a Python file defining data)")
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise DataError(
                f"{str(record_file)!r} names no spec file; pass --data SPEC.py (a Python file defining data)"
            )
        spec = Path(record["path"])
        if not spec.is_file():
            raise DataError(
                f"{str(run.path)!r} was trained on the data of {str(spec)!r}, which no longer exists there; "
                "pass --data PATH (a Python file defining data)"
            )
        if _sha256(spec) != record.get("sha256"):
            raise DataError(
                f"{str(spec)!r} changed since {str(run.path)!r} was trained on its data; pass --data PATH "
                "to evaluate on the data a file defines now"
            )
        return resolve_data(run.experiment, self._load(spec))


def _evaluate_run(run: _RunDir, data: Any, split: str, probes: bool, figures: bool, which: str = "best") -> Any:
    """Evaluate one run, say in the report what was scored, and save it into ``RUN/eval-SPLIT``."""
    from ._evaluate import evaluate

    report = evaluate(run.path, data=data, split=split, which=which, probe_data=None if probes else False)
    metrics = run.root / "metrics.jsonl"
    report.save(run.path / f"eval-{split}", figures=figures, metrics_file=metrics if metrics.is_file() else None)
    return report


def _cmd_eval(args: argparse.Namespace, console: Console) -> int:
    run = _run_dir(args.run)
    data = _DataFiles(args.data).for_run(run)
    report = _evaluate_run(run, data, args.split, not args.no_probes, not args.no_figures, args.which)
    console.print(report.to_markdown(), markup=False, highlight=False)
    console.print(f"written to {run.path / f'eval-{args.split}'}")
    return 0


def _group_label(spec: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """The fields where this run's spec differs from the others (seed and name aside)."""

    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in leaves(v, f"{prefix}{k}.").items()}
        return {prefix[:-1]: json.dumps(d)}

    mine = leaves(spec)
    differing = sorted({k for o in others for k, v in leaves(o).items() if mine.get(k) != v})
    return ", ".join(f"{k}={mine.get(k)}" for k in differing) or "all runs"


def _cmd_compare(args: argparse.Namespace, console: Console) -> int:
    groups: dict[str, list[tuple[Path, Any, Any]]] = {}
    specs: dict[str, dict[str, Any]] = {}
    run_dirs = _expand_runs(args.runs)  # every directory checked before anything is evaluated
    data_files = _DataFiles(args.data)
    data = [data_files.for_run(run) for run in run_dirs]
    for run, run_data in zip(run_dirs, data, strict=True):
        saved = json.loads(run.experiment.model_dump_json())  # as trained (fields it predates filled in)
        key_spec = {k: v for k, v in saved.items() if k not in {"seed", "name"}}
        key = json.dumps(key_spec, sort_keys=True)
        specs[key] = key_spec
        report = _evaluate_run(run, run_data, args.split, True, False)
        unseen = None
        if args.unseen_split:
            unseen = _evaluate_run(run, run_data, args.unseen_split, False, False)
        groups.setdefault(key, []).append((run.path, report, unseen))
    table = Table(title=f"comparison on split {args.split!r} (mean ± std over runs)")
    first = next(iter(groups.values()))[0][1]
    table.add_column("runs")
    table.add_column("n")
    for t in first.tasks:
        table.add_column(f"acc {t}")
    if args.unseen_split:
        for t in first.tasks:
            table.add_column(f"{args.unseen_split} acc {t}")
    table.add_column("probe leakage (norm., i != j)")
    rows = []
    for key, runs in groups.items():
        label = _group_label(specs[key], [s for k, s in specs.items() if k != key])
        cells = [label, str(len(runs))]
        cells += [format_mean_std([r.accuracy[t] for _, r, _ in runs]) for t in first.tasks]
        if args.unseen_split:
            cells += [format_mean_std([u.accuracy[t] for _, _, u in runs]) for t in first.tasks]
        cells.append(format_mean_std([r.off_diagonal_leakage() for _, r, _ in runs]))
        table.add_row(*cells)
        rows.append(cells)
    console.print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        header = [c.header for c in table.columns]
        md_lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
        md_lines += ["| " + " | ".join(r) + " |" for r in rows]
        (out / "compare.md").write_text("\n".join(md_lines) + "\n")
        console.print(f"written to {out / 'compare.md'}")
    return 0


def _cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from ._engine import train
    from ._evaluate import evaluate

    spec, namespace = load_spec_file(args.spec)
    base = apply_overrides(spec, args.set)
    data = _load_data_file(Path(args.data)) if args.data else namespace.get("data")
    out = Path(args.out_dir)
    points = []
    for weight in args.weights:
        for seed in args.seeds:
            e = apply_overrides(base, [f"adversary.weight={weight}", f"seed={seed}"])
            run_dir = out / f"w{weight:g}_s{seed}"
            resume = (run_dir / "checkpoints").is_dir()
            run = train(e, data=data, out_dir=run_dir, resume=resume, quiet=args.quiet)
            _record_spec_source(run_dir, args.data or args.spec)
            val = evaluate(run, data=data, split="val", layers=("features",), probes=("linear",))
            test = evaluate(run, data=data, split="test", probe_data=False)
            point: dict[str, Any] = {
                "weight": weight,
                "seed": seed,
                "run": str(run_dir),
                "val_accuracy": sum(val.accuracy.values()) / len(val.accuracy),
                "val_leakage": val.off_diagonal_leakage(),
                "accuracy": sum(test.accuracy.values()) / len(test.accuracy),
                "test_accuracy": test.accuracy,
            }
            if args.unseen_split:
                unseen = evaluate(run, data=data, split=args.unseen_split, probe_data=False)
                point["unseen"] = unseen.accuracy
                point["unseen_accuracy"] = unseen.accuracy.get(args.unseen_task) if args.unseen_task else None
            point["leakage"] = point["val_leakage"]
            points.append(point)
            console.print(
                f"lambda={weight:g} seed={seed}: val acc {point['val_accuracy']:.3f}, "
                f"val leakage {point['val_leakage']:.3f}, test acc {point['accuracy']:.3f}"
            )
    by_weight: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_weight.setdefault(p["weight"], []).append(p)

    def score(ps: list[dict[str, Any]]) -> float:
        acc = sum(p["val_accuracy"] for p in ps) / len(ps)
        leak = [p["val_leakage"] for p in ps if p["val_leakage"] == p["val_leakage"]]
        return acc - (sum(leak) / len(leak) if leak else 0.0)

    chosen = max(by_weight, key=lambda w: score(by_weight[w]))
    result = {
        "rule": "lambda maximising mean validation accuracy minus mean validation normalised probe leakage "
        "(linear probes, off-diagonal pairs), averaged over seeds",
        "chosen_weight": chosen,
        "scores": {f"{w:g}": score(ps) for w, ps in by_weight.items()},
        "points": points,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| lambda | seeds | val accuracy | val leakage | test accuracy | unseen accuracy | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, ps in by_weight.items():
        lines.append(
            f"| {w:g} | {len(ps)} | {format_mean_std([p['val_accuracy'] for p in ps])} "
            f"| {format_mean_std([p['val_leakage'] for p in ps])} | {format_mean_std([p['accuracy'] for p in ps])} "
            f"| {format_mean_std([p.get('unseen_accuracy') for p in ps])} | {score(ps):.3f} |"
        )
    lines.append(f"\nChosen lambda: {chosen:g} ({result['rule']}).")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    try:
        from ._plots import plot_tradeoff

        plot_tradeoff(points, out / "tradeoff.png")
    except PlotsUnavailableError as exc:
        warnings.warn(f"{exc}; sweep.json and sweep.md were written without tradeoff.png", FigureWarning, 2)
    console.print("\n".join(lines), markup=False, highlight=False)
    return 0


DEMO_SCALE = 0.125


def demo_experiment(weight: float, iterations: int, seed: int = 0) -> Experiment:
    """The embedded default: the paper's synthetic experiment at 1/8 scale (32 x 40), sized for a CPU in minutes.

    Differences from the public code's settings (``md.preset("paper_synthetic")``): 1/8 of the image size,
    learning rate 1e-4 instead of 1e-5 and 600 iterations instead of 10,010, 5 adversary steps on the main
    step's features (``reuse``) instead of 3 on fresh batches. ``examples/shapes_paper.py`` runs the same
    comparison over several seeds and larger settings.
    """
    from ._presets import preset

    e = preset(
        "paper_synthetic", scale=DEMO_SCALE, data={"name": "shapes", "args": {"scale": DEMO_SCALE, "seed": seed}}
    )
    return apply_overrides(
        e,
        [
            f"adversary.weight={weight}",
            "adversary.features=reuse",
            "adversary.steps=5",
            f"training.iterations={iterations}",
            "training.optimizer.lr=0.0001",
            "training.adversary_optimizer.lr=0.0001",
            f"training.checkpoint_every={iterations}",
            f"seed={seed}",
            f"name=demo lambda={weight:g}",
        ],
    )


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from ._engine import train
    from ._evaluate import evaluate

    out = Path(args.out_dir)
    console.print(
        "[bold]mtdisent demo:[/] the paper's synthetic experiment (background colour x shape; train has no "
        "circle on black) at 1/8 scale, full model (lambda = 0.01) against lambda = 0. Nothing is downloaded."
    )
    results = {}
    for weight in (0.01, 0.0):
        e = demo_experiment(weight, args.iterations, args.seed)
        run_dir = out / f"lambda_{weight:g}"
        resume = (run_dir / "checkpoints").is_dir()
        console.print(f"training lambda = {weight:g} for {args.iterations} iterations into {run_dir}")
        run = train(e, out_dir=run_dir, resume=resume, quiet=args.quiet)
        test = evaluate(run, split="test", probes=("linear",))
        unseen = evaluate(run, split="unseen", probe_data=False)
        # without matplotlib: the reports and one FigureWarning
        test.save(run_dir / "eval-test", figures=True, metrics_file=run_dir / "metrics.jsonl")
        unseen.save(run_dir / "eval-unseen")
        results[weight] = (test, unseen)
    table = Table(title=f"demo results ({args.iterations} iterations, seed {args.seed})")
    for col in ("", "lambda = 0.01 (full model)", "lambda = 0"):
        table.add_column(col)
    full, base = results[0.01], results[0.0]
    for t in full[0].tasks:
        table.add_row(f"test accuracy, {t}", f"{full[0].accuracy[t]:.3f}", f"{base[0].accuracy[t]:.3f}")
    table.add_row(
        "unseen circle/black, shape accuracy", f"{full[1].accuracy['shape']:.3f}", f"{base[1].accuracy['shape']:.3f}"
    )
    for pair in full[0].adversary_accuracy:
        table.add_row(
            f"trained adversary {pair[0]}->{pair[1]} (test)",
            f"{full[0].adversary_accuracy[pair]:.3f}",
            f"{base[0].adversary_accuracy[pair]:.3f}",
        )
    for pair, acc in full[0].leakage.items():
        if pair[0] != pair[1]:
            table.add_row(
                f"fresh linear probe {pair[0]}->{pair[1]} (test)", f"{acc:.3f}", f"{base[0].leakage[pair]:.3f}"
            )
    console.print(table)
    console.print(
        f"Reports (JSON, markdown; PCA, leakage and curve figures) under {out}/lambda_*/eval-*. One seed is one "
        "draw: the gain on unseen combinations varies with the seed (examples/shapes_paper.py measures several)."
    )
    return 0


DATA_HELP = (
    "a Python file defining data (a Dataset or a mapping of splits); default: the spec's registered dataset, or the "
    "Python spec file the run was trained from (recorded in RUN/spec_source.json)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtdisent", description="N-task adversarial representation disentanglement")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list every backbone, objective and dataset with its distribution")
    p.add_argument("--kind", choices=["backbone", "objective", "dataset"], default=None)
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("build", help="validate a spec (JSON or Python file) and print the model it builds")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("train", help="train a spec (JSON, or a Python file defining experiment and optionally data)")
    p.add_argument("spec")
    p.add_argument("--out-dir", required=True, help="run directory (checkpoints, metrics.jsonl, final model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p.add_argument(
        "--restart",
        action="store_true",
        help="move --out-dir's previous checkpoints and metrics into discarded-<time>/ and train from iteration 0",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="override training.device (cpu, cuda, auto)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="evaluate a run: report.json, report.md and figures in RUN/eval-SPLIT")
    p.add_argument("run")
    p.add_argument("--split", default="test")
    p.add_argument("--which", default="best", choices=["best", "final", "latest"])
    p.add_argument("--no-probes", action="store_true", help="skip the fresh probes")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--data", default=None, metavar="SPEC.py", help=DATA_HELP)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("compare", help="runs side by side, mean ± std over runs that differ only in seed")
    p.add_argument("runs", nargs="+")
    p.add_argument("--split", default="test")
    p.add_argument("--unseen-split", default=None, help="also report accuracy on this split (e.g. unseen)")
    p.add_argument("--out", default=None, help="write compare.md here")
    p.add_argument("--data", default=None, metavar="SPEC.py", help=DATA_HELP)
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("sweep", help="train lambda x seeds, plot the accuracy-leakage trade-off, choose lambda")
    p.add_argument("spec")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--weights", type=float, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--unseen-split", default=None)
    p.add_argument("--unseen-task", default=None, help="task whose unseen accuracy is plotted")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--data", default=None, metavar="SPEC.py", help="a Python file whose 'data' to train and evaluate on"
    )
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("demo", help="train and evaluate the embedded default: the paper's synthetic experiment")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return parser


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show mtdisent's figure warnings as ``warning: ...`` lines on stderr (other warnings as Python shows them)."""
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, FigureWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtdisent`` command."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        with _one_line_warnings():
            return int(args.func(args, console))
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signal
    except MtdisentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
