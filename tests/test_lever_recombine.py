"""The recombine lever: flips that are real, labels that follow them, a model left as it was, seeded choices."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from conftest import ToyDataset, toy_experiment

import mtdisent as md
from mtdisent.testing import check_lever


def lever_model(seed=0, **args):
    e = toy_experiment(levers=[{"name": "recombine", "args": args}], seed=seed)
    model = md.build_model(e)
    step = SimpleNamespace(model=model, experiment=e, setup=SimpleNamespace(autocast=contextlib.nullcontext))
    return model, model.levers[0], step


def batch(n=20, seed=0, **kwargs):
    data = ToyDataset(n, seed=seed, **kwargs)
    x = torch.stack([data[i][0] for i in range(n)])
    y = {"a": data.a.clone(), "b": torch.where(data.drop_b, -1, data.b)}
    return x, y


def classify(model, task, x):
    with md._torch.eval_mode(model), torch.no_grad():
        return model.classifiers[task](model.encoders[task](x)).argmax(-1)


def test_reported_flips_are_predicted_as_their_target_and_failures_are_unlabelled():
    model, lever, step = lever_model(fraction=1.0, steps=3, step_size=0.3)
    x, y = batch()
    x_out, y_out = lever.augment(step, x, y)
    s = lever.last
    assert s.flipped.any() and not s.flipped.all()  # this setting flips some, not all: both branches are tested
    for k in range(len(s.rows)):
        task, pos, row = lever.flip_tasks[int(s.tasks[k])], int(s.positions[k]), int(s.rows[k])
        pred = classify(model, task, x_out[pos : pos + 1])
        before = classify(model, task, x[row : row + 1])
        if s.flipped[k]:
            assert int(pred) == int(s.targets[k]) != int(before)  # C_j now says the target; it did not before
            assert int(y_out[task][pos]) == int(s.targets[k]) != int(y[task][row])
        else:
            assert int(y_out[task][pos]) == -1
    assert lever.metrics() == {"recombine/synthesised": 20.0, "recombine/flipped": float(s.flipped.float().mean())}


def test_other_tasks_keep_their_labels_and_the_originals_stay():
    model, lever, step = lever_model(fraction=0.5, step_size=0.3)
    x, y = batch()
    x_out, y_out = lever.augment(step, x, y)
    assert torch.equal(x_out[:20], x) and all(torch.equal(y_out[t][:20], y[t]) for t in y)
    s = lever.last
    assert not torch.equal(x_out[20:], x[s.rows])  # the synthesised images were changed
    for k in range(len(s.rows)):
        flipped_task = lever.flip_tasks[int(s.tasks[k])]
        for t in y:
            if t != flipped_task:
                assert int(y_out[t][int(s.positions[k])]) == int(y[t][int(s.rows[k])])


def test_targets_differ_from_labels_and_the_tasks_argument_limits_flips():
    model, lever, step = lever_model(fraction=1.0, tasks=["b"])
    x, y = batch(unlabelled_b=0.3)
    x_out, y_out = lever.augment(step, x, y)
    s = lever.last
    assert lever.flip_tasks == ["b"] and torch.equal(s.tasks, torch.zeros_like(s.tasks))
    assert (y["b"][s.rows] >= 0).all() and len(s.rows) == int((y["b"] >= 0).sum())  # unlabelled b: never chosen
    assert (s.targets != y["b"][s.rows]).all() and (s.targets >= 0).all() and (s.targets < 3).all()
    assert torch.equal(y_out["a"][20:], y["a"][s.rows])


@pytest.mark.parametrize(("fraction", "n"), [(0.25, 5), (0.3, 6), (1.0, 20), (0.01, 0)])
def test_fraction_is_respected_appended_or_replaced(fraction, n):
    x, y = batch()
    _, lever, step = lever_model(fraction=fraction)
    x_out, y_out = lever.augment(step, x, y)
    assert x_out.shape[0] == 20 + n and all(v.shape[0] == 20 + n for v in y_out.values())
    assert lever.metrics()["recombine/synthesised"] == n
    _, lever, step = lever_model(fraction=fraction, mode="replace")
    x_out, y_out = lever.augment(step, x, y)
    assert x_out.shape == x.shape
    rows = lever.last.rows if n else torch.zeros(0, dtype=torch.long)
    assert len(rows) == len(set(rows.tolist())) == n
    keep = torch.ones(20, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(x_out[keep], x[keep]) and all(torch.equal(y_out[t][keep], y[t][keep]) for t in y)
    if n:
        assert torch.equal(lever.last.positions, rows) and not torch.equal(x_out[rows], x[rows])


def test_model_parameters_gradients_buffers_and_modes_are_untouched():
    model, lever, step = lever_model(fraction=1.0, steps=5, step_size=0.3)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lever_modules")}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = batch()
    lever.augment(step, x, y)
    after = model.state_dict()
    assert any("running_mean" in k for k in state)  # BatchNorm statistics are among what is compared
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert all(m.training for m in model.modules())
    assert int(model.lever_modules["0"].steps) == 1  # only the lever's own step counter moved


def test_deterministic_for_a_seed_and_different_across_steps_and_seeds():
    x, y = batch()
    runs = []
    for seed in (0, 0, 1):
        _, lever, step = lever_model(seed=seed, fraction=0.5)
        runs.append([lever.augment(step, x, y) + (lever.last,) for _ in range(2)])
    (xa, ya, sa), (xb, yb, sb) = runs[0][0], runs[1][0]
    assert torch.equal(xa, xb) and all(torch.equal(ya[t], yb[t]) for t in ya)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb, strict=True))
    assert not torch.equal(runs[0][0][2].rows, runs[0][1][2].rows)  # the next step draws anew
    assert not torch.equal(runs[0][0][2].rows, runs[2][0][2].rows)  # so does another seed


def test_epsilon_bounds_the_change_and_start_waits():
    x, y = batch()
    _, lever, step = lever_model(fraction=1.0, steps=10, step_size=0.1, epsilon=0.15)
    x_out, _ = lever.augment(step, x, y)
    change = (x_out[20:] - x[lever.last.rows]).abs().amax()
    assert 0.1 <= float(change) <= 0.15 + 1e-6
    _, lever, step = lever_model(start=2)
    for expected in (20, 20, 30):
        assert lever.augment(step, x, y)[0].shape[0] == expected


def test_l2_steps_flip_too():
    model, lever, step = lever_model(fraction=1.0, steps=10, step_size=0.5, norm="l2")
    x, y = batch()
    x_out, _ = lever.augment(step, x, y)
    s = lever.last
    assert s.flipped.any()
    for k in s.flipped.nonzero().squeeze(1).tolist():
        pos, task = int(s.positions[k]), lever.flip_tasks[int(s.tasks[k])]
        assert int(classify(model, task, x_out[pos : pos + 1])) == int(s.targets[k])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"fraction": 0}, "fraction=0"),
        ({"fraction": 1.5}, "fraction"),
        ({"steps": 0}, "steps=0"),
        ({"step_size": -1.0}, "step_size"),
        ({"norm": "l1"}, "norm='l1'.*'sign' or 'l2'"),
        ({"epsilon": 0}, "epsilon"),
        ({"mode": "drop"}, "mode='drop'.*'append' or 'replace'"),
        ({"start": -1}, "start"),
        ({"tasks": "b"}, "tasks='b'"),
        ({"tasks": ["c"]}, r"tasks=\['c'\].*unknown.*\['a', 'b'\]"),
    ],
)
def test_bad_arguments_are_component_errors_naming_them(args, match):
    with pytest.raises(md.ComponentError, match=match):
        md.build_model(toy_experiment(levers=[{"name": "recombine", "args": args}]))


def test_check_lever_passes():
    assert check_lever("recombine") is not None
    check_lever("recombine", args={"mode": "replace", "norm": "l2", "epsilon": 0.5})


def test_counts_its_steps_across_a_resume():
    # check_lever trains half way and resumes: bitwise equal to the uninterrupted run
    run = check_lever("recombine", args={"fraction": 0.5}, iterations=4)
    assert int(run.model.state_dict()["lever_modules.0.steps"]) == 4


def test_trains_on_tiny_shapes_and_logs_its_flips():
    source = md.datasets.get("shapes")(scale=0.0625)
    e = md.Experiment(
        tasks=source.tasks,
        input_shape=source.input_shape,
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2]}},
        head={"hidden": [8]},
        adversary={"head": {"hidden": [8]}, "steps": 1, "features": "reuse", "ensemble": 1},
        levers=[{"name": "recombine", "args": {"tasks": ["background"], "fraction": 0.5, "steps": 3}}],
        training={"iterations": 3, "batch_size": 10, "log_every": 1, "device": "cpu"},
    )
    run = md.train(e, data=source, quiet=True)
    assert [m["recombine/synthesised"] for m in run.history] == [5.0, 5.0, 5.0]
    assert all(0.0 <= m["recombine/flipped"] <= 1.0 for m in run.history)
    assert run.model.predict(source["unseen"][0][0][None])["shape"].shape == (1,)
