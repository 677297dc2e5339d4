"""The intervene lever: the transform applied to the right rows, labels that follow it, seeded draws, exact resume."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ToyDataset, toy_experiment
from mtdisent_plugins.datasets.shapes import BG_LEVELS, SHAPES_N_FACTORS, _render_n
from mtdisent_plugins.levers.intervene import background, negate, shadow

import mtdisent as md
from mtdisent.testing import check_lever

NEGATE_B = {"task": "b", "transform": "negate", "target": 0, "source": [1, 2]}


def lever_model(seed=0, **args):
    e = toy_experiment(levers=[{"name": "intervene", "args": {**NEGATE_B, **args}}], seed=seed)
    model = md.build_model(e)
    return model, model.levers[0], SimpleNamespace(model=model, experiment=e)


def batch(n=20, seed=0, **kwargs):
    data = ToyDataset(n, seed=seed, **kwargs)
    x = torch.stack([data[i][0] for i in range(n)])
    y = {"a": data.a.clone(), "b": torch.where(data.drop_b, -1, data.b)}
    return x, y


@pytest.mark.parametrize(("fraction", "mode"), [(0.25, "append"), (0.5, "append"), (1.0, "append"), (0.5, "replace")])
def test_chosen_rows_are_transformed_relabelled_and_placed(fraction, mode):
    _, lever, step = lever_model(fraction=fraction, mode=mode)
    x, y = batch(unlabelled_b=0.2)
    x0, y0 = x.clone(), {k: v.clone() for k, v in y.items()}
    x_out, y_out = lever.augment(step, x, y)
    rows, positions = lever.last
    eligible = ((y["b"] == 1) | (y["b"] == 2)).nonzero().squeeze(1)
    assert len(rows) == min(len(eligible), math.floor(fraction * 20 + 0.5)) > 0
    assert set(rows.tolist()) <= set(eligible.tolist()) and len(set(rows.tolist())) == len(rows)  # no repeats
    assert torch.equal(x, x0) and all(torch.equal(y[k], y0[k]) for k in y)  # inputs untouched
    assert x_out.shape[0] == (20 + len(rows) if mode == "append" else 20)
    assert torch.equal(x_out[positions], -x[rows])  # the transform, on exactly those rows
    assert (y_out["b"][positions] == 0).all() and torch.equal(y_out["a"][positions], y["a"][rows])
    others = torch.ones(x_out.shape[0], dtype=torch.bool)
    others[positions] = False
    kept = torch.arange(20) if mode == "append" else others.nonzero().squeeze(1)
    assert torch.equal(x_out[kept], x[kept]) and torch.equal(y_out["b"][kept], y["b"][kept])
    assert lever.metrics() == {"intervene/synthesised": float(len(rows))}


def test_class_names_resolve_and_the_default_source_is_every_other_class():
    e = md.Experiment(
        **{
            **toy_experiment().model_dump(),
            "tasks": [md.Task(name="a", num_classes=2), md.Task(name="b", classes=["x", "y", "z"])],
            "levers": [{"name": "intervene", "args": {"task": "b", "transform": "negate", "target": "y"}}],
        }
    )
    lever = md.build_model(e).levers[0]
    assert (lever.target_index, lever.source_indices) == (1, [0, 2])


def test_deterministic_for_a_seed_different_across_steps_and_seeds_and_start_waits():
    x, y = batch(40)
    draws = []
    for seed in (0, 0, 1):
        _, lever, step = lever_model(seed=seed, fraction=0.25, args={})
        draws.append([(lever.augment(step, x, y), lever.last[0])[1] for _ in range(2)])
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0], draws[2][0])
    _, lever, step = lever_model(start=2, fraction=0.25)
    sizes = [lever.augment(step, x, y)[0].shape[0] for _ in range(3)]
    assert sizes == [40, 40, 50]


def test_shadow_darkens_toward_the_darkest_value_inside_sectors_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 48, 40, generator=g)
    out = shadow(x, torch.Generator().manual_seed(1), edge=1e-3, depth=(0.5, 0.6), spread=30.0)
    lo = x.flatten(2).amin(2)[..., None, None]
    assert ((out - lo) <= (x - lo) + 1e-6).all() and ((out - lo) >= -1e-6).all()  # pulled toward lo, never past
    # above the shallowest start, off-axis included (radius <= (row - apex) / cos 30deg inside the fan), nothing moves
    apex_row = -0.15 * 48
    safe = int((0.5 * 48 - apex_row) * math.cos(math.radians(30)) + apex_row) - 1
    assert torch.allclose(out[..., :safe, :], x[..., :safe, :], atol=1e-6)
    assert ((out - x).abs() > 1e-3).flatten(1).any(1).all()  # every image got a shadow
    assert torch.equal(out, shadow(x, torch.Generator().manual_seed(1), edge=1e-3, depth=(0.5, 0.6)))  # seeded
    d, e = out - lo, x - lo  # one shadow for all channels: the same factor d / e in both
    assert torch.allclose(d[:, 0] * e[:, 1], d[:, 1] * e[:, 0], atol=1e-4)


def test_negate_is_the_inverted_image_after_per_image_standardisation():
    v = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    std = lambda t: (t - t.mean((1, 2, 3), keepdim=True)) / t.std((1, 2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(negate(std(v), torch.Generator()), std(1 - v), atol=1e-6)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_background_gives_shapes_n_images_their_other_background_exactly(k):
    names = list(SHAPES_N_FACTORS)[:k]
    values = torch.randint(0, 2, (40, k), generator=torch.Generator().manual_seed(k))
    light, dark = values.clone(), values.clone()
    light[:, 1], dark[:, 1] = 1, 0
    mean, std = 0.21, 0.37  # a global standardisation, as shapes_n's
    render = lambda v: (_render_n(v, names, 24, 28, torch.Generator().manual_seed(5))[0] - mean) / std  # noqa: E731
    x = render(light)
    out = background(x, torch.Generator(), level=(BG_LEVELS[0] - mean) / std)
    assert torch.allclose(out, render(dark), atol=1e-6)  # the same geometry, texture and shade on the dark level
    assert torch.equal(x, render(light))  # not in place
    assert torch.allclose(background(render(dark), torch.Generator(), level=(BG_LEVELS[1] - mean) / std), x, atol=1e-6)


def test_a_user_transform_by_import_path():
    model, lever, step = lever_model(transform="mtdisent_plugins.levers.intervene:shadow", args={"sectors": [2, 2]})
    x, y = batch()
    x_out, _ = lever.augment(step, x, y)
    rows, positions = lever.last
    assert not torch.equal(x_out[positions], x[rows])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"transform": "shadw"}, "transform='shadw' is not a built-in.*shadow"),
        ({"transform": "no_such_module_xyz:fn"}, "transform='no_such_module_xyz:fn' cannot be imported"),
        ({"task": "c"}, "task='c' is not a task of the model"),
        ({"target": 3}, r"target=3 is not a class of task 'b'; expected one of \[0, 1, 2\]"),
        ({"source": [0, 1]}, "includes the target"),
        ({"source": "x"}, "source='x'"),
        ({"args": {"depthh": 1}}, r"transform='negate' with args=\{'depthh': 1\}"),
        ({"fraction": 0}, "fraction=0"),
        ({"mode": "drop"}, "mode='drop'"),
    ],
)
def test_bad_arguments_are_component_errors_naming_them(args, match):
    with pytest.raises(md.ComponentError, match=match):
        md.build_model(toy_experiment(levers=[{"name": "intervene", "args": {**NEGATE_B, **args}}]))


def test_check_lever_passes():
    check_lever("intervene", args=NEGATE_B)
    check_lever("intervene", args={**NEGATE_B, "transform": "shadow", "mode": "replace"})


def test_counts_its_steps_and_synthesises_at_most_its_fraction():
    # check_lever also trains half way and resumes: bitwise equal to the uninterrupted run
    run = check_lever("intervene", args={**NEGATE_B, "transform": "shadow"}, iterations=4)
    assert int(run.model.state_dict()["lever_modules.0.steps"]) == 4
    assert all(0 < m["intervene/synthesised"] <= 10 for m in run.history)  # at most half of each batch of 20
