import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent.evaluation import (
    EvaluationError,
    TaskMetrics,
    accuracy,
    balanced_accuracy,
    combination_accuracy,
    combination_summary,
    confusion_matrix,
    majority_rate,
    normalised_leakage,
    per_class_accuracy,
    seen_combinations,
    task_metrics,
)

# A hand-checked 3-class example; the last sample is unlabelled (its prediction 2 must be ignored).
#   true 0: predicted 0, 0, 1     -> row [2, 1, 0], recall 2/3
#   true 1: predicted 1, 0        -> row [1, 1, 0], recall 1/2
#   true 2: predicted 2, 2, 2, 0  -> row [1, 0, 3], recall 3/4
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
PRED = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 0, 2])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.dtype == torch.long
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 3]]


def test_accuracy_and_balanced_accuracy_by_hand():
    assert accuracy(PRED, TARGET) == pytest.approx(6 / 9)
    assert accuracy(PRED, TARGET, 3) == pytest.approx(6 / 9)
    assert per_class_accuracy(PRED, TARGET, 3) == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    # mean of the recalls: (2/3 + 1/2 + 3/4) / 3 = 23/36
    assert balanced_accuracy(PRED, TARGET, 3) == pytest.approx(23 / 36)


def test_absent_class_is_none_and_skipped_by_balanced_accuracy():
    assert per_class_accuracy(PRED, TARGET, 4)[3] is None
    assert balanced_accuracy(PRED, TARGET, 4) == pytest.approx(23 / 36)
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.shape == (4, 4) and cm[3].sum() == 0 and cm[:, 3].sum() == 0


def test_unlabelled_samples_are_excluded_whatever_their_prediction():
    target = torch.tensor([1, -1, -1, 0])
    pred = torch.tensor([1, 0, 7, 1])  # 7 is out of range but belongs to an unlabelled sample
    assert confusion_matrix(pred, target, 2).tolist() == [[0, 1], [0, 1]]
    assert accuracy(pred, target, 2) == pytest.approx(0.5)
    m = task_metrics(pred, target, 2)
    assert m.n == 2


def test_nothing_labelled_gives_nan():
    t = torch.tensor([-1, -1])
    p = torch.tensor([0, 1])
    assert math.isnan(accuracy(p, t, 2))
    assert math.isnan(balanced_accuracy(p, t, 2))
    assert per_class_accuracy(p, t, 2) == [None, None]
    assert math.isnan(majority_rate(t, 2))
    m = task_metrics(p, t, 2)
    assert m.n == 0 and m.to_dict()["accuracy"] is None


def test_task_metrics_matches_the_parts_and_is_json():
    m = task_metrics(PRED, TARGET, 3)
    assert isinstance(m, TaskMetrics)
    assert m.accuracy == pytest.approx(6 / 9)
    assert m.balanced_accuracy == pytest.approx(23 / 36)
    assert m.per_class_accuracy == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert m.confusion == [[2, 1, 0], [1, 1, 0], [1, 0, 3]]
    assert m.n == 9
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["confusion"] == m.confusion and d["n"] == 9
    assert task_metrics(PRED, TARGET, 4).to_dict()["per_class_accuracy"][3] is None


@pytest.mark.parametrize(
    ("pred", "target", "k", "match"),
    [
        (torch.tensor([0, 1]), torch.tensor([0]), 2, "pred has 2 entries but target has 1"),
        (torch.tensor([0, 1]), torch.tensor([0, 3]), 2, r"target\[1\] = 3 is out of range; expected 0..1 or -1"),
        (torch.tensor([0, 1]), torch.tensor([0, -2]), 2, r"target\[1\] = -2"),
        (torch.tensor([0, 5]), torch.tensor([0, 1]), 2, "pred contains class 5"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2, "pred: expected a 1-D integer tensor"),
        (torch.tensor([[0, 1]]), torch.tensor([0, 1]), 2, r"pred: expected a 1-D tensor .* shape \(1, 2\)"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), 0, "num_classes: expected a positive integer"),
    ],
)
def test_bad_inputs_are_named(pred, target, k, match):
    with pytest.raises(EvaluationError, match=match) as info:
        confusion_matrix(pred, target, k)
    assert isinstance(info.value, md.MtdisentError) and isinstance(info.value, ValueError)


def test_lists_are_accepted():
    assert confusion_matrix([0, 1, 1], [0, 1, -1], 2).tolist() == [[1, 0], [0, 1]]


def test_majority_rate_and_normalised_leakage_by_hand():
    # labelled counts [3, 2, 4] -> majority 4/9
    assert majority_rate(TARGET, 3) == pytest.approx(4 / 9)
    # (2/3 - 4/9) / (1 - 4/9) = (2/9) / (5/9) = 0.4
    assert normalised_leakage(6 / 9, 4 / 9) == pytest.approx(0.4)
    assert normalised_leakage(0.5, 0.5) == 0.0
    assert normalised_leakage(1.0, 0.5) == 1.0
    assert normalised_leakage(0.25, 0.5) == pytest.approx(-0.5)  # below majority: negative, not clipped
    assert math.isnan(normalised_leakage(0.7, 1.0))  # constant target: undefined
    assert math.isnan(normalised_leakage(math.nan, 0.5))
    assert math.isnan(normalised_leakage(0.5, math.nan))


# shape (task scored) and bg (factor); row 6 has no shape label and row 7 no bg label
SHAPE = torch.tensor([0, 0, 1, 1, 1, 0, -1, 1])
BG = torch.tensor([0, 1, 0, 1, 1, 1, 0, -1])
SHAPE_PRED = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
#   row: combo  correct
#   0: (0, 0)  yes   1: (0, 1) no   2: (1, 0) yes   3: (1, 1) no   4: (1, 1) yes   5: (0, 1) yes


def test_combination_accuracy_by_hand():
    preds, labels = {"shape": SHAPE_PRED}, {"shape": SHAPE, "bg": BG}
    per = combination_accuracy(preds, labels, "shape", ["shape", "bg"])
    assert per == {(0, 0): (1.0, 1), (0, 1): (0.5, 2), (1, 0): (1.0, 1), (1, 1): (0.5, 2)}
    assert list(per) == sorted(per)
    assert combination_accuracy(preds, labels, "shape", ["bg"]) == {(0,): (1.0, 2), (1,): (0.5, 4)}


def test_combination_summary_by_hand():
    per = combination_accuracy({"shape": SHAPE_PRED}, {"shape": SHAPE, "bg": BG}, "shape", ["shape", "bg"])
    seen = seen_combinations({"shape": torch.tensor([0, 1, 1, -1]), "bg": torch.tensor([1, 0, 1, 0])}, ["shape", "bg"])
    assert seen == {(0, 1), (1, 0), (1, 1)}
    s = combination_summary(per, seen)
    assert s.seen_accuracy == pytest.approx(3 / 5)  # (1 + 1 + 1) correct of 2 + 1 + 2
    assert s.seen_n == 5 and s.unseen_n == 1
    assert s.unseen_accuracy == 1.0
    assert s.unseen_combinations == [(0, 0)]
    assert s.worst_combination == (0, 1) and s.worst_accuracy == 0.5  # tie with (1, 1): first in order
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["worst_combination"] == [0, 1]
    empty = combination_summary({}, seen)
    assert empty.worst_combination is None and math.isnan(empty.seen_accuracy)
    assert empty.to_dict()["unseen_accuracy"] is None


def test_combination_accuracy_errors_name_the_task():
    with pytest.raises(EvaluationError, match="no predictions for task 'bg'"):
        combination_accuracy({"shape": SHAPE_PRED}, {"shape": SHAPE, "bg": BG}, "bg", ["shape"])
    with pytest.raises(EvaluationError, match="no labels for factor 'colour'"):
        combination_accuracy({"shape": SHAPE_PRED}, {"shape": SHAPE, "bg": BG}, "shape", ["colour"])
    with pytest.raises(EvaluationError, match=r"factor labels \['bg'\] have 3; they must match"):
        combination_accuracy({"shape": SHAPE_PRED}, {"shape": SHAPE, "bg": BG[:3]}, "shape", ["bg"])


labelled_pairs = st.integers(1, 5).flatmap(
    lambda k: st.tuples(
        st.just(k),
        st.lists(st.tuples(st.integers(0, k - 1), st.integers(-1, k - 1)), min_size=0, max_size=40),
    )
)


@settings(max_examples=60, deadline=None)
@given(labelled_pairs)
def test_confusion_properties(case):
    k, rows = case
    pred = torch.tensor([p for p, _ in rows], dtype=torch.long)
    target = torch.tensor([t for _, t in rows], dtype=torch.long)
    cm = confusion_matrix(pred, target, k)
    n_labelled = sum(t >= 0 for _, t in rows)
    assert int(cm.sum()) == n_labelled
    assert cm.sum(1).tolist() == [sum(t == c for _, t in rows) for c in range(k)]
    acc = accuracy(pred, target, k)
    bal = balanced_accuracy(pred, target, k)
    if n_labelled:
        assert acc == pytest.approx(float(cm.trace()) / n_labelled)
        assert 0.0 <= bal <= 1.0
        maj = majority_rate(target, k)
        assert 1 / k - 1e-12 <= maj <= 1.0
        assert normalised_leakage(maj, maj) == 0.0 or math.isnan(normalised_leakage(maj, maj))
    else:
        assert math.isnan(acc) and math.isnan(bal)
    per = per_class_accuracy(pred, target, k)
    assert [r is None for r in per] == [int(cm[c].sum()) == 0 for c in range(k)]
    m = task_metrics(pred, target, k)
    assert m.confusion == cm.tolist() and m.n == n_labelled
    assert m.per_class_accuracy == per


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 2), st.integers(-1, 1), st.integers(0, 2)), max_size=40))
def test_combination_counts_add_up(rows):
    a = torch.tensor([r[0] for r in rows], dtype=torch.long)
    b = torch.tensor([r[1] for r in rows], dtype=torch.long)
    p = torch.tensor([r[2] for r in rows], dtype=torch.long)
    per = combination_accuracy({"a": p}, {"a": a, "b": b}, "a", ["a", "b"])
    assert sum(n for _, n in per.values()) == sum(r[0] >= 0 and r[1] >= 0 for r in rows)
    pooled = sum(acc * n for acc, n in per.values())
    mask = (a >= 0) & (b >= 0)
    assert pooled == pytest.approx(float((p[mask] == a[mask]).sum()))


def test_mean_std_by_hand():
    from mtdisent.evaluation import format_mean_std, mean_std

    mean, std, n = mean_std([0.2, 0.4, None, float("nan"), 0.9])
    assert n == 3 and mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert mean_std([0.7]) == (0.7, 0.0, 1)
    assert math.isnan(mean_std([None])[0])
    assert format_mean_std([0.2, 0.4]) == "0.300 ± 0.141"
    assert format_mean_std([]) == "-"
    assert format_mean_std([0.25, None]) == "0.250"
