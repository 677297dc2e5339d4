"""Levers for disentanglement that holds: adversary ensembles, re-initialisation, HSIC, leakage-limited selection."""

from __future__ import annotations

import math
from importlib import import_module

import pytest
import torch
from conftest import iterate
from hypothesis import given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent._heads import HeadGroup, MLPHead
from mtdisent.engine import Selection, build_loop, validation_leakage
from mtdisent.testing import check_objective

TINY = {"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}}


def experiment(objective=None, training=None, **adversary):
    return md.Experiment(
        tasks=[{"name": "shape", "classes": ["circle", "rectangle"]}, {"name": "background", "classes": ["w", "b"]}],
        backbone=TINY,
        head={"hidden": [16]},
        adversary={
            "objective": objective or {"name": "minmax"},
            "weight": 0.5,
            "steps": 2,
            "features": "reuse",
            "head": {"hidden": [16]},
            **adversary,
        },
        data={"name": "shapes", "args": {"scale": 0.0625, "seed": 0}},
        training={"iterations": 12, "batch_size": 16, "checkpoint_every": 6, "log_every": 1, "device": "cpu"}
        | (training or {}),
    )


# -- ensembles ---------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 5), m=st.integers(1, 4), data=st.data())
def test_ensemble_expands_every_enabled_pair_into_m_members_sharing_its_weight(n, m, data):
    names = [f"t{i}" for i in range(n)]
    ordered = [(a, b) for a in names for b in names if a != b]
    off = data.draw(st.sets(st.sampled_from(ordered)))
    e = md.Experiment(
        tasks=[{"name": t, "num_classes": 2} for t in names],
        input_shape=(1, 8, 8),
        adversary={"ensemble": m},
        pairs=[{"source": a, "target": b, "enabled": False} for a, b in off],
    )
    pairs = e.adversary_pairs()
    enabled = [pair for pair in ordered if pair not in off]
    assert [(p.source, p.target) for p in pairs] == [pair for pair in enabled for _ in range(m)]
    assert [p.member for p in pairs] == list(range(m)) * len(enabled)
    assert all(math.isclose(p.weight, 1.0 / m) for p in pairs)
    assert len({p.key for p in pairs}) == len(pairs)  # every member has its own module
    assert all(p.key == p.pair_key for p in pairs if p.member == 0)  # ensemble=1 keys are unchanged


def test_ensemble_members_start_different_and_are_all_opposed():
    model = md.build_model(experiment(ensemble=3, conditional=False, layout="pair"), (1, 28, 36))
    a, b = model.adversaries["shape->background"], model.adversaries["shape->background#1"]
    z = torch.randn(5, model.feature_sizes["shape"])
    model.eval()
    assert not torch.allclose(a(z), b(z))
    assert len(model.pairs) == 6 and model.pair_classes == [2] * 6


def test_evaluate_reports_the_strongest_ensemble_member():
    model = md.train(experiment(ensemble=2, layout="pair", training={"iterations": 2}), quiet=True).model
    with torch.no_grad():  # member 0 always says "white", member 1 always "black"
        for key, label in (("shape->background", 0), ("shape->background#1", 1)):
            head = model.adversaries[key]
            head._stack.out_weight[head.index].zero_()
            head._stack.out_bias[head.index].zero_()
            head._stack.out_bias[head.index, label] = 10.0
    test = md.datasets.get("shapes")(scale=0.0625, seed=0)["test"]
    only_black = torch.utils.data.Subset(test, [i for i in range(len(test)) if test[i][1]["background"] == 1])
    report = md.evaluate(model, data=only_black, probe_data=False, device="cpu")
    assert report.adversary_accuracy[("shape", "background")] == 1.0  # not member 0's 0.0, not the mean


# -- re-initialisation --------------------------------------------------------------------------------
@pytest.mark.parametrize("stacked", [True, False])
def test_reinitialise_gives_exactly_a_fresh_head_and_leaves_the_others(stacked):
    spec = md.HeadSpec(hidden=[8])
    heads = {n: MLPHead(6, k, spec) for n, k in (("a", 2), ("b", 3), ("c", 2))}
    group = HeadGroup(heads, dict.fromkeys(heads, spec), stacked)
    before = {k: v.clone() for k, v in group.state_dict().items()}
    group.reinitialise(["b"], seed=123)
    torch.manual_seed(123)
    fresh = MLPHead(6, 3, spec).state_dict()
    after = group.state_dict()
    for k, v in after.items():
        name, rest = k.split(".", 1)
        if name == "b":
            assert torch.equal(v, fresh[rest]), k
        else:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("stacked", [True, False])
def test_head_copy_is_independent_and_load_head_writes_back_only_that_head(stacked):
    spec = md.HeadSpec(hidden=[8])
    heads = {n: MLPHead(6, k, spec) for n, k in (("a", 2), ("b", 3), ("c", 2))}
    group = HeadGroup(heads, dict.fromkeys(heads, spec), stacked).eval()
    x = torch.randn(5, 6)
    copy = group.head("b").eval()
    torch.testing.assert_close(copy(x), group["b"](x))  # the copy computes what the head computes
    before = {k: v.clone() for k, v in group.state_dict().items()}
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)
        copy.body[1].running_mean.fill_(0.5)
    assert group.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in group.state_dict().items())  # a copy, not a view
    group.load_head("b", copy)
    for k, v in group.state_dict().items():
        name, rest = k.split(".", 1)
        assert torch.equal(v, copy.state_dict()[rest] if name == "b" else before[k]), k


def test_reinit_rotates_through_members_on_schedule_and_resume_is_exact(tmp_path):
    e = experiment(ensemble=2, reinit_every=3, training={"iterations": 10, "checkpoint_every": 4})
    run = md.train(e, quiet=True)
    reinit = {h["iteration"]: h["adv_reinit"] for h in run.history if "adv_reinit" in h}
    assert reinit == {4: 0, 7: 1, 10: 0}  # after the main steps of iterations 3, 6, 9 (0-based)
    md.train(e.model_copy(update={"training": e.training.model_copy(update={"iterations": 5})}), out_dir=tmp_path)
    resumed = md.train(e, out_dir=tmp_path, resume=True, quiet=True)
    for (k, v), w in zip(run.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_reinit_restarts_the_adversary_optimiser():
    e = experiment(reinit_every=2, layout="pair", training={"iterations": 2})
    loop = build_loop(e)
    step = loop.step
    iterate(loop)
    assert step.adversary_optimizer.state  # SGD momentum buffers exist after an adversary step
    iterate(loop)  # iteration index 1: no re-initialisation yet
    w = loop.model.adversaries["shape->background"]._stack.out_weight.detach().clone()
    member = step.reinitialise_adversaries(2)
    assert member == 0 and not step.adversary_optimizer.state
    assert not torch.equal(w, loop.model.adversaries["shape->background"]._stack.out_weight)


# -- HSIC ----------------------------------------------------------------------------------------------
def test_normalised_hsic_by_hand():
    normalised_hsic = import_module(md.objectives.get("hsic").__module__).normalised_hsic
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    onehot = torch.nn.functional.one_hot(y, 2).float()
    assert normalised_hsic(onehot, y, 2, "linear").item() == pytest.approx(1.0)  # K = L
    assert normalised_hsic(onehot * 5 + 3, y, 2, "gaussian").item() == pytest.approx(1.0, abs=1e-5)
    # features constant within classes of y but ordered along another factor: independent of y here
    other = torch.tensor([[0.0], [0.0], [1.0], [1.0], [2.0], [2.0]])  # each value once per class
    assert normalised_hsic(other, y, 2, "linear").item() == pytest.approx(0.0, abs=1e-6)
    assert normalised_hsic(other, y, 2, "gaussian").item() == pytest.approx(0.0, abs=1e-6)
    # by hand, linear kernel: z = [1, 0, 0, 0], y = [0, 0, 1, 1]: <Kc, Lc> / (|Kc| |Lc|)
    z = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    y2 = torch.tensor([0, 0, 1, 1])
    h = torch.eye(4) - 0.25
    onehot2 = torch.nn.functional.one_hot(y2).float()
    kc, lc = h @ (z @ z.t()) @ h, h @ (onehot2 @ onehot2.t()) @ h
    expected = float((kc * lc).sum() / (kc.norm() * lc.norm()))
    assert normalised_hsic(z, y2, 2, "linear").item() == pytest.approx(expected)
    # zc = [.75, -.25, -.25, -.25]: <Kc, Lc> = sum over classes (sum of zc)^2 = .25 + .25, |Kc| = |zc|^2 = .75,
    # Lc has entries +-.5 so |Lc| = 2: 0.5 / 1.5
    assert expected == pytest.approx(1 / 3)


def test_conditional_hsic_spares_features_that_only_encode_their_own_task():
    """Shape and background correlated (circles on white): shape-only features pass the conditional test."""
    hsic = md.objectives.get("hsic")
    shape = torch.tensor([0] * 12 + [1] * 12)
    background = torch.tensor([0] * 12 + [0] * 4 + [1] * 8)  # circles always white, rectangles mostly black
    shape_only = torch.nn.functional.one_hot(shape, 2).float()
    both = torch.cat([shape_only, torch.nn.functional.one_hot(background, 2).float()], 1)
    weights = torch.ones(1)

    def term(objective, z):
        return float(objective.feature_terms([z], background[None], weights, [2], shape[None])[0])

    conditional, marginal = hsic(), hsic(conditional=False)
    assert term(marginal, shape_only) > 0.3  # the marginal penalty punishes the shape itself
    assert term(conditional, shape_only) < 1e-6  # the conditional one does not
    assert term(conditional, both) > 0.5  # but it does punish the background carried beyond the shape


@pytest.mark.parametrize(
    "args", [{}, {"conditional": False}, {"kernel": "linear"}, {"adversary": "confusion"}, {"adversary": "minmax"}]
)
def test_hsic_variants_pass_the_conformance_kit(args):
    objective = check_objective("hsic", args=args)
    assert objective.uses_adversaries is ("adversary" in args)


def test_hsic_rejects_bad_arguments_by_name():
    hsic = md.objectives.get("hsic")
    with pytest.raises(md.ComponentError, match="kernel='rbf'"):
        hsic(kernel="rbf")
    with pytest.raises(md.ComponentError, match="adversary='grl'.*'minmax' or 'confusion'"):
        hsic(adversary="grl")
    with pytest.raises(md.ComponentError, match="min_group"):
        hsic(min_group=1)
    with pytest.raises(md.ComponentError, match="'kernal'.*kernel"):
        md.objectives.create("hsic", {"kernal": "linear"})


def test_hsic_alone_adds_its_penalty_and_keeps_adversaries_as_monitors():
    first = {}
    hsic = {"name": "hsic", "args": {"conditional": False}}  # the first batch has no white rectangle: the
    for weight in (0.0, 5.0):  # conditional term is 0 there, the marginal one is not
        run = md.train(experiment(objective=hsic, weight=weight, training={"iterations": 3}), quiet=True)
        first[weight] = run.history[0]["loss/main"]
        assert "adv_acc/shape->background" in run.history[-1]  # adversaries still train, as monitors
    assert first[5.0] > first[0.0] + 1e-3  # same weights and batch: the difference is 5 x the HSIC terms


# -- selection under a leakage limit -------------------------------------------------------------------
def test_validation_leakage_reads_what_the_features_carry():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    informative = torch.nn.functional.one_hot(y, 2).float() + 0.1 * torch.randn(200, 2, generator=g)
    noise = torch.randn(200, 4, generator=g)
    leak = validation_leakage({"a": informative, "b": noise}, {"a": y, "b": y}, [("a", "b", 2), ("b", "a", 2)])
    assert leak["a->b"] > 0.95
    assert abs(leak["b->a"]) < 0.2


def test_selection_prefers_checkpoints_within_the_leakage_limit():
    rule = Selection.from_spec(experiment(training={"leakage_limit": 0.2}).training)

    def val(score, leakage):
        return {"val_mean_acc": score, "val_leakage": leakage}

    assert rule.is_better(val(0.5, 0.9), None)
    best = val(0.9, 0.5)
    assert rule.is_better(val(0.6, 0.1), best)  # within the limit beats outside it
    assert rule.is_better(val(0.5, 0.4), best)  # both outside: lower leakage wins
    assert not rule.is_better(val(0.5, 0.6), best)
    best = val(0.8, 0.1)
    assert not rule.is_better(val(0.99, 0.3), best)
    assert rule.is_better(val(0.81, 0.15), best)
    assert not rule.is_better(val(0.79, 0.0), best)
    assert Selection("mean_acc", "min").is_better(val(0.1, 0), val(0.2, 0))  # a metric to minimise
    with pytest.raises(md.SpecError, match="select_metric.*'mean_acc'"):
        Selection("mean_accuracy").is_better(val(0.1, 0), val(0.2, 0))


def test_validate_reports_leakage_per_pair_when_a_limit_is_set():
    e = experiment(training={"leakage_limit": 0.5, "iterations": 2, "eval_every": 2})
    run = md.train(e, quiet=True)
    assert run.best is not None
    assert {"val_leakage/shape->background", "val_leakage/background->shape", "val_leakage"} <= set(run.best)
    assert run.best["val_leakage"] == max(
        run.best["val_leakage/shape->background"], run.best["val_leakage/background->shape"]
    )


class FirstIsBest(md.Metric):
    """A validation metric that falls with every validation: selecting on it keeps the first checkpoint."""

    def __init__(self):
        super().__init__()
        self.validations = 0

    def update(self, logits, labels):
        pass

    def compute(self):
        self.validations += 1
        return {"first": -float(self.validations)}


def test_evaluating_a_run_at_best_uses_the_selected_checkpoint(tmp_path):
    # selection on FirstIsBest marks only the first validation (iteration 2) best; the run trains on to 6
    e = experiment(training={"iterations": 6, "eval_every": 2, "checkpoint_every": 6, "select_metric": "first"})
    on_disk = md.train(e, out_dir=tmp_path, quiet=True, metrics=[FirstIsBest()])
    in_memory = md.train(e, quiet=True, metrics=[FirstIsBest()])
    assert [h["val_first"] for h in on_disk.history if "val_first" in h] == [-1.0, -2.0, -3.0]
    assert on_disk.best["val_score"] == -1.0
    assert on_disk.best["iteration"] == in_memory.best["iteration"] == 2
    saved = md.load(tmp_path / "checkpoints" / "best").state_dict()
    for run in (on_disk, in_memory):
        best, final = run.model_at("best").state_dict(), run.model_at("final").state_dict()
        assert all(torch.equal(best[k].cpu(), saved[k]) for k in saved)
        assert any(not torch.equal(best[k], final[k]) for k in final if final[k].is_floating_point())
        assert run.model_at("final") is run.model and run.model_at("latest") is run.model
    best_model = md.load(tmp_path / "checkpoints" / "best")
    report = md.evaluate(in_memory, split="test", which="best", probe_data=False, device="cpu")
    expected = md.evaluate(best_model, split="test", probe_data=False, device="cpu")
    assert report.accuracy == expected.accuracy
    with pytest.raises(md.MtdisentError, match="expected 'final', 'best' or 'latest'"):
        in_memory.model_at("middle")
    in_memory.best_state = None  # weights of an earlier best that were not kept cannot be made up
    with pytest.raises(md.MtdisentError, match="iteration 2.*not kept"):
        md.evaluate(in_memory, split="test", probe_data=False)


# -- conditional adversaries ---------------------------------------------------------------------------
def test_conditional_adversaries_read_features_and_the_sources_own_label():
    e = md.Experiment(
        tasks=[{"name": "a", "num_classes": 3}, {"name": "b", "num_classes": 2}],
        input_shape=(1, 16, 16),
        backbone=TINY,
        head={"hidden": [8]},
        adversary={"conditional": True, "ensemble": 1, "head": {"hidden": [8]}, "layout": "pair"},
    )
    model = md.build_model(e)
    d = model.feature_sizes["a"]
    assert model.adversaries["a->b"].in_features == d + 3 and model.adversaries["b->a"].in_features == d + 2
    feats = {"a": torch.zeros(4, d), "b": torch.zeros(4, d)}
    labels = {"a": torch.tensor([0, 2, -1, 1]), "b": torch.tensor([1, 0, 1, -1])}
    inputs = model.adversary_inputs(feats, labels)
    assert torch.equal(inputs[0][:, d:], torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]]))  # a's label
    assert torch.equal(inputs[1][:, d:], torch.tensor([[0.0, 1], [1, 0], [0, 1], [0, 0]]))  # b's; -1 -> zeros
    assert model.stack_adversary_inputs(feats, labels) is None  # different widths: no single stack
    with pytest.raises(md.MtdisentError, match="pass labels"):
        model.adversary_logits(feats)
    out = model(torch.randn(4, 1, 16, 16))  # forward conditions on the classifiers' predictions
    assert out.adversary_logits["a->b"].shape == (4, 2) and out.adversary_logits["b->a"].shape == (4, 3)


def test_a_conditional_adversary_gains_nothing_from_labels_the_features_do_not_carry():
    """Labels alone decide the logits when the features are constant: the label is really an input."""
    e = md.Experiment(
        tasks=[{"name": "a", "num_classes": 2}, {"name": "b", "num_classes": 2}],
        input_shape=(1, 16, 16),
        backbone=TINY,
        adversary={"conditional": True, "head": {"hidden": [8], "batchnorm": False}},
    )
    model = md.build_model(e).eval()
    d = model.feature_sizes["a"]
    feats = {"a": torch.zeros(2, d), "b": torch.zeros(2, d)}
    logits = model.adversary_logits(feats, labels={"a": torch.tensor([0, 1]), "b": torch.tensor([0, 1])})
    assert not torch.allclose(logits[0, 0], logits[0, 1])


@pytest.mark.parametrize("heads", ["stacked", "separate"])
def test_conditional_adversaries_train_with_reused_and_fresh_features(heads):
    for features in ("reuse", "fresh"):
        e = experiment(conditional=True, features=features, training={"iterations": 3})
        e = e.model_copy(update={"execution": md.ExecutionSpec(heads=heads)})
        run = md.train(e, quiet=True)
        assert all(math.isfinite(h["loss/main"]) for h in run.history)
        report = md.evaluate(run, split="test", probe_data=False, device="cpu")
        assert set(report.adversary_accuracy) == {("shape", "background"), ("background", "shape")}
