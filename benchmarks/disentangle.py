"""Does the disentanglement hold? Methods x workloads x seeds: seen and unseen accuracy, leakage by fresh probes.

    python benchmarks/disentangle.py --workloads shapes --methods lambda0 paper default --seeds 0 1 2
    python benchmarks/disentangle.py --workloads shapes shapes_n fetal --append     # fill in what is missing
    python benchmarks/disentangle.py --quick --out /tmp/study                       # a smoke run

Workloads (each a base experiment; a method is a set of overrides of it):

* ``shapes``: the paper's synthetic experiment at 1/4 scale (56 x 72); training never shows a circle on
  black; unseen = shape accuracy on circles on black; nuisance pair shape -> background.
* ``shapes_n``: ``shapes_n`` with N = 4 binary factors at 32 x 32, correlation 0.5; training never shows an
  ellipse on a dark background; unseen = shape accuracy there; nuisance pairs shape -> each other factor.
* ``fetal``: ``fetal_us_sim`` with the paper's Table 1 counts at 64 x 80 (see ``examples/fetal_us.py``);
  training never shows LVOT with a shadow; unseen = plane accuracy on ``lvot_with_shadow``; nuisance pair
  plane -> shadow.

Every method and seed trains, is evaluated (final model) on the seen ``test`` split (fresh linear and MLP
probes fitted on ``train``, conditional and unconditional) and on the unseen split, and records: seen accuracy
per task, unseen accuracy (also with the final model's BatchNorm statistics recomputed on ``train``:
``md.recompute_batchnorm``), the leakage of the nuisance from the main task's features (normalised: 0 at the
(within-class) majority rate, 1 perfect), the trained adversaries' accuracy and the training time. Results are
written after every run (``--append`` continues a study; settings must match).

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out`` (default benchmarks/results/study).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtdisent_plugins.datasets.shapes import BG_LEVELS

import mtdisent as md
from mtdisent.evaluation import format_mean_std

# name -> (description, overrides merged into the workload's base spec)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lambda0": ("no adversary term (lambda = 0); adversaries train as monitors", {"adversary": {"weight": 0.0}}),
    "paper": (
        "the paper: min-max, lambda = 0.01, one unconditional adversary per ordered pair",
        {"adversary": {"weight": 0.01, "ensemble": 1, "conditional": False, "reinit_every": 0, "layout": "pair"}},
    ),
    "default": ("the library default adversaries (see AdversarySpec)", {}),
    "source": (
        "one adversary network per source task (adversary.layout='source', the default since source_fresh/)",
        {"adversary": {"layout": "source"}},
    ),
    "pair": (
        "the default with one adversary network per ordered pair (adversary.layout='pair', the default before)",
        {"adversary": {"layout": "pair"}},
    ),
    "narrow": (
        "the default with members 86 wide: three together cost about one paper adversary 256 wide",
        {"adversary": {"ensemble": 3, "head": {"hidden": [86]}}},
    ),
    "single": (
        "the default with one adversary per pair (ensemble 1, still conditional and re-initialised): the paper's cost",
        {"adversary": {"ensemble": 1}},
    ),
    "shared": (
        "the default's three members per pair sharing their hidden layer, each with its own output layer "
        "(adversary.layout='pair_shared'): about one adversary's cost",
        {"adversary": {"layout": "pair_shared"}},
    ),
    "three": (
        "three conditional adversaries per pair, one re-initialised at a time: the library default, named",
        {"adversary": {"ensemble": 3}},
    ),
    "strong": (
        "the default with 10 adversary steps at learning rate 1e-3",
        {"adversary": {"steps": 10}, "training": {"adversary_optimizer": {"lr": 1e-3}}},
    ),
    "long": ("the default with twice the iterations", {"training": {"iterations": "x2"}}),
    "fresh": (
        "the default with adversary steps on fresh batches, re-encoded without gradients (adversary.features="
        "'fresh', the paper's public code) instead of the main step's features",
        {"adversary": {"features": "fresh"}},
    ),
    "erasure": ("the default plus the conditional erasure lever", {"levers": [{"name": "erasure"}]}),
    "erasure_cumulative": (
        "the default plus conditional erasure on exact cumulative cell means (momentum=None)",
        {"levers": [{"name": "erasure", "args": {"momentum": None}}]},
    ),
    "erase_after": (
        "the default plus conditional erasure fitted after training on the training split, the erased heads retrained "
        "5 epochs (fit='after': what fit_erasure(..., retrain_epochs=5) does, inside md.train)",
        {"levers": [{"name": "erasure", "args": {"fit": "after", "retrain_epochs": 5}}]},
    ),
    "erase_after_marginal": (
        "erase_after with the marginal erasure (the directions of Cov(z_i, y_j) over all samples)",
        {"levers": [{"name": "erasure", "args": {"fit": "after", "retrain_epochs": 5, "mode": "marginal"}}]},
    ),
    "erasure_only": (
        "lambda = 0 plus the conditional erasure lever",
        {"adversary": {"weight": 0.0}, "levers": [{"name": "erasure"}]},
    ),
    "projection": (
        "gradient projection (Zhang et al. 2018) instead of min-max",
        {"adversary": {"objective": {"name": "projection"}}},
    ),
    "multiscale": ("the default with adversaries on every encoder scale", {"adversary": {"scales": "all"}}),
    "recombine": ("the default plus image-space recombination", {"levers": [{"name": "recombine"}]}),
    "recombine_nuisance": (
        "the default plus image-space recombination that flips only the workload's nuisance tasks",
        {"levers": [{"name": "recombine", "args": {"tasks": "nuisance"}}]},
    ),
    "recombine_only": (
        "lambda = 0 plus image-space recombination",
        {"adversary": {"weight": 0.0}, "levers": [{"name": "recombine"}]},
    ),
    "intervene": (
        "the default plus the workload's intervention on its nuisance (INTERVENTIONS)",
        {"levers": [{"name": "intervene", "args": "workload"}]},
    ),
    "intervene_bn": (
        "intervene with training.batchnorm_stats='recompute' (final statistics from a pass replaying the lever)",
        {"levers": [{"name": "intervene", "args": "workload"}], "training": {"batchnorm_stats": "recompute"}},
    ),
    "intervene_only": (
        "lambda = 0 plus the workload's intervention on its nuisance",
        {"adversary": {"weight": 0.0}, "levers": [{"name": "intervene", "args": "workload"}]},
    ),
}


def shapes_n_background(spec: dict[str, Any]) -> dict[str, Any]:
    """The dark background drawn on light-background ``shapes_n`` images, at its level in the data's units."""
    norm = md.datasets.create("shapes_n", spec["data"]["args"]).factors["normalisation"]
    dark = BG_LEVELS[0]  # shapes_n's raw dark background level
    level = (dark - norm["mean"]) / norm["std"] if norm["kind"] == "global" else dark
    lever = {"task": "background", "transform": "background", "source": ["light"], "target": "dark"}
    return {**lever, "args": {"level": level}}


# workload -> the intervene lever's arguments (or a function of the spec giving them): a transform that shows the
# nuisance's missing class
INTERVENTIONS: dict[str, dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]] = {
    # -x of a standardised image is the inverted image: the gray circle on white becomes a gray circle on black
    "shapes": {"task": "background", "transform": "negate", "source": ["white"], "target": "black"},
    # a generic shadow (dark sectors from the probe's apex), drawn on LVOT/3VV/Abd images without shadow
    "fetal": {"task": "shadow", "transform": "shadow", "source": ["without"], "target": "with"},
    # exact: every light-background pixel set to the dark level gives the same image on a dark background
    "shapes_n": shapes_n_background,
}


def shapes(seed: int, quick: bool) -> dict[str, Any]:
    scale = 0.0625 if quick else 0.25
    base = md.preset("paper_synthetic", scale=scale, data={"name": "shapes", "args": {"scale": scale, "seed": seed}})
    spec = base.model_dump(mode="json")
    spec["adversary"] = md.AdversarySpec().model_dump(mode="json")  # the library's (reused features)
    spec["training"].update(
        iterations=4 if quick else 600,
        adversary_optimizer=md.OptimizerSpec(name="sgd", lr=1e-4).model_dump(mode="json"),  # the library's
    )
    spec["training"]["optimizer"]["lr"] = 1e-4  # the paper's Adam (betas 0, 0.9) at 10x its rate, for 600 steps
    return spec


def shapes_n(seed: int, quick: bool) -> dict[str, Any]:
    args = {"num_tasks": 4, "image_size": [32, 32], "seed": seed, "correlation": 0.5}
    if quick:  # probes on 2000 x 2048 features cost minutes; a smoke run needs a few hundred rows
        args.update(n_train=200, n_eval=100)
    source = md.datasets.get("shapes_n")(**{**args, "n_train": 16, "n_eval": 4})  # for its tasks and shape
    return {
        "tasks": [t.model_dump(mode="json") for t in source.tasks],
        "input_shape": list(source.input_shape),
        "data": {"name": "shapes_n", "args": args},
        "backbone": {"name": "dltk_residual", "args": {"filters": [8, 16, 32], "output": "flatten"}},
        "adversary": {"features": "reuse"},
        "training": {"iterations": 4 if quick else 600, "optimizer": {"name": "adam", "lr": 1e-3}},
    }


def fetal(seed: int, quick: bool) -> dict[str, Any]:
    # the CPU fetal-US setting, one definition shared with examples/fetal_us.py
    scale = {"scale": 0.1, "image_size": [32, 40], "iterations": 4} if quick else {}
    spec = md.preset("fetal_us_cpu", seed=seed, **scale).model_dump(mode="json")
    spec["adversary"] = md.AdversarySpec().model_dump(mode="json")  # the library's (reused features)
    return spec


# name -> (base spec builder, unseen split, main task, nuisance tasks)
WORKLOADS: dict[str, tuple[Any, str, str, list[str] | None]] = {
    "shapes": (shapes, "unseen", "shape", ["background"]),
    "shapes_n": (shapes_n, "unseen", "shape", None),  # None: every other task
    "fetal": (fetal, "lvot_with_shadow", "plane", ["shadow"]),
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v == "x2":
            out[k] = 2 * out[k]
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "objective":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def experiment(workload: str, method: str, seed: int, quick: bool) -> md.Experiment:
    build, _, main, nuisance = WORKLOADS[workload]
    spec = merge(build(seed, quick), copy.deepcopy(METHODS[method][1]))
    for lever in spec.get("levers", []):  # "nuisance": the workload's nuisance tasks (every task but the main one)
        if lever.get("args") == "workload":
            if workload not in INTERVENTIONS:
                raise SystemExit(f"method {method!r}: no intervention for {workload!r}; one of {sorted(INTERVENTIONS)}")
            given = INTERVENTIONS[workload]
            lever["args"] = given(spec) if callable(given) else copy.deepcopy(given)
        elif lever.get("args", {}).get("tasks") == "nuisance":
            lever["args"]["tasks"] = nuisance or [t["name"] for t in spec["tasks"] if t["name"] != main]
    spec["training"].update(checkpoint_every=spec["training"]["iterations"], device="cpu")
    spec.update(seed=seed, name=f"{workload} {method} seed={seed}")
    return md.Experiment.model_validate(spec)


def run_dir(runs: str | Path, quick: bool, workload: str, method: str, seed: int) -> Path:
    """Where one run trains (shared with ``examples/fetal_us.py``, whose fetal runs are this study's)."""
    return Path(runs) / ("quick" if quick else "") / workload / method / f"seed_{seed}"


def train_once(experiment: md.Experiment, data: Any, out: Path) -> tuple[md.Run, float]:
    """Train into ``out``, or resume it, or reuse it when finished; returns the run and its training seconds.

    The seconds of the first, complete training are kept in ``out/train_seconds.json`` (a reused run costs none).
    """
    timing = out / "train_seconds.json"
    start = time.perf_counter()
    run = md.train(experiment, data=data, out_dir=out, resume=(out / "checkpoints").is_dir(), quiet=True)
    if not timing.is_file():
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run, float(json.loads(timing.read_text())["seconds"])


def run_one(args: argparse.Namespace, workload: str, method: str, seed: int) -> dict[str, Any]:
    _, unseen_split, main, nuisance = WORKLOADS[workload]
    e = experiment(workload, method, seed, args.quick)
    out = run_dir(args.runs, args.quick, workload, method, seed)
    run, seconds = train_once(e, None, out)
    data = spec_data(run.model)
    probe_data = None if args.probes else False  # None: the data's train split
    targets = nuisance or [t for t in e.task_names if t != main]
    pairs = [(main, t) for t in targets]
    test = md.evaluate(
        run,
        data,
        split="test",
        which="final",
        layers=("features",),
        probe_data=probe_data,
        device="cpu",
        probe_pairs=pairs,
    )
    unseen = md.evaluate(run, data, split=unseen_split, which="final", probe_data=False, device="cpu")

    leak = leakage(test, pairs) if args.probes else dict.fromkeys(LEAKAGE, {})
    return {
        "workload": workload,
        "method": method,
        "seed": seed,
        "train_seconds": seconds,
        "test_accuracy": test.accuracy,
        "unseen_accuracy": unseen.accuracy[main],
        "unseen_confusion": unseen.metrics[main].confusion,
        "adversary_accuracy": {f"{i}->{j}": test.adversary_accuracy.get((i, j)) for i, j in pairs},
        **leak,
        "recomputed_bn": scores(recomputed(run.model, data), data, unseen_split, main, pairs),
    }


# row key -> probe kind of md.evaluate
LEAKAGE = {
    "linear_leakage": "linear",
    "mlp_leakage": "mlp",
    "linear_conditional_leakage": "linear_conditional",
    "mlp_conditional_leakage": "mlp_conditional",
}


def leakage(test: md.Report, pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """The normalised leakage of each pair (main -> nuisance) by each probe kind the report has."""
    probes = test.probes["features"]
    return {
        key: {f"{i}->{j}": probes[kind].normalised[(i, j)] for i, j in pairs}
        for key, kind in LEAKAGE.items()
        if kind in probes
    }


def fill_probes(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Give a row made with --no-probes its leakage, from its finished run (the final model, as run_one would)."""
    _, _, main, nuisance = WORKLOADS[row["workload"]]
    model = md.load(run_dir(args.runs, args.quick, row["workload"], row["method"], row["seed"]), "final")
    pairs = [(main, t) for t in (nuisance or [t for t in model.task_names if t != main])]
    row.update(leakage(md.evaluate(model, split="test", layers=("features",), device="cpu", probe_pairs=pairs), pairs))


def rescore_parser(doc: str, main_help: str) -> argparse.ArgumentParser:
    """The command line shared by the scripts that score finished runs again (``rescore_*.py``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--unseen", required=True, help="the unseen split's name")
    p.add_argument("--main", required=True, help=main_help)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    return p


def spec_data(model: md.MultiTaskModel) -> md.DataSource:
    """The data the model's spec names (what it trained on), built once."""
    e = model.experiment
    assert e.data is not None, "the spec names no dataset"
    return md.datasets.create(e.data.name, e.data.args)


def recomputed(model: md.MultiTaskModel, data: md.DataSource) -> md.MultiTaskModel:
    """A copy of ``model`` with BatchNorm statistics recomputed on the training split of ``data``, at its batch size."""
    tr = model.experiment.training
    return md.recompute_batchnorm(copy.deepcopy(model), data[tr.train_split], batch_size=tr.batch_size)


def scores(
    model: md.MultiTaskModel, data: md.DataSource, unseen_split: str, main: str, pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """Accuracies without probes: every task on ``test``, ``main`` on the unseen split, the trained adversaries."""
    test = md.evaluate(model, data, split="test", probe_data=False, device="cpu")
    unseen = md.evaluate(model, data, split=unseen_split, probe_data=False, device="cpu")
    return {
        "test_accuracy": test.accuracy,
        "unseen_accuracy": unseen.accuracy[main],
        "adversary_accuracy": {f"{i}->{j}": test.adversary_accuracy.get((i, j)) for i, j in pairs},
    }


def _mean(d: dict[str, float]) -> float:
    vals = [v for v in d.values() if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


COLUMNS: list[tuple[str, Any, bool]] = [
    ("seen test, min over tasks", lambda r: min(r["test_accuracy"].values()), False),
    ("**unseen** (per seed)", lambda r: r["unseen_accuracy"], True),
    ("unseen, BN recomputed", lambda r: r.get("recomputed_bn", {}).get("unseen_accuracy", math.nan), True),
    (
        "seen, BN recomputed",
        lambda r: min(r.get("recomputed_bn", {"test_accuracy": {"": math.nan}})["test_accuracy"].values()),
        False,
    ),
    ("conditional linear leakage", lambda r: _mean(r["linear_conditional_leakage"]), False),
    ("conditional MLP leakage", lambda r: _mean(r["mlp_conditional_leakage"]), False),
    ("linear leakage", lambda r: _mean(r["linear_leakage"]), False),
    ("MLP leakage", lambda r: _mean(r["mlp_leakage"]), False),
    ("trained adversary", lambda r: _mean(r["adversary_accuracy"]), False),
    ("train s", lambda r: r["train_seconds"], False),
]


def table(rows: list[dict[str, Any]], workload: str) -> str:
    """One line per method; the recomputed-BN columns only where some row has them (older studies do not)."""
    rows = [r for r in rows if r["workload"] == workload]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    recomputed = any("recomputed_bn" in r for r in rows)
    columns = [c for c in COLUMNS if recomputed or "BN recomputed" not in c[0]]
    lines = ["| method | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = []
        for _, fn, per_seed in columns:
            vals = [fn(r) for r in mine]
            text = format_mean_std(vals, 2)
            cells.append(f"{text} ({', '.join(f'{v:.2f}' for v in vals)})" if per_seed else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    out = [
        "# Disentanglement study (benchmarks/disentangle.py)",
        "",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "Cells: mean ± std over seeds (per-seed values in brackets). Leakage: the nuisance read from the main "
        "task's encoder features by fresh probes fitted on `train` and scored on `test`, normalised (0 at the "
        "majority rate, within each class of the main task for the conditional probes; 1 perfect); averaged "
        "over the nuisance pairs. Trained adversary: accuracy of the strongest trained adversary of the same "
        "pairs on `test` (a conditional adversary also sees the main task's label).",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        _, unseen, main, _ = WORKLOADS[workload]
        out += ["", f"## {workload}: unseen = {main} accuracy on `{unseen}`", "", table(rows, workload)]
    out += ["", "Methods:", ""] + [
        f"- `{m}`: {METHODS[m][0]}" for m in dict.fromkeys(r["method"] for r in rows) if m in METHODS
    ]
    return "\n".join(out) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'mtdisent[plots]'): no figure")
        return
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7), squeeze=False)
    for col, w in enumerate(workloads):
        mine = [r for r in rows if r["workload"] == w]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for x, m in enumerate(methods):
            rs = [r for r in mine if r["method"] == m]
            axes[0][col].scatter([x] * len(rs), [r["unseen_accuracy"] for r in rs], color="C0")
            axes[1][col].scatter([x] * len(rs), [_mean(r["linear_conditional_leakage"]) for r in rs], color="C1")
            axes[1][col].scatter(
                [x] * len(rs), [_mean(r["mlp_conditional_leakage"]) for r in rs], color="C2", marker="x"
            )
        for ax, title, line in (
            (axes[0][col], f"{w}: unseen accuracy", 0.9),
            (axes[1][col], f"{w}: conditional leakage (o linear, x MLP)", 0.2),
        ):
            ax.axhline(line, ls="--", color="gray", lw=1)
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
            ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=["lambda0", "paper", "default"], choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 4 iterations: checks that everything runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "study"))
    p.add_argument("--runs", default="runs/study", help="run directories (shared with examples/fetal_us.py)")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier results.json in --out")
    p.add_argument(
        "--fill-probes",
        action="store_true",
        help="with --append: first give the chosen rows made with --no-probes their leakage (from their runs)",
    )
    p.add_argument(
        "--no-probes",
        dest="probes",
        action="store_false",
        help="skip the leakage probes (accuracies only; the row's leakage stays empty, shown as '-')",
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"quick": args.quick, "defaults": md.AdversarySpec().model_dump(mode="json")}
    rows: list[dict[str, Any]] = []
    if args.append and (out / "results.json").exists():  # keep earlier rows; run only what is missing
        earlier = json.loads((out / "results.json").read_text())
        if earlier["settings"] != settings:
            raise SystemExit(
                f"--append: {out / 'results.json'} was made with other settings ({earlier['settings']}, now "
                f"{settings}); use the same settings or another --out"
            )
        rows = earlier["rows"]
    done = {(r["workload"], r["method"], r["seed"]) for r in rows}
    if args.fill_probes:  # rows of the chosen workloads, methods and seeds made with --no-probes
        for row in rows:
            chosen = row["workload"] in args.workloads and row["method"] in args.methods and row["seed"] in args.seeds
            if chosen and args.probes and not row["linear_leakage"]:
                fill_probes(args, row)
                print(f"{row['workload']} {row['method']} seed={row['seed']}: probes filled in", flush=True)
                result = {"settings": settings, "machine": md.machine_info(), "rows": rows}
                (out / "results.json").write_text(json.dumps(result, indent=1))
                (out / "results.md").write_text(markdown(result))
    for workload in args.workloads:
        for method in args.methods:
            for seed in args.seeds:
                if (workload, method, seed) in done:
                    continue
                row = run_one(args, workload, method, seed)
                rows.append(row)
                print(
                    f"{workload} {method} seed={seed}: unseen {row['unseen_accuracy']:.3f}, seen "
                    f"{min(row['test_accuracy'].values()):.3f}, cond. linear leak "
                    f"{_mean(row['linear_conditional_leakage']):.2f}, {row['train_seconds']:.0f} s",
                    flush=True,
                )
                result = {"settings": settings, "machine": md.machine_info(), "rows": rows}
                (out / "results.json").write_text(json.dumps(result, indent=1))
                (out / "results.md").write_text(markdown(result))
    result = {"settings": settings, "machine": md.machine_info(), "rows": rows}
    (out / "results.md").write_text(markdown(result))
    figure(rows, out / "results.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
