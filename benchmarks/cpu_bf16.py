"""bf16 autocast against float32 on this CPU: iteration time side by side, and the demo's results on a few seeds.

    python benchmarks/cpu_bf16.py --out benchmarks/results/cpu_bf16            # speed, then the demo on seeds 0-2
    python benchmarks/cpu_bf16.py --only speed --quick --out /tmp/bf16         # a smoke run

``speed``: the whole fast-path iteration (main step and adversary steps; 1 x 64 x 64, batch 50, k = 5, reused
features) with ``training.amp`` ``"off"`` and ``"bf16"``, timed alternately in one process (speed.py's loops):
the paper's adversaries at N = 2, 4, 8 and the library default's at N = 8.
``demo``: ``mtdisent demo``'s two models (lambda 0.01 and 0, 600 iterations) trained with each precision on each
seed, scored as the demo scores them: seen test accuracy per task, shape accuracy on the unseen circles on black.
Writes results.json and results.md to ``--out`` after every measurement. What the numbers decide is written in
``benchmarks/results/cpu_bf16/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402  (the same loops, specs and alternating timer as the speed benchmark)

import mtdisent as md  # noqa: E402
from mtdisent._cli import apply_overrides, demo_experiment  # noqa: E402

PRECISIONS = ("off", "bf16")


def speed_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n, adversary in [*((n, "paper") for n in args.tasks), (max(args.tasks), "default")]:
        data = speed.data_for(n, args.size)
        chosen = speed.PAPER_ADVERSARY if adversary == "paper" else {}
        loops = {p: speed.loop_for(speed.spec(n, args.size, adversary=chosen, amp=p), data) for p in PRECISIONS}
        t = speed.side_by_side(loops, args.repeats)
        row = {"tasks": n, "adversary": adversary, **t, "ratio": t["bf16"]["iteration_s"] / t["off"]["iteration_s"]}
        rows.append(row)
        print(f"speed N={n} {adversary}: bf16 / float32 = {row['ratio']:.2f}", flush=True)
    return rows


def demo_section(args: argparse.Namespace, result: dict[str, Any], save: Any) -> None:
    rows = result.setdefault("demo", [])
    for seed in args.seeds:
        for precision in PRECISIONS:
            for weight in (0.01, 0.0):
                e = apply_overrides(demo_experiment(weight, args.iterations, seed), [f"training.amp={precision}"])
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    run = md.train(e, out_dir=tmp, quiet=True)
                    seconds = time.perf_counter() - t0
                    test = md.evaluate(run, split="test", probe_data=False)
                    unseen = md.evaluate(run, split="unseen", probe_data=False)
                rows.append(
                    {
                        "seed": seed,
                        "amp": precision,
                        "weight": weight,
                        "train_seconds": seconds,
                        "test_accuracy": dict(test.accuracy),
                        "unseen_shape_accuracy": unseen.accuracy["shape"],
                    }
                )
                print(f"demo seed={seed} amp={precision} lambda={weight:g}: {rows[-1]}", flush=True)
                save()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# bf16 autocast against float32 on the CPU (benchmarks/cpu_bf16.py)",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in result["machine"].items())
        + f". Other jobs: {result['shared']}.",
        "",
    ]
    if "speed" in result:
        lines += [
            "## Iteration time, bf16 / float32 (fast path, 1 x 64 x 64, batch 50, k = 5, reuse; medians)",
            "",
            "| N | adversaries | float32 s (main / adversary) | bf16 s (main / adversary) | **bf16 / float32** |",
            "|---|---|---|---|---|",
        ]
        for r in result["speed"]:
            f, b = r["off"], r["bf16"]
            cells = [f"{t['iteration_s']:.3f} ({t['main_s']:.3f} / {t['adversary_s']:.3f})" for t in (f, b)]
            lines.append(f"| {r['tasks']} | {r['adversary']} | {cells[0]} | {cells[1]} | **{r['ratio']:.2f}** |")
        lines.append("")
    if result.get("demo"):
        lines += [
            "## `mtdisent demo`'s models with each precision (seen test accuracy per task; unseen circle on black)",
            "",
            "| lambda | amp | seeds | seen (mean over seeds) | unseen per seed | unseen mean | train s per run |",
            "|---|---|---|---|---|---|---|",
        ]
        for weight in (0.01, 0.0):
            for p in PRECISIONS:
                rs = [r for r in result["demo"] if r["weight"] == weight and r["amp"] == p]
                if not rs:
                    continue
                seen = ", ".join(
                    f"{t} {statistics.mean(r['test_accuracy'][t] for r in rs):.3f}" for t in rs[0]["test_accuracy"]
                )
                unseen = [r["unseen_shape_accuracy"] for r in rs]
                lines.append(
                    f"| {weight:g} | {p} | {', '.join(str(r['seed']) for r in rs)} | {seen} | "
                    f"{', '.join(f'{u:.2f}' for u in unseen)} | {statistics.mean(unseen):.3f} | "
                    f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("speed", "demo"), default=["speed", "demo"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 4 demo iterations: checks that it runs")
    p.add_argument("--shared", default="none", help="say what else ran on the machine, for the record")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.size, args.tasks, args.repeats, args.iterations = (64, 64), [2, 4, 8], 7, 600
    if args.quick:
        args.size, args.tasks, args.repeats, args.iterations = (32, 32), [2, 3], 1, 4
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": md.machine_info(), "shared": args.shared, "quick": args.quick}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        (args.out / "results.md").write_text(markdown(result))

    if "speed" in args.only:
        result["speed"] = speed_section(args)
        save()
    if "demo" in args.only:
        demo_section(args, result, save)
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
