import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent.evaluation import SplitError, SplitWarning, check_no_leak, combination_split

FACTORS = ["shape", "bg"]  # shape: 0 circle, 1 rectangle; bg: 0 black, 1 white


def paper_like_labels(seed=0):
    """Counts per (shape, bg): circle/white 60, rectangle/white 20, rectangle/black 50, circle/black 30, shuffled."""
    counts = {(0, 1): 60, (1, 1): 20, (1, 0): 50, (0, 0): 30}
    rows = [combo for combo, n in counts.items() for _ in range(n)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    table = torch.tensor(rows)[order]
    return {"shape": table[:, 0].clone(), "bg": table[:, 1].clone(), "other": torch.zeros(len(rows), dtype=torch.long)}


def combos_of(labels, idx):
    return {(int(labels["shape"][i]), int(labels["bg"][i])) for i in idx}


def test_paper_protocol_holds_out_circle_on_black_only():
    labels = paper_like_labels()
    splits = combination_split(labels, FACTORS, [(0, 0)], val_fraction=0.1, test_fraction=0.2, seed=0)
    assert set(splits) == {"train", "val", "test", "unseen"}
    circle_black = ((labels["shape"] == 0) & (labels["bg"] == 0)).nonzero().flatten()
    assert splits["unseen"].tolist() == circle_black.tolist()  # exactly the held-out combination
    for name in ("train", "val", "test"):
        assert (0, 0) not in combos_of(labels, splits[name])
    assert combos_of(labels, splits["train"]) == {(0, 1), (1, 1), (1, 0)}  # circle and black still trained on
    everything = torch.cat([splits[k] for k in ("train", "val", "test", "unseen")])
    assert sorted(everything.tolist()) == list(range(160))  # a partition
    for name, idx in splits.items():
        assert idx.dtype == torch.long and idx.tolist() == sorted(idx.tolist()), name
    # stratified: round(n * fraction) of each seen combination
    assert len(splits["val"]) == round(60 * 0.1) + round(20 * 0.1) + round(50 * 0.1)
    assert len(splits["test"]) == round(60 * 0.2) + round(20 * 0.2) + round(50 * 0.2)
    check_no_leak(splits["train"], labels, FACTORS, [(0, 0)])


def test_dict_and_tuple_holdouts_agree_and_split_is_deterministic():
    labels = paper_like_labels()
    a = combination_split(labels, FACTORS, [(0, 0)], seed=3)
    b = combination_split(labels, FACTORS, [{"bg": 0, "shape": 0}], seed=3)
    c = combination_split(labels, FACTORS, [(0, 0)], seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["unseen"], c["unseen"])
    assert not torch.equal(a["train"], c["train"])


def test_invalid_combination_is_refused_by_name():
    labels = paper_like_labels()
    with pytest.raises(SplitError, match=r"\(shape=0, bg=2\) is not a valid combination.*'bg'.*\[0, 1\]") as info:
        combination_split(labels, FACTORS, [(0, 2)])
    assert isinstance(info.value, md.MtdisentError) and isinstance(info.value, ValueError)
    with pytest.raises(SplitError, match=r"\(shape=0, bg=2\) is not a valid combination: factor 'bg' has classes 0..1"):
        combination_split(labels, FACTORS, [(0, 2)], num_classes={"shape": 2, "bg": 2})
    with pytest.raises(SplitError, match=r"combination \(0, 0, 1\) has 3 values but there are 2 factors"):
        combination_split(labels, FACTORS, [(0, 0, 1)])
    with pytest.raises(SplitError, match=r"must name every factor exactly: missing \['bg'\]"):
        combination_split(labels, FACTORS, [{"shape": 0}])
    with pytest.raises(SplitError, match="labels has no factor 'colour'"):
        combination_split(labels, ["shape", "colour"], [(0, 0)])
    with pytest.raises(SplitError, match="not an integer class index"):
        combination_split(labels, FACTORS, [("circle", 0)])


def test_combination_absent_from_the_data_is_refused():
    labels = paper_like_labels()
    keep = ~((labels["shape"] == 0) & (labels["bg"] == 0))
    labels = {k: v[keep] for k, v in labels.items()}
    with pytest.raises(SplitError, match=r"\(shape=0, bg=0\) does not occur in the data"):
        combination_split(labels, FACTORS, [(0, 0)], num_classes={"shape": 2, "bg": 2})


def test_holding_out_every_circle_is_refused_unless_allowed():
    labels = paper_like_labels()
    with pytest.raises(
        SplitError, match=r"\(shape=0, bg=0\), \(shape=0, bg=1\) leaves factor 'shape' value\(s\) \[0\]"
    ):
        combination_split(labels, FACTORS, [(0, 0), (0, 1)])
    with pytest.warns(SplitWarning, match="factor 'shape' value"):
        splits = combination_split(labels, FACTORS, [(0, 0), (0, 1)], allow_absent_values=True)
    assert combos_of(labels, splits["unseen"]) == {(0, 0), (0, 1)}
    assert len(splits["unseen"]) == 90


def test_check_no_leak_names_the_combination_and_indices():
    labels = paper_like_labels()
    leaked = int(((labels["shape"] == 0) & (labels["bg"] == 0)).nonzero()[0])
    train = torch.tensor([i for i in range(160) if (int(labels["shape"][i]), int(labels["bg"][i])) != (0, 0)])
    check_no_leak(train, labels, FACTORS, [(0, 0)])
    with pytest.raises(SplitError, match=rf"\(shape=0, bg=0\) would reach training: 1 training sample\(s\).*{leaked}"):
        check_no_leak([*train.tolist(), leaked], labels, FACTORS, [(0, 0)])
    with pytest.raises(SplitError, match="train_indices contains 500, out of range for 160 samples"):
        check_no_leak([0, 500], labels, FACTORS, [(0, 0)])


def test_partially_labelled_samples_go_to_training_only_when_they_cannot_be_held_out():
    labels = paper_like_labels()
    labels = {k: torch.cat([v, torch.tensor([0, 1, -1])]) for k, v in labels.items()}
    labels["bg"][-3:] = -1  # 160: circle, bg unknown (might be black); 161: rectangle, bg unknown; 162: nothing
    with pytest.warns(SplitWarning, match="dropped 2 sample"):
        splits = combination_split(labels, FACTORS, [(0, 0)])
    placed = torch.cat(list(splits.values())).tolist()
    assert 161 in placed and 160 not in placed and 162 not in placed
    assert 161 not in splits["unseen"].tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 1.0}, r"val_fraction: expected a number in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction: expected a number in \[0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
    ],
)
def test_bad_fractions(kwargs, match):
    with pytest.raises(SplitError, match=match):
        combination_split(paper_like_labels(), FACTORS, [(0, 0)], **kwargs)


def test_tiny_combinations_keep_a_training_sample():
    labels = {"a": torch.tensor([0, 1, 1, 0]), "b": torch.tensor([0, 0, 1, 1])}
    splits = combination_split(labels, ["a", "b"], [(1, 1)], val_fraction=0.5, test_fraction=0.4)
    assert sorted(splits["train"].tolist()) == [0, 1, 3]  # one sample per seen combination: all to training
    assert splits["unseen"].tolist() == [2]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=60),
    st.data(),
    st.integers(0, 3),
)
def test_split_properties(rows, data, seed):
    labels = {f: torch.tensor([r[c] for r in rows], dtype=torch.long) for c, f in enumerate(["x", "y", "z"])}
    present = sorted(set(rows))
    holdout = data.draw(st.lists(st.sampled_from(present), unique=True, max_size=len(present)))
    try:
        splits = combination_split(labels, ["x", "y", "z"], holdout, val_fraction=0.2, test_fraction=0.2, seed=seed)
    except SplitError as exc:  # only allowed when a factor value would vanish from training
        assert "with no training sample" in str(exc)
        seen = [r for r in rows if r not in holdout]
        assert any({r[c] for r in rows} - {r[c] for r in seen} for c in range(3))
        return
    unseen = {i for i, r in enumerate(rows) if r in holdout}
    assert set(splits["unseen"].tolist()) == unseen
    parts = [set(splits[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint
    assert set().union(*parts) == set(range(len(rows))) - unseen
    assert {rows[i] for i in parts[0]} == set(rows) - set(holdout)  # every seen combination is trained on
    again = combination_split(labels, ["x", "y", "z"], holdout, val_fraction=0.2, test_fraction=0.2, seed=seed)
    assert all(torch.equal(splits[k], again[k]) for k in splits)
