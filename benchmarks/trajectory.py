"""When does a run take the shortcut? Unseen and seen accuracy at checkpoints along one study run.

    python benchmarks/trajectory.py --workload shapes_n --method long --seeds 1 --every 100

Trains the run exactly as ``benchmarks/disentangle.py`` does (same spec, same seed) but with a checkpoint every
``--every`` iterations, all kept, then evaluates each checkpoint's model on the workload's unseen split and on the
seen ``test`` split (accuracy only, no probes). Checkpointing does not change the training (exact resume), so the
last checkpoint is the study's final model and the one at iteration i is what a run of i iterations would end
with, as long as nothing in the spec depends on the total length (constant lambda, no warm-up: the study's
workloads).

``--average K ...`` also scores, for each K, the uniform average of the last K checkpoints' weights (stochastic
weight averaging over the run's end, Izmailov et al. 2018) with its BatchNorm statistics re-estimated on the
training split (``md.recompute_batchnorm``: exact averages over one pass, no flips); K = 1 is the
final model with re-estimated statistics, which separates what the running statistics do from what the weights
do.

Writes ``trajectory.json`` and ``trajectory.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import mtdisent as md

sys.path.insert(0, str(Path(__file__).parent))
from disentangle import METHODS, WORKLOADS, experiment  # noqa: E402  (the study's runs, one definition)


def trajectory(
    workload: str, method: str, seed: int, every: int, runs: Path, quick: bool = False
) -> list[dict[str, Any]]:
    """Train (or reuse) one run with a checkpoint every ``every`` iterations; accuracy at each checkpoint."""
    _, unseen_split, main, _ = WORKLOADS[workload]
    spec = experiment(workload, method, seed, quick).model_dump(mode="json")
    iterations = spec["training"]["iterations"]
    if iterations % every:
        raise SystemExit(f"--every: {every} does not divide the run's {iterations} iterations; pick a divisor")
    spec["training"].update(checkpoint_every=every, keep_last=iterations // every)
    out = runs / workload / method / f"seed_{seed}"
    md.train(md.Experiment.model_validate(spec), out_dir=out, resume=(out / "checkpoints").is_dir(), quiet=True)
    points = []
    for it in range(every, iterations + 1, every):
        model = md.load(out / "checkpoints" / f"iter-{it:08d}")  # read once, scored on both splits
        unseen = md.evaluate(model, split=unseen_split, probe_data=False, device="cpu")
        seen = md.evaluate(model, split="test", probe_data=False, device="cpu")
        points.append({"iteration": it, "unseen_accuracy": unseen.accuracy[main], "test_accuracy": dict(seen.accuracy)})
        print(f"{workload} {method} seed={seed} iteration {it}: unseen {unseen.accuracy[main]:.3f}", flush=True)
    return points


def averaged(checkpoints: list[Path], train: Any) -> md.MultiTaskModel:
    """The checkpoints' floating-point weights averaged uniformly, BatchNorm statistics re-estimated on ``train``."""
    models = [md.load(c) for c in checkpoints]
    model, states = models[-1], [m.state_dict() for m in models]
    model.load_state_dict(
        {k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v for k, v in states[-1].items()}
    )
    return md.recompute_batchnorm(model, train, batch_size=50).eval()


def averages(workload: str, method: str, seed: int, every: int, runs: Path, lasts: list[int], quick: bool = False):
    """Unseen and seen accuracy of the average of the last K checkpoints, for each K in ``lasts``."""
    _, unseen_split, main, _ = WORKLOADS[workload]
    e = experiment(workload, method, seed, quick)
    out, iterations = runs / workload / method / f"seed_{seed}", e.training.iterations
    train = md.datasets.create(e.data.name, e.data.args)["train"]
    rows = []
    for k in lasts:
        its = list(range(every, iterations + 1, every))[-k:]
        model = averaged([out / "checkpoints" / f"iter-{it:08d}" for it in its], train)
        unseen = md.evaluate(model, split=unseen_split, probe_data=False, device="cpu")
        seen = md.evaluate(model, split="test", probe_data=False, device="cpu")
        rows.append(
            {
                "last": k,
                "iterations": its,
                "unseen_accuracy": unseen.accuracy[main],
                "test_accuracy": dict(seen.accuracy),
            }
        )
        print(
            f"{workload} {method} seed={seed} average of the last {k}: unseen {unseen.accuracy[main]:.3f}", flush=True
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Unseen accuracy along training (benchmarks/trajectory.py)",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
    ]
    for r in result["runs"]:
        main = WORKLOADS[r["workload"]][2]
        lines += [
            f"## {r['workload']} {r['method']} seed {r['seed']}: {main} accuracy",
            "",
            "| iteration | unseen | seen test, " + main + " | seen test, min over tasks |",
            "|---|---|---|---|",
        ]
        for p in r["points"]:
            acc, low = p["test_accuracy"], min(p["test_accuracy"].values())
            lines.append(f"| {p['iteration']} | {p['unseen_accuracy']:.3f} | {acc[main]:.3f} | {low:.3f} |")
        lines.append("")
        if r.get("averages"):
            lines += [
                "Averages of the last K checkpoints' weights, BatchNorm statistics re-estimated on `train`:",
                "",
                "| K | iterations | unseen | seen test, " + main + " | seen test, min over tasks |",
                "|---|---|---|---|---|",
            ]
            for a in r["averages"]:
                acc, low, its = a["test_accuracy"], min(a["test_accuracy"].values()), a["iterations"]
                span = f"{its[0]}-{its[-1]}" if len(its) > 1 else str(its[0])
                lines.append(f"| {a['last']} | {span} | {a['unseen_accuracy']:.3f} | {acc[main]:.3f} | {low:.3f} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="shapes_n", choices=list(WORKLOADS))
    p.add_argument("--method", default="default", choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=100, help="iterations between checkpoints (divides the run's)")
    p.add_argument("--quick", action="store_true", help="the study's smoke sizes (4 iterations): checks it runs")
    p.add_argument(
        "--average",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="also score the average of the last K checkpoints (BatchNorm re-estimated), for each K",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default="runs/trajectory", help="run directories (kept; a finished run is reused)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trajectory"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = experiment(args.workload, args.method, 0, args.quick).training.iterations // args.every
    if any(not 1 <= k <= n for k in args.average):
        raise SystemExit(f"--average: each K must be in 1..{n} (the run's checkpoints); got {args.average}")
    runs = []
    for seed in args.seeds:
        points = trajectory(args.workload, args.method, seed, args.every, Path(args.runs), args.quick)
        avg = averages(args.workload, args.method, seed, args.every, Path(args.runs), args.average, args.quick)
        runs.append({"workload": args.workload, "method": args.method, "seed": seed, "points": points, "averages": avg})
        result = {"machine": md.machine_info(), "every": args.every, "quick": args.quick, "runs": runs}
        (out / "trajectory.json").write_text(json.dumps(result, indent=1))
        (out / "trajectory.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
