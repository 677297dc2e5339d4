import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtdisent as md


def test_readme_example_shapes(two_tasks):
    model = md.build_model(two_tasks)
    x = torch.randn(5, 1, 16, 24)
    preds = model.predict(x)
    assert set(preds) == {"plane", "shadow"}
    assert preds["plane"].dtype == torch.long and preds["plane"].shape == (5,)
    assert preds["plane"].max() < 3 and preds["shadow"].max() < 2
    feats = model.features(x)
    assert feats["plane"].shape == (5, 16 * 4 * 6) and not feats["plane"].requires_grad
    out = model(x)
    assert out.logits["plane"].shape == (5, 3) and out.logits["shadow"].shape == (5, 2)
    members = [f"#{m}" if m else "" for m in range(two_tasks.adversary.ensemble)]  # a->b, a->b#1, ...
    assert set(out.adversary_logits) == {f"{k}{m}" for k in ("plane->shadow", "shadow->plane") for m in members}
    assert out.adversary_logits["plane->shadow"].shape == (5, 2)
    assert out.adversary_logits["shadow->plane"].shape == (5, 3)
    assert model.training  # predict/features restore the mode
    assert model.penultimate(x)["plane"].shape == (5, 8)
    probs = model.predict_proba(x)["plane"]
    assert torch.allclose(probs.sum(-1), torch.ones(5))


def test_modules_reachable_by_name(two_tasks):
    model = md.build_model(two_tasks)
    assert model.adversary("plane", "shadow") is model.adversaries["plane->shadow"]
    assert isinstance(model.encoders["plane"], torch.nn.Module)
    with pytest.raises(md.ComponentError, match="no adversary 'plane->plane'"):
        model.adversary("plane", "plane")
    main_ids = {id(p) for p in model.main_parameters()}
    adv_ids = {id(p) for p in model.adversary_parameters()}
    assert not main_ids & adv_ids
    assert len(main_ids) + len(adv_ids) == len(list(model.parameters()))


def test_build_is_seeded(two_tasks):
    a, b = md.build_model(two_tasks), md.build_model(two_tasks)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = md.build_model(two_tasks.model_copy(update={"seed": 1}))
    assert not torch.equal(a.encoders["plane"].stem[1].weight, c.encoders["plane"].stem[1].weight)


def test_per_task_head_override():
    e = md.preset("paper_fetal_us", input_shape=(1, 32, 32))
    for heads in ("stacked", "separate"):
        state = md.build_model(e.model_copy(update={"execution": md.ExecutionSpec(heads=heads)})).state_dict()
        dense = {
            t: [k for k, v in state.items() if k.startswith(f"classifiers.{t}.") and v.ndim == 2] for t in e.task_names
        }
        assert len(dense["plane"]) == 3, dense  # three dense layers, as in the paper
        assert len(dense["shadow"]) == 2, dense


def test_heterogeneous_backbones():
    e = md.Experiment(
        tasks=[
            md.Task(name="a", num_classes=2),
            md.Task(
                name="b",
                num_classes=3,
                backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}},
            ),
        ],
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2]}},
        input_shape=(1, 8, 8),
        adversary={"conditional": False, "layout": "pair"},
    )
    model = md.build_model(e)
    assert model.feature_sizes == {"a": 8 * 4 * 4, "b": 8}
    assert model.adversaries["a->b"].in_features == 128 and model.adversaries["b->a"].in_features == 8


def test_input_shape_errors(two_tasks):
    with pytest.raises(md.SpecError, match="input_shape: not set"):
        md.build_model(two_tasks.model_copy(update={"input_shape": None}))
    model = md.build_model(two_tasks)
    with pytest.raises(md.MtdisentError, match=r"shape \(B, 1, 16, 24\)"):
        model.predict(torch.randn(2, 3, 16, 24))


def test_integer_images_are_refused_naming_the_dtype(two_tasks):
    model = md.build_model(two_tasks)
    images = torch.randint(0, 256, (2, 1, 16, 24), dtype=torch.uint8)
    for call in (model.predict, model.predict_proba, model.features, model.penultimate):
        with pytest.raises(md.MtdisentError) as info:
            call(images)
        message = str(info.value)
        assert "\n" not in message
        assert "torch.uint8" in message and "floating-point" in message and "torch.float32" in message
    assert set(model.predict(images.float() / 255)) == {"plane", "shadow"}  # the conversion it suggests works


def test_indivisible_input_names_backbone_and_valid_sizes(two_tasks):
    with pytest.raises(md.ComponentError) as info:
        md.build_model(two_tasks.model_copy(update={"input_shape": (1, 15, 24)}))
    assert "dltk_residual" in str(info.value) and "multiples of 4" in str(info.value)


def test_unknown_backbone_argument_is_named(two_tasks):
    bad = two_tasks.model_copy(update={"backbone": md.Component(name="dltk_residual", args={"filtrs": [4]})})
    with pytest.raises(md.ComponentError) as info:
        md.build_model(bad)
    assert "'filtrs'" in str(info.value) and "Did you mean 'filters'" in str(info.value)
    assert "task 'plane'" in str(info.value)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.data())
def test_adversary_set_matches_enabled_pairs(n, data):
    names = [f"t{i}" for i in range(n)]
    classes = {nm: data.draw(st.integers(2, 5)) for nm in names}
    ordered = [(s, t) for s in names for t in names if s != t]
    mask = data.draw(st.lists(st.booleans(), min_size=len(ordered), max_size=len(ordered)))
    pairs = [md.Pair(source=s, target=t, enabled=m) for (s, t), m in zip(ordered, mask, strict=True)]
    e = md.Experiment(
        tasks=[md.Task(name=nm, num_classes=classes[nm]) for nm in names],
        backbone={"name": "dltk_residual", "args": {"filters": [2, 2], "strides": [1, 2], "output": "pool"}},
        input_shape=(1, 4, 4),
        head={"hidden": []},
        adversary={"head": {"hidden": [3]}, "ensemble": 1, "conditional": False, "layout": "pair"},
        pairs=pairs,
    )
    model = md.build_model(e)
    expected = {f"{s}->{t}" for (s, t), m in zip(ordered, mask, strict=True) if m}
    assert set(model.adversaries.keys()) == expected
    for (s, t), m in zip(ordered, mask, strict=True):
        if m:
            adv = model.adversary(s, t)
            assert adv.in_features == model.feature_sizes[s]
            assert adv.num_classes == classes[t]
    out = model(torch.randn(2, 1, 4, 4))
    assert set(out.adversary_logits) == expected
    for key, logits in out.adversary_logits.items():
        assert logits.shape == (2, classes[key.split("->")[1]])
