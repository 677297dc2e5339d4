"""Conformance checks for plugin authors.

Run them on your own components::

    from mtdisent.testing import check_backbone, check_dataset, check_objective
    check_backbone("my_backbone", args={"width": 8})
    check_objective("my_objective")
    check_dataset("my_dataset", args={"root": "..."})

or parametrise pytest over every registered component with :func:`backbone_names` /
:func:`objective_names` / :func:`dataset_names`. Each check raises ``AssertionError`` with a message saying
what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ._data import ContractView, DataError, DataSource, is_tensor_backed, make_loader, sequential_batches
from ._errors import MtdisentError
from ._heads import MLPHead
from ._model import _scale_paths, _ScaleCapture, build_backbone
from ._objectives import Objective
from ._registry import backbones, datasets, objectives
from ._spec import Component, Experiment, HeadSpec
from ._torch import eval_mode

__all__ = [
    "check_backbone",
    "check_objective",
    "check_dataset",
    "check_lever",
    "backbone_names",
    "objective_names",
    "dataset_names",
]


def backbone_names() -> list[str]:
    """Every registered backbone (for ``pytest.mark.parametrize``)."""
    return backbones.list()


def objective_names() -> list[str]:
    """Every registered objective (for ``pytest.mark.parametrize``)."""
    return objectives.list()


def dataset_names() -> list[str]:
    """Every registered dataset (for ``pytest.mark.parametrize``)."""
    return datasets.list()


def _finite(t: torch.Tensor, what: str) -> None:
    assert torch.isfinite(t).all(), f"{what} contains NaN or inf"


def check_backbone(
    name: str,
    *,
    args: dict[str, Any] | None = None,
    in_channels: int = 1,
    input_size: tuple[int, int] = (32, 32),
    batch_size: int = 3,
    seed: int = 0,
) -> nn.Module:
    """Check the backbone contract: (B, C, H, W) -> (B, D), ``num_features`` honest, gradients everywhere, no NaN.

    A backbone with ``scale_modules()`` must return its own submodules, each run once per forward pass with an
    output (B, C, *spatial).

    Args:
        name: Registered backbone name.
        args: Factory arguments.
        in_channels: Image channels to build with.
        input_size: (H, W) of the test images.
        batch_size: Batch size of the test (>= 2, for BatchNorm).
        seed: Seed for weights and inputs.

    Returns:
        The built module, for further checks.
    """
    torch.manual_seed(seed)
    module = build_backbone(Component(name=name, args=args or {}), in_channels)
    x = torch.randn(batch_size, in_channels, *input_size)
    for mode in ("train", "eval"):
        module.train(mode == "train")
        out = module(x)
        assert isinstance(out, torch.Tensor), f"backbone {name!r} returned {type(out).__name__}, expected a Tensor"
        assert out.ndim == 2 and out.shape[0] == batch_size, (
            f"backbone {name!r} ({mode} mode) returned shape {tuple(out.shape)}; expected (B={batch_size}, D)"
        )
        _finite(out, f"backbone {name!r} output ({mode} mode)")
        declared = getattr(module, "num_features", None)
        if isinstance(declared, int):
            assert declared == out.shape[1], f"backbone {name!r}: num_features={declared} but D={out.shape[1]}"
    module.train()
    module.zero_grad(set_to_none=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"backbone {name!r}: parameters received no gradient: {missing[:10]}"
    for n, p in module.named_parameters():
        if p.grad is not None:
            _finite(p.grad, f"backbone {name!r} gradient of {n}")
    if callable(getattr(module, "scale_modules", None)):  # the optional scales contract (adversary.scales="all")
        label = f"backbone {name!r}"
        try:
            paths = _scale_paths(module, label)
            with _ScaleCapture({"": [module.get_submodule(p) for p in paths]}, {"": label}) as capture:
                module(x)
            pooled = capture.pooled()[""]
        except MtdisentError as exc:
            raise AssertionError(str(exc)) from exc
        for i, s in enumerate(pooled):
            assert s.ndim == 2 and s.shape[0] == batch_size, f"{label}: scale {i} pools to {tuple(s.shape)}"
            _finite(s, f"{label} scale {i}")
    return module


def check_objective(
    name: str | Callable[..., Objective],
    *,
    args: dict[str, Any] | None = None,
    num_classes: tuple[int, ...] = (3, 2, 4),
    feature_dim: int = 8,
    batch_size: int = 12,
    seed: int = 0,
) -> Objective:
    """Check the objective contract.

    Per pair: ``encoder_term`` is a finite scalar. Batched: ``encoder_terms`` over padded logits of pairs with
    different class counts and partly unlabelled targets gives (P,) finite terms equal to the per-pair
    reference; ``feature_terms``, when the objective has them, gives (P,) finite terms, 0 for a pair without
    labelled samples; together the terms the main step uses give the features a gradient (through
    ``adversary_input``); ``adversary_loss`` gives (P,) finite losses with a gradient to every adversary weight;
    an objective with ``combines_gradients`` is not ``single_pass``, and its ``combine_gradients`` keeps the shape,
    stays finite and returns the task gradient unchanged when the adversary gradient is zero.

    Args:
        name: Registered objective name, or the objective class itself.
        args: Constructor arguments.
        num_classes: Classes of each pair's target task in the test.
        feature_dim: Feature size in the test.
        batch_size: Batch size of the test.
        seed: Seed.

    Returns:
        The objective instance.
    """
    torch.manual_seed(seed)
    factory = objectives.get(name) if isinstance(name, str) else name
    objective = factory(**(args or {}))
    assert isinstance(objective, Objective), f"objective {name!r} is not an mtdisent.Objective"
    label = f"objective {name!r}"
    k_max, p = max(num_classes), len(num_classes)
    heads = [MLPHead(feature_dim, k, HeadSpec(hidden=[16])) for k in num_classes]
    z = torch.randn(p, batch_size, feature_dim, requires_grad=True)
    weights = torch.linspace(0.25, 1.0, p)
    x = objective.adversary_input(z, weights.view(-1, 1, 1))
    assert x.shape == z.shape, f"{label}: adversary_input changed the shape {tuple(z.shape)} -> {tuple(x.shape)}"
    logits = torch.full((p, batch_size, k_max), float("-inf"))
    logits = torch.stack(
        [torch.cat([h(x[i]), logits[i, :, h.num_classes :]], dim=-1) for i, h in enumerate(heads)]
    )  # (P, B, K_max)
    targets = torch.stack([torch.arange(batch_size) % k for k in num_classes])  # (P, B)
    targets[0, ::2] = -1  # partly unlabelled
    targets[-1, :] = -1  # a pair with no labelled sample
    term = objective.encoder_term(logits[1, :, : num_classes[1]], targets[1], 0.5)
    assert isinstance(term, torch.Tensor) and term.ndim == 0, f"{label}: encoder_term must return a scalar"
    _finite(term, f"{label} encoder_term")
    terms = objective.encoder_terms(logits, targets, weights, list(num_classes))
    assert terms.shape == (p,), f"{label}: encoder_terms must return one term per pair, got {tuple(terms.shape)}"
    _finite(terms, f"{label} encoder_terms")
    reference = Objective.encoder_terms(objective, logits, targets, weights, list(num_classes))
    assert torch.allclose(terms, reference, atol=1e-5, rtol=1e-4), (
        f"{label}: encoder_terms {terms.tolist()} differ from the per-pair encoder_term {reference.tolist()}"
    )
    assert float(terms[-1].detach()) == 0.0, f"{label}: a pair without labelled samples must contribute 0"
    own = torch.stack([torch.arange(batch_size) % 2 for _ in num_classes])  # (P, B) the sources' own labels
    direct = objective.feature_terms([z[i] for i in range(p)], targets, weights, list(num_classes), own)
    assert objective.uses_adversaries or direct is not None, (
        f"{label}: uses_adversaries is False and feature_terms returns None: the objective does nothing"
    )
    total = terms if objective.uses_adversaries else torch.zeros(p)
    if direct is not None:
        assert isinstance(direct, torch.Tensor) and direct.shape == (p,), (
            f"{label}: feature_terms must return one term per pair, got {getattr(direct, 'shape', direct)}"
        )
        _finite(direct, f"{label} feature_terms")
        assert float(direct[-1].detach()) == 0.0, f"{label}: feature_terms of a pair without labels must be 0"
        total = total + direct
    total.sum().backward()
    assert z.grad is not None and z.grad[:-1].abs().sum() > 0, f"{label}: encoder terms give no gradient to features"
    _finite(z.grad, f"{label} feature gradient")
    for h in heads:
        h.zero_grad(set_to_none=True)
    detached = torch.stack(
        [torch.cat([h(z[i].detach()), logits[i, :, h.num_classes :].detach()], dim=-1) for i, h in enumerate(heads)]
    )
    losses = objective.adversary_loss(detached, targets)
    assert losses.shape == (p,), f"{label}: adversary_loss must return one loss per pair"
    _finite(losses, f"{label} adversary_loss")
    losses.sum().backward()
    missing = [f"pair {i}: {n}" for i, h in enumerate(heads[:-1]) for n, q in h.named_parameters() if q.grad is None]
    assert not missing, f"{label}: adversary parameters received no gradient: {missing}"
    if objective.combines_gradients:
        assert not objective.single_pass, f"{label}: combines_gradients cannot be combined with single_pass"
        task, adversary = torch.randn(40), torch.randn(40)
        combined = objective.combine_gradients(task.clone(), adversary.clone())
        assert isinstance(combined, torch.Tensor) and combined.shape == task.shape, (
            f"{label}: combine_gradients must return a vector of the gradients' shape {tuple(task.shape)}, "
            f"got {getattr(combined, 'shape', combined)}"
        )
        _finite(combined, f"{label} combine_gradients")
        alone = objective.combine_gradients(task.clone(), torch.zeros_like(adversary))
        assert torch.allclose(alone, task, rtol=1e-6, atol=1e-7), (
            f"{label}: with a zero adversary gradient combine_gradients must return the task gradient unchanged"
        )
    return objective


def check_dataset(
    name: str | DataSource, *, args: dict[str, Any] | None = None, splits: list[str] | None = None, samples: int = 8
) -> DataSource:
    """Check the dataset contract on every sample of every split (or of ``splits``).

    The factory returns a :class:`~mtdisent.DataSource` that declares its ``tasks`` and ``input_shape``; every
    item is ``(float image (C, H, W) of that shape, finite, {task: class index or -1})`` with labels in range
    (read through the same path as training, so a violation gives the same :class:`~mtdisent.DataError`); a
    label table (``labels``) agrees with the items; a tensor-backed dataset's ``dataset[i]`` equals
    ``(images[i], labels at i)`` (checked on ``samples`` indices spread over the split).

    Args:
        name: Registered dataset name, or a DataSource to check.
        args: Factory arguments.
        splits: Splits to check (default all).
        samples: Items compared one by one against the tensors or the label table per split.

    Returns:
        The DataSource, for further checks.
    """
    if isinstance(name, DataSource):
        source, label = name, "dataset"
    else:
        label = f"dataset {name!r}"
        source = datasets.create(name, args or {})
    assert isinstance(source, DataSource), f"{label}: the factory returned {type(source).__name__}, not a DataSource"
    assert source.tasks, f"{label}: the DataSource declares no tasks (DataSource(..., tasks=[...]))"
    assert source.input_shape is not None, f"{label}: the DataSource declares no input_shape"
    experiment = Experiment(tasks=source.tasks, input_shape=source.input_shape)
    classes = {t.name: t.n_classes for t in experiment.tasks}
    for split in splits or list(source):
        ds = source[split]
        try:
            view = ContractView(ds, classes, source.input_shape, split)
            batches = list(make_loader(view, sequential_batches(view.n, 64)))
        except DataError as exc:
            raise AssertionError(f"{label}: {exc}") from exc
        labels = {t: torch.cat([b.labels[t] for b in batches]) for t in classes}
        picks = torch.linspace(0, view.n - 1, min(samples, view.n)).long().unique().tolist()
        for i in picks:
            image, item_labels = ds[i]
            for t in classes:
                got = int(item_labels.get(t, -1))
                table = int(labels[t][i])
                assert got == table, (
                    f"{label}, split {split!r}, sample {i}, task {t!r}: the item says {got}, the label table {table}"
                )
            if is_tensor_backed(ds):
                assert torch.equal(image.float(), cast(Any, ds).images[i].float()), (
                    f"{label}, split {split!r}, sample {i}: dataset[i] differs from images[i]; a dataset with an "
                    "images tensor must return it unchanged (apply transforms with DataSource.with_transform)"
                )
    return source


class _Toy(torch.utils.data.Dataset):
    """Two tasks written into the image: 'a' (2 classes) on the top half, 'b' (3 classes) on the bottom."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = {"a": torch.randint(0, 2, (n,), generator=g), "b": torch.randint(0, 3, (n,), generator=g)}
        self.images = torch.randn(n, 1, 16, 16, generator=g) * 0.1
        self.images[:, :, :8] += self.labels["a"][:, None, None, None].float()
        self.images[:, :, 8:] += self.labels["b"][:, None, None, None].float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, int]]:
        return self.images[i], {t: int(v[i]) for t, v in self.labels.items()}


def check_lever(name: str, *, args: dict[str, Any] | None = None, iterations: int = 3) -> Any:
    """Check the lever contract on a two-task toy run.

    Training with the lever runs and stays finite; ``Lever.features`` keeps every task's feature shape; what
    ``Lever.build`` made is saved with the model and :func:`~mtdisent.load` gives back the same predictions;
    with ``iterations`` > 1, training stopped half way and resumed from its checkpoint ends bitwise where
    uninterrupted training does, :meth:`~mtdisent.Lever.finish` included (the lever's state and random draws are in
    the checkpoints).

    Args:
        name: Registered lever name.
        args: Its arguments.
        iterations: Training iterations of the check.

    Returns:
        The trained :class:`~mtdisent.Run`.
    """
    import tempfile

    from ._engine import load, train

    experiment = Experiment.model_validate(
        dict(
            tasks=[{"name": "a", "num_classes": 2}, {"name": "b", "num_classes": 3}],
            backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}},
            input_shape=(1, 16, 16),
            head={"hidden": [8]},
            adversary={"head": {"hidden": [8]}, "steps": 2, "features": "reuse"},
            levers=[{"name": name, "args": args or {}}],
            training={"iterations": iterations, "batch_size": 20, "checkpoint_every": iterations, "device": "cpu"},
        )
    )
    label = f"lever {name!r}"
    data = {"train": _Toy(), "val": _Toy(20, seed=1)}
    with tempfile.TemporaryDirectory() as tmp:
        run = train(experiment, data=data, out_dir=tmp, quiet=True)
        for metrics in run.history:
            finite = all(v == v and abs(v) != float("inf") for v in metrics.values() if isinstance(v, float))
            assert finite, f"{label}: a logged metric is not finite: {metrics}"
        x = _Toy(8, seed=2).images
        with eval_mode(run.model), torch.no_grad():
            raw = {t: run.model.encoders[t](x).shape for t in run.model.task_names}
        feats = run.model.features(x)
        assert {t: f.shape for t, f in feats.items()} == raw, f"{label}: features changed shape"
        loaded = load(tmp)
        for t, p in run.model.predict(x).items():
            assert torch.equal(p, loaded.predict(x)[t]), f"{label}: the loaded model predicts differently"
    if iterations > 1:
        half = experiment.training.model_copy(update={"iterations": iterations // 2})
        with tempfile.TemporaryDirectory() as tmp:
            train(experiment.model_copy(update={"training": half}), data=data, out_dir=tmp, quiet=True)
            resumed = train(experiment, data=data, out_dir=tmp, resume=True, quiet=True)
        full, again = run.model.state_dict(), resumed.model.state_dict()
        differ = [k for k in full if not torch.equal(full[k], again[k])]
        assert not differ, f"{label}: resumed training differs from uninterrupted training in {differ[:3]}"
    return run
