"""What an iteration costs, measured side by side: the issue's speed and memory targets from one command.

    python benchmarks/speed.py            # everything below on this machine's CPU (about 15 minutes on 2 cores)
    python benchmarks/speed.py --quick    # a smoke run at tiny sizes
    python benchmarks/speed.py --only gates ratio
    python benchmarks/speed.py --gpu      # on CUDA: 1 x 224 x 288 everywhere, bf16 autocast (benchmarks/gpu.sh)

Sections (``--only`` picks some):

* ``gates``: correctness first. The Gram shortcut for the k adversary steps on reused features against the
  plain steps (same model, same batches): every weight within float tolerance after each of 20 iterations
  started from the same state (the paper's adversaries at every N, the library's default at the second N);
  the fast path against the reference loop: the same losses over 20 iterations. The run stops if a gate fails.
* ``ratio``: the targets' points, 1 x 64 x 64, batch 50, k = 5, reused features, the paper's one unconditional
  adversary per ordered pair, N = 2, 4, 8. *fast* = stacked heads + the Gram shortcut (the library's execution
  defaults) and its default memory layout (channels-last encoders on a CPU); *naive* = the fair reference loop
  (one module per head, Python loops, adversary weights out of the main step's graph, foreach optimisers, the same
  reused features) with contiguous tensors, and timed beside them the same loop channels-last. Timed alternately,
  medians.
* ``default``: the library's default adversaries against the paper's at N = 8 (both fast), with four variants of
  the default timed beside them (one network per ordered pair, the default before 2026-12-05; members 86 wide; one
  member; one network per pair whose members share their hidden layer).
* ``layout``: adversary parameters at the paper's resolution (1 x 224 x 288, flattened DLTK features,
  D = 64,512) for N = 2, 4, 8: one network per pair against one per source task, and the default's members
  sharing their hidden layer (``adversary.layout``).
* ``memory``: the default settings at 1 x 224 x 288 train (3 iterations, batch 50) for N = 2, 4, 8, each in a
  fresh process: peak resident memory and seconds per iteration.
* ``main``: the main step's options at N = 4, 64 x 64: channels_last, ``torch.compile``, bf16 autocast, threads;
  channels-last against contiguous encoders at every N and over whole iterations of the study's three workloads.
* ``loader``: a disk dataset (``csv_images``, PNGs at 224 x 288): training-feed images per second with
  ``training.num_workers`` 0, 1, 2.
* ``demo``: ``mtdisent demo`` (the README's main job, target <= 5 minutes on 2 cores) in a fresh process and an
  empty folder: wall and CPU seconds, and what it concludes (seen test and unseen accuracy of both models).
* ``profile``: torch.profiler over 3 iterations of the fast path at the smallest N: the top operators by self
  time and, on CUDA, device-busy time, kernel launches, synchronisations and cudaMalloc/cudaFree calls per iteration.

Sections run in the order ``--only`` gives, and the results are written after each one.
Results go to benchmarks/results/speed.{json,md} (``--gpu``: speed_gpu.{json,md}) with the machine description.
With ``--gpu`` every section runs on CUDA at the paper's resolution with bf16 autocast, except the gates, which
compare float32 paths.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from disentangle import METHODS  # the study's definitions of the variants timed here (same folder)

import mtdisent as md
from mtdisent._heads import MLPHead
from mtdisent.engine import Loop, build_loop

RESULTS = Path(__file__).parent / "results"
# environment variables that slow CUDA down by design (debugging), recorded with every result
CUDA_SWITCHES = ("CUDA_LAUNCH_BLOCKING", "PYTORCH_NO_CUDA_MEMORY_CACHING", "PYTORCH_CUDA_ALLOC_CONF")
SECTIONS = ("gates", "ratio", "default", "layout", "memory", "main", "loader", "profile", "demo")
# the study's `paper` method (one plain adversary per pair), its width pinned at the paper's 256
PAPER_ADVERSARY = {**METHODS["paper"][1]["adversary"], "head": {"hidden": [256]}}
MAIN_ONLY = {**PAPER_ADVERSARY, "steps": 0}  # the main-step sections: no adversary step is timed
RUN_ON = {"device": "cpu", "amp": "off"}  # where every loop runs (main() sets it from --gpu)


def spec(
    n: int, size: tuple[int, int], *, fast: bool = True, adversary: dict[str, Any] | None = None, **training: Any
) -> dict[str, Any]:
    """The benchmark's experiment as a dict: ``shapes_n`` tasks, DLTK encoders, k = 5 on reused features."""
    return {
        "tasks": [{"name": f"t{i}", "num_classes": 2} for i in range(n)],
        "input_shape": (1, *size),
        "backbone": {"name": "dltk_residual", "args": {"output": "flatten"}},
        "adversary": {"steps": 5, "features": "reuse", "weight": 0.1, **(adversary or {})},
        "training": {"batch_size": 50, **RUN_ON, **training},
        "execution": {"heads": "stacked", "adversary_steps": "auto"}
        if fast
        else {"heads": "separate", "adversary_steps": "plain"},
        "seed": 0,
    }


def data_for(n: int, size: tuple[int, int], count: int = 300) -> md.DataSource:
    return md.datasets.get("shapes_n")(num_tasks=n, image_size=list(size), n_train=count, n_eval=20)


def loop_for(experiment: dict[str, Any], data: md.DataSource) -> Loop:
    e = md.Experiment.model_validate({**experiment, "tasks": [t.model_dump() for t in data.tasks]})
    return build_loop(e, data)


def iterate(loop: Loop) -> dict[str, float]:
    metrics = loop.step.update(loop.iteration)
    loop.iteration += 1
    return metrics


def synchronize() -> None:
    if RUN_ON["device"] == "cuda":
        torch.cuda.synchronize()


def timed(loop: Loop) -> dict[str, float]:
    synchronize()
    t0 = time.perf_counter()
    m = iterate(loop)
    synchronize()
    return {"iteration": time.perf_counter() - t0, "main": m["time/main"], "adversary": m["time/adversary"]}


def side_by_side(loops: dict[str, Loop], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median iteration, main-step and adversary-step seconds of each loop, timed alternately."""
    for loop in loops.values():
        for _ in range(warmup):
            iterate(loop)
    times: dict[str, list[dict[str, float]]] = {k: [] for k in loops}
    for _ in range(repeats):  # alternate so drifting machine load hits every path alike
        for name, loop in loops.items():
            times[name].append(timed(loop))
    return {
        name: {f"{key}_s": statistics.median(t[key] for t in ts) for key in ("iteration", "main", "adversary")}
        for name, ts in times.items()
    }


# ----------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------
GATE_OPTIMIZER = {"name": "sgd", "lr": 1e-3, "momentum": 0.9}


def relative_weight_difference(a: Loop, b: Loop) -> float:
    """Largest weight difference between two loops' models, relative to each tensor's scale (at least 1e-3)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    floats = [k for k in sa if sa[k].is_floating_point()]
    return max(float((sa[k] - sb[k]).abs().max()) / max(float(sb[k].abs().max()), 1e-3) for k in floats)


def gates(args: argparse.Namespace) -> dict[str, Any]:
    """Gram == plain (weights after each iteration from one state), fast == naive (losses), over ``args.gate_steps``
    iterations.

    Gram against plain: before every iteration the Gram loop is given the plain loop's weights and optimiser state,
    and the weights after the iteration are compared (relative to each tensor's scale, at least 1e-3). The median
    over iterations is gated at float32 precision (1e-5), the largest at 1e-3: a 1e-7 difference occasionally moves
    a ReLU input across zero, which changes one unit's update for one sample. Free-running trajectories are reported
    (``drift``: the largest relative difference of the main loss, and of the weights after all iterations) but not
    gated: such flips, and parameters whose true gradient is zero (a BatchNorm shift feeding a convolution and
    another BatchNorm, moved by summation noise alone), make two float paths drift apart whatever the shortcut
    does. Fast against naive: the main losses of the free-running loops (the naive loop's optimiser state has
    another layout, so it cannot be given the same start). The gates train the encoders with SGD: Adam divides each
    gradient by its running scale and turns that noise into full-size steps.
    """
    out: dict[str, Any] = {}
    cases = [(f"N={n}", n, PAPER_ADVERSARY) for n in args.tasks] + [(f"N={args.tasks[1]} default", args.tasks[1], {})]
    for name, n, adversary in cases:
        data = data_for(n, args.size)
        base = spec(n, args.size, adversary=adversary, optimizer=GATE_OPTIMIZER, amp="off")  # float32 paths
        plain = copy.deepcopy(base)
        plain["execution"]["adversary_steps"] = "plain"
        naive = spec(n, args.size, fast=False, adversary=adversary, optimizer=GATE_OPTIMIZER, amp="off")
        loops = {k: loop_for(v, data) for k, v in (("gram", base), ("plain", plain), ("naive", naive), ("free", base))}
        assert loops["gram"].step.gram and not loops["plain"].step.gram  # type: ignore[attr-defined]
        synced, drift_loss, naive_loss = [], 0.0, 0.0
        for _ in range(args.gate_steps):
            loops["gram"].model.load_state_dict(loops["plain"].model.state_dict())
            loops["gram"].step.load_state_dict(copy.deepcopy(loops["plain"].step.state_dict()))  # no shared buffers
            losses = {k: iterate(v)["loss/main"] for k, v in loops.items()}
            synced.append(relative_weight_difference(loops["gram"], loops["plain"]))
            drift_loss = max(drift_loss, abs(losses["free"] - losses["plain"]) / max(1.0, abs(losses["plain"])))
            naive_loss = max(naive_loss, abs(losses["free"] - losses["naive"]) / max(1.0, abs(losses["naive"])))
        worst = {
            "gram_weights_median": statistics.median(synced),
            "gram_weights": max(synced),
            "naive_loss": naive_loss,
            "drift_loss": drift_loss,
            "drift_weights": relative_weight_difference(loops["free"], loops["plain"]),
        }
        out[name] = worst
        print(f"gates {name}: {worst}", flush=True)
        if worst["gram_weights_median"] > 1e-5 or worst["gram_weights"] > 1e-3 or naive_loss > 2e-3:
            raise SystemExit(f"correctness gate failed at {name}: {worst}")
    return out


def matmul_rate(n: int = 8192, repeats: int = 20) -> float:
    """The device's measured bf16 matrix-multiply rate, TFLOP/s (n x n x n products), to read images/s against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def ratio(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.tasks:
        data = data_for(n, args.size)
        loops = {  # fast: the library's defaults; naive: a plain loop's contiguous tensors, and channels-last
            "fast": loop_for(spec(n, args.size, adversary=PAPER_ADVERSARY), data),
            "naive": loop_for(spec(n, args.size, fast=False, adversary=PAPER_ADVERSARY, channels_last=False), data),
            "naive_cl": loop_for(spec(n, args.size, fast=False, adversary=PAPER_ADVERSARY, channels_last=True), data),
        }
        t = side_by_side(loops, args.repeats)
        row = {"tasks": n, **t, "ratio": t["fast"]["iteration_s"] / t["naive"]["iteration_s"]}
        row["ratio_naive_cl"] = t["fast"]["iteration_s"] / t["naive_cl"]["iteration_s"]
        row["fast_images_per_s"] = 50 / t["fast"]["iteration_s"]
        rows.append(row)
        print(
            f"ratio N={n}: fast {t['fast']['iteration_s']:.3f} s, naive {t['naive']['iteration_s']:.3f} s, "
            f"{row['ratio']:.2f} (against the naive loop with channels-last: {row['ratio_naive_cl']:.2f})",
            flush=True,
        )
    return rows


# variants of the default adversaries, timed beside it (their quality: results/source_fresh/, single_rerun/)
VARIANTS = {k: METHODS[k][1]["adversary"] for k in ("pair", "narrow", "single", "shared")}


def default(args: argparse.Namespace) -> dict[str, Any]:
    n = max(args.tasks)
    data = data_for(n, args.size)
    loops = {
        "default": loop_for(spec(n, args.size), data),
        "paper": loop_for(spec(n, args.size, adversary=PAPER_ADVERSARY), data),
        **{k: loop_for(spec(n, args.size, adversary=v), data) for k, v in VARIANTS.items()},
    }
    t = side_by_side(loops, args.repeats)
    ratios = {k: t[k]["iteration_s"] / t["paper"]["iteration_s"] for k in ("default", *VARIANTS)}
    out = {
        "tasks": n,
        **t,
        "ratio": ratios["default"],
        "variant_ratios": {k: ratios[k] for k in VARIANTS},
        "variants": VARIANTS,
        "default_adversary": md.AdversarySpec().model_dump(mode="json"),
    }
    print(f"default/paper N={n}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    return out


def layout(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Adversary parameters at 224 x 288 (D = 64,512), counted by ``MLPHead.parameter_count``, per layout."""
    d = md.build_model(md.Experiment.model_validate(spec(2, (224, 288)))).feature_sizes["t0"]
    rows = []
    for n in (2, 4, 8):
        row: dict[str, Any] = {"tasks": n, "D": d}
        for name, adversary in (("paper", PAPER_ADVERSARY), ("default", {})):
            a = md.AdversarySpec(**adversary)
            extra = 2 if a.conditional else 0
            m = a.ensemble
            row[f"{name}_pair"] = n * (n - 1) * m * MLPHead.parameter_count(d + extra, 2, a.head)
            row[f"{name}_source"] = n * m * MLPHead.parameter_count(d + extra, 2 * (n - 1), a.head)
            row[f"{name}_pair_shared"] = n * (n - 1) * MLPHead.parameter_count(d + extra, 2 * m, a.head)
        rows.append(row)
    # the formula is the model's: check it on a model small enough to build
    e = md.Experiment.model_validate(spec(3, (64, 64), adversary={"layout": "source"}))
    model = md.build_model(e)
    built = sum(p.numel() for p in model.adversary_parameters())
    dd = model.feature_sizes["t0"] + 2
    assert built == 3 * e.adversary.ensemble * MLPHead.parameter_count(dd, 4, e.adversary.head), "the formula is wrong"
    e = md.Experiment.model_validate(spec(3, (64, 64), fast=False, adversary={"layout": "pair_shared"}))
    built = sum(p.numel() for p in md.build_model(e).adversary_parameters())
    assert built == 6 * MLPHead.parameter_count(dd, 2 * e.adversary.ensemble, e.adversary.head), "the formula is wrong"
    return rows


MEMORY_CHILD = """
import json, resource, sys, time, torch
import mtdisent as md
from mtdisent.engine import build_loop
torch.set_num_threads(int(sys.argv[3]))
spec = json.loads(sys.argv[1]); iterations = int(sys.argv[2])
n = len(spec["tasks"])
data = md.datasets.get("shapes_n")(num_tasks=n, image_size=spec["input_shape"][1:], n_train=100, n_eval=4)
spec["tasks"] = [t.model_dump() for t in data.tasks]
loop = build_loop(md.Experiment.model_validate(spec), data)
params = sum(p.numel() for p in loop.model.adversary_parameters())
cuda = spec["training"]["device"] == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
times, used = [], 0.0
for i in range(iterations):
    sync(); t0 = time.perf_counter(); loop.step.update(i); sync(); times.append(time.perf_counter() - t0)
    if cuda:  # the device's memory in use after each iteration: what is left when the allocator keeps no statistics
        free, total = torch.cuda.mem_get_info()
        used = max(used, (total - free) / 2**20)
def resident_peak_mib():  # this process's own high-water mark: ru_maxrss also keeps the forking parent's at exec
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resident_peak_mib()
row = {"peak_mib": peak, "s_per_iteration": min(times[1:] or times), "adversary_parameters": params}
print(json.dumps({**row, "device_used_mib": used} if cuda else row))
"""


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.memory_tasks:
        s = spec(n, args.memory_size)
        s["adversary"] = {"layout": args.layout} if args.layout else {}
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, json.dumps(s), str(args.memory_iterations), str(args.threads)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            rows.append(
                {
                    "tasks": n,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}",
                }
            )
        else:
            rows.append({"tasks": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"memory N={n}: {rows[-1]}", flush=True)
    return rows


def main_step(args: argparse.Namespace) -> dict[str, Any]:
    n = 4 if 4 in args.tasks else args.tasks[0]
    data = data_for(n, args.size)
    variants = {  # each against contiguous tensors, the layout before 2026-12-05 (channels-last by default on CPUs)
        "baseline": {"channels_last": False},
        "channels_last": {"channels_last": True},
        "compile": {"compile": True, "channels_last": False},
        "compile + channels_last": {"compile": True, "channels_last": True},
        **(
            {"bf16": {"amp": "bf16", "channels_last": False}}
            if RUN_ON["amp"] == "off"
            else {"float32": {"amp": "off", "channels_last": False}}
        ),
    }
    loops = {
        k: loop_for(spec(n, args.size, adversary=MAIN_ONLY, **v), data)
        for k, v in variants.items()
    }
    t = side_by_side(loops, args.repeats, warmup=3)
    out: dict[str, Any] = {"tasks": n, "variants": {k: v["main_s"] for k, v in t.items()}}
    threads = torch.get_num_threads()
    per_threads = {}
    for th in sorted({1, threads}):
        torch.set_num_threads(th)
        per_threads[th] = side_by_side({"baseline": loops["baseline"]}, args.repeats, warmup=1)["baseline"]["main_s"]
    torch.set_num_threads(threads)
    out["threads"] = per_threads
    # channels-last against contiguous at every N, and over whole iterations of the study's three workloads
    by_n = {}
    for k in args.tasks:
        pair = {
            f"{name}_s": loop_for(spec(k, args.size, adversary=MAIN_ONLY, channels_last=cl), data_for(k, args.size))
            for name, cl in (("contiguous", False), ("channels_last", True))
        }
        by_n[k] = {name: t["main_s"] for name, t in side_by_side(pair, args.repeats, warmup=2).items()}
    out["channels_last_by_n"] = by_n
    out["channels_last_workloads"] = channels_last_workloads(args)
    print(f"main step N={n}: {out}", flush=True)
    return out


def channels_last_workloads(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Whole iterations of the disentanglement study's workloads (its default method), contiguous and channels-last."""
    import disentangle

    out = {}
    for workload in ("shapes_n", "shapes", "fetal"):
        e = disentangle.experiment(workload, "default", 0, args.quick).model_dump(mode="json")
        data = md.datasets.create(e["data"]["name"], e["data"]["args"])
        pair = {}
        for name, cl in (("contiguous", False), ("channels_last", True)):
            s = {**e, "training": {**e["training"], **RUN_ON, "channels_last": cl}}
            pair[f"{name}_s"] = build_loop(md.Experiment.model_validate(s), data)
        out[workload] = {name: t["iteration_s"] for name, t in side_by_side(pair, 3 * args.repeats, warmup=3).items()}
    return out


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """Where one iteration's time goes: torch.profiler over 3 iterations of the fast path at the smallest N.

    Kernel and operator counts and the top operators by self time (device time on CUDA), so that a device running
    far below its arithmetic rate says whether launches, synchronisations or allocations bound it.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    n = min(args.tasks)
    loop = loop_for(spec(n, args.size, adversary=PAPER_ADVERSARY), data_for(n, args.size))
    for _ in range(2):
        iterate(loop)
    cuda = RUN_ON["device"] == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            iterate(loop)
        synchronize()
    wall = (time.perf_counter() - t0) / 3
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:15]
    out: dict[str, Any] = {
        "tasks": n,
        "iteration_s": wall,
        "operators_per_iteration": sum(e.count for e in events) / 3,
        "top": [
            {
                "name": e.key,
                "calls_per_iteration": e.count / 3,
                "self_cpu_ms": e.self_cpu_time_total / 3e3,
                **({"self_device_ms": getattr(e, "self_device_time_total", 0.0) / 3e3} if cuda else {}),
            }
            for e in top
        ],
    }
    if cuda:
        out["device_busy_s"] = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 3e6
        out["synchronisations_per_iteration"] = sum(e.count for e in events if "Synchronize" in e.key) / 3
        out["mallocs_per_iteration"] = sum(e.count for e in events if e.key in {"cudaMalloc", "cudaFree"}) / 3
        out["launches_per_iteration"] = sum(e.count for e in events if "LaunchKernel" in e.key) / 3
    print(f"profile N={n}: { ({k: v for k, v in out.items() if k != 'top'}) }", flush=True)
    return out


def loader(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    n_images, size = args.loader_images, (224, 288)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        g = torch.Generator().manual_seed(0)
        rows = ["file,plane,shadow"]
        for i in range(n_images):
            pixels = (torch.rand(size[0] * 2, size[1] * 2, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"img{i}.png")
            rows.append(f"img{i}.png,{i % 3},{i % 2}")
        (root / "data.csv").write_text("\n".join(rows) + "\n")
        source = md.datasets.get("csv_images")(
            csv=str(root / "data.csv"),
            image_column="file",
            label_columns=["plane", "shadow"],
            image_size=size,
            val_fraction=0.0,
            test_fraction=0.0,
        )
        out: dict[str, Any] = {"images": n_images, "size": list(size)}
        for workers in args.workers:
            e = md.Experiment(
                tasks=source.tasks, input_shape=source.input_shape, training={"num_workers": workers, "batch_size": 50}
            )
            loop = build_loop(e, source)
            loop.feed.next()  # start the loader (and its workers)
            t0 = time.perf_counter()
            batches = 6
            for _ in range(batches):
                loop.feed.next()
            out[f"workers={workers}"] = batches * 50 / (time.perf_counter() - t0)
            loop.feed.close()
            print(f"loader workers={workers}: {out[f'workers={workers}']:.0f} images/s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> dict[str, Any]:
    """``mtdisent demo`` as a new user runs it (a fresh process, an empty output folder): its cost and its results.

    Wall seconds, CPU seconds of the process (user + system: what the two cores spent) and, from the reports it
    writes, each model's seen test accuracy per task and its shape accuracy on the unseen circles on black.
    """
    iterations = 4 if args.quick else 600  # 600: the demo's own default
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "mtdisent",
            "demo",
            "--quiet",
            "--out-dir",
            tmp,
            "--iterations",
            str(iterations),
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"demo: mtdisent demo failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        models = {}
        for weight in ("0.01", "0"):
            run_dir = Path(tmp) / f"lambda_{weight}"
            test = json.loads((run_dir / "eval-test" / "report.json").read_text())
            unseen = json.loads((run_dir / "eval-unseen" / "report.json").read_text())
            models[f"lambda={weight}"] = {
                "test_accuracy": {t: m["accuracy"] for t, m in test["metrics"].items()},
                "unseen_shape_accuracy": unseen["metrics"]["shape"]["accuracy"],
            }
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"iterations": iterations, "wall_s": wall, "cpu_s": cpu, "models": models}
    print(f"demo: {wall:.0f} s wall, {cpu:.0f} CPU-s, {models}", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    h, w = result.get("size", (64, 64))
    where = f"{result.get('device', 'cpu')}, amp {result.get('amp', 'off')}"
    lines = [
        "# Speed and memory (benchmarks/speed.py)",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in info.items())
        + f". Other jobs on the machine: {result['shared']}. Environment switches: "
        + (", ".join(f"{k}={v}" for k, v in result.get("environment", {}).items()) or "none")
        + ".",
        "",
    ]
    if "gates" in result:
        lines += [
            f"## Correctness gates ({result.get('gate_steps', 20)} iterations, float32)",
            "",
            "Gram vs plain: the weights after each iteration, both started from the plain loop's state, relative to "
            "max(|w|, 1e-3); gated: median <= 1e-5, largest <= 1e-3 (a ReLU input crossing zero). Fast vs naive: "
            "main losses of the free-running loops, <= 2e-3. Drift (not gated): free-running Gram vs plain, the "
            "largest relative main-loss difference and the weight difference after all iterations.",
            "",
            "| case | Gram vs plain weights, median / largest | fast vs naive loss | drift: loss / weights |",
            "|---|---|---|---|",
        ]
        for k, v in result["gates"].items():
            lines.append(
                f"| {k} | {v['gram_weights_median']:.1e} / {v['gram_weights']:.1e} | {v['naive_loss']:.1e} "
                f"| {v['drift_loss']:.1e} / {v['drift_weights']:.1e} |"
            )
        lines.append("")
    if "ratio" in result:
        lines += [
            f"## Iteration time: fast / naive (1 x {h} x {w}, batch 50, k = 5, reuse, one adversary per pair, {where})",
            "",
            "*fast*: the library's defaults (on a CPU the encoders channels-last, `training.channels_last=\"auto\"`); "
            "*naive*: the reference loop with contiguous tensors, as a plain loop has them; the last column times "
            "the naive loop channels-last too.",
            "",
            "| N | fast s | naive s | **ratio** | target | fast main / adversary s | naive main / adversary s "
            "| fast images / s | ratio against naive channels-last |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        targets = {2: 0.8, 4: 0.5, 8: 0.3}
        for r in result["ratio"]:
            f, nv = r["fast"], r["naive"]
            lines.append(
                f"| {r['tasks']} | {f['iteration_s']:.3f} | {nv['iteration_s']:.3f} | **{r['ratio']:.2f}** | "
                f"<= {targets.get(r['tasks'], '-')} | {f['main_s']:.3f} / {f['adversary_s']:.3f} | "
                f"{nv['main_s']:.3f} / {nv['adversary_s']:.3f} | {50 / f['iteration_s']:.0f} | "
                + (f"{r['ratio_naive_cl']:.2f} |" if "ratio_naive_cl" in r else "- |")
            )
        rows = {r["tasks"]: r["fast"]["iteration_s"] for r in result["ratio"]}
        if len(rows) > 1:
            lo, hi = min(rows), max(rows)
            lines += ["", f"Fast path t(N = {hi}) / t(N = {lo}): **{rows[hi] / rows[lo]:.2f}** (target <= 2.5 on GPU)."]
        if "bf16_matmul_tflops" in result:
            lines += ["", f"Measured bf16 matmul rate of the device: {result['bf16_matmul_tflops']:.0f} TFLOP/s."]
        lines.append("")
    if "default" in result:
        d = result["default"]
        lines += [
            f"## Default adversaries / the paper's, N = {d['tasks']} (fast path)",
            "",
            f"default {d['default']['iteration_s']:.3f} s, paper {d['paper']['iteration_s']:.3f} s: "
            f"**{d['ratio']:.2f}** (target <= 1.5). "
            f"Default adversary: {json.dumps(d['default_adversary'])}.",
            "",
        ]
        if "cheaper_ratios" in d:  # results written before 2026-12-05 name the variants "cheaper"
            d = {**d, "variant_ratios": d["cheaper_ratios"], "variants": d["cheaper"]}
        if "variant_ratios" in d:  # timed in the same run, alternately with the two above
            lines += [
                "Variants of the default, same run: "
                + "; ".join(
                    f"{k} ({json.dumps(d['variants'][k])}) {d[k]['iteration_s']:.3f} s, **{r:.2f}**"
                    for k, r in d["variant_ratios"].items()
                )
                + " (their quality: benchmarks/results/single_rerun/ and source_fresh/).",
                "",
            ]
    if "layout" in result:
        lines += [
            "## Adversary parameters at 1 x 224 x 288 (D = 64,512)",
            "",
            "| N | paper, per pair | paper, per source | default, per pair | default, per source | default, "
            "members sharing hidden layers (`pair_shared`) |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["layout"]:
            lines.append(
                f"| {r['tasks']} | {r['paper_pair'] / 1e6:.0f} M | {r['paper_source'] / 1e6:.0f} M | "
                f"{r['default_pair'] / 1e6:.0f} M | {r['default_source'] / 1e6:.0f} M | "
                f"{r['default_pair_shared'] / 1e6:.0f} M |"
            )
        lines.append("")
    if "memory" in result:
        layout = f" with adversary.layout={result['memory_layout']!r}" if result.get("memory_layout") else ""
        lines += [
            f"## Default settings{layout} at 1 x {result['memory_size'][0]} x {result['memory_size'][1]}, batch 50, "
            f"{where}",
            "",
            "| N | peak MiB (CPU: resident; CUDA: allocated) | s / iteration | adversary parameters |",
            "|---|---|---|---|",
        ]
        for r in result["memory"]:
            if "error" in r:
                lines.append(f"| {r['tasks']} | failed: {r['error']} | | |")
            else:
                used = r.get("device_used_mib")
                used = f" (device in use after an iteration: {used:.0f})" if used is not None else ""
                lines.append(
                    f"| {r['tasks']} | {r['peak_mib']:.0f}{used} | {r['s_per_iteration']:.2f} "
                    f"| {r['adversary_parameters'] / 1e6:.1f} M |"
                )
        lines.append("")
    if "main" in result:
        m = result["main"]
        lines += [
            f"## Main step options (N = {m['tasks']}, {h} x {w}, batch 50, {where}; seconds per main step)",
            "",
            "| option | s |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in m["variants"].items()]
        lines += [f"| threads = {k} | {v:.3f} |" for k, v in m["threads"].items()]
        lines.append("")
        if "channels_last_by_n" in m:
            lines += [
                "Channels-last against contiguous encoders (the default of `training.channels_last=\"auto\"` on a "
                "CPU since 2026-12-05), timed alternately in this run: the main step at each N, and whole iterations "
                "of the disentanglement study's workloads (its default method, seed 0).",
                "",
                "| setting | contiguous s | channels-last s | **channels-last / contiguous** |",
                "|---|---|---|---|",
            ]
            rows = [(f"main step, N = {k}", v) for k, v in m["channels_last_by_n"].items()]
            rows += [(f"iteration, `{k}`", v) for k, v in m["channels_last_workloads"].items()]
            lines += [
                f"| {k} | {v['contiguous_s']:.3f} | {v['channels_last_s']:.3f} | "
                f"**{v['channels_last_s'] / v['contiguous_s']:.2f}** |"
                for k, v in rows
            ]
            lines.append("")
    if "profile" in result:
        p = result["profile"]
        busy = f", device busy {p['device_busy_s']:.3f} s" if "device_busy_s" in p else ""
        extra = (
            f", {p['launches_per_iteration']:.0f} kernel launches, {p['synchronisations_per_iteration']:.0f} "
            f"synchronisations, {p['mallocs_per_iteration']:.0f} cudaMalloc/cudaFree"
            if "mallocs_per_iteration" in p
            else ""
        )
        lines += [
            f"## Profile of the fast path (N = {p['tasks']}, {h} x {w}, {where}; per iteration)",
            "",
            f"{p['iteration_s']:.3f} s{busy}; {p['operators_per_iteration']:.0f} profiled events{extra}.",
            "",
            "| operator | calls | self CPU ms | self device ms |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {e['name']} | {e['calls_per_iteration']:.0f} | {e['self_cpu_ms']:.1f} | "
            f"{e.get('self_device_ms', float('nan')):.1f} |"
            for e in p["top"]
        ]
        lines.append("")
    if "loader" in result:
        lo = result["loader"]
        lines += [
            f"## Training feed from PNG files (csv_images, 224 x 288, {lo['images']} images), images / s",
            "",
            "| workers | images / s |",
            "|---|---|",
        ]
        lines += [f"| {k.split('=')[1]} | {v:.0f} |" for k, v in lo.items() if k.startswith("workers=")]
        lines.append("")
    if "demo" in result:
        d = result["demo"]
        lines += [
            f"## `mtdisent demo` ({d['iterations']} iterations; fresh process, empty folder)",
            "",
            f"**{d['wall_s'] / 60:.1f} minutes** wall (target <= 5 on 2 cores), {d['cpu_s'] / 60:.1f} CPU-minutes.",
            "",
            "| model | seen test accuracy | unseen circle on black, shape accuracy |",
            "|---|---|---|",
        ]
        for name, m in d["models"].items():
            seen = ", ".join(f"{t} {a:.3f}" for t, a in m["test_accuracy"].items())
            lines.append(f"| {name} | {seen} | {m['unseen_shape_accuracy']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--gpu", action="store_true", help="CUDA, 1 x 224 x 288, bf16 autocast (not the gates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared", default="none", help="say what else ran on the machine, for the record")
    parser.add_argument(
        "--layout", default=None, help="adversary.layout for the memory section (default: library default)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.size, args.tasks, args.repeats, args.gate_steps = (64, 64), [2, 4, 8], 5, 20
    args.memory_size, args.memory_tasks, args.memory_iterations = (224, 288), [2, 4, 8], 3
    args.workers, args.loader_images = [0, 1, 2], 300
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
        RUN_ON.update(device="cuda", amp="bf16")
        args.size, args.gate_steps = (224, 288), 10
    if args.quick:
        args.size, args.tasks, args.repeats, args.gate_steps = (32, 32), [2, 3], 1, 3
        args.memory_size, args.memory_tasks, args.memory_iterations = (32, 32), [2], 2
        args.workers, args.loader_images = [0, 1], 60
    result: dict[str, Any] = {"machine": md.machine_info(), "shared": args.shared, "quick": args.quick, **RUN_ON}
    result["environment"] = {k: os.environ[k] for k in CUDA_SWITCHES if k in os.environ}
    if args.gpu:
        result["bf16_matmul_tflops"] = matmul_rate()
        print(f"bf16 matmul: {result['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
    sections = {
        "gates": gates,
        "ratio": ratio,
        "default": default,
        "layout": layout,
        "memory": memory,
        "main": main_step,
        "profile": profile,
        "loader": loader,
        "demo": demo,
    }
    result.update(memory_size=list(args.memory_size), size=list(args.size), gate_steps=args.gate_steps)
    result["memory_layout"] = args.layout  # adversary.layout of the memory section (None: the default's)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("speed" + ("_gpu" if args.gpu else "") + ("_quick" if args.quick else ""))
    for name in dict.fromkeys(args.only):  # in the order given: a time-limited run measures the first ones first
        if name in sections:
            t0 = time.perf_counter()
            result[name] = sections[name](args)
            result.setdefault("seconds", {})[name] = time.perf_counter() - t0
            # after every section, so that a run stopped by a time limit (benchmarks/gpu.sh) keeps what it measured
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
            stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
