import json
import math

import pytest
import torch

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


def gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


W = torch.tensor([1.0, -2.0, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def linear_label(x):
    return (x @ W > 0).long()


def xor_label(x):
    return ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def test_linear_probe_reads_a_linearly_encoded_label():
    xtr, xev = gaussian(600, 12, 0), gaussian(400, 12, 1)
    probe = train_probe(xtr, linear_label(xtr), 2, "linear", seed=0)
    assert isinstance(probe, Probe) and not probe.training
    assert probe_accuracy(probe, xev, linear_label(xev)) > 0.95


def test_probe_on_independent_features_stays_near_the_majority_rate():
    xtr, xev = gaussian(600, 12, 2), gaussian(400, 12, 3)
    g = torch.Generator().manual_seed(4)
    ytr = (torch.rand(600, generator=g) < 0.3).long()  # imbalanced: majority about 0.7
    yev = (torch.rand(400, generator=g) < 0.3).long()
    for kind in ("linear", "mlp"):
        acc = probe_accuracy(train_probe(xtr, ytr, 2, kind, seed=0), xev, yev)
        assert normalised_leakage(acc, majority_rate(yev, 2)) < 0.2, kind


def test_mlp_probe_reads_xor_that_a_linear_probe_cannot():
    xtr, xev = gaussian(800, 6, 5), gaussian(400, 6, 6)
    ytr, yev = xor_label(xtr), xor_label(xev)
    lin = probe_accuracy(train_probe(xtr, ytr, 2, "linear", seed=0), xev, yev)
    mlp = probe_accuracy(train_probe(xtr, ytr, 2, "mlp", seed=0), xev, yev)
    assert lin < 0.65
    assert mlp > 0.9


def test_standardisation_is_stored_and_applied_to_eval_features():
    xtr, xev = gaussian(600, 12, 7), gaussian(400, 12, 8)
    scale, shift = torch.linspace(1e-3, 1e3, 12), torch.linspace(-500, 500, 12)
    probe = train_probe(xtr * scale + shift, linear_label(xtr), 2, seed=0)
    assert torch.allclose(probe.mean, (xtr * scale + shift).mean(0), rtol=1e-4, atol=1e-3)
    assert torch.allclose(probe.std, (xtr * scale + shift).std(0, unbiased=False), rtol=1e-4)
    assert probe_accuracy(probe, xev * scale + shift, linear_label(xev)) > 0.95
    # constant features do not divide by zero
    const = torch.cat([xtr, torch.full((600, 1), 3.0)], 1)
    p2 = train_probe(const, linear_label(xtr), 2, epochs=2)
    assert p2.std[-1] == 1.0 and torch.isfinite(p2(const)).all()


def test_unlabelled_rows_are_skipped():
    xtr, xev = gaussian(600, 12, 9), gaussian(400, 12, 10)
    ytr, yev = linear_label(xtr), linear_label(xev)
    ytr_partial = ytr.clone()
    ytr_partial[::2] = -1
    probe = train_probe(xtr, ytr_partial, 2, seed=0)
    assert torch.allclose(probe.mean, xtr[1::2].mean(0), atol=1e-6)
    yev_partial = yev.clone()
    yev_partial[:200] = -1
    acc = probe_accuracy(probe, xev, yev_partial)
    assert acc == pytest.approx(float((probe.predict(xev[200:]) == yev[200:]).double().mean()))
    assert math.isnan(probe_accuracy(probe, xev, torch.full((400,), -1)))
    with pytest.raises(EvaluationError, match="no labelled row"):
        train_probe(xtr, torch.full((600,), -1), 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probes_are_deterministic_by_seed_and_leave_the_global_rng_alone(kind):
    x, y = gaussian(300, 12, 11), linear_label(gaussian(300, 12, 11))
    state = torch.random.get_rng_state()
    a = train_probe(x, y, 2, kind, seed=3, epochs=3, batch_size=64).state_dict()
    b = train_probe(x, y, 2, kind, seed=3, epochs=3, batch_size=64).state_dict()
    c = train_probe(x, y, 2, kind, seed=4, epochs=3, batch_size=64).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_full_batch_and_explicit_settings():
    x, y = gaussian(200, 12, 12), linear_label(gaussian(200, 12, 12))
    probe = train_probe(x, y, 2, "mlp", epochs=100, lr=1e-2, weight_decay=0.0, hidden=16, batch_size=None, seed=0)
    assert probe.net[0].out_features == 16
    assert probe_accuracy(probe, x, y) > 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "lineer"}, "unknown probe kind 'lineer'.*Did you mean 'linear'"),
        ({"batch_size": 0}, "batch_size: expected a positive integer or None"),
        ({"epochs": -1}, "epochs: expected a non-negative integer"),
        ({"lr": 0.0}, "lr > 0"),
        ({"kind": "mlp", "hidden": 0}, "hidden: expected a positive integer"),
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


def test_leakage_matrix_shape_keys_and_values():
    (ftr, ytr), (fev, yev) = three_task_data(400, 0), three_task_data(300, 1)
    ytr["c"][:100] = -1  # partly unlabelled
    k = {"a": 2, "b": 3, "c": 2}
    m = leakage_matrix(ftr, ytr, fev, yev, k, kind="linear", seed=0)
    assert isinstance(m, LeakageMatrix)
    assert m.tasks == ["a", "b", "c"]
    assert set(m.accuracy) == {(i, j) for i in "abc" for j in "abc"}  # diagonal included
    assert set(m.normalised) == set(m.accuracy)
    for t in "abc":
        assert m.majority[t] == pytest.approx(majority_rate(yev[t], k[t]))
        assert m.accuracy[(t, t)] > 0.9  # each task reads itself
    for (i, j), acc in m.accuracy.items():
        assert m.normalised[(i, j)] == pytest.approx(normalised_leakage(acc, m.majority[j]))
        if i != j:
            assert m.normalised[(i, j)] < 0.2  # nothing else leaks
    t = m.as_tensor()
    assert t.shape == (3, 3)
    assert t[0, 1] == pytest.approx(m.accuracy[("a", "b")])
    assert m.as_tensor(normalised=True)[2, 2] == pytest.approx(m.normalised[("c", "c")])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert set(d["accuracy"]) == {f"{i}->{j}" for i in "abc" for j in "abc"}
    assert d["kind"] == "linear" and d["tasks"] == ["a", "b", "c"] and set(d["majority"]) == set("abc")


def test_leakage_matrix_is_deterministic_and_handles_constant_or_unlabelled_targets():
    (ftr, ytr), (fev, yev) = three_task_data(200, 2), three_task_data(100, 3)
    yev["b"] = torch.ones(100, dtype=torch.long)  # constant on the eval data: majority 1
    ytr["c"] = torch.full((200,), -1)  # no training label at all
    k = {"a": 2, "b": 3, "c": 2}
    m1 = leakage_matrix(ftr, ytr, fev, yev, k, kind="mlp", seed=1, epochs=5)
    m2 = leakage_matrix(ftr, ytr, fev, yev, k, kind="mlp", seed=1, epochs=5)
    assert m1.to_dict() == m2.to_dict()
    assert m1.kind == "mlp"
    assert m1.majority["b"] == 1.0 and all(math.isnan(m1.normalised[(i, "b")]) for i in "abc")
    assert all(math.isnan(m1.accuracy[(i, "c")]) for i in "abc")
    assert m1.to_dict()["accuracy"]["a->c"] is None


def test_leakage_matrix_errors_name_the_task():
    (f, y) = three_task_data(50, 4)
    k = {"a": 2, "b": 3, "c": 2}
    with pytest.raises(EvaluationError, match="eval_feats has no entry for task 'c'"):
        leakage_matrix(f, y, {"a": f["a"], "b": f["b"]}, y, k)
    with pytest.raises(EvaluationError, match="num_classes has no entry for task 'b'"):
        leakage_matrix(f, y, f, y, {"a": 2, "c": 2})
    with pytest.raises(EvaluationError, match="unknown probe argument 'epoch'.*Did you mean 'epochs'"):
        leakage_matrix(f, y, f, y, k, epoch=3)
    with pytest.raises(EvaluationError, match="unknown probe kind 'svm'"):
        leakage_matrix(f, y, f, y, k, kind="svm")
    m = leakage_matrix(f, y, f, y, k, tasks=["c", "a"], epochs=1)
    assert m.tasks == ["c", "a"] and set(m.accuracy) == {("c", "c"), ("c", "a"), ("a", "c"), ("a", "a")}
