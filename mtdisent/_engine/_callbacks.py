"""Callbacks: what happens around the training steps (in the manner of Lightning's callbacks).

The loop calls every callback's hooks in order: the built-in ones first (:class:`Checkpointer`,
:class:`MetricsLog`, :class:`Progress`, :class:`GracefulStop`), then the user's (``md.train(...,
callbacks=[...])``). A callback overrides the hooks it needs; each receives the :class:`~mtdisent.engine.Loop`,
whose documented attributes it may read (and ``loop.should_stop`` it may set). Callbacks run on every process
of a distributed run; ``loop.is_main`` is true on the one that writes files.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from .._errors import SpecError
from .._spec import changed_default_hint, upgrade_saved_spec
from ._checkpoint import (
    CheckpointError,
    atomic_write_text,
    export_model,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    set_aside,
    write_checkpoint,
)

if TYPE_CHECKING:
    from ._loop import Loop

__all__ = ["Callback", "Checkpointer", "MetricsLog", "Progress", "GracefulStop", "format_metrics"]


class Callback:
    """Base class of callbacks. Every hook does nothing by default.

    Hooks, in the order the loop calls them:

    * :meth:`on_train_start` once, after the model, step and data are ready (and a resumed state is loaded);
    * per iteration, :meth:`on_validation_end` when the iteration validated, then :meth:`on_iteration_end`;
    * :meth:`on_train_end` once training completed; :meth:`teardown` always, also after an error.

    :meth:`state_dict` / :meth:`load_state_dict` put a callback's own state into checkpoints (JSON values and
    tensors), keyed by its class name.
    """

    def on_train_start(self, loop: Loop) -> None:
        """Training is about to run its first iteration (``loop.iteration`` is where it starts)."""

    def on_validation_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        """Validation of iteration ``loop.iteration`` gave ``metrics`` (``val_*`` keys)."""

    def on_iteration_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        """Iteration ``loop.iteration`` (1-based: the count completed) ended with ``metrics``."""

    def on_train_end(self, loop: Loop) -> None:
        """The last iteration completed."""

    def teardown(self, loop: Loop) -> None:
        """Training ended, normally or not: release what the callback holds (files, signal handlers)."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
def _specs_differ(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields in which two experiments differ: ``section.field`` within a section, else the top-level name.

    Training length, data loading and the final model's BatchNorm statistics may change on resume (none of them
    changes an iteration).
    """
    free = {"iterations", "num_workers", "batchnorm_stats"}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs += [f"{key}.{k}" for k in fields if not (key == "training" and k in free)]
        elif a != b:
            diffs.append(key)
    return diffs


class Checkpointer(Callback):
    """Periodic, best and final checkpoints; the resume handshake.

    At the start, with ``resume``: continues from the newest checkpoint that verifies (a damaged newer one is
    skipped with a warning naming it; when none verifies, training stops with an error naming them, unless
    ``restart``). Without ``resume`` a directory that holds checkpoints is refused. ``restart`` moves the
    directory's previous outputs into ``discarded-<time>/`` and starts from iteration 0. Every
    ``training.checkpoint_every`` iterations, at the end and when stopping, it writes ``checkpoints/iter-N``
    (keeping the last ``training.keep_last``; the loop calls :meth:`write_last` for a run a callback stopped
    between them); when validation finds a new best, ``checkpoints/best`` (or, for a run without a directory, a
    copy of the weights in memory); at the end, the inference model.
    """

    def __init__(self, resume: bool = False, restart: bool = False) -> None:
        self.resume, self.restart = resume, restart
        self.best_state: dict[str, torch.Tensor] | None = None
        self.resumed_from: Path | None = None
        self._written = -1  # the iteration of the last periodic checkpoint

    def on_train_start(self, loop: Loop) -> None:
        run_dir = loop.out_dir
        if run_dir is None:
            return
        if loop.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.restart:
                aside = set_aside(run_dir)
                if aside is not None:
                    warnings.warn(
                        f"restart: the previous outputs of {str(run_dir)!r} are kept in {str(aside)!r}", stacklevel=2
                    )
        loop.barrier()
        latest = latest_checkpoint(run_dir)  # every rank reads the same checkpoint
        if latest is not None and not self.resume:
            raise CheckpointError(
                f"{str(run_dir)!r} already holds checkpoints (latest {latest.name}); pass resume=True (--resume) to "
                "continue, or restart=True (--restart) to set them aside and train from iteration 0"
            )
        if latest is not None:
            tensors, state = read_checkpoint(latest)
            if state.get("format_version") != 2:
                raise CheckpointError(
                    f"{str(latest)!r} was written by mtdisent 0.1 and cannot be resumed by this version (its model "
                    "still loads with md.load); pass restart=True to train from iteration 0"
                )
            saved = dict(upgrade_saved_spec(state["experiment"]))
            current = json.loads(loop.experiment.model_dump_json())
            for spec in (saved, current):  # "auto" compared as the layout it gives here: only a real change refused
                if spec["training"].get("channels_last") == "auto":
                    spec["training"] = {**spec["training"], "channels_last": loop.setup.channels_last}
            diffs = _specs_differ(saved, current)
            if diffs:
                raise CheckpointError(
                    f"cannot resume from {str(latest)!r}: the experiment differs in {', '.join(diffs)} "
                    "(only training.iterations, training.num_workers and training.batchnorm_stats may change on resume)"
                    + changed_default_hint(saved, diffs)
                )
            loop.load_state(tensors, state, latest)
            self.resumed_from = latest
        loop.barrier()  # nobody writes before every rank has read
        if loop.is_main:
            atomic_write_text(run_dir / "spec.json", loop.experiment.model_dump_json(indent=1))

    def on_validation_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        if not loop.best_improved:
            return
        if loop.out_dir is None:  # no directory to hold it: keep the weights in memory
            self.best_state = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        elif loop.is_main:
            tensors, state = loop.state()
            write_checkpoint(loop.out_dir / "checkpoints" / "best", tensors, state)

    def on_iteration_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        tr, it = loop.experiment.training, loop.iteration
        if loop.out_dir is None or not loop.is_main:
            return
        if it % tr.checkpoint_every == 0 or it == tr.iterations or loop.interrupting:
            self._write(loop)

    def _write(self, loop: Loop) -> None:
        assert loop.out_dir is not None
        tensors, state = loop.state()
        write_checkpoint(loop.out_dir / "checkpoints" / f"iter-{loop.iteration:08d}", tensors, state)
        prune_checkpoints(loop.out_dir, loop.experiment.training.keep_last)
        self._written = loop.iteration

    def write_last(self, loop: Loop) -> None:
        """The last iteration's checkpoint, when a callback stopped training between periodic ones."""
        if loop.out_dir is not None and loop.is_main and self._written != loop.iteration:
            self._write(loop)

    def on_train_end(self, loop: Loop) -> None:
        if loop.out_dir is None or not loop.is_main:
            return
        export_model(loop.out_dir, loop.model, {"iteration": loop.iteration, "best": loop.best})


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard
# ----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics file, and the number of lines that did not parse (a torn last line)."""
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return records, torn


class MetricsLog(Callback):
    """Logs metrics every ``training.log_every`` iterations (and at validations and the end).

    Keeps them in ``loop.history``, appends them to ``metrics.jsonl`` in the run directory and, with
    ``training.tensorboard``, to TensorBoard when it is installed. On resume the file is cut back to the
    resumed iteration first, so it never holds an iteration twice.
    """

    def __init__(self) -> None:
        self._file: TextIO | None = None
        self._writer: Any = None

    def on_train_start(self, loop: Loop) -> None:
        if loop.out_dir is None or not loop.is_main:
            return
        path = loop.out_dir / "metrics.jsonl"
        if path.is_file():  # a resumed run: drop what was logged after the checkpoint, and a torn last line
            records, torn = _read_jsonl(path)
            kept = [r for r in records if int(r.get("iteration", 0)) <= loop.iteration]
            if len(kept) != len(records) or torn:
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in teardown)
        if loop.experiment.training.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("training.tensorboard is on but tensorboard is not installed", stacklevel=2)
            else:
                self._writer = SummaryWriter(str(loop.out_dir / "tensorboard"))

    def on_iteration_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        tr, it = loop.experiment.training, loop.iteration
        if not (it % tr.log_every == 0 or it == tr.iterations or "val_score" in metrics):
            return
        loop.history.append(metrics)
        if self._file is not None:
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._writer.add_scalar(k, v, it)

    def teardown(self, loop: Loop) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ----------------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------------
def format_metrics(metrics: dict[str, Any], loop: Loop) -> str:
    """One line: ``plane loss 0.41 acc 0.88 | adv plane->shadow 0.52 (chance 0.50) | val 0.91``.

    An adversary's chance level is the accuracy of the best guess it could make without the features: the
    target's majority rate, or for a conditional adversary (which sees its source task's label) the mean over
    source classes of the target's majority rate within the class, both on the training labels.
    """
    parts = []
    for t in loop.model.task_names:
        if f"loss/{t}" in metrics:
            parts.append(f"{t} loss {metrics[f'loss/{t}']:.3f} acc {metrics[f'acc/{t}']:.2f}")
    for p in loop.model.pairs:
        key = f"adv_acc/{p.key}"
        if key in metrics:
            chance = loop.chance.get(p.pair_key)
            shown = f" (chance {chance:.2f})" if chance is not None else ""
            parts.append(f"adv {p.key} {metrics[key]:.2f}{shown}")
    if "val_score" in metrics:
        parts.append(f"val {metrics['val_score']:.3f}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress(Callback):
    """Training progress: iteration, elapsed time, ETA, per-task loss and accuracy, adversaries against chance.

    On a terminal: a progress bar (counter, elapsed, ETA) with the metrics on their own line below it, so a
    narrow terminal cuts the metrics, never the bar. Otherwise (output to a file, as cluster jobs do): a plain
    line every ``every`` seconds (and at the end) with the same content.

    Args:
        quiet: Show nothing.
        every: Seconds between plain lines when the output is not a terminal.
        stream: Where to write (default standard error).
    """

    def __init__(self, quiet: bool = False, every: float = 30.0, stream: TextIO | None = None) -> None:
        self.quiet, self.every, self.stream = quiet, every, stream
        self._live: Any = None
        self._start = 0.0
        self._first = 0
        self._last_line = -math.inf

    def on_train_start(self, loop: Loop) -> None:
        if self.quiet or not loop.is_main:
            self.quiet = True
            return
        self.stream = self.stream or sys.stderr
        self._start, self._first = time.perf_counter(), loop.iteration
        if self.stream.isatty():
            from rich.console import Console, Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
            )
            self._task = self._bar.add_task(
                "train", total=loop.experiment.training.iterations, completed=loop.iteration
            )
            self._info = Text("", overflow="ellipsis", no_wrap=True)
            console = Console(file=self.stream)
            self._live = Live(Group(self._bar, self._info), console=console, refresh_per_second=4, transient=False)
            self._live.start()

    def line(self, loop: Loop, metrics: dict[str, Any]) -> str:
        """The plain progress line for iteration ``loop.iteration``."""
        total, it = loop.experiment.training.iterations, loop.iteration
        elapsed = time.perf_counter() - self._start
        done = it - self._first
        eta = elapsed / done * (total - it) if done > 0 else math.inf
        head = f"iteration {it}/{total} ({100 * it / total:.0f}%) elapsed {_clock(elapsed)} eta {_clock(eta)}"
        info = format_metrics(metrics, loop)
        return f"{head} | {info}" if info else head

    def on_iteration_end(self, loop: Loop, metrics: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self._live is not None:
            self._bar.update(self._task, completed=loop.iteration)
            self._info.plain = format_metrics(metrics, loop)
            return
        now = time.perf_counter()
        last = loop.iteration == loop.experiment.training.iterations
        if now - self._last_line >= self.every or last or loop.iteration == self._first + 1:
            self._last_line = now
            assert self.stream is not None
            print(self.line(loop, metrics), file=self.stream, flush=True)

    def teardown(self, loop: Loop) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


# ----------------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------------
class GracefulStop(Callback):
    """Turns the first SIGINT/SIGTERM into a stop after the current iteration, with a checkpoint.

    A second signal stops at once. Handlers are installed only from the main thread and restored at teardown.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._loop: Loop | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        assert self._loop is not None
        if self._loop.stop_signal is not None:  # second signal: give up waiting for the iteration to end
            self.teardown(self._loop)
            raise KeyboardInterrupt
        self._loop.stop_signal = signum

    def on_train_start(self, loop: Loop) -> None:
        self._loop = loop
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def teardown(self, loop: Loop) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def check_callbacks(callbacks: Any) -> list[Callback]:
    """``callbacks`` as a list of :class:`Callback` instances, or a :class:`~mtdisent.SpecError` naming the bad one."""
    out = []
    for i, cb in enumerate(list(callbacks or [])):
        if not isinstance(cb, Callback):
            what = f"the class {cb.__name__} (pass an instance)" if isinstance(cb, type) else type(cb).__name__
            raise SpecError(f"callbacks[{i}]: expected an mtdisent.Callback, got {what}")
        out.append(cb)
    return out
