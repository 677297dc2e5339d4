"""The experiment specification: what a user declares.

Everything here is a pydantic v2 model that validates on construction, round-trips losslessly through
JSON (``model_dump_json`` / ``model_validate_json``) and raises :class:`~mtdisent.SpecError` (never a bare
pydantic error) naming the field, the task and what would be valid.
"""

from __future__ import annotations

import json
import math
import runpy
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ._errors import MtdisentError, SpecError, UnknownComponentError, did_you_mean
from ._registry import REGISTRIES

__all__ = [
    "SpecModel",
    "Component",
    "HeadSpec",
    "Task",
    "Pair",
    "AdversarySpec",
    "OptimizerSpec",
    "TrainingSpec",
    "ExecutionSpec",
    "Experiment",
    "AdversaryPair",
    "load_spec",
]

TASK_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


# ----------------------------------------------------------------------------------------------------
# error formatting
# ----------------------------------------------------------------------------------------------------
def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("function-") or part in {"model", "tagged-union"}:
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def _task_name_at(data: Any, loc: tuple[int | str, ...]) -> str | None:
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int) and isinstance(data, Mapping):
        tasks = data.get("tasks")
        try:
            task = tasks[loc[1]]  # type: ignore[index]
        except (TypeError, IndexError, KeyError):
            return None
        name = task.get("name") if isinstance(task, Mapping) else getattr(task, "name", None)
        return name if isinstance(name, str) else None
    return None


def _spec_models() -> list[type[SpecModel]]:
    """Every spec model class, subclasses of subclasses included."""
    found: list[type[SpecModel]] = []
    todo = list(SpecModel.__subclasses__())
    while todo:
        model = todo.pop(0)
        if model not in found:
            found.append(model)
            todo.extend(model.__subclasses__())
    return found


def _all_field_names() -> set[str]:
    """Field names of every spec model (the fallback when the model at an error's location is unknown)."""
    names: set[str] = set()
    for model in _spec_models():
        names.update(model.model_fields)
    return names


def _nested_model(annotation: Any) -> type[SpecModel] | None:
    """The spec model inside a field's annotation (``HeadSpec | None``, ``list[Task]``...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, SpecModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[SpecModel], loc: tuple[int | str, ...]) -> type[SpecModel] | None:
    """The spec model that holds the last entry of ``loc`` when validation started at ``root``."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int) or part.startswith("function-") or part in {"model", "tagged-union"}:
            continue  # list indices and pydantic's validator wrappers do not change the model
        info = model.model_fields.get(part)
        nested = _nested_model(info.annotation) if info is not None else None
        if nested is None:
            return None
        model = nested
    return model


def _field_locations(name: str) -> list[tuple[str, type[SpecModel]]]:
    """Where ``name`` is a field in an Experiment: ``[(path from the top level, model holding it)]``."""
    out: list[tuple[str, type[SpecModel]]] = []

    def walk(model: type[SpecModel], prefix: str, depth: int) -> None:
        for field_name, info in model.model_fields.items():
            path = f"{prefix}.{field_name}" if prefix else field_name
            if field_name == name:
                out.append((path, model))
            nested = _nested_model(info.annotation)
            if nested is not None and depth < 6:
                walk(nested, path + ("[i]" if get_origin(info.annotation) is list else ""), depth + 1)

    walk(Experiment, "", 0)
    return sorted(out, key=lambda item: item[0].count("."))  # the shallowest places first


def _unknown_field_message(name: str, root: type[SpecModel], loc: tuple[int | str, ...]) -> str:
    """``unknown field 'x'``, where it belongs instead (if anywhere), a close match, and the fields valid here."""
    here = _model_at(root, loc)
    if here is None:
        return f"unknown field {name!r}. {did_you_mean(name, _all_field_names())}"
    msg = f"unknown field {name!r}"
    elsewhere = _field_locations(name)
    if elsewhere:
        by_owner: dict[str, list[str]] = {}
        for path, owner in elsewhere[:5]:
            parent = path.rpartition(".")[0]
            by_owner.setdefault(owner.__name__, []).append(f"in {parent}" if parent else "at the top level")
        places = [f"{' or '.join(wheres)} ({owner}.{name})" for owner, wheres in by_owner.items()]
        more = f" (and {len(elsewhere) - 5} more places)" if len(elsewhere) > 5 else ""
        msg += f"; {name!r} belongs {', or '.join(places)}{more}"
    valid = sorted(here.model_fields)
    close = get_close_matches(name, valid, n=3, cutoff=0.6)
    msg += "." + (f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
    return msg + f" Valid here ({here.__name__}): {', '.join(repr(v) for v in valid)}."


def _format_validation_error(exc: ValidationError, model: type[SpecModel], data: Any) -> tuple[str, list[Any]]:
    lines = []
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = tuple(err["loc"])
        path = _loc_to_path(loc)
        msg = err["msg"].removeprefix("Value error, ")
        task = _task_name_at(data, loc)
        where = f"{path} (task {task!r})" if task else path
        if not loc:  # a cross-field check: its message starts with the field path itself
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            msg = _unknown_field_message(loc[-1], model, loc)
        elif err["type"] == "missing":
            msg = "this field is required"
        lines.append(f"  {where}: {msg}")
    head = f"invalid {model.__name__} spec ({len(errors)} error{'s' if len(errors) != 1 else ''}):"
    return "\n".join([head, *lines]), errors


class SpecModel(BaseModel):
    """Base of every spec model: strict fields, JSON-safe, errors raised as :class:`SpecError`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, frozen=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            message, errors = _format_validation_error(exc, type(self), data)
            raise SpecError(message, errors) from exc

    # Tell pydantic this __init__ only wraps the base one, so nested models are validated by pydantic's
    # core (keeping the full error location) instead of calling __init__ for each nested model.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            message, errors = _format_validation_error(exc, type(self), {})
            raise SpecError(message, errors) from exc

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """Validate a mapping (or model); raises :class:`SpecError`."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            message, errors = _format_validation_error(exc, cls, obj)
            raise SpecError(message, errors) from exc

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Any:
        """Validate a JSON document; raises :class:`SpecError` (also for malformed JSON)."""
        try:
            data = json.loads(json_data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"invalid {cls.__name__} JSON: {exc}") from exc
        return cls.model_validate(data, **kwargs)


def _json_safe(value: Any, where: str) -> Any:
    """Normalise ``value`` to plain JSON types (tuples become lists) or raise naming ``where``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; only finite numbers can be stored in a spec")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has key {k!r}; keys must be strings")
            out[k] = _json_safe(v, f"{where}[{k!r}]")
        return out
    raise ValueError(
        f"{where} has a value of type {type(value).__name__}; spec arguments must be JSON values "
        "(numbers, strings, booleans, lists, dicts). Register a component and refer to it by name instead."
    )


# ----------------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------------
class Component(SpecModel):
    """A registry name plus keyword arguments for its factory. A bare string is accepted as the name."""

    kind: ClassVar[str] = ""
    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("args")
    @classmethod
    def _args_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _json_safe(v, "args")


def _check_component(comp: Component | None, kind: str, field: str, info: ValidationInfo | None = None) -> None:
    skip = (info.context or {}).get("skip_registry_checks", ()) if info is not None else ()
    if comp is None or kind in skip:
        return
    registry = REGISTRIES[kind]
    if comp.name not in registry:
        raise ValueError(f"{field}.name: unknown {kind} {comp.name!r}. {did_you_mean(comp.name, registry.names())}")


class HeadSpec(SpecModel):
    """An MLP head: ``hidden`` dense layers (Linear -> BatchNorm -> activation), then a Linear to the classes.

    The paper's head is ``HeadSpec(hidden=[256])``: Dense(256, no bias) -> BatchNorm -> ReLU -> Dense(classes).
    """

    hidden: list[int] = Field(default_factory=lambda: [256])
    batchnorm: bool = True
    activation: Literal["relu", "leaky_relu", "gelu", "elu", "tanh"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = False

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [h for h in v if h < 1]
        if bad:
            raise ValueError(f"hidden layer sizes must be >= 1, got {v}")
        return v


class Task(SpecModel):
    """One classification task.

    Args:
        name: Identifier of the task (letters, digits, underscore; not starting with a digit).
        classes: Class names. Give these or ``num_classes``.
        num_classes: Number of classes (>= 2); filled in from ``classes`` when those are given.
        head: Classifier head for this task; ``None`` uses ``Experiment.head``.
        backbone: Encoder for this task; ``None`` uses ``Experiment.backbone``.
        loss_weight: Weight ``w_i`` of this task's classification loss (>= 0).
    """

    name: str = Field(pattern=TASK_NAME_PATTERN, max_length=64)
    classes: list[str] | None = None
    num_classes: int | None = Field(default=None, ge=2)
    head: HeadSpec | None = None
    backbone: Component | None = None
    loss_weight: float = Field(default=1.0, ge=0.0)

    @model_validator(mode="after")
    def _classes(self) -> Task:
        if self.classes is None and self.num_classes is None:
            raise ValueError(f"task {self.name!r}: give classes=[...] (names) or num_classes=N (N >= 2)")
        if self.classes is not None:
            if len(self.classes) < 2:
                raise ValueError(f"task {self.name!r}: classes has {len(self.classes)} entry; at least 2 are needed")
            if len(set(self.classes)) != len(self.classes):
                dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
                raise ValueError(f"task {self.name!r}: class names must be unique, repeated: {dup}")
            if self.num_classes is not None and self.num_classes != len(self.classes):
                raise ValueError(
                    f"task {self.name!r}: num_classes={self.num_classes} but classes lists {len(self.classes)} names"
                )
            if self.num_classes is None:
                object.__setattr__(self, "num_classes", len(self.classes))
        return self

    @property
    def n_classes(self) -> int:
        """Number of classes (always set after validation)."""
        assert self.num_classes is not None
        return self.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, ``["0", "1", ...]`` when only ``num_classes`` was given."""
        return list(self.classes) if self.classes is not None else [str(i) for i in range(self.n_classes)]


class Pair(SpecModel):
    """Override for the adversary predicting task ``target`` from task ``source``'s features."""

    source: str
    target: str
    enabled: bool = True
    weight: float = Field(default=1.0, ge=0.0)


class AdversaryPair(NamedTuple):
    """An adversary: predicts ``target`` from ``source``'s features, weighted by ``weight``.

    With an ensemble (``adversary.ensemble`` > 1) every ordered pair has several members, numbered by
    ``member``; each carries the pair's weight divided by the ensemble size, so lambda keeps its meaning.
    """

    source: str
    target: str
    weight: float
    member: int = 0

    @property
    def key(self) -> str:
        """Name of the adversary: ``"a->b"``, or ``"a->b#m"`` for member m > 0.

        It keys the adversary's logits; with ``adversary.layout="pair"`` it also keys its network in the model's
        ``adversaries``.
        """
        return self.pair_key if self.member == 0 else f"{self.pair_key}#{self.member}"

    @property
    def pair_key(self) -> str:
        """``"source->target"`` whatever the member."""
        return f"{self.source}->{self.target}"


class AdversarySpec(SpecModel):
    """The adversaries and the encoder-side objective that opposes them.

    The defaults (lambda 0.1, three conditional adversaries per pair, one re-initialised every 100
    iterations, 5 steps on the main step's features) are the best measured setting of
    ``benchmarks/disentangle.py`` on its three workloads; the paper used one unconditional adversary per pair
    with lambda 0.01 on fresh batches (``md.preset("paper_synthetic")`` keeps that).

    Args:
        objective: Objective plugin (``minmax`` is the paper's) and its arguments.
        weight: The global adversarial weight lambda (>= 0; 0 trains the plain multi-task model).
        steps: Adversary optimisation steps per iteration (k; the paper uses 5, its public code 3).
        features: ``"reuse"`` (the main step's detached features, the default: higher unseen accuracy than fresh
            batches on all three study workloads, ``benchmarks/results/fresh_features/``, and with an SGD
            adversary optimiser the exact Gram shortcut applies) or ``"fresh"`` (each adversary step draws a new
            batch and re-encodes it without gradients, as the paper's public code does; k more encoder passes per
            iteration, 2.3-2.5x the training time there).
        head: Head of every adversary.
        schedule: How lambda ramps up: constant, linear warm-up or DANN's sigmoid ramp.
        warmup: Iterations over which the schedule ramps from 0 to ``weight``.
        ensemble: Adversaries per ordered pair (with ``layout="source"``: networks per source task, each with an
            output for every pair of its source), each initialised differently; the encoders oppose all of
            them (each weighted ``weight / ensemble``), so hiding from one adversary is not enough.
        reinit_every: Every this many iterations re-initialise adversaries from fresh random weights and
            restart their optimiser: one ensemble member per pair in turn (all of them when ``ensemble`` is 1).
            A new adversary finds whatever the features still carry; 0 never re-initialises.
        conditional: Give each adversary its source task's own label (one-hot, zeros where unlabelled) next
            to the features, so it can only gain from what the features carry *beyond* their own task
            (equalised-odds style). With correlated factors (circles only on white) an adversary reading the
            background from perfect shape features succeeds through the shape alone; a conditional one does
            not, so the encoders are not pushed to forget their own task.
        layout: ``"source"`` (the default): one network per source task i whose output layer predicts every other
            task j at once, so the adversaries' parameters and cost grow linearly in N (their first layer,
            D x hidden, dominates); ``"pair"``: one adversary network per ordered pair (i, j) (the paper's
            N (N - 1); ``md.preset("paper_*")`` keeps it). With two tasks both are the same network. The default
            was ``"pair"`` until a comparison on ten fresh seeds of ``shapes_n`` (N = 4) found ``"source"`` no worse
            on unseen combinations, seen accuracy or leakage (``benchmarks/results/source_fresh/``). An objective
            that transforms the adversaries' inputs (``gradient_reversal``) transforms each network's input once,
            with its pairs' weight, so those pairs must share one weight. ``"pair_shared"``: one network per
            ordered pair whose ``ensemble`` members share its hidden layers, each with its own output layer, so
            members cost little more than one adversary (the first layer dominates); re-initialising member 0
            renews the whole network, member m > 0 its own output layer only. With ``ensemble`` 1 it is
            ``"pair"``.
        scales: What an adversary reads from its source encoder. ``"last"``: the last features, as the
            classifier does (the paper). ``"all"``: the last features followed by the global-average-pooled output
            of every scale of the encoder (the modules its backbone's ``scale_modules()`` returns; ``dltk_residual``:
            the stem and the last residual unit of each scale, widths ``filters``), so an adversary can read a
            nuisance from early layers and the encoder must remove it there too, not only in its last layer. The
            classifiers still read the last features only; levers transform only those. The scales are captured
            with forward hooks during the encoders' forward pass (the same batch as the features); a backbone
            without ``scale_modules()`` is an error. ``training.compile`` works where compiled modules run the hooks
            of their submodules (checked with torch 2.14, inductor, without recompilation); where they do not, the
            first forward stops with an error saying a scale module did not run.
    """

    objective: Component = Field(default_factory=lambda: Component(name="minmax"))
    weight: float = Field(default=0.1, ge=0.0)
    steps: int = Field(default=5, ge=0)
    features: Literal["fresh", "reuse"] = "reuse"
    head: HeadSpec = Field(default_factory=HeadSpec)
    schedule: Literal["constant", "linear", "sigmoid"] = "constant"
    warmup: int = Field(default=0, ge=0)
    ensemble: int = Field(default=3, ge=1, le=32)
    reinit_every: int = Field(default=100, ge=0)
    conditional: bool = True
    layout: Literal["pair", "source", "pair_shared"] = "source"
    scales: Literal["last", "all"] = "last"


class OptimizerSpec(SpecModel):
    """An optimiser: ``adam``, ``adamw`` or ``sgd`` with its settings."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)


class ExecutionSpec(SpecModel):
    """How the model runs; results and checkpoints do not depend on it (one state_dict entry per head).

    Args:
        heads: ``"stacked"`` runs same-shaped classifiers and adversaries as stacked weights with batched
            matrix products; ``"separate"`` runs one module per head (the reference path); ``"auto"``
            stacks (faster in every measured configuration, see benchmarks/).
        adversary_steps: How the k adversary steps on reused features run. ``"gram"``: the first layer's
            updates through the (B, B) Gram matrix of the inputs, exact for SGD with momentum (four large
            products per iteration instead of 2k; ``mtdisent/_engine/_gram.py``); ``"plain"``: k ordinary
            steps; ``"auto"``: ``gram`` wherever it is exact.
        memory_check: Before building the adversaries and before training, compare the bytes their weights
            and the optimisers' state need (a floor: activations are not counted) with the device's free memory,
            and stop with an error naming the settings to change rather than be killed for lack of memory.
    """

    heads: Literal["auto", "stacked", "separate"] = "auto"
    adversary_steps: Literal["auto", "gram", "plain"] = "auto"
    memory_check: bool = True


class TrainingSpec(SpecModel):
    """How to train.

    Args:
        iterations: Training iterations (1 main step + ``adversary.steps`` adversary steps each).
        batch_size: Images per step (the paper: 50).
        optimizer: Optimiser of encoders and classifiers (Adam by default).
        adversary_optimizer: Optimiser of the adversaries (SGD with momentum 0.9 by default).
        l2: Weight of the L2 penalty on every weight matrix/kernel, added to each step's loss (paper: 1e-5).
        hflip: Random horizontal flips of training images.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: Mixed precision: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"bf16"`` or ``"off"``.
        compile: Run the encoders through ``torch.compile``.
        channels_last: Run the encoders in the channels-last memory format (NHWC): ``"auto"`` (on the CPU, where
            it was measured faster on every workload and N of ``benchmarks/speed.py``; off elsewhere until measured
            there), ``True`` or ``False``. Only the memory layout changes: results agree to float rounding.
        sync_batchnorm: Under torchrun on CUDA, BatchNorm statistics over the global batch (SyncBatchNorm).
        checkpoint_every: Write a checkpoint every this many iterations (and at the end).
        keep_last: Checkpoints kept besides the best one.
        eval_every: Evaluate on the validation split every this many iterations (0: at each checkpoint).
        log_every: Write a line to metrics.jsonl every this many iterations.
        num_workers: DataLoader worker processes that fetch batches (0: in the training process). Worth it for
            datasets read from disk; results do not depend on it.
        train_split: Split of the data used for training.
        val_split: Split used to select the best checkpoint (skipped when the data has none).
        select_metric: The validation metric that decides the best checkpoint (a key of the validation
            metrics without ``val_``: ``mean_acc`` (default), ``min_acc``, ``mean_balanced_acc``, ``acc/<task>``,
            or a key of a metric passed to ``md.train(..., metrics=[...])``).
        select_mode: ``"max"`` (higher is better) or ``"min"``.
        leakage_limit: Model selection under a leakage limit: at each validation, fresh linear probes read
            every adversary pair's target task from its source task's validation features (two-fold
            cross-fitting, normalised: 0 at the majority rate, 1 perfect); a checkpoint can be "best" only
            if the largest of these is at most the limit. ``None`` selects on validation accuracy alone.
            Probes fitted on a small validation split read less leakage than probes fitted on the training
            split (``benchmarks/disentangle.py`` measured 0.18 against 0.69 with 300 validation images).
        tensorboard: Also log to TensorBoard when it is installed.
        batchnorm_stats: The final model's BatchNorm statistics: ``"running"`` (the momentum averages training
            kept) or ``"recompute"`` (exact averages over one pass of the training split at the end, at the
            training batch size, without flips, each batch changed by the step's ``augment`` as in training (the
            levers' synthetic samples): :func:`~mtdisent.recompute_batchnorm`). Only the final model
            (``Run.model``, ``model.safetensors``) has them: checkpoints, the best one included, keep the running
            ones (so resuming stays exact), and validation used the running ones. Under torchrun every process
            makes the same whole pass.
    """

    iterations: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=50, ge=2)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    adversary_optimizer: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(name="sgd", lr=1e-4))
    l2: float = Field(default=1e-5, ge=0.0)
    hflip: bool = True
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    amp: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    channels_last: bool | Literal["auto"] = "auto"
    sync_batchnorm: bool = False
    checkpoint_every: int = Field(default=500, ge=1)
    keep_last: int = Field(default=2, ge=1)
    eval_every: int = Field(default=0, ge=0)
    log_every: int = Field(default=10, ge=1)
    num_workers: int = Field(default=0, ge=0)
    train_split: str = "train"
    val_split: str = "val"
    select_metric: str = Field(default="mean_acc", min_length=1)
    select_mode: Literal["max", "min"] = "max"
    leakage_limit: float | None = Field(default=None, ge=0.0, le=1.0)
    tensorboard: bool = False
    batchnorm_stats: Literal["running", "recompute"] = "running"


class Experiment(SpecModel):
    """An N-task disentanglement experiment (N >= 1).

    Args:
        tasks: The tasks, at least one, with unique names. Two or more are disentangled from each other (one
            adversary per ordered pair); a single task trains a single-task baseline (one encoder and one
            classifier, no adversaries).
        backbone: Encoder used by every task without its own ``backbone``.
        input_shape: ``(channels, height, width)`` of the images; may come from a dataset instead.
        head: Classifier head used by every task without its own ``head``.
        adversary: Adversary settings (objective, lambda, steps, head).
        pairs: Overrides for individual adversaries: switch one off or change its weight.
        all_pairs: Start from every ordered pair (i, j), i != j (default) or from none (then only the
            pairs listed in ``pairs`` with ``enabled=True`` get adversaries).
        data: Dataset from the ``datasets`` registry.
        training: Training settings.
        execution: Execution path (stacked or separate heads); does not change results.
        levers: Levers (plugins of the ``levers`` registry, applied in this order) that change how the model
            trains: erasure layers, recombination of factors.
        seed: Seed for weights and data order.
        name: Optional human name of the experiment.
    """

    tasks: list[Task]
    backbone: Component = Field(default_factory=lambda: Component(name="dltk_residual"))
    input_shape: tuple[int, int, int] | None = None
    head: HeadSpec = Field(default_factory=HeadSpec)
    adversary: AdversarySpec = Field(default_factory=AdversarySpec)
    pairs: list[Pair] = Field(default_factory=list)
    all_pairs: bool = True
    data: Component | None = None
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    levers: list[Component] = Field(default_factory=list)
    seed: int = 0
    name: str | None = None

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(d < 1 for d in v):
            raise ValueError(f"must be (channels, height, width) with every entry >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Experiment:
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError(
                "tasks: at least 1 task is needed (2 or more are disentangled from each other; "
                "1 trains a single-task baseline without adversaries)"
            )
        seen: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in seen:
                raise ValueError(
                    f"tasks[{i}].name: duplicate task name {n!r} (also tasks[{seen[n]}]); names must be unique"
                )
            seen[n] = i
        pairs_seen: dict[tuple[str, str], int] = {}
        for k, p in enumerate(self.pairs):
            for field in ("source", "target"):
                value = getattr(p, field)
                if value not in seen:
                    raise ValueError(f"pairs[{k}].{field}: unknown task {value!r}. {did_you_mean(value, names)}")
            if p.source == p.target:
                raise ValueError(f"pairs[{k}]: source and target are both {p.source!r}; an adversary needs two tasks")
            if (p.source, p.target) in pairs_seen:
                first = pairs_seen[(p.source, p.target)]
                raise ValueError(f"pairs[{k}]: ({p.source!r}, {p.target!r}) is already given as pairs[{first}]")
            pairs_seen[(p.source, p.target)] = k
        _check_component(self.backbone, "backbone", "backbone", info)
        for i, t in enumerate(self.tasks):
            _check_component(t.backbone, "backbone", f"tasks[{i}].backbone (task {t.name!r})", info)
        _check_component(self.adversary.objective, "objective", "adversary.objective", info)
        _check_component(self.data, "dataset", "data", info)
        for k, lever in enumerate(self.levers):
            _check_component(lever, "lever", f"levers[{k}]", info)
        return self

    # -- derived views -------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names in declaration order."""
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        """The task called ``name``."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise UnknownComponentError(f"Unknown task {name!r}. {did_you_mean(name, self.task_names)}")

    def head_for(self, name: str) -> HeadSpec:
        """Classifier head of task ``name`` (its override or the experiment default)."""
        return self.task(name).head or self.head

    def backbone_for(self, name: str) -> Component:
        """Backbone of task ``name`` (its override or the experiment default)."""
        return self.task(name).backbone or self.backbone

    def adversary_pairs(self) -> list[AdversaryPair]:
        """Enabled adversaries in task order: every ordered pair unless switched off, with per-pair weights.

        With ``adversary.ensemble`` = M each pair appears M times in a row (members 0..M-1), weight / M each.
        """
        overrides = {(p.source, p.target): p for p in self.pairs}
        out: list[AdversaryPair] = []
        for src in self.task_names:
            for tgt in self.task_names:
                if src == tgt:
                    continue
                p = overrides.get((src, tgt))
                enabled = p.enabled if p is not None else self.all_pairs
                if enabled:
                    weight = (p.weight if p is not None else 1.0) / self.adversary.ensemble
                    out.extend(AdversaryPair(src, tgt, weight, m) for m in range(self.adversary.ensemble))
        return out


# defaults that changed: (section, field) -> (the value before, the date it changed). A saved spec that lacks such a
# field predates it, so it reads the value before; a resume refused over one says so.
CHANGED_DEFAULTS: dict[tuple[str, str], tuple[Any, str]] = {
    ("adversary", "layout"): ("pair", "2026-12-05"),  # one network per ordered pair -> one per source task
    ("training", "channels_last"): (False, "2026-12-05"),  # -> "auto" (channels-last encoders on the CPU)
}


def saved_experiment(data: Any) -> Experiment:
    """The experiment a run saved (``spec.json``, a checkpoint's or model's ``experiment``), as it was trained.

    Saved specs hold every field, so a field a spec lacks did not exist when it was written: it gets the value it
    had then, not today's default (:data:`CHANGED_DEFAULTS`). ``adversary.layout`` (``"source"`` by default since
    2026-12-05) came after runs whose adversaries were all one network per ordered pair, so such a spec reads
    ``"pair"``. Objective and dataset plugins need not be installed (evaluating a saved model uses neither).
    """
    context = {"skip_registry_checks": ("objective", "dataset")}
    return Experiment.model_validate(upgrade_saved_spec(data), context=context)


def upgrade_saved_spec(data: Any) -> Any:
    """A saved spec's JSON with the fields it predates set as they were then (see :func:`saved_experiment`)."""
    for (section, field), (before, _) in CHANGED_DEFAULTS.items():
        if isinstance(data, dict) and isinstance(data.get(section), dict) and field not in data[section]:
            data = {**data, section: {**data[section], field: before}}
    return data


def changed_default_hint(saved: dict[str, Any], fields: list[str]) -> str:
    """For a resume refused over ``fields`` (``section.field``): which of them had another default when it ran."""
    hints = []
    for (section, field), (before, when) in CHANGED_DEFAULTS.items():
        if f"{section}.{field}" in fields and saved[section][field] == before:
            now = getattr(Experiment.model_fields[section].default_factory(), field)  # type: ignore[call-arg, misc]
            hints.append(
                f"this run was trained with {section}.{field}={saved[section][field]!r} (the default was {before!r} "
                f"before {when} and is {now!r} now)"
            )
    return "; " + "; ".join(hints) + ": set it in the spec to resume" if hints else ""


def load_spec(path: str | Path) -> Experiment:
    """Read an :class:`Experiment` from a JSON file or from a Python file that defines one.

    A Python file must define a variable named ``experiment`` or exactly one ``Experiment`` at module level.

    Raises:
        SpecError: the file is missing, unreadable, or does not define a valid experiment.
    """
    return load_spec_file(path)[0]


def load_spec_file(path: str | Path) -> tuple[Experiment, dict[str, Any]]:
    """Like :func:`load_spec`, also returning the Python file's namespace (empty for JSON), for ``data``."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist (expected a .json or .py file)")
    if path.suffix == ".py":
        try:
            namespace = runpy.run_path(str(path), run_name="__mtdisent_spec__")
        except MtdisentError as exc:
            raise SpecError(f"spec file {str(path)!r}: {exc}") from exc
        except Exception as exc:
            raise SpecError(f"spec file {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(namespace.get("experiment"), Experiment):
            return namespace["experiment"], namespace
        found = {k: v for k, v in namespace.items() if isinstance(v, Experiment) and not k.startswith("_")}
        if len(found) == 1:
            return next(iter(found.values())), namespace
        if not found:
            raise SpecError(
                f"spec file {str(path)!r} defines no Experiment; assign one to a variable named 'experiment'"
            )
        raise SpecError(
            f"spec file {str(path)!r} defines several Experiments ({', '.join(sorted(found))}); "
            "name the one to use 'experiment'"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {exc}") from exc
    try:
        return Experiment.model_validate_json(text), {}
    except SpecError as exc:
        raise SpecError(f"spec file {str(path)!r}: {exc}", exc.errors) from exc
