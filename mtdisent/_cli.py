"""Command line: ``mtdisent plugins | build | demo`` (``python -m mtdisent`` works too)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from ._engine import TrainingInterrupted
from ._errors import MtdisentError, SpecError
from ._registry import list_plugins
from ._spec import Experiment, load_spec, load_spec_file

__all__ = ["main", "apply_overrides"]


def apply_overrides(experiment: Experiment, overrides: Sequence[str]) -> Experiment:
    """Apply ``key.path=value`` overrides (value parsed as JSON, else taken as a string).

    List items are addressed by index (``tasks.1.loss_weight=2``). Raises :class:`SpecError` naming the key.
    """
    data: dict[str, Any] = experiment.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, for example training.iterations=500")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"--set {key}: {where!r} must be an index below {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise SpecError(f"--set {key}: {'.'.join(parts[:depth])!r} is a value, not a section")
    return Experiment.model_validate(data)


def _summary(console: Console, experiment: Experiment) -> None:
    from ._model import build_model

    model = build_model(experiment)
    table = Table(title=f"mtdisent model: {experiment.name or 'experiment'} ({len(model.task_names)} tasks)")
    for col in ("module", "input", "output", "parameters"):
        table.add_column(col)
    for t in model.task_names:
        n_enc = sum(p.numel() for p in model.encoders[t].parameters())
        table.add_row(f"encoder {t}", "x".join(map(str, model.input_shape)), str(model.feature_sizes[t]), f"{n_enc:,}")
        n_cls = sum(p.numel() for p in model.classifiers[t].parameters())
        table.add_row(f"classifier {t}", str(model.feature_sizes[t]), str(experiment.task(t).n_classes), f"{n_cls:,}")
    for p in model.pairs:
        n_adv = sum(q.numel() for q in model.adversaries[p.key].parameters())
        out = experiment.task(p.target).n_classes
        table.add_row(f"adversary {p.key} (w={p.weight:g})", str(model.feature_sizes[p.source]), str(out), f"{n_adv:,}")
    console.print(table)


def _cmd_plugins(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="mtdisent plugins")
    for col in ("kind", "name", "distribution", "factory"):
        table.add_column(col)
    for info in list_plugins(args.kind):
        table.add_row(info.kind, info.name, info.source, info.value)
    console.print(table)
    return 0


def _cmd_build(args: argparse.Namespace, console: Console) -> int:
    experiment = apply_overrides(load_spec(args.spec), args.set)
    _summary(console, experiment)
    return 0


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    from ._engine import train

    experiment, namespace = load_spec_file(args.spec)
    experiment = apply_overrides(experiment, args.set)
    run = train(
        experiment,
        data=namespace.get("data"),
        out_dir=args.out_dir,
        resume=args.resume,
        quiet=args.quiet,
        device=args.device,
    )
    last = run.history[-1] if run.history else {}
    console.print(f"trained {run.iteration} iterations into {args.out_dir}")
    for key in sorted(k for k in last if k.startswith(("acc/", "adv_acc/", "val_"))):
        console.print(f"  {key}: {last[key]:.4f}")
    return 0


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    import torch

    from ._model import build_model
    from ._presets import preset

    experiment = preset("paper_synthetic", scale=0.25)
    console.print("[bold]Embedded default:[/] the paper's synthetic experiment at 1/4 scale (no data downloaded).")
    _summary(console, experiment)
    model = build_model(experiment)
    c, h, w = model.input_shape
    images = torch.zeros(4, c, h, w)  # two white and two black backgrounds, a gray square on each
    images[:2] = 1.0
    images[:, :, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 0.5
    images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
    preds = model.predict(images)
    feats = model.features(images)
    for t in model.task_names:
        console.print(f"task {t}: features {tuple(feats[t].shape)}, untrained predictions {preds[t].tolist()}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtdisent", description="N-task adversarial representation disentanglement")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list every backbone, objective and dataset with its distribution")
    p.add_argument("--kind", choices=["backbone", "objective", "dataset"], default=None)
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("build", help="validate a spec (JSON or Python file) and print the model it builds")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("train", help="train a spec (JSON, or a Python file defining experiment and optionally data)")
    p.add_argument("spec")
    p.add_argument("--out-dir", required=True, help="run directory (checkpoints, metrics.jsonl, final model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="override training.device (cpu, cuda, auto)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("demo", help="build the embedded default experiment and run it on a few images")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtdisent`` command."""
    args = _parser().parse_args(argv)
    console = Console()
    try:
        return int(args.func(args, console))
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signal
    except MtdisentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
