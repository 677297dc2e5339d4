"""Speed of one training iteration across task counts: stacked (fast) against separate (reference) heads.

    python benchmarks/speed.py                 # the CPU targets: N = 2, 4, 8 at 64 x 64, batch 50, k = 5, reuse
    python benchmarks/speed.py --grid cpu-full # N = 2..8, reuse and fresh
    python benchmarks/speed.py --grid gpu      # 224 x 288 on CUDA, bf16
    python benchmarks/speed.py --grid quick    # a smoke run

For every point both paths are built from the same seed, checked to give the same losses for 20 steps
(the correctness gate; the run stops if they differ), then timed side by side, alternating iterations so
machine noise hits both alike. One iteration = 1 main step + k adversary steps. Results go to
benchmarks/results/speed_<grid>.{json,md,png} with the machine description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mtdisent as md
from mtdisent.engine import Loop, build_loop

RESULTS = Path(__file__).parent / "results"

GRIDS: dict[str, dict[str, Any]] = {
    "quick": {
        "tasks": [2, 4],
        "sizes": [(64, 64)],
        "batch": [50],
        "steps": [5],
        "features": ["reuse"],
        "outputs": ["pool"],
        "repeats": 2,
        "gate_steps": 5,
    },
    "cpu": {  # the target points: 1 x 64 x 64, batch 50, k = 5, reuse; N = 2, 4, 8 (about 5 minutes)
        "tasks": [2, 4, 8],
        "sizes": [(64, 64)],
        "batch": [50],
        "steps": [5],
        "features": ["reuse"],
        "outputs": ["flatten", "pool"],
        "repeats": 5,
        "gate_steps": 20,
    },
    "cpu-full": {  # every N and both feature modes (an hour or more on 2 cores)
        "tasks": [2, 3, 4, 5, 6, 7, 8],
        "sizes": [(64, 64)],
        "batch": [50],
        "steps": [5],
        "features": ["reuse", "fresh"],
        "outputs": ["flatten", "pool"],
        "repeats": 5,
        "gate_steps": 20,
    },
    "gpu": {
        "tasks": [2, 4, 8],
        "sizes": [(64, 64), (224, 288)],
        "batch": [50],
        "steps": [5],
        "features": ["reuse", "fresh"],
        "outputs": ["flatten", "pool"],
        "repeats": 10,
        "gate_steps": 20,
    },
}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def experiment(
    data: md.DataSource, heads: str, output: str, steps: int, features: str, batch: int, device: str
) -> md.Experiment:
    return md.Experiment(
        tasks=data.tasks,
        input_shape=data.input_shape,
        backbone={"name": "dltk_residual", "args": {"output": output}},
        # one unconditional adversary per ordered pair, as in the paper (the library default is an ensemble
        # of three conditional ones): the N (N - 1) heads the targets are about, and the committed results
        adversary={"steps": steps, "features": features, "ensemble": 1, "conditional": False, "reinit_every": 0},
        training={"batch_size": batch, "device": device, "amp": "bf16" if device == "cuda" else "off"},
        execution={"heads": heads},
        seed=0,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def iterate(loop: Loop) -> dict[str, float]:
    metrics = loop.step.update(loop.iteration)
    loop.iteration += 1
    return metrics


def timed(loop: Loop, device: torch.device) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    m = iterate(loop)
    sync(device)
    return {"iteration": time.perf_counter() - t0, "main": m["time/main"], "adversary": m["time/adversary"]}


def gate(data: md.DataSource, point: dict[str, Any], device: torch.device, steps: int) -> float:
    """Largest relative difference of the main loss over ``steps`` iterations; raises if beyond tolerance."""
    trainers = [
        build_loop(
            experiment(data, h, point["output"], point["steps"], point["features"], point["batch"], device.type),
            data,
            device=device.type,
        )
        for h in ("stacked", "separate")
    ]
    worst = 0.0
    for step in range(steps):
        a, b = (iterate(t)["loss/main"] for t in trainers)
        diff = abs(a - b) / max(1.0, abs(b))
        worst = max(worst, diff)
        tol = 2e-2 if device.type == "cuda" else 2e-3  # bf16 on CUDA
        if diff > tol:
            raise SystemExit(f"correctness gate failed at step {step}: stacked {a} vs separate {b} ({point})")
    return worst


def run_point(point: dict[str, Any], device: torch.device, repeats: int, gate_steps: int) -> dict[str, Any]:
    h, w = point["size"]
    data = md.datasets.get("shapes_n")(num_tasks=point["tasks"], image_size=[h, w], n_train=300, n_eval=20)
    worst = gate(data, point, device, gate_steps)
    trainers = {}
    for heads in ("stacked", "separate"):
        e = experiment(data, heads, point["output"], point["steps"], point["features"], point["batch"], device.type)
        trainers[heads] = build_loop(e, data, device=device.type)
        for _ in range(2):  # warm-up
            iterate(trainers[heads])
    times: dict[str, list[dict[str, float]]] = {"stacked": [], "separate": []}
    for _ in range(repeats):  # alternate so drifting machine load hits both paths alike
        for heads, tr in trainers.items():
            times[heads].append(timed(tr, device))
    out: dict[str, Any] = {**point, "size": f"{h}x{w}", "gate_max_rel_diff": worst}
    for heads, ts in times.items():
        it = statistics.median(t["iteration"] for t in ts)
        out[heads] = {
            "iteration_s": it,
            "main_s": statistics.median(t["main"] for t in ts),
            "adversary_s": statistics.median(t["adversary"] for t in ts),
            "images_per_s": point["batch"] / it,
        }
        reset_peak(device)
        iterate(trainers[heads])
        out[heads]["peak_mib"] = peak_mib(device)
    out["ratio"] = out["stacked"]["iteration_s"] / out["separate"]["iteration_s"]
    return out


def markdown(results: list[dict[str, Any]], info: dict[str, Any], grid: str) -> str:
    lines = [
        f"# Iteration time, stacked vs separate heads ({grid} grid)",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "One iteration = 1 main step + k adversary steps; medians of alternating runs; ratio = stacked / separate. "
        "Peak memory: on CUDA the allocator's peak; on the CPU the process's peak resident set during one "
        "iteration (it includes the resident models and data, so it separates the paths poorly).",
        "",
        "| N | image | batch | k | features | encoder output | stacked s | separate s | ratio | stacked main / adv s "
        "| separate main / adv s | img/s stacked | peak MiB stacked / separate | gate max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, p = r["stacked"], r["separate"]
        lines.append(
            f"| {r['tasks']} | {r['size']} | {r['batch']} | {r['steps']} | {r['features']} | {r['output']} "
            f"| {s['iteration_s']:.3f} | {p['iteration_s']:.3f} | **{r['ratio']:.2f}** "
            f"| {s['main_s']:.3f} / {s['adversary_s']:.3f} | {p['main_s']:.3f} / {p['adversary_s']:.3f} "
            f"| {s['images_per_s']:.0f} | {s['peak_mib'] or 0:.0f} / {p['peak_mib'] or 0:.0f} "
            f"| {r['gate_max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'mtdisent[plots]'): no PNG written", file=sys.stderr)
        return False
    series: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault(f"{r['size']} {r['features']} {r['output']}", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in series.items():
        n = [r["tasks"] for r in rs]
        axes[0].plot(n, [r["stacked"]["iteration_s"] for r in rs], "o-", label=f"stacked {label}")
        axes[0].plot(n, [r["separate"]["iteration_s"] for r in rs], "x--", label=f"separate {label}")
        axes[1].plot(n, [r["ratio"] for r in rs], "o-", label=label)
    axes[0].set(xlabel="tasks N", ylabel="seconds per iteration", yscale="log", title="iteration time")
    axes[1].set(xlabel="tasks N", ylabel="stacked / separate", title="ratio (lower is faster)")
    axes[1].axhline(1.0, color="gray", lw=0.5)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.grid == "gpu" and torch.cuda.is_available() else "cpu")
    grid = GRIDS[args.grid]
    info = md.machine_info()
    results = []
    for size in grid["sizes"]:
        for output in grid["outputs"]:
            for features in grid["features"]:
                for n in grid["tasks"]:
                    for batch in grid["batch"]:
                        for steps in grid["steps"]:
                            point = {
                                "tasks": n,
                                "size": size,
                                "batch": batch,
                                "steps": steps,
                                "features": features,
                                "output": output,
                            }
                            r = run_point(point, device, grid["repeats"], grid["gate_steps"])
                            results.append(r)
                            print(
                                f"N={n} {r['size']} {features} {output}: stacked {r['stacked']['iteration_s']:.3f} s, "
                                f"separate {r['separate']['iteration_s']:.3f} s, ratio {r['ratio']:.2f}",
                                flush=True,
                            )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed_{args.grid}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=1))
    stem.with_suffix(".md").write_text(markdown(results, info, args.grid))
    written = [".json", ".md"] + ([".png"] if plot(results, stem.with_suffix(".png")) else [])
    print(f"wrote {stem}{'/'.join(written)}")


if __name__ == "__main__":
    main()
