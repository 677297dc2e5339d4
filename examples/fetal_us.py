"""The paper's fetal-ultrasound study (Meng et al. 2019, Table 2): standard plane and acoustic shadows.

Training never shows an LVOT plane with a shadow, and "no shadow -> LVOT" is a shortcut (500 of the 805
shadow-free training images are LVOT). Per seed, on the same data, three two-task models are trained from
``md.preset("fetal_us_cpu")`` (the paper's heads, a DLTK encoder with six residual units, 64 x 80 on a CPU):
``lambda0`` (no adversary term), ``paper`` (min-max, lambda 0.01, one unconditional adversary per pair) and
``default`` (the library's default adversaries), plus any ``--methods`` of ``benchmarks/disentangle.py``.
The table follows the paper's Table 2 (per-class and overall accuracy on the seen test set, plane accuracy on
LVOT with shadow, shadow accuracy on other planes with artifacts) with the paper's numbers beside ours:

* "plane only" and "shadow only" are the ``lambda0`` model's branches: with separate encoders and no
  adversary term the two tasks never interact, so each branch *is* the single-task network trained from the
  same seed (``tests/test_engine.py`` checks this); they are not trained twice.
* "features of the other task" is the paper's last row: an MLP probe fitted on the training split reads each
  task from the *other* task's features of the ``default`` model.

Also written: the predicted-plane distribution on ``lvot_with_shadow`` per model (a high number that comes from
calling everything LVOT shows there), the conditional and unconditional leakage of shadow from the plane
features (linear and MLP probes, fitted on ``train``, scored on ``test``), and validation curves.

    python examples/fetal_us.py --seeds 0 1 2 3 4             # 2 CPU cores: ~4 min training + 2 min probes a model
    python examples/fetal_us.py --quick                       # a smoke run
    python examples/fetal_us.py --fetal-planes-db /data/FETAL_PLANES_ZENODO --holdout "Fetal brain" Aloka

With ``--fetal-planes-db`` the public FETAL_PLANES_DB is read instead: ``Plane`` is the main task, ``US_Machine``
the nuisance and the ``--holdout`` (plane, machine) cell the unseen combination (same rows; no paper numbers).
Runs are kept under ``--runs`` (shared with ``benchmarks/disentangle.py``: a run trained by one is evaluated,
not retrained, by the other). Writes ``results.json``, ``results.md`` and PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

import mtdisent as md
from mtdisent.evaluation import collect_features, format_mean_std, train_probe

HERE = Path(__file__).parent
# The paper's Table 2 (accuracy %): 3VV, LVOT, Abd, overall | shadow without, with, overall | LVOT with shadow |
# shadow on Others with artifacts. None where the paper has no number.
PAPER = {
    "plane only": [60.80, 96.59, 67.09, 78.36, None, None, None, 34.93, None],
    "shadow only": [None, None, None, None, 77.94, 80.46, 78.70, None, 69.26],
    "lambda0": [63.73, 97.80, 78.48, 81.25, 78.77, 77.78, 78.74, 37.56, 69.50],
    "full model (paper)": [93.87, 97.56, 81.01, 94.44, 87.89, 58.62, 79.05, 73.68, 68.49],
    "features of the other task": [39.20, 83.90, 82.28, 64.35, 68.49, 81.99, 72.57, None, None],
}


def study() -> Any:
    """``benchmarks/disentangle.py``: its methods, spec merging and run cache (one definition for both studies)."""
    spec = importlib.util.spec_from_file_location("disentangle", HERE.parent / "benchmarks" / "disentangle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment(
    args: argparse.Namespace, shared: Any, method: str, seed: int
) -> tuple[md.Experiment, md.DataSource, dict]:
    """The experiment of ``method``, its data and the roles of its tasks and splits.

    Simulated data: exactly the study's ``fetal`` workload (so runs are shared). FETAL_PLANES_DB: the same
    settings on the public data, ``Plane`` x ``US_Machine`` with a held-out cell.
    """
    e = shared.experiment("fetal", method, seed, args.quick)
    if not args.fetal_planes_db:
        assert e.data is not None
        roles = {"main": "plane", "nuisance": "shadow", "unseen": "lvot_with_shadow", "extra": "artifacts_others"}
        return e, md.datasets.get("fetal_us_sim")(**e.data.args), roles
    data = md.datasets.get("fetal_planes_db")(
        root=args.fetal_planes_db,
        tasks=("Plane", "US_Machine"),
        image_size=tuple(e.input_shape[1:]),
        holdout=[{"Plane": args.holdout[0], "US_Machine": args.holdout[1]}],
        seed=seed,
        max_samples=args.max_samples,
        cache=True,
    )
    spec = e.model_dump(mode="json")
    spec["tasks"] = [t.model_dump(mode="json") for t in data.tasks]
    spec["tasks"][0]["head"] = e.task("plane").head.model_dump(mode="json")  # the paper's plane classifier
    spec.update(data=None, name=f"fetal_planes_db {method} seed={seed}")
    roles = {"main": "plane", "nuisance": "us_machine", "unseen": "unseen", "extra": None}
    return md.Experiment.model_validate(spec), data, roles


def accuracy_cells(model: md.MultiTaskModel, data: md.DataSource, roles: dict[str, Any]) -> dict[str, Any]:
    """Table 2's cells: per-class and overall accuracy on test, the unseen split and the extra split."""
    cells: dict[str, Any] = {}
    feats, labels = collect_features(model, data["test"], split="test")
    with torch.no_grad():
        logits = model.eval().classify(feats)
    for task in model.task_names:
        k = model.experiment.task(task).n_classes
        m = md.evaluation.task_metrics(logits[task].argmax(-1), labels[task], k)
        cells[f"test/{task}"] = [*m.per_class_accuracy, m.accuracy]
    for role, task in (("unseen", roles["main"]), ("extra", roles["nuisance"])):
        split = roles[role]
        if split and split in data:
            r = md.evaluate(model, data=data, split=split, probe_data=False, device="cpu")
            cells[f"{role}/{task}"] = r.accuracy[task]
            cells[f"{role}/{task}/confusion"] = r.metrics[task].confusion
    return cells


def other_task_cells(model: md.MultiTaskModel, data: md.DataSource) -> dict[str, Any]:
    """The paper's last row: an MLP probe reads each task from the *other* task's features."""
    tr_f, tr_y = collect_features(model, data["train"], split="train")
    te_f, te_y = collect_features(model, data["test"], split="test")
    cells = {}
    for target in model.task_names:
        source = next(t for t in model.task_names if t != target)
        k = model.experiment.task(target).n_classes
        probe = train_probe(tr_f[source], tr_y[target], k, kind="mlp", seed=0)
        m = md.evaluation.task_metrics(probe.predict(te_f[source]), te_y[target], k)
        cells[f"test/{target}"] = [*m.per_class_accuracy, m.accuracy]
    return cells


def columns(data: md.DataSource, roles: dict[str, Any]) -> list[tuple[str, int | None, str]]:
    main, nuis = roles["main"], roles["nuisance"]
    names = {t.name: t.class_names for t in data.tasks}
    cols: list[tuple[str, int | None, str]] = [(f"test/{main}", i, f"{main} {c}") for i, c in enumerate(names[main])]
    cols.append((f"test/{main}", len(names[main]), f"{main} overall"))
    cols += [(f"test/{nuis}", i, f"{nuis} {c}") for i, c in enumerate(names[nuis])]
    cols.append((f"test/{nuis}", len(names[nuis]), f"{nuis} overall"))
    cols.append((f"unseen/{main}", None, f"{main} on {roles['unseen']}"))
    if roles["extra"]:
        cols.append((f"extra/{nuis}", None, f"{nuis} on {roles['extra']}"))
    return cols


def table(rows: list[dict[str, Any]], data: md.DataSource, roles: dict[str, Any], paper: bool) -> str:
    cols = columns(data, roles)
    lines = ["| model | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in dict.fromkeys(r["row"] for r in rows):
        cells = []
        for key, idx, _ in cols:
            vals = [r["cells"].get(key) for r in rows if r["row"] == label]
            vals = [(v[idx] if idx is not None and v is not None else v) for v in vals]
            cells.append(format_mean_std([None if v is None else 100 * v for v in vals], 1))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if paper and label in PAPER:
            ref = ["-" if v is None else f"{v:.2f}" for v in PAPER[label]]
            lines.append(f"| *paper: {label}* | " + " | ".join(f"*{v}*" for v in ref[: len(cols)]) + " |")
        if paper and label.startswith("default") and "full model (paper)" in PAPER:
            ref = ["-" if v is None else f"{v:.2f}" for v in PAPER["full model (paper)"]]
            lines.append("| *paper: full model* | " + " | ".join(f"*{v}*" for v in ref[: len(cols)]) + " |")
    return "\n".join(lines)


def leakage_table(rows: list[dict[str, Any]], roles: dict[str, Any]) -> str:
    pair = f"{roles['main']}->{roles['nuisance']}"
    keys = ("linear_conditional", "mlp_conditional", "linear", "mlp")
    lines = [
        f"| model | unseen {roles['main']} (per seed) | "
        + " | ".join(f"{k} leakage {pair}" for k in keys)
        + " | train s |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for label in dict.fromkeys(r["row"] for r in rows if "leakage" in r):
        mine = [r for r in rows if r["row"] == label and "leakage" in r]
        unseen = [r["cells"].get(f"unseen/{roles['main']}") for r in mine]
        cells = [f"{format_mean_std(unseen, 2)} ({', '.join(f'{v:.2f}' for v in unseen)})"]
        cells += [format_mean_std([r["leakage"][k] for r in mine], 2) for k in keys]
        cells.append(format_mean_std([r["seconds"] for r in mine], 0))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confusion_table(rows: list[dict[str, Any]], data: md.DataSource, roles: dict[str, Any]) -> str:
    main = roles["main"]
    names = next(t for t in data.tasks if t.name == main).class_names
    key = f"unseen/{main}/confusion"
    lines = ["| model | " + " | ".join(f"called {c}" for c in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in dict.fromkeys(r["row"] for r in rows if key in r["cells"]):
        total = torch.zeros(len(names))
        for r in rows:
            if r["row"] == label and key in r["cells"]:
                total += torch.tensor(r["cells"][key], dtype=torch.float).sum(0)  # predicted-class counts
        share = total / total.sum().clamp(min=1)
        lines.append(f"| {label} | " + " | ".join(f"{100 * float(v):.1f}" for v in share) + " |")
    return "\n".join(lines)


def curves(runs: dict[str, Path], path: Path, main: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'mtdisent[plots]'): no curves")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [(r["iteration"], r[f"acc/{main}"]) for r in rows if f"acc/{main}" in r]
        val = [(r["iteration"], r[f"val_acc/{main}"]) for r in rows if f"val_acc/{main}" in r]
        if train:
            axes[0].plot(*zip(*train, strict=True), label=label, lw=0.8)
        if val:
            axes[1].plot(*zip(*val, strict=True), "o-", label=label)
    axes[0].set(title=f"{main} accuracy on training batches", xlabel="iteration")
    axes[1].set(title=f"{main} accuracy on the validation split", xlabel="iteration")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_once(
    run: md.Run, data: md.DataSource, roles: dict[str, Any], method: str, seed: int, seconds: float, out: Path
) -> list[dict[str, Any]]:
    """The study's rows for one finished run, kept in ``out/study_rows.json``: a later call (more seeds, another
    table) reads them instead of fitting the probes again. Delete the file to evaluate afresh."""
    cache = out / "study_rows.json"
    if cache.exists():
        return list(json.loads(cache.read_text()))
    model = run.model.cpu().eval()
    cells = accuracy_cells(model, data, roles)
    report = md.evaluate(run, data=data, split="test", which="final", layers=("features",), device="cpu")
    pair = (roles["main"], roles["nuisance"])
    leakage = {
        k: report.probes["features"][k].normalised[pair]
        for k in ("linear", "mlp", "linear_conditional", "mlp_conditional")
    }
    rows: list[dict[str, Any]] = [{"row": method, "seed": seed, "seconds": seconds, "cells": cells, "leakage": leakage}]
    if method == "lambda0":  # the single-task networks (see the module docstring)
        for task in (roles["main"], roles["nuisance"]):
            only = {k: v for k, v in cells.items() if k.split("/")[1] == task}
            rows.append({"row": f"{task} only", "seed": seed, "cells": only})
    if method == "default":
        rows.append({"row": "features of the other task", "seed": seed, "cells": other_task_cells(model, data)})
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["lambda0", "paper", "default"], help="of benchmarks/disentangle.py")
    p.add_argument("--quick", action="store_true", help="tiny data and 4 iterations: checks that everything runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fetal-planes-db", default=None, help="FETAL_PLANES_DB folder: real data instead of simulated")
    p.add_argument("--holdout", nargs=2, default=["Fetal brain", "Aloka"], metavar=("PLANE", "MACHINE"))
    p.add_argument("--max-samples", type=int, default=None, help="FETAL_PLANES_DB: a random subset of rows")
    p.add_argument("--runs", default="runs/study", help="run directories (shared with benchmarks/disentangle.py)")
    p.add_argument("--out", default=str(HERE / "results" / "fetal_us"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shared = study()
    methods = shared.METHODS
    if "lambda0" not in args.methods:
        raise SystemExit("--methods must include lambda0 (its branches are the single-task rows)")
    workload = "fetal_planes_db" if args.fetal_planes_db else "fetal"
    rows: list[dict[str, Any]] = []
    curve_runs: dict[str, Path] = {}
    for seed in args.seeds:
        for method in args.methods:
            e, data, roles = experiment(args, shared, method, seed)
            out = shared.run_dir(args.runs, args.quick, workload, method, seed)
            run, seconds = shared.train_once(e, data, out)
            mine = evaluate_once(run, data, roles, method, seed, seconds, out)
            rows.extend(mine)
            if seed == args.seeds[0]:
                curve_runs[method] = out
            unseen = mine[0]["cells"].get("unseen/" + roles["main"])
            print(f"seed {seed} {method}: unseen {unseen}, {seconds:.0f} s", flush=True)
    order = [f"{roles['main']} only", f"{roles['nuisance']} only", *args.methods, "features of the other task"]
    rows.sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = md.machine_info()
    settings = {"seeds": args.seeds, "methods": args.methods, "quick": args.quick, "workload": workload}
    (out / "results.json").write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1))
    text = "\n".join(
        [
            f"# Fetal-US study ({workload})",
            "",
            f'Seeds {args.seeds}; base spec `md.preset("fetal_us_cpu")` with the library\'s default adversaries on '
            f"reused features; machine: {json.dumps(machine)}.",
            "",
            "## Table 2 layout (accuracy %, mean ± std over seeds; the paper's numbers in italics)",
            "",
            table(rows, data, roles, paper=not args.fetal_planes_db),
            "",
            f"## Unseen combination and leakage of {roles['nuisance']} from the {roles['main']} features",
            "",
            leakage_table(rows, roles),
            "",
            "Leakage normalised: 0 at the majority rate (within each plane class for the conditional probes), 1 "
            "perfect; probes fitted on `train`, scored on `test`.",
            "",
            f"## What the models call the images of `{roles['unseen']}` (% of predictions, all seeds)",
            "",
            confusion_table(rows, data, roles),
            "",
            "Methods: " + "; ".join(f"`{m}`: {methods[m][0]}" for m in args.methods) + ".",
        ]
    )
    (out / "results.md").write_text(text + "\n")
    curves(curve_runs, out / "curves.png", roles["main"])
    print(text)


if __name__ == "__main__":
    main()
