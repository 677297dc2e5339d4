"""``md.train``: set up, then a short loop of step -> validation -> callbacks.

The pieces: :mod:`._setup` (device, precision, DDP), :mod:`._stream` (the data feed), :mod:`._step` (what an
iteration does), :mod:`._validation` (validation metrics, the best-checkpoint rule), :mod:`._callbacks`
(checkpoints, metrics log, progress, signals, and the user's), :mod:`._checkpoint` (files).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from .._batchnorm import recompute_batchnorm
from .._data import Batch, ContractView, DataError, DataSource, _shape, resolve_data, task_classes
from .._errors import MtdisentError, SpecError, with_context
from .._levers import change_after_training, finishing_levers
from .._model import build_model
from .._registry import objectives
from .._spec import Experiment
from .._torch import own_rng, seed_rng
from ..evaluation._metric import Accuracy, Metric
from ._callbacks import Callback, Checkpointer, GracefulStop, MetricsLog, Progress, check_callbacks
from ._checkpoint import CheckpointError, pack_state, unpack_state
from ._distributed import DistInfo, any_true, setup, teardown
from ._run import Run
from ._setup import prepare, resolve_device
from ._step import AdversarialStep, Step
from ._stream import TrainFeed
from ._validation import Selection, Validator

__all__ = ["Loop", "train", "TrainingInterrupted"]


class TrainingInterrupted(MtdisentError):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint; ``resume=True`` continues it.

    Attributes:
        signal: The signal number received.
        iteration: The last completed iteration.
        checkpoint: The checkpoint written, or ``None`` for an in-memory run.
    """

    def __init__(self, message: str, signal: int, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signal, self.iteration, self.checkpoint = signal, iteration, checkpoint


def _chance(view: ContractView, experiment: Experiment) -> dict[str, float]:
    """Per adversary pair, the accuracy of the best guess without features, on the training labels.

    The target's majority rate; for conditional adversaries (they see the source's label) the mean over the
    source's classes of the target's majority rate within the class. Empty without a label table.
    """
    if view.table is None:
        return {}
    out = {}
    for p in experiment.adversary_pairs():
        if p.member or p.source not in view.table or p.target not in view.table:
            continue
        s, t = view.table[p.source], view.table[p.target]
        both = (s >= 0) & (t >= 0)
        if not bool(both.any()):
            continue
        groups = s[both] if experiment.adversary.conditional else torch.zeros_like(s[both])
        hits = sum(int(torch.bincount(t[both][groups == g]).max()) for g in groups.unique())
        out[p.pair_key] = hits / int(both.sum())
    return out


class Loop:
    """One training run: everything :func:`train` builds, and the loop that drives it.

    Callbacks receive the loop and may read these attributes:

    Attributes:
        experiment: The experiment.
        model: The model being trained.
        step: The :class:`~mtdisent.engine.Step` doing the iterations.
        iteration: Iterations completed.
        out_dir: The run directory, ``None`` for an in-memory run.
        is_main: Whether this process writes files and shows progress (rank 0).
        history: Logged metrics, one dict per logged iteration.
        best: Validation metrics of the best checkpoint so far (with its ``iteration``), or ``None``.
        best_improved: Whether the validation of this iteration found a new best.
        should_stop: Set it to end training normally after the current iteration (for example early stopping).
        stop_signal: The signal received (SIGINT/SIGTERM), if any.
        chance: Per adversary pair (``"a->b"``), the accuracy of guessing without features.
    """

    def __init__(
        self,
        experiment: Experiment,
        source: DataSource,
        out_dir: str | Path | None,
        device: torch.device,
        dist: DistInfo,
        *,
        resume: bool = False,
        restart: bool = False,
        quiet: bool = False,
        callbacks: Sequence[Callback] = (),
        metrics: Sequence[Metric] = (),
        step: type[Step] = AdversarialStep,
    ) -> None:
        tr = experiment.training
        if tr.batch_size % dist.world:
            raise SpecError(
                f"training.batch_size: {tr.batch_size} is not divisible by the {dist.world} processes; "
                "each process trains on an equal slice of every global batch"
            )
        if tr.train_split not in source:
            raise DataError(f"training.train_split: the data has no split {tr.train_split!r} (it has {sorted(source)})")
        classes = task_classes(experiment)
        shape = experiment.input_shape or source.input_shape
        self.train_split = source[tr.train_split]
        train_view = ContractView(self.train_split, classes, shape, tr.train_split, require_labels=True)
        if shape is None:
            first = train_view.__getitems__([0])
            if not isinstance(first, Batch):
                raise DataError(first.message)
            shape = train_view.input_shape = _shape(first.images.shape[1:])
        self.experiment, self.dist = experiment, dist
        self.model, self.setup = prepare(build_model(experiment, shape), experiment, device, dist)
        objective = objectives.create(
            experiment.adversary.objective.name,
            experiment.adversary.objective.args,
            what=f"adversary.objective {experiment.adversary.objective.name!r}",
        )
        self.feed = TrainFeed(train_view, tr.batch_size, experiment.seed, tr.hflip, dist, device, tr.num_workers)
        self.step: Step = step(self.model, experiment, objective, self.setup, self.feed)  # type: ignore[call-arg]
        self.validator = None
        if tr.val_split in source:
            view = ContractView(source[tr.val_split], classes, self.model.input_shape, tr.val_split)
            all_metrics = [Accuracy(classes), *metrics]
            self.validator = Validator(self.model, experiment, view, self.setup, all_metrics, tr.num_workers)
        self.selection = Selection.from_spec(tr)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.is_main = dist.is_main
        self.checkpointer = Checkpointer(resume, restart)
        self.callbacks: list[Callback] = [
            self.checkpointer,
            MetricsLog(),
            Progress(quiet),
            GracefulStop(),
            *check_callbacks(callbacks),
        ]
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_improved = self.should_stop = self.interrupting = False
        self.stop_signal: int | None = None
        if tr.batchnorm_stats == "recompute" and train_view.n < tr.batch_size:  # refused now, not after training
            raise DataError(
                f"training.batchnorm_stats: 'recompute' needs one full batch of {tr.batch_size} images from split "
                f"{tr.train_split!r}, which has {train_view.n}; use 'running' or a smaller training.batch_size"
            )
        self.chance = _chance(train_view, experiment)
        self.train_view = train_view

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> Run:
        """Train to ``training.iterations`` (or until a callback sets ``should_stop``); returns the :class:`Run`.

        What draws from torch's global generators meanwhile (a dataset's random augmentation in ``__getitem__``,
        dropout, a callback) draws from streams seeded at every iteration by ``experiment.seed``, the iteration
        and the rank (:meth:`seed_streams`): the same spec trains the same model in any process, a resumed run
        continues exactly on every rank, and the caller's generator states are as they were afterwards.
        """
        with own_rng(self.setup.device):
            return self._run()

    def seed_streams(self, iteration: int, shared: bool = False) -> None:
        """Seed the global CPU generator (and the training device's) for ``iteration`` of this rank.

        ``shared``: the same streams on every rank (passes that must agree across ranks).
        """
        rank = 0 if shared else self.dist.rank + 1
        seed = ((self.experiment.seed * 1_000_003 + iteration) * 8191 + rank) * 2 + 1  # apart from every other seed
        seed_rng(seed, self.setup.device)

    def _run(self) -> Run:
        tr = self.experiment.training
        eval_every = tr.eval_every or tr.checkpoint_every
        try:
            if self.setup.channels_last:  # again, when a stopped loop runs on (the final model is contiguous)
                self.model.encoders.to(memory_format=torch.channels_last)
            self._call("on_train_start")
            while self.iteration < tr.iterations:
                self.seed_streams(self.iteration)
                metrics: dict[str, Any] = self.step.update(self.iteration)
                self.iteration += 1
                metrics["iteration"] = self.iteration
                self.best_improved = False
                if self.validator is not None and (self.iteration % eval_every == 0 or self.iteration == tr.iterations):
                    val = self.validator.run()
                    metrics.update(val)
                    if self.selection.is_better(val, self.best):
                        self.best, self.best_improved = {"iteration": self.iteration, **val}, True
                    self._call("on_validation_end", val)
                self.interrupting = any_true(self.stop_signal is not None, self.dist, self.setup.device)
                self._call("on_iteration_end", metrics)
                if self.interrupting:
                    self._interrupted()
                if any_true(self.should_stop, self.dist, self.setup.device):
                    break
            if self.dist.enabled:  # DDP broadcasts buffers before each forward; align the last statistics too
                for buffer in self.model.buffers():
                    torch.distributed.broadcast(buffer, src=0)
            # the final model in the layout md.load gives it (channels-last encoders compute within rounding of it)
            self.model.encoders.to(memory_format=torch.contiguous_format)
            self.checkpointer.write_last(self)  # with the running statistics: what resuming continues from
            finished = change_after_training(self.model) is not None
            latest_state = None  # an in-memory run keeps the last iteration's model, as a directory keeps it
            if finished and self.out_dir is None:
                latest_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.seed_streams(self.iteration, shared=True)
            if tr.batchnorm_stats == "recompute":  # every rank the same full pass: the same statistics
                self._recompute_batchnorm()
            self._finish_levers()
            self._call("on_train_end")
            self.barrier()
        finally:
            for cb in self.callbacks:
                cb.teardown(self)
            self.feed.close()
        return Run(
            self.experiment,
            self.model,
            self.out_dir,
            self.iteration,
            self.history,
            self.best,
            self.checkpointer.best_state,
            finished,
            latest_state,
        )

    def _recompute_batchnorm(self) -> None:
        """Recompute the final model's BatchNorm statistics on the training split, batches changed as the step does.

        The step's ``augment`` is replayed; what it moves in the levers is put back: their modules' state (step
        counters) and their attributes (the last step's choices and metrics).
        """
        tr, levers = self.experiment.training, self.model.lever_modules
        kept = {k: v.clone() for k, v in levers.state_dict().items()}
        attributes = [dict(vars(lever)) for lever in self.model.levers]
        try:
            recompute_batchnorm(
                self.model,
                self.train_view,
                batch_size=tr.batch_size,
                num_workers=tr.num_workers,
                transform=self.step.augment,
            )
        finally:
            levers.load_state_dict(kept)
            for lever, values in zip(self.model.levers, attributes, strict=True):
                vars(lever).clear()
                vars(lever).update(values)

    def _finish_levers(self) -> None:
        """The levers' :meth:`~mtdisent.Lever.finish` that change the final model; then every rank holds rank 0's."""
        model, finishing = self.model, finishing_levers(self.model)
        for k in finishing:
            where = f"levers[{k}] {self.experiment.levers[k].name!r}, at the end of training"
            try:
                model.levers[k].finish(model.lever_module(k), model, self.train_split)
            except Exception as exc:  # a torch error too (out of memory): say where the trained model is
                error = (
                    with_context(exc, where)
                    if isinstance(exc, MtdisentError)
                    else MtdisentError(f"{where}: {type(exc).__name__}: {exc}")
                )
                if self.out_dir is not None:  # nothing is lost
                    kept = f"md.load({str(self.out_dir)!r}, 'latest')"
                    error.args = (f"{error}; the model training ended with is {kept}",)
                raise error from exc
            model.train()
        if finishing and self.dist.enabled:
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _interrupted(self) -> None:
        signum = self.stop_signal or signal.SIGTERM
        path = self.out_dir / "checkpoints" / f"iter-{self.iteration:08d}" if self.out_dir is not None else None
        where = f"; checkpoint {str(path)!r}" if path is not None else ""
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after iteration {self.iteration}{where}; train again with "
            "resume=True to continue",
            int(signum),
            self.iteration,
            path,
        )

    def barrier(self) -> None:
        """Wait for every process (a no-op in a single process)."""
        if self.dist.enabled:
            torch.distributed.barrier()

    # -- checkpoint state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: tensors (safetensors) and a JSON-able dict."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state: dict[str, Any] = {
            "iteration": self.iteration,
            "experiment": json.loads(self.experiment.model_dump_json()),
            "input_shape": list(self.model.input_shape),
            "best": self.best,
            "step": pack_state(self.step.state_dict(), tensors, "step"),
            "feed": pack_state(self.feed.state_dict(), tensors, "feed"),
            "callbacks": {
                type(cb).__name__: pack_state(cb.state_dict(), tensors, f"callbacks.{type(cb).__name__}")
                for cb in self.callbacks
            },
        }
        return tensors, state

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any], where: Path) -> None:
        """Restore what :meth:`state` saved (``where`` names the checkpoint in errors)."""
        model_sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{str(where)!r} does not fit this experiment's model: {exc}") from exc
        self.step.load_state_dict(unpack_state(state["step"], tensors))
        self.feed.load_state_dict(unpack_state(state["feed"], tensors))
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(unpack_state(saved[type(cb).__name__], tensors))
        self.iteration = int(state["iteration"])
        self.best = state.get("best")


def train(
    experiment: Experiment,
    data: Any = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    quiet: bool = False,
    device: str | None = None,
    callbacks: Sequence[Callback] = (),
    metrics: Sequence[Metric] = (),
    step: type[Step] = AdversarialStep,
) -> Run:
    """Train ``experiment``: per iteration one main step, then ``adversary.steps`` adversary steps.

    Args:
        experiment: The experiment.
        data: A Dataset (used as the training split), a mapping of split name to Dataset, or a
            :class:`~mtdisent.DataSource`; ``None`` builds the spec's ``data`` from the datasets registry.
        out_dir: Run directory for spec.json, metrics.jsonl, checkpoints and the final model; ``None``
            keeps everything in memory.
        resume: Continue from the newest valid checkpoint in ``out_dir`` (exactly: on CPU the result is
            bitwise equal to an uninterrupted run). Without it, an ``out_dir`` holding checkpoints is refused.
        restart: Set the previous outputs of ``out_dir`` aside (into ``discarded-<time>/``) and train from
            iteration 0; also the way out when every checkpoint is corrupt.
        quiet: No progress display (metrics are still written to metrics.jsonl).
        device: Overrides ``training.device``.
        callbacks: :class:`~mtdisent.Callback` instances, called after the built-in ones.
        metrics: Extra validation :class:`~mtdisent.Metric` objects (logged as ``val_<key>``; one may be
            ``training.select_metric``).
        step: The :class:`~mtdisent.engine.Step` class doing the iterations, constructed as
            ``step(model, experiment, objective, setup, feed)`` (default the paper's
            :class:`~mtdisent.engine.AdversarialStep`; subclass it to change one part of an iteration).

    Returns:
        A :class:`Run` with the trained model.
    """
    if not isinstance(experiment, Experiment):
        raise SpecError(f"train expects an Experiment, got {type(experiment).__name__}")
    tr = experiment.training
    source = resolve_data(experiment, data)
    info, rank_device = setup(device or tr.device)
    try:
        dev = rank_device or resolve_device(device or tr.device)
        loop = Loop(
            experiment,
            source,
            out_dir,
            dev,
            info,
            resume=resume,
            restart=restart,
            quiet=quiet,
            callbacks=callbacks,
            metrics=metrics,
            step=step,
        )
        return loop.run()
    finally:
        teardown(info)
