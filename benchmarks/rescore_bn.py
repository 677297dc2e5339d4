"""Score finished runs again with their BatchNorm statistics recomputed (``md.recompute_batchnorm``).

    python benchmarks/rescore_bn.py --unseen lvot_with_shadow --main plane --out OUT.json RUN_DIR...

For each run directory: the final model's accuracy on ``test`` (every task), the main task's accuracy on the
unseen split and the trained adversaries' (main -> each other task), with the running statistics training kept
and with statistics recomputed on the training split at the training batch size (``disentangle.scores`` and
``disentangle.recomputed``, what the study records per run). A run trained with
``training.batchnorm_stats="recompute"`` is scored three ways: its last checkpoint (the running statistics), that
checkpoint recomputed by the plain pass, and its final model (recomputed by the engine, the step's batch changes
replayed: ``"replayed"``). Evaluation only: the runs are not changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import mtdisent as md

sys.path.insert(0, str(Path(__file__).parent))
from disentangle import recomputed, rescore_parser, scores, spec_data  # noqa: E402  (one definition of the scores)


def main() -> None:
    args = rescore_parser(__doc__, "the task scored on the unseen split").parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for run in args.runs:
        final = md.load(run, "final")
        replayed = final.experiment.training.batchnorm_stats == "recompute"
        model = md.load(run, "latest") if replayed else final  # the same weights with the running statistics
        pairs = [(args.main, t) for t in model.task_names if t != args.main]
        data = spec_data(model)
        row = {"run": str(run), "running": scores(model, data, args.unseen, args.main, pairs)}
        row["recomputed"] = scores(recomputed(model, data), data, args.unseen, args.main, pairs)
        if replayed:
            row["replayed"] = scores(final, data, args.unseen, args.main, pairs)
        rows.append(row)
        kinds = [k for k in ("running", "recomputed", "replayed") if k in row]
        unseen = " -> ".join(f"{row[k]['unseen_accuracy']:.3f}" for k in kinds)
        seen = " -> ".join(f"{min(row[k]['test_accuracy'].values()):.3f}" for k in kinds)
        print(
            f"{run}: unseen {unseen}, seen (min over tasks) {seen} ({', '.join(kinds)})",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": md.machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
