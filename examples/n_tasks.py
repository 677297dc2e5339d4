"""N tasks at once: ``shapes_n`` with K binary factors, full model against lambda = 0, across task counts.

Each of the K factors (shape, background, foreground, texture, size, position, orientation, noise) is a task
and every other factor is a nuisance that follows the shape with a chosen correlation; training never shows
an ellipse on a dark background, and the ``unseen`` split is made of exactly those. The model has K encoders,
K classifiers and K (K - 1) adversaries. Reported per K and lambda, mean ± std over seeds: seen-test accuracy
(mean over tasks), shape accuracy on the unseen combinations, and the fresh linear-probe leakage averaged
over all ordered pairs i != j (normalised: 0 at the majority rate, 1 when the probe is perfect).

    python examples/n_tasks.py --quick                 # CPU: K = 2, 4, 8 at 32 x 32, 300 iterations, 2 seeds
    python examples/n_tasks.py --tasks 4 --seeds 0 1 2 3 4 --iterations 2000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mtdisent as md
from mtdisent.evaluation import format_mean_std


def experiment(args: argparse.Namespace, k: int, weight: float, seed: int) -> md.Experiment:
    data = {
        "name": "shapes_n",
        "args": {"num_tasks": k, "image_size": list(args.image_size), "seed": seed, "correlation": args.correlation},
    }
    source = md.datasets.get("shapes_n")(**data["args"], n_train=16, n_eval=4)  # only for tasks and input shape
    return md.Experiment(
        name=f"shapes_n K={k} lambda={weight:g} seed={seed}",
        tasks=source.tasks,
        input_shape=source.input_shape,
        data=data,
        backbone={"name": "dltk_residual", "args": {"filters": [8, 16, 32], "strides": [1, 2, 2], "output": "pool"}},
        head={"hidden": [64]},
        adversary={"weight": weight, "steps": args.steps, "features": "reuse", "head": {"hidden": [64]}},
        training={
            "iterations": args.iterations,
            "batch_size": 50,
            "optimizer": {"name": "adam", "lr": args.lr},
            "adversary_optimizer": {"name": "adam", "lr": args.lr},
            "checkpoint_every": args.iterations,
            "device": args.device,
        },
        seed=seed,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K = 2, 4, 8 at 32 x 32, 300 iterations, seeds 0 1")
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts K (default 2 4 8)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, help="default 64 64")
    p.add_argument("--iterations", type=int, default=None, help="default 1000")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--correlation", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/n_tasks")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    quick = {"tasks": [2, 4, 8], "image_size": [32, 32], "iterations": 300, "seeds": [0, 1]} if args.quick else {}
    full = {"tasks": [2, 4, 8], "image_size": [64, 64], "iterations": 1000, "seeds": [0, 1, 2]}
    for key, value in {**full, **quick}.items():
        if getattr(args, key) is None:  # explicit arguments win over --quick
            setattr(args, key, value)

    rows = []
    for k in args.tasks:
        for weight in args.weights:
            for seed in args.seeds:
                e = experiment(args, k, weight, seed)
                out = Path(args.out) / f"K{k}" / f"lambda_{weight:g}" / f"seed_{seed}"
                start = time.perf_counter()
                run = md.train(e, out_dir=out, resume=(out / "checkpoints").is_dir(), quiet=args.quiet)
                seconds = time.perf_counter() - start
                test = md.evaluate(run, split="test", which="final", layers=("features",), probes=("linear",))
                unseen = md.evaluate(run, split="unseen", which="final", probe_data=False)
                test.save(out / "eval-test")
                row = {
                    "tasks": k,
                    "weight": weight,
                    "seed": seed,
                    "seconds": seconds,
                    "test_accuracy": test.accuracy,
                    "mean_test_accuracy": sum(test.accuracy.values()) / k,
                    "unseen_shape_accuracy": unseen.accuracy["shape"],
                    "probe_leakage": test.off_diagonal_leakage(),
                    "probe_background_from_shape": test.leakage_normalised[("shape", "background")],
                }
                rows.append(row)
                print(
                    f"K={k} lambda={weight:g} seed={seed}: test {row['mean_test_accuracy']:.3f}, unseen shape "
                    f"{row['unseen_shape_accuracy']:.3f}, leakage {row['probe_leakage']:.3f} ({seconds:.0f} s)",
                    flush=True,
                )
    lines = [
        "| K | lambda | seen test accuracy (mean over tasks) | unseen shape accuracy | probe leakage, all pairs "
        "| probe leakage, background from shape | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in args.tasks:
        for weight in args.weights:
            rs = [r for r in rows if r["tasks"] == k and r["weight"] == weight]
            lines.append(
                f"| {k} | {weight:g} | {format_mean_std(r['mean_test_accuracy'] for r in rs)} "
                f"| {format_mean_std(r['unseen_shape_accuracy'] for r in rs)} "
                f"({', '.join(format(r['unseen_shape_accuracy'], '.2f') for r in rs)}) "
                f"| {format_mean_std(r['probe_leakage'] for r in rs)} "
                f"| {format_mean_std(r['probe_background_from_shape'] for r in rs)} "
                f"| {format_mean_std((r['seconds'] for r in rs), 0)} |"
            )
    note = "mean ± std over seeds (unseen accuracy per seed in parentheses); leakage normalised."
    table = "\n".join(lines) + f"\n\n{note}\n"
    settings = {k: v for k, v in vars(args).items() if k not in {"out", "quiet"}}
    # the adversary as trained (library defaults apart from weight, steps, features and head)
    settings["adversary"] = experiment(args, args.tasks[0], args.weights[0], args.seeds[0]).adversary.model_dump()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = md.machine_info()
    (out / "results.json").write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1))
    header = f"# n_tasks\n\nSettings: {json.dumps(settings)}\n\nMachine: {json.dumps(machine)}\n\n"
    (out / "results.md").write_text(header + table)
    print(table)


if __name__ == "__main__":
    main()
