"""The ceiling of the fetal workload: lambda = 0 trained with LVOT-with-shadow images in its training split.

The fetal target asks for +0.30 over lambda = 0 on LVOT with shadow in every seed, a combination training never
shows. A model that *does* see it in training (an oracle, not a method) bounds what any method can reach on the
same test images, so it says for which seeds the target is reachable at all.

    python benchmarks/fetal_oracle.py --seeds 0 1 2 --out oracle.json

Per seed: the study's `fetal` workload with `lambda0` (``benchmarks/disentangle.py``, the same experiment and
data seed), its training split extended by ``--extra`` LVOT-with-shadow images drawn from another data seed (never
the test images), shifted as the training split is. Reported: the final model's LVOT-with-shadow accuracy (the
``lvot_with_shadow`` split the study scores) and its seen plane accuracy on ``test``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from disentangle import experiment, scores  # the study's definitions and scoring (same folder)
from torch.utils.data import ConcatDataset

import mtdisent as md

EXTRA_SEED = 1000  # data seed of the added images: seed + EXTRA_SEED, never the scored ones


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--extra", type=int, default=500, help="LVOT-with-shadow images added to the training split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        e = experiment("fetal", "lambda0", seed, args.quick)
        data_args = dict(e.data.args) if e.data is not None else {}
        data = md.datasets.create("fetal_us_sim", data_args)
        extra_args = {**data_args, "seed": seed + EXTRA_SEED, "splits": ["lvot_with_shadow"]}
        extra_args["scale"] = args.extra / 418  # the split's Table 1 count at scale 1
        extra = md.datasets.create("fetal_us_sim", extra_args)["lvot_with_shadow"]
        extra.shift = data["train"].shift  # the training split's augmentation for the added images too
        train = ConcatDataset([data["train"], extra])
        splits = {"train": train, **{k: data[k] for k in ("val", "test", "lvot_with_shadow")}}
        start = time.perf_counter()
        run = md.train(e.model_copy(update={"name": f"fetal oracle seed={seed}"}), data=splits, quiet=True)
        seconds = time.perf_counter() - start
        scored = scores(run.model, data, "lvot_with_shadow", "plane", [])  # as the study scores its runs
        row = {
            "seed": seed,
            "extra": len(extra),
            "unseen_accuracy": scored["unseen_accuracy"],
            "test_plane_accuracy": scored["test_accuracy"]["plane"],
            "train_seconds": seconds,
        }
        rows.append(row)
        print(f"fetal oracle seed={seed}: {row}", flush=True)
        args.out.write_text(
            json.dumps(
                {"machine": md.machine_info(), "args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
