"""Score finished runs again with linear erasure fitted after training (``fit_erasure``): accuracy and leakage.

    python benchmarks/rescore_erasure.py --unseen unseen --main shape --out OUT.json RUN_DIR...

For each run directory, the final model as trained (``"final"``) and a copy with every nuisance erased from the
main task's features by the erasure lever (``--mode``, default conditional), fitted on the final features of the
whole training split (``"erased"``; the classifiers are not retrained). With ``--retrain EPOCHS`` two more: the
erased copy with its main-task classifier retrained on its erased features of the training split (``"retrained"``,
``md.retrain_classifiers``, what ``fit_erasure(retrain_epochs=...)`` does; its features are the erased copy's, so it
gets no probes of its own), and, the control, the final model with that classifier retrained the same way on its
features as they are (``"retrained_plain"``); ``retrain.seconds`` is the retraining alone. Each is scored as the
study scores a run (``disentangle.scores`` and ``disentangle.leakage``): every task's accuracy on ``test``, the main
task's on the unseen split, the trained adversaries', and the leakage of each nuisance from the main task's features
by fresh linear and MLP probes, conditional and unconditional, fitted on ``train`` and scored on ``test``. Evaluation
only: the runs are not changed. ``--no-before`` skips the final model's probes (the study has them already);
``--probes linear`` fits only the linear ones (the MLP probes cost most of the time), ``--probes`` alone none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mtdisent_plugins.levers.erasure import fit_erasure

import mtdisent as md

sys.path.insert(0, str(Path(__file__).parent))
from disentangle import leakage, rescore_parser, scores, spec_data  # noqa: E402  (one definition of the scores)


def score(
    model: md.MultiTaskModel, data: md.DataSource, args: argparse.Namespace, pairs: list[tuple[str, str]], probes: bool
) -> dict[str, Any]:
    out = scores(model, data, args.unseen, args.main, pairs)
    if probes and args.probes:
        report = md.evaluate(
            model, data, split="test", probes=args.probes, layers=("features",), device="cpu", probe_pairs=pairs
        )
        out.update(leakage(report, pairs))
    return out


def main() -> None:
    p = rescore_parser(__doc__, "the task whose features are erased and scored on the unseen split")
    p.add_argument("--nuisance", nargs="+", help="the tasks erased from the main task's features (default: the rest)")
    p.add_argument("--no-before", dest="before", action="store_false", help="skip the final model's probes")
    p.add_argument("--mode", default="conditional", choices=["conditional", "marginal", "both", "keep_own"])
    p.add_argument("--probes", choices=["linear", "mlp"], default=["linear", "mlp"], nargs="*", help="probe kinds")
    p.add_argument("--retrain", type=int, default=0, metavar="EPOCHS", help="also score a retrained classifier")
    p.add_argument("--retrain-lr", type=float, help="its learning rate (default the run's training.optimizer.lr)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for run in args.runs:
        model = md.load(run, "final")
        data = spec_data(model)
        pairs = [(args.main, t) for t in (args.nuisance or [t for t in model.task_names if t != args.main])]
        start = time.perf_counter()
        train = data[model.experiment.training.train_split]
        erased = fit_erasure(model, train, mode=args.mode, pairs=[list(p) for p in pairs])
        fit_seconds = time.perf_counter() - start
        row = {"run": str(run), "mode": args.mode, "final": score(model, data, args, pairs, args.before)}
        row["fit_seconds"] = fit_seconds
        row["erased"] = score(erased, data, args, pairs, True)
        source = erased.lever_modules[str(len(erased.experiment.levers) - 1)].sources[args.main]
        row["erased_rank"] = int(source.rank)
        kinds: tuple[str, ...] = ("final", "erased")
        if args.retrain:  # the erased copy's main classifier retrained, then (the control) the final model's
            start = time.perf_counter()
            md.retrain_classifiers(erased, train, tasks=[args.main], epochs=args.retrain, lr=args.retrain_lr)
            row["retrain"] = {"epochs": args.retrain, "lr": args.retrain_lr, "seconds": time.perf_counter() - start}
            row["retrained"] = score(erased, data, args, pairs, False)
            md.retrain_classifiers(model, train, tasks=[args.main], epochs=args.retrain, lr=args.retrain_lr)
            row["retrained_plain"] = score(model, data, args, pairs, False)
            kinds += ("retrained", "retrained_plain")
        rows.append(row)
        unseen = " -> ".join(f"{row[k]['unseen_accuracy']:.3f}" for k in kinds)
        seen = " -> ".join(f"{min(row[k]['test_accuracy'].values()):.3f}" for k in kinds)
        leak = " -> ".join(
            f"{sum(row[k]['linear_conditional_leakage'].values()) / len(pairs):.2f}"
            for k in kinds
            if "linear_conditional_leakage" in row[k]
        )
        print(f"{run}: unseen {unseen}, seen (min over tasks) {seen}, conditional linear leakage {leak}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": md.machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
