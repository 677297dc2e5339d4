"""Combination splits: hold out chosen combinations of factor labels from training.

:func:`combination_split` puts every sample of a held-out combination (say circle on black) in an
``unseen`` split and divides the rest, stratified by combination, into ``train``, ``val`` and ``test``.
It refuses (:class:`SplitError`, naming the combination) a held-out combination that is not a valid
combination of factor values or that does not occur in the data, and, unless ``allow_absent_values=True``,
a hold-out that would remove some factor value from training entirely: the paper's protocol holds out
circle/black while circles (on white) and black backgrounds (with rectangles) remain in training, which
passes; holding out both circle/black and circle/white would leave no circle to learn from and fails.
:func:`check_no_leak` verifies that given training indices contain no held-out combination.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._metrics import UNLABELLED, EvaluationError, as_labels

__all__ = ["SplitError", "SplitWarning", "combination_split", "check_no_leak", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "val", "test", "unseen")

Combination = tuple[int, ...]


class SplitError(EvaluationError):
    """A combination split is impossible or would leak a held-out combination; the message names it."""


class SplitWarning(UserWarning):
    """A combination split went ahead but dropped samples or lost a factor value from training."""


def _fmt(factors: Sequence[str], combo: Sequence[int]) -> str:
    return "(" + ", ".join(f"{f}={v}" for f, v in zip(factors, combo, strict=True)) + ")"


def _factor_table(labels: Mapping[str, Any], factors: Sequence[str]) -> torch.Tensor:
    """``(N, F)`` factor labels in ``factors`` order; :class:`SplitError` naming what is wrong."""
    if isinstance(factors, str) or not isinstance(factors, Sequence) or not factors:
        raise SplitError(f"factors: expected a non-empty list of task names, got {factors!r}")
    factors = list(factors)
    if len(set(factors)) != len(factors):
        raise SplitError(f"factors: {factors} names a factor twice")
    if not isinstance(labels, Mapping):
        raise SplitError(f"labels: expected a dict from task name to LongTensor[N], got {type(labels).__name__}")
    cols = []
    for f in factors:
        if f not in labels:
            raise SplitError(f"labels has no factor {f!r}; it has {sorted(labels)}")
        try:
            col = as_labels(labels[f], f"labels[{f!r}]")
        except EvaluationError as exc:
            raise SplitError(str(exc)) from exc
        bad = col < UNLABELLED
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise SplitError(f"labels[{f!r}][{i}] = {int(col[i])}; class indices must be >= 0, or -1 (unlabelled)")
        cols.append(col)
    n = cols[0].numel()
    for f, c in zip(factors, cols, strict=True):
        if c.numel() != n:
            raise SplitError(f"labels[{f!r}] has {c.numel()} entries but labels[{factors[0]!r}] has {n}")
    return torch.stack(cols, dim=1) if n else torch.zeros(0, len(factors), dtype=torch.long)


def _normalise_holdout(
    holdout: Any,
    factors: Sequence[str],
    table: torch.Tensor,
    num_classes: Mapping[str, int] | None,
) -> list[Combination]:
    """Held-out combinations as tuples in ``factors`` order, each checked to be valid and present in the data."""
    if isinstance(holdout, (Mapping, str)) or not isinstance(holdout, Sequence):
        raise SplitError(
            "holdout: expected a list of combinations, each a tuple of factor values in the order of "
            f"factors={list(factors)} or a dict {{factor: value}}; got {type(holdout).__name__}"
        )
    values = [set(table[:, c][table[:, c] != UNLABELLED].tolist()) for c in range(len(factors))]
    present = {tuple(r) for r in table[(table != UNLABELLED).all(1)].tolist()}
    out: list[Combination] = []
    for entry in holdout:
        if isinstance(entry, Mapping):
            extra = [k for k in entry if k not in factors]
            missing = [f for f in factors if f not in entry]
            if extra or missing:
                raise SplitError(
                    f"holdout combination {dict(entry)} must name every factor exactly: "
                    f"missing {missing}, unknown {extra}; factors are {list(factors)}"
                )
            raw = [entry[f] for f in factors]
        elif isinstance(entry, (tuple, list)):
            if len(entry) != len(factors):
                raise SplitError(
                    f"holdout combination {tuple(entry)} has {len(entry)} values but there are {len(factors)} "
                    f"factors {list(factors)}"
                )
            raw = list(entry)
        else:
            raise SplitError(
                f"holdout combination {entry!r}: expected a tuple of values in the order of factors={list(factors)} "
                "or a dict {factor: value} (a single combination must still be wrapped in a list: [(0, 0)])"
            )
        combo: list[int] = []
        for c, (f, v) in enumerate(zip(factors, raw, strict=True)):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            try:
                if isinstance(v, bool):
                    raise TypeError
                v = operator.index(v)  # ints, numpy integers
            except TypeError:
                raise SplitError(
                    f"holdout combination {tuple(raw)}: value {v!r} of factor {f!r} is not an integer class index"
                ) from None
            if num_classes is not None and f in num_classes:
                k = num_classes[f]
                if not 0 <= v < k:
                    raise SplitError(
                        f"holdout combination {_fmt(factors, raw)} is not a valid combination: factor {f!r} has "
                        f"classes 0..{k - 1}, not {v}"
                    )
            elif v not in values[c]:
                raise SplitError(
                    f"holdout combination {_fmt(factors, raw)} is not a valid combination: factor {f!r} takes "
                    f"the values {sorted(values[c])} in the data, not {v}"
                )
            combo.append(v)
        key = tuple(combo)
        if key not in present:
            raise SplitError(
                f"holdout combination {_fmt(factors, key)} does not occur in the data; combinations present: "
                + ", ".join(_fmt(factors, p) for p in sorted(present))
            )
        if key not in out:
            out.append(key)
    return out


def _may_match(table: torch.Tensor, combos: Sequence[Combination]) -> torch.Tensor:
    """``(N,)`` bool: the row's labelled factors agree with some combination (unlabelled factors match anything)."""
    hit = torch.zeros(table.shape[0], dtype=torch.bool)
    for combo in combos:
        ref = torch.tensor(combo, dtype=torch.long)
        hit |= ((table == ref) | (table == UNLABELLED)).all(1)
    return hit


def check_no_leak(
    train_indices: Any,
    labels: Mapping[str, torch.Tensor],
    factors: Sequence[str],
    holdout: Sequence[Any],
) -> None:
    """Raise :class:`SplitError` if any training sample belongs to a held-out combination.

    Only fully labelled samples can be decided; a sample with an unlabelled factor whose labelled factors
    agree with a held-out combination is not counted as a leak (:func:`combination_split` never puts such a
    sample in training).

    Args:
        train_indices: Indices of the training samples (``LongTensor``, or a sequence of ints).
        labels: ``{task: LongTensor[N]}`` labels of the whole dataset the indices refer to.
        factors: The factor tasks, in the order of tuple combinations in ``holdout``.
        holdout: Held-out combinations, as tuples of values (``factors`` order) or dicts ``{factor: value}``.

    Raises:
        SplitError: A held-out combination reaches training (the message names it and the first indices),
            an index is out of range, or the inputs are malformed.
    """
    table = _factor_table(labels, factors)
    combos = _normalise_holdout(holdout, factors, table, None) if len(holdout) else []
    try:
        idx = as_labels(train_indices, "train_indices")
    except EvaluationError as exc:
        raise SplitError(str(exc)) from exc
    n = table.shape[0]
    bad = (idx < 0) | (idx >= n)
    if bool(bad.any()):
        raise SplitError(f"train_indices contains {int(idx[bad][0])}, out of range for {n} samples (0..{n - 1})")
    rows = table[idx]
    for combo in combos:
        hit = (rows == torch.tensor(combo, dtype=torch.long)).all(1)
        if bool(hit.any()):
            where = idx[hit]
            shown = ", ".join(str(int(i)) for i in where[:5]) + (", ..." if where.numel() > 5 else "")
            raise SplitError(
                f"held-out combination {_fmt(factors, combo)} would reach training: {where.numel()} training "
                f"sample(s) have it (indices {shown})"
            )


def combination_split(
    labels: Mapping[str, torch.Tensor],
    factors: Sequence[str],
    holdout: Sequence[Any],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    num_classes: Mapping[str, int] | None = None,
    allow_absent_values: bool = False,
) -> dict[str, torch.Tensor]:
    """Split sample indices so that chosen factor combinations never reach training.

    Every sample whose factors form a held-out combination goes to ``unseen``. The other fully labelled
    samples are split within each combination (stratified): ``round(n * val_fraction)`` to ``val``,
    ``round(n * test_fraction)`` to ``test``, the rest (at least one) to ``train``, so every seen
    combination is trained on. Samples with an unlabelled factor go to train/val/test only when their
    labelled factors rule out every held-out combination (they are stratified as one extra group);
    otherwise they are dropped with a :class:`SplitWarning`, since they might belong to a held-out
    combination. The result depends only on the labels and ``seed``.

    Args:
        labels: ``{task: LongTensor[N]}`` labels of the whole dataset, ``-1`` for unlabelled.
        factors: The factor tasks defining combinations (the order of tuple combinations).
        holdout: Combinations to hold out, each a tuple of values in ``factors`` order or a dict
            ``{factor: value}`` naming every factor. Each must be a valid combination that occurs in the data.
        val_fraction: Share of each seen combination for validation.
        test_fraction: Share of each seen combination for testing.
        seed: Seed of the random assignment.
        num_classes: ``{factor: K}`` to validate held-out values against ``0..K-1``; by default a value must
            occur in the data.
        allow_absent_values: If False (default), refuse a hold-out that leaves some factor value (present in
            the data) with no training sample; if True, only warn (:class:`SplitWarning`).

    Returns:
        ``{"train", "val", "test", "unseen": LongTensor of indices}``, each sorted ascending, pairwise disjoint.

    Raises:
        SplitError: Naming the combination or argument: an invalid or absent held-out combination, fractions
            outside ``[0, 1)`` or summing to 1 or more, or (unless ``allow_absent_values``) a factor value that
            would be absent from training.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise SplitError(f"{name}: expected a number in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1:
        raise SplitError(
            f"val_fraction + test_fraction must be < 1 to leave training data; got {val_fraction} + {test_fraction}"
        )
    factors = list(factors) if isinstance(factors, Sequence) and not isinstance(factors, str) else factors
    table = _factor_table(labels, factors)
    combos = _normalise_holdout(holdout, factors, table, num_classes)
    n = table.shape[0]
    labelled = (table != UNLABELLED).all(1)
    held = torch.zeros(n, dtype=torch.bool)
    for combo in combos:
        held |= (table == torch.tensor(combo, dtype=torch.long)).all(1) & labelled
    ambiguous = ~labelled & _may_match(table, combos)
    if bool(ambiguous.any()):
        warnings.warn(
            f"combination_split: dropped {int(ambiguous.sum())} sample(s) with an unlabelled factor that might "
            "belong to a held-out combination",
            SplitWarning,
            stacklevel=2,
        )

    # groups: each seen combination, plus one group of partially labelled samples that are safe to train on
    seen = labelled & ~held
    keys, inverse = (
        torch.unique(table[seen], dim=0, return_inverse=True)
        if bool(seen.any())
        else (torch.zeros(0, len(factors), dtype=torch.long), torch.zeros(0, dtype=torch.long))
    )
    group = torch.full((n,), -1, dtype=torch.long)
    group[seen] = inverse
    group[~labelled & ~ambiguous] = keys.shape[0]

    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for g in range(keys.shape[0] + 1):
        members = (group == g).nonzero().flatten()
        m = members.numel()
        if m == 0:
            continue
        members = members[torch.randperm(m, generator=gen)]
        n_val, n_test = round(m * val_fraction), round(m * test_fraction)
        while n_val + n_test >= m and n_val + n_test > 0:  # keep at least one sample for training
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    out = {
        name: torch.sort(torch.cat(chunks)).values if chunks else torch.zeros(0, dtype=torch.long)
        for name, chunks in parts.items()
    }
    out["unseen"] = held.nonzero().flatten()

    # every factor value present in the (fully labelled) data should remain in training
    train_rows = table[out["train"]]
    for c, f in enumerate(factors):
        everywhere = set(table[labelled, c].tolist())
        in_train = set(train_rows[:, c][train_rows[:, c] != UNLABELLED].tolist())
        lost = sorted(everywhere - in_train)
        if lost:
            culprits = [combo for combo in combos if combo[c] in lost]
            message = (
                f"holding out {', '.join(_fmt(factors, k) for k in culprits)} leaves factor {f!r} value(s) {lost} "
                "with no training sample, so nothing could learn them"
            )
            if not allow_absent_values:
                raise SplitError(message + "; hold out fewer combinations, or pass allow_absent_values=True")
            warnings.warn(message, SplitWarning, stacklevel=2)
    check_no_leak(out["train"], labels, factors, combos)
    return out
