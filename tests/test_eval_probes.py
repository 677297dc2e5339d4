import json
import math

import pytest
import torch
import torch.nn.functional as F

from mtdisent.evaluation import (
    EvaluationError,
    LeakageMatrix,
    Probe,
    leakage_matrix,
    majority_rate,
    normalised_leakage,
    probe_accuracy,
    train_probe,
)
from mtdisent.evaluation._probes import _ABSENT, _holdout, _solve


def gaussian(n, d, seed, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


W = torch.tensor([1.0, -2.0, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def linear_label(x):
    return (x @ W > 0).long()


def xor_label(x):
    return ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def noisy_linear_problem(n, d, noise, seed, n_eval=1000):
    """Labels from a dense random direction plus label noise; fit and eval rows share the direction."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(n + n_eval, d, generator=g)
    y = ((x @ w) / math.sqrt(d) + noise * torch.randn(n + n_eval, generator=g) > 0).long()
    return x[:n], y[:n], x[n:], y[n:]


def adam_probe_accuracy(xtr, ytr, xev, yev, epochs, seed=0):
    """The previous linear probe's recipe: standardise, Adam (lr 1e-2, wd 1e-4), minibatches of 256, fixed epochs."""
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Linear(xtr.shape[1], 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    z = (xtr - mean) / std
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=gen)
        for start in range(0, len(z), 256):
            rows = order[start : start + 256]
            opt.zero_grad()
            F.cross_entropy(net(z[rows]), ytr[rows]).backward()
            opt.step()
    with torch.no_grad():
        return float((net((xev - mean) / std).argmax(1) == yev).double().mean())


# ----------------------------------------------------------------------------------------------------
# probes: what they can read
# ----------------------------------------------------------------------------------------------------
def test_linear_probe_reads_a_linearly_encoded_label():
    xtr, xev = gaussian(600, 12, 0), gaussian(400, 12, 1)
    probe = train_probe(xtr, linear_label(xtr), 2, "linear", seed=0)
    assert isinstance(probe, Probe) and not probe.training
    assert probe.info["converged"] and probe.info["cv_converged"]
    assert probe_accuracy(probe, xev, linear_label(xev)) > 0.97


def test_linear_probe_separates_separable_data_perfectly():
    x = gaussian(1200, 12, 20)
    x = x[(x @ W).abs() > 0.3][:700]  # a margin around the separating plane
    xtr, xev = x[:400], x[400:]
    probe = train_probe(xtr, linear_label(xtr), 2, seed=0)
    assert probe_accuracy(probe, xtr, linear_label(xtr)) == 1.0
    assert probe_accuracy(probe, xev, linear_label(xev)) == 1.0


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_on_independent_features_scores_the_majority_rate(kind):
    xtr, xev = gaussian(600, 12, 2), gaussian(2000, 12, 3)
    g = torch.Generator().manual_seed(4)
    ytr = (torch.rand(600, generator=g) < 0.3).long()  # imbalanced: majority about 0.7
    yev = (torch.rand(2000, generator=g) < 0.3).long()
    acc = probe_accuracy(train_probe(xtr, ytr, 2, kind, seed=0), xev, yev)
    assert abs(acc - majority_rate(yev, 2)) < 0.02, (acc, majority_rate(yev, 2))


def test_mlp_probe_reads_xor_that_a_linear_probe_cannot():
    xtr, xev = gaussian(800, 6, 5), gaussian(400, 6, 6)
    ytr, yev = xor_label(xtr), xor_label(xev)
    lin = probe_accuracy(train_probe(xtr, ytr, 2, "linear", seed=0), xev, yev)
    mlp = probe_accuracy(train_probe(xtr, ytr, 2, "mlp", seed=0), xev, yev)
    assert lin < 0.65
    assert mlp > 0.9


# ----------------------------------------------------------------------------------------------------
# linear probe: solved to convergence, L2 strength by cross-validation
# ----------------------------------------------------------------------------------------------------
def test_accuracy_does_not_depend_on_the_iteration_budget():
    xtr, ytr, xev, yev = noisy_linear_problem(400, 100, 0.5, seed=0)
    # the previous fixed-budget Adam probe moves when its budget doubles on this problem ...
    assert abs(adam_probe_accuracy(xtr, ytr, xev, yev, 32) - adam_probe_accuracy(xtr, ytr, xev, yev, 16)) > 0.01
    # ... the converged probes do not
    lin = [train_probe(xtr, ytr, 2, seed=0, max_iter=m) for m in (200, 400)]
    assert all(p.info["converged"] and p.info["cv_converged"] for p in lin)
    assert probe_accuracy(lin[0], xev, yev) == pytest.approx(probe_accuracy(lin[1], xev, yev), abs=1e-9)
    mlp = [train_probe(xtr, ytr, 2, "mlp", seed=0, max_epochs=m) for m in (150, 300)]
    assert all(p.info["stopped_early"] and p.info["best_epoch"] < p.info["epochs"] < 150 for p in mlp)
    assert probe_accuracy(mlp[0], xev, yev) == pytest.approx(probe_accuracy(mlp[1], xev, yev), abs=1e-9)


def test_an_exhausted_budget_is_recorded_as_not_converged():
    xtr, ytr, _, _ = noisy_linear_problem(300, 50, 0.3, seed=1)
    probe = train_probe(xtr, ytr, 2, seed=0, max_iter=2)
    assert probe.info["n_iter"] == 2 and not probe.info["converged"] and not probe.info["cv_converged"]
    assert probe.info["grad_norm"] > 1e-5
    done = train_probe(xtr, ytr, 2, seed=0)
    assert done.info["converged"] and done.info["grad_norm"] <= 1e-5 and 2 < done.info["n_iter"] < 1000


def test_cross_validation_picks_a_stronger_penalty_for_noisier_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    clean = (x[:, :3].sum(1) > 0).long()
    noisy = torch.where(torch.rand(600, generator=g) < 0.35, 1 - clean, clean)  # 35 % of the labels flipped
    lo, hi = train_probe(x, clean, 2, seed=0).info, train_probe(x, noisy, 2, seed=0).info
    assert lo["l2_grid"] == hi["l2_grid"] == pytest.approx([10.0**e * 20 / 600 for e in range(-4, 3)])
    assert lo["l2"] in lo["l2_grid"] and len(lo["cv_accuracy"]) == 7
    assert hi["l2"] >= 10 * lo["l2"], (lo["l2"], hi["l2"])
    assert max(lo["cv_accuracy"]) > 0.95 and max(hi["cv_accuracy"]) < 0.7
    fixed = train_probe(x, clean, 2, seed=0, l2=0.5)
    assert fixed.info["l2"] == 0.5 and fixed.info["cv_accuracy"] is None
    grid = train_probe(x, clean, 2, seed=0, l2=[0.5, 50.0])
    assert grid.info["l2_grid"] == [0.5, 50.0] and grid.info["l2"] == 0.5


def full_space_gradient(probe, x, y, l2):
    """Gradient of mean CE + l2/2 |W|^2 at the probe's weights, in the full feature space (float64)."""
    z = probe.standardise(x)
    logits = probe.net(z)
    g = (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(z.dtype)) / len(y)
    return torch.cat([(g.T @ z + l2 * probe.net.weight).flatten(), g.sum(0)])


def test_row_space_solution_is_the_full_space_solution_when_d_exceeds_n():
    x, xev = gaussian(40, 100, 10, torch.float64), gaussian(200, 100, 11, torch.float64)
    y = (x[:, :3].sum(1) > 0).long()
    probe = train_probe(x, y, 2, seed=0, l2=0.05, tol=1e-7)  # D > N: solved in the row space (40 coordinates)
    assert probe.net.weight.dtype == torch.float64 and probe.net.weight.shape == (2, 100)
    assert probe.info["converged"] and probe.info["grad_norm"] <= 1e-7
    # stationary in the full 100-dimensional space, not only in the row space
    assert full_space_gradient(probe, x, y, 0.05).norm() <= 1.01e-7
    # the same weights as a solve in the full space
    z = probe.standardise(x)
    a, b, info = _solve(z, y, 2, 0.05, 1e-7, 5000)
    assert info["converged"]
    assert torch.allclose(probe.net.weight, a.T, atol=1e-5) and torch.allclose(probe.net.bias, b, atol=1e-5)
    assert torch.equal(probe.predict(xev), (probe.standardise(xev) @ a + b).argmax(1))


def test_classes_absent_from_the_fit_data_are_never_predicted():
    x = gaussian(300, 6, 12)
    y = torch.where(x[:, 0] > 0, 2, 0)  # classes 0 and 2 of 3
    probe = train_probe(x, y, 3, seed=0)
    assert probe.info["converged"] and probe.net.bias[1] == _ABSENT
    assert 1 not in probe.predict(gaussian(500, 6, 13)).tolist()
    single = train_probe(x, torch.full((300,), 1), 3, seed=0)  # one class: nothing to solve
    assert single.info["l2"] is None and single.predict(x).eq(1).all()


# ----------------------------------------------------------------------------------------------------
# MLP probe: early stopping
# ----------------------------------------------------------------------------------------------------
def test_mlp_probe_restores_its_best_weights():
    xtr, ytr, _, _ = noisy_linear_problem(400, 100, 0.5, seed=2)
    probe = train_probe(xtr, ytr, 2, "mlp", seed=5)
    info = probe.info
    assert info["stopped_early"] and info["epochs"] - info["best_epoch"] == 20  # patience
    n_val = sum(int(0.2 * int((ytr == c).sum())) for c in (0, 1))  # 20 % of each class held out
    assert info["n_val"] == n_val and info["n_fit"] == 400 - n_val
    held = _holdout(ytr, 0.2, torch.Generator().manual_seed(5))  # the rows the probe held out
    with torch.no_grad():
        val = float(F.cross_entropy(probe(xtr[held]), ytr[held]))
    assert val == pytest.approx(info["val_loss"], rel=1e-5)


def test_mlp_probe_without_held_out_rows_trains_for_its_budget():
    x = gaussian(200, 12, 12)
    probe = train_probe(
        x, linear_label(x), 2, "mlp", val_fraction=0.0, max_epochs=100, hidden=16, batch_size=200, lr=1e-2
    )
    assert probe.net[0].out_features == 16
    assert probe.info == {
        "n_fit": 200,
        "n_val": 0,
        "epochs": 100,
        "best_epoch": 100,
        "stopped_early": False,
        "val_loss": None,
    }
    assert probe_accuracy(probe, x, linear_label(x)) > 0.9


# ----------------------------------------------------------------------------------------------------
# shared behaviour and errors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_standardisation_is_stored_and_applied_to_eval_features(kind):
    xtr, xev = gaussian(600, 12, 7), gaussian(400, 12, 8)
    scale, shift = torch.linspace(1e-3, 1e3, 12), torch.linspace(-500, 500, 12)
    probe = train_probe(xtr * scale + shift, linear_label(xtr), 2, kind, seed=0)
    assert torch.allclose(probe.mean, (xtr * scale + shift).mean(0), rtol=1e-4, atol=1e-3)
    assert torch.allclose(probe.std, (xtr * scale + shift).std(0, unbiased=False), rtol=1e-4)
    assert probe_accuracy(probe, xev * scale + shift, linear_label(xev)) > 0.95
    # constant features do not divide by zero
    const = torch.cat([xtr, torch.full((600, 1), 3.0)], 1)
    p2 = train_probe(const, linear_label(xtr), 2, kind, seed=0)
    assert p2.std[-1] == 1.0 and torch.isfinite(p2(const)).all()


def test_unlabelled_rows_are_skipped():
    xtr, xev = gaussian(600, 12, 9), gaussian(400, 12, 10)
    ytr, yev = linear_label(xtr), linear_label(xev)
    ytr_partial = ytr.clone()
    ytr_partial[::2] = -1
    probe = train_probe(xtr, ytr_partial, 2, seed=0)
    assert torch.allclose(probe.mean, xtr[1::2].mean(0), atol=1e-6)
    assert probe.info["n_fit"] == 300
    yev_partial = yev.clone()
    yev_partial[:200] = -1
    acc = probe_accuracy(probe, xev, yev_partial)
    assert acc == pytest.approx(float((probe.predict(xev[200:]) == yev[200:]).double().mean()))
    assert math.isnan(probe_accuracy(probe, xev, torch.full((400,), -1)))
    with pytest.raises(EvaluationError, match="no labelled row"):
        train_probe(xtr, torch.full((600,), -1), 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probes_are_deterministic_by_seed_and_leave_the_global_rng_alone(kind):
    xtr, ytr, _, _ = noisy_linear_problem(300, 12, 0.5, seed=11)
    state = torch.random.get_rng_state()
    a = train_probe(xtr, ytr, 2, kind, seed=3)
    b = train_probe(xtr, ytr, 2, kind, seed=3)
    c = train_probe(xtr, ytr, 2, kind, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.info == b.info
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # the seed draws the CV folds (linear) or the held-out rows, initialisation and shuffling (MLP)
    assert a.info != c.info


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "lineer"}, "unknown probe kind 'lineer'.*Did you mean 'linear'"),
        ({"kind": "mlp", "batch_size": 0}, "batch_size: expected a positive integer"),
        ({"kind": "mlp", "max_epochs": -1}, "max_epochs: expected a positive integer"),
        ({"kind": "mlp", "lr": 0.0}, "lr: expected a positive number"),
        ({"kind": "mlp", "hidden": 0}, "hidden: expected a positive integer"),
        ({"kind": "mlp", "val_fraction": 1.0}, r"val_fraction: expected a number in \[0, 1\)"),
        ({"l2": 0.0}, "l2: expected a positive number or a list"),
        ({"l2": [1.0, -1.0]}, "l2: expected a positive number or a list"),
        ({"cv_folds": 1}, "cv_folds: expected an integer >= 2"),
        ({"tol": 0}, "tol: expected a positive number"),
        ({"max_iter": 1.5}, "max_iter: expected a positive integer"),
        ({"max_epochs": 10}, "max_epochs: a setting of the 'mlp' probe; kind='linear' does not take it"),
        ({"kind": "mlp", "l2": 1.0}, "l2: a setting of the 'linear' probe; kind='mlp' does not take it"),
        ({"seed": 1.0}, "seed: expected an integer"),
    ],
)
def test_train_probe_rejects_bad_settings(kwargs, match):
    x, y = gaussian(20, 3, 0), torch.zeros(20, dtype=torch.long)
    with pytest.raises(EvaluationError, match=match):
        train_probe(x, y, 2, **kwargs)


def test_train_probe_rejects_bad_data():
    x = gaussian(20, 3, 0)
    with pytest.raises(EvaluationError, match="features_train has 20 rows but y_train has 19"):
        train_probe(x, torch.zeros(19, dtype=torch.long), 2)
    with pytest.raises(EvaluationError, match=r"y_train\[0\] = 2 is out of range; expected 0..1"):
        train_probe(x, torch.full((20,), 2), 2)
    with pytest.raises(EvaluationError, match=r"features_train: expected a float tensor \(N, D\)"):
        train_probe(x[0], torch.zeros(20, dtype=torch.long), 2)
    with pytest.raises(EvaluationError, match="D=4 features but the probe was trained on D=3"):
        leakage_matrix(
            {"a": x},
            {"a": torch.zeros(20, dtype=torch.long)},
            {"a": gaussian(5, 4, 0)},
            {"a": torch.zeros(5, dtype=torch.long)},
            {"a": 2},
        )


# ----------------------------------------------------------------------------------------------------
# leakage matrices
# ----------------------------------------------------------------------------------------------------
def three_task_data(n, seed):
    """Task a (2 classes), b (3 classes) and c (2 classes); task t's features encode only its own label."""
    g = torch.Generator().manual_seed(seed)
    y = {
        "a": torch.randint(0, 2, (n,), generator=g),
        "b": torch.randint(0, 3, (n,), generator=g),
        "c": torch.randint(0, 2, (n,), generator=g),
    }
    feats = {}
    for t, d in (("a", 6), ("b", 8), ("c", 5)):
        f = torch.randn(n, d, generator=g)
        f[:, 0] += 3.0 * y[t].float()
        f[:, 1] -= 3.0 * (y[t] == 1).float()
        feats[t] = f
    return feats, y


@pytest.mark.parametrize("conditional", [False, True])
def test_leakage_matrix_of_chosen_pairs_has_the_full_matrix_cells_and_nan_elsewhere(conditional):
    (ftr, ytr), (fev, yev) = three_task_data(300, 0), three_task_data(200, 1)
    k = {"a": 2, "b": 3, "c": 2}
    full = leakage_matrix(ftr, ytr, fev, yev, k, kind="linear", seed=0, conditional=conditional)
    some = leakage_matrix(ftr, ytr, fev, yev, k, kind="linear", seed=0, conditional=conditional, pairs=[("a", "b")])
    assert some.accuracy[("a", "b")] == full.accuracy[("a", "b")] and not math.isnan(some.accuracy[("a", "b")])
    others = [p for p in full.accuracy if p != ("a", "b")]
    assert all(math.isnan(some.accuracy[p]) and math.isnan(some.normalised[p]) for p in others)
    assert some.info["cells"]["b->a"] == {"reason": "not requested (pairs)"}
    with pytest.raises(EvaluationError, match=r"pairs: \('a', 'z'\) is not a pair \(i, j\) of tasks"):
        leakage_matrix(ftr, ytr, fev, yev, k, pairs=[("a", "z")])


def test_leakage_matrix_shape_keys_and_values():
    (ftr, ytr), (fev, yev) = three_task_data(400, 0), three_task_data(300, 1)
    ytr["c"][:100] = -1  # partly unlabelled
    k = {"a": 2, "b": 3, "c": 2}
    m = leakage_matrix(ftr, ytr, fev, yev, k, kind="linear", seed=0, fit_split="train", score_split="val")
    assert isinstance(m, LeakageMatrix) and not m.conditional
    assert m.tasks == ["a", "b", "c"]
    assert set(m.accuracy) == {(i, j) for i in "abc" for j in "abc"}  # diagonal included
    assert set(m.normalised) == set(m.accuracy)
    for t in "abc":
        assert m.majority[t] == pytest.approx(majority_rate(yev[t], k[t]))
        assert m.accuracy[(t, t)] > 0.9  # each task reads itself
    for (i, j), acc in m.accuracy.items():
        assert m.normalised[(i, j)] == pytest.approx(normalised_leakage(acc, m.majority[j]))
        if i != j:
            assert m.normalised[(i, j)] < 0.1  # nothing else leaks
    t = m.as_tensor()
    assert t.shape == (3, 3)
    assert t[0, 1] == pytest.approx(m.accuracy[("a", "b")])
    assert m.as_tensor(normalised=True)[2, 2] == pytest.approx(m.normalised[("c", "c")])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert set(d["accuracy"]) == {f"{i}->{j}" for i in "abc" for j in "abc"}
    assert d["kind"] == "linear" and d["tasks"] == ["a", "b", "c"] and set(d["majority"]) == set("abc")
    info = d["info"]
    assert (info["fit_split"], info["score_split"], info["n_fit"], info["n_score"]) == ("train", "val", 400, 300)
    assert info["probe"]["seed"] == 0 and info["probe"]["cv_folds"] == 3
    cell = info["cells"]["a->c"]
    assert (cell["n_fit"], cell["n_score"]) == (300, 300) and cell["converged"] and cell["l2"] > 0
    assert info["cells"]["a->a"]["n_fit"] == 400


def test_leakage_matrix_refuses_to_score_on_the_fit_split():
    (f, y) = three_task_data(50, 4)
    k = {"a": 2, "b": 3, "c": 2}
    with pytest.raises(EvaluationError, match="fit_split and score_split are both 'train'"):
        leakage_matrix(f, y, f, y, k, fit_split="train", score_split="train")
    with pytest.raises(EvaluationError, match="score_split: expected a split name"):
        leakage_matrix(f, y, f, y, k, score_split=3)


def test_leakage_matrix_is_deterministic_and_handles_constant_or_unlabelled_targets():
    (ftr, ytr), (fev, yev) = three_task_data(200, 2), three_task_data(100, 3)
    yev["b"] = torch.ones(100, dtype=torch.long)  # constant on the eval data: majority 1
    ytr["c"] = torch.full((200,), -1)  # no training label at all
    k = {"a": 2, "b": 3, "c": 2}
    m1 = leakage_matrix(ftr, ytr, fev, yev, k, kind="mlp", seed=1, max_epochs=5)
    m2 = leakage_matrix(ftr, ytr, fev, yev, k, kind="mlp", seed=1, max_epochs=5)
    assert m1.to_dict() == m2.to_dict()
    assert m1.kind == "mlp"
    assert m1.majority["b"] == 1.0 and all(math.isnan(m1.normalised[(i, "b")]) for i in "abc")
    assert all(math.isnan(m1.accuracy[(i, "c")]) for i in "abc")
    assert m1.to_dict()["accuracy"]["a->c"] is None
    assert m1.info["cells"]["a->c"] == {"reason": "task 'c' has no labelled fit row"}
    assert m1.info["cells"]["a->a"]["epochs"] <= 5 and "best_epoch" in m1.info["cells"]["a->a"]


def test_leakage_matrix_errors_name_the_task():
    (f, y) = three_task_data(50, 4)
    k = {"a": 2, "b": 3, "c": 2}
    with pytest.raises(EvaluationError, match="eval_feats has no entry for task 'c'"):
        leakage_matrix(f, y, {"a": f["a"], "b": f["b"]}, y, k)
    with pytest.raises(EvaluationError, match="num_classes has no entry for task 'b'"):
        leakage_matrix(f, y, f, y, {"a": 2, "c": 2})
    with pytest.raises(EvaluationError, match="probe: unknown argument 'max_epoch'.*Did you mean 'max_epochs'"):
        leakage_matrix(f, y, f, y, k, max_epoch=3)
    with pytest.raises(EvaluationError, match="unknown probe kind 'svm'"):
        leakage_matrix(f, y, f, y, k, kind="svm")
    with pytest.raises(EvaluationError, match="max_epochs: a setting of the 'mlp' probe"):
        leakage_matrix(f, y, f, y, k, max_epochs=3)
    m = leakage_matrix(f, y, f, y, k, tasks=["c", "a"], l2=1.0)
    assert m.tasks == ["c", "a"] and set(m.accuracy) == {("c", "c"), ("c", "a"), ("a", "c"), ("a", "a")}


# ----------------------------------------------------------------------------------------------------
# conditional leakage
# ----------------------------------------------------------------------------------------------------
def shapes_on_backgrounds(n, seed, with_background):
    """Shape (0 circle, 1 square) and background (0 white, 1 black): circles only on white, squares 70 % on black.

    Shape features: one-hot shape (and one-hot background when ``with_background``) plus noise; background
    features: one-hot background plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 2, (n,), generator=g)
    bg = torch.where(shape == 0, 0, (torch.rand(n, generator=g) < 0.7).long())
    f_shape = 0.1 * torch.randn(n, 8, generator=g)
    f_shape[:, :2] += F.one_hot(shape, 2)
    if with_background:
        f_shape[:, 2:4] += F.one_hot(bg, 2)
    f_bg = 0.1 * torch.randn(n, 4, generator=g)
    f_bg[:, :2] += F.one_hot(bg, 2)
    return {"shape": f_shape, "bg": f_bg}, {"shape": shape, "bg": bg}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_conditional_leakage_separates_correlation_from_encoding(kind):
    k = {"shape": 2, "bg": 2}
    (ftr, ytr), (fev, yev) = shapes_on_backgrounds(1000, 0, False), shapes_on_backgrounds(1000, 1, False)
    plain = leakage_matrix(ftr, ytr, fev, yev, k, kind=kind, seed=0)
    cond = leakage_matrix(ftr, ytr, fev, yev, k, kind=kind, seed=0, conditional=True)
    # shape features read the background through the correlation, far above its majority rate ...
    assert plain.normalised[("shape", "bg")] > 0.4
    # ... but say nothing about it within a shape
    assert cond.conditional and abs(cond.normalised[("shape", "bg")]) < 0.05
    cell = cond.info["cells"]["shape->bg"]
    assert set(cell["classes"]) == {"1"}  # squares; circles are always on white
    assert cell["skipped"] == {"0": "task 'bg' takes 1 value(s) in the fit rows of class 0"}
    assert cell["majority"] == pytest.approx(majority_rate(yev["bg"][yev["shape"] == 1], 2))
    assert math.isnan(cond.accuracy[("shape", "shape")]) and "diagonal" in cond.info["cells"]["shape->shape"]["reason"]
    # shape features that also encode the background: conditional leakage 1
    (ftr, ytr), (fev, yev) = shapes_on_backgrounds(1000, 0, True), shapes_on_backgrounds(1000, 1, True)
    cond = leakage_matrix(ftr, ytr, fev, yev, k, kind=kind, seed=0, conditional=True)
    assert cond.normalised[("shape", "bg")] > 0.95


def test_conditional_leakage_weights_classes_by_their_score_rows():
    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, 3, (n,), generator=g)
        rate = torch.tensor([0.2, 0.4, 0.0])[i]  # task j within each class of i; constant in class 2
        j = (torch.rand(n, generator=g) < rate).long()
        x = torch.randn(n, 4, generator=g)
        x[:, 0] += 4.0 * (j * (i == 0)).float()  # i's features encode j in class 0 only
        x[:, 1] += 4.0 * i.float()
        return {"i": x, "j": torch.randn(n, 2, generator=g)}, {"i": i, "j": j}

    (ftr, ytr), (fev, yev) = data(1500, 0), data(1200, 1)
    yev["j"][:300] = -1  # unlabelled score rows do not count
    m = leakage_matrix(ftr, ytr, fev, yev, {"i": 3, "j": 2}, seed=0, conditional=True)
    cell = m.info["cells"]["i->j"]
    assert set(cell["classes"]) == {"0", "1"} and set(cell["skipped"]) == {"2"}
    labelled = yev["j"] != -1
    n = {c: int((labelled & (yev["i"] == int(c))).sum()) for c in ("0", "1")}
    maj = {c: majority_rate(yev["j"][labelled & (yev["i"] == int(c))], 2) for c in ("0", "1")}
    for c in ("0", "1"):
        assert cell["classes"][c]["n_score"] == n[c]
        assert cell["classes"][c]["majority"] == pytest.approx(maj[c])
    assert cell["classes"]["0"]["accuracy"] > 0.97  # read within class 0
    assert abs(cell["classes"]["1"]["accuracy"] - maj["1"]) < 0.03  # not within class 1
    acc = sum(n[c] * cell["classes"][c]["accuracy"] for c in n) / sum(n.values())
    base = sum(n[c] * maj[c] for c in n) / sum(n.values())
    assert m.accuracy[("i", "j")] == pytest.approx(acc)
    assert m.normalised[("i", "j")] == pytest.approx((acc - base) / (1 - base))
    assert m.majority["j"] == pytest.approx(majority_rate(yev["j"], 2))  # unconditional, for reference
    # j's features know nothing of i within a class of j
    assert abs(m.normalised[("j", "i")]) < 0.05
    json.dumps(m.to_dict(), allow_nan=False)


def test_conditional_cell_without_a_measurable_class_is_nan_and_says_why():
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 2, (200,), generator=g)
    y = {"i": i, "j": 1 - i}  # j is a function of i: constant within each class of i
    f = {"i": torch.randn(200, 3, generator=g), "j": torch.randn(200, 3, generator=g)}
    m = leakage_matrix(f, y, f, y, {"i": 2, "j": 2}, seed=0, conditional=True, fit_split="a", score_split="b")
    assert math.isnan(m.accuracy[("i", "j")]) and math.isnan(m.normalised[("i", "j")])
    cell = m.info["cells"]["i->j"]
    assert cell["reason"] == "no class of 'i' in which task 'j' varies in both the fit and the score rows"
    assert set(cell["skipped"]) == {"0", "1"} and cell["classes"] == {}
    assert m.to_dict()["conditional"] is True and m.to_dict()["normalised"]["i->j"] is None
