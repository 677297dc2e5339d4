"""The paper's fetal-ultrasound experiment (Meng et al. 2019, Table 2): standard plane and acoustic shadows.

Training shows LVOT planes only without shadow. Four models are trained on the same data with the paper's
architecture (DLTK residual encoders, a three-layer plane classifier, a two-layer shadow classifier) and
optimiser settings: a plane-only and a shadow-only single-task network, the two-task model without adversary
(lambda = 0), and the full model. The table follows the paper's Table 2: per-class and overall accuracy on
the seen test set, plane accuracy on LVOT with shadow (the unseen combination), shadow accuracy on other
planes with artifacts, and a last row where a fresh probe reads each task from the *other* task's features
of the full model (the paper's "features of the irrelevant task").

    python examples/fetal_us.py --quick            # CPU, simulated data at 64 x 80, 300 iterations, minutes
    python examples/fetal_us.py                    # simulated data at 224 x 288, the paper's 10,010 iterations
    python examples/fetal_us.py --fetal-planes-db /data/FETAL_PLANES_ZENODO --holdout "Fetal brain" Aloka

Data: ``fetal_us_sim`` (simulated B-mode images with Table 1's split structure) by default. With
``--fetal-planes-db`` the public FETAL_PLANES_DB is read instead, with ``Plane`` as the main task and
``US_Machine`` as the nuisance, and the ``--holdout`` (plane, machine) cell as the unseen combination.
Runs on CUDA when there is a GPU (``--device``). Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import mtdisent as md
from mtdisent.evaluation import collect_features, format_mean_std, per_class_accuracy, train_probe


def load_data(args: argparse.Namespace, seed: int) -> tuple[md.DataSource, dict[str, Any]]:
    """The data and the roles of its tasks and splits."""
    if args.fetal_planes_db:
        holdout = [{"Plane": args.holdout[0], "US_Machine": args.holdout[1]}]
        factory = md.datasets.get("fetal_planes_db")
        data = factory(
            root=args.fetal_planes_db,
            tasks=("Plane", "US_Machine"),
            image_size=tuple(args.image_size),
            holdout=holdout,
            seed=seed,
            max_samples=args.max_samples,
            cache=True,
        )
        roles = {"main": "plane", "nuisance": "us_machine", "unseen": "unseen", "extra": None}
    else:
        factory = md.datasets.get("fetal_us_sim")
        data = factory(scale=args.scale, image_size=tuple(args.image_size), seed=seed)
        roles = {"main": "plane", "nuisance": "shadow", "unseen": "lvot_with_shadow", "extra": "artifacts_others"}
    return data, roles


def experiment(args: argparse.Namespace, data: md.DataSource, tasks: list[str], weight: float, seed: int):
    """The paper's configuration (``md.preset("paper_fetal_us")``) on these tasks, with this run's budget."""
    spec = md.preset("paper_fetal_us").model_dump()
    by_name = {t.name: t for t in data.tasks}
    heads = {"plane": [256, 256]}  # the paper: three dense layers for the plane, two for the shadow
    spec["tasks"] = [
        {"name": t, "classes": by_name[t].class_names, "head": {"hidden": heads.get(t, [256])}} for t in tasks
    ]
    spec["input_shape"] = tuple(data.input_shape)
    spec["seed"] = seed
    spec["name"] = f"fetal_us {'+'.join(tasks)} lambda={weight:g} seed={seed}"
    spec["adversary"].update(weight=weight, steps=args.steps, features=args.features)
    spec["training"].update(iterations=args.iterations, checkpoint_every=args.iterations, device=args.device)
    spec["training"]["optimizer"]["lr"] = args.lr
    spec["training"]["adversary_optimizer"]["lr"] = args.lr
    return md.Experiment.model_validate(spec)


def only(dataset: Any, tasks: list[str]) -> Any:
    """A view of a split carrying only ``tasks``' labels (single-task networks know one task)."""

    class View(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int) -> Any:
            x, labels = dataset[i]
            return x, {t: labels[t] for t in tasks if t in labels}

    return View()


def per_class(pred: torch.Tensor, y: torch.Tensor, k: int) -> list[float | None]:
    """Per-class accuracy then overall accuracy (unlabelled ``-1`` samples skipped)."""
    m = y >= 0
    overall = float((pred[m] == y[m]).float().mean()) if bool(m.any()) else None
    return [*per_class_accuracy(pred, y, k), overall]


@torch.no_grad()
def evaluate_model(model: md.MultiTaskModel, data: md.DataSource, roles: dict[str, Any], device: str) -> dict:
    """Table 2's cells for one model: per-class accuracies on test, the unseen and extra splits."""
    cells: dict[str, Any] = {}
    for task in model.task_names:
        k = model.experiment.task(task).n_classes
        feats, labels = collect_features(model, only(data["test"], [task]), layer="features", device=device)
        pred = model.classify(feats)[task].argmax(-1).cpu()
        cells[f"test/{task}"] = per_class(pred, labels[task], k)
        for role in ("unseen", "extra"):
            split = roles[role]
            wanted = roles["main"] if role == "unseen" else roles["nuisance"]
            if split and split in data and task == wanted:
                feats, labels = collect_features(model, only(data[split], [task]), device=device)
                pred = model.classify(feats)[task].argmax(-1).cpu()
                cells[f"{role}/{task}"] = per_class(pred, labels[task], k)[-1]
    return cells


def probe_other_task(model: md.MultiTaskModel, data: md.DataSource, roles: dict[str, Any], device: str) -> dict:
    """The last row: an MLP probe, trained on the training split, reads each task from the other's features."""
    tasks = model.task_names
    tr_f, tr_y = collect_features(model, data["train"], device=device)
    te_f, te_y = collect_features(model, data["test"], device=device)
    cells = {}
    for target in tasks:
        source = next(t for t in tasks if t != target)
        k = model.experiment.task(target).n_classes
        probe = train_probe(tr_f[source], tr_y[target], k, kind="mlp", seed=0)
        cells[f"test/{target}"] = per_class(probe.predict(te_f[source]), te_y[target], k)
    return cells


def table(rows: list[dict], data: md.DataSource, roles: dict[str, Any]) -> str:
    main, nuis = roles["main"], roles["nuisance"]
    names = {t.name: t.class_names for t in data.tasks}
    cols = [(f"test/{main}", i, f"{main} {c}") for i, c in enumerate(names[main])]
    cols.append((f"test/{main}", len(names[main]), f"{main} overall"))
    cols += [(f"test/{nuis}", i, f"{nuis} {c}") for i, c in enumerate(names[nuis])]
    cols.append((f"test/{nuis}", len(names[nuis]), f"{nuis} overall"))
    cols.append((f"unseen/{main}", None, f"{main} on {roles['unseen']}"))
    if roles["extra"]:
        cols.append((f"extra/{nuis}", None, f"{nuis} on {roles['extra']}"))
    lines = ["| model | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for key, idx, _ in cols:
            vals = [r["cells"].get(key) for r in rows if r["model"] == label]
            vals = [(v[idx] if idx is not None and v is not None else v) for v in vals]
            cells.append(format_mean_std([None if v is None else 100 * v for v in vals], 1))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAccuracy in %, mean ± std over seeds; '-' where the model has no such output.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 x 80, scale 0.1, 300 iterations, lr 1e-4, reuse")
    p.add_argument("--scale", type=float, default=None, help="fetal_us_sim size relative to Table 1 (default 0.25)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, help="default 224 288")
    p.add_argument("--iterations", type=int, default=None, help="default 10010 (the paper's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--weight", type=float, default=0.01, help="lambda of the full model")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--features", default=None, choices=["fresh", "reuse"], help="adversary features (fresh)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-5 (the paper's); --quick uses 1e-4")
    p.add_argument("--device", default="auto")
    p.add_argument("--fetal-planes-db", default=None, help="FETAL_PLANES_DB folder: real data instead of simulated")
    p.add_argument("--holdout", nargs=2, default=["Fetal brain", "Aloka"], metavar=("PLANE", "MACHINE"))
    p.add_argument("--max-samples", type=int, default=None, help="FETAL_PLANES_DB: a random subset of rows")
    p.add_argument("--out", default="runs/fetal_us")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    defaults = dict(scale=0.1, image_size=[64, 80], iterations=300, lr=1e-4, features="reuse") if args.quick else {}
    full = {"scale": 0.25, "image_size": [224, 288], "iterations": 10010, "lr": 1e-5, "features": "fresh"}
    for key, value in {**full, **defaults}.items():
        if getattr(args, key) is None:  # explicit arguments win over --quick
            setattr(args, key, value)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    rows = []
    for seed in args.seeds:
        data, roles = load_data(args, seed)
        main_t, nuis = roles["main"], roles["nuisance"]
        models = [
            (f"{main_t} only", [main_t], 0.0),
            (f"{nuis} only", [nuis], 0.0),
            ("two tasks, lambda = 0", [main_t, nuis], 0.0),
            (f"full model, lambda = {args.weight:g}", [main_t, nuis], args.weight),
        ]
        for label, tasks, weight in models:
            e = experiment(args, data, tasks, weight, seed)
            out = Path(args.out) / f"seed_{seed}" / label.replace(" ", "_").replace(",", "").replace("=", "")
            splits = {name: only(data[name], tasks) for name in ("train", "val") if name in data}
            start = time.perf_counter()
            run = md.train(e, data=splits, out_dir=out, resume=(out / "checkpoints").is_dir(), quiet=args.quiet)
            seconds = time.perf_counter() - start
            model = run.model.to(device).eval()
            cells = evaluate_model(model, data, roles, device)
            rows.append({"model": label, "seed": seed, "seconds": seconds, "cells": cells})
            print(f"seed {seed}, {label}: {rows[-1]['cells']} ({seconds:.0f} s)", flush=True)
            if weight > 0:
                probed = probe_other_task(model, data, roles, device)
                label = "full model, features of the other task (MLP probe)"
                rows.append({"model": label, "seed": seed, "cells": probed})
    settings = {k: v for k, v in vars(args).items() if k not in {"out", "quiet"}}
    md_table = table(rows, data, roles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = md.machine_info()
    (out / "results.json").write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1))
    header = f"# fetal_us\n\nSettings: {json.dumps(settings)}\n\nMachine: {json.dumps(machine)}\n\n"
    (out / "results.md").write_text(header + md_table)
    print(md_table)
    print(f"written to {out}/results.md")


if __name__ == "__main__":
    main()
