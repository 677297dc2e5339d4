"""The erasure lever: closed-form linear erasure of task j from task i's features, fitted on running statistics."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import mtdisent as md
from mtdisent.evaluation import leakage_matrix, majority_rate, probe_accuracy, train_probe
from mtdisent.testing import check_lever


def make(mode="conditional", dim=16, classes=(2, 3), **args):
    """The lever and the layer it builds for two tasks 'i' and 'j' with features of size ``dim``."""
    e = md.Experiment(
        tasks=[{"name": "i", "num_classes": classes[0]}, {"name": "j", "num_classes": classes[1]}],
        input_shape=(1, 8, 8),
        adversary={"ensemble": 3},
    )  # an ensemble of 3 per pair, so pairs has members 0..2 (the lever must see every pair once)
    model = SimpleNamespace(
        experiment=e, task_names=e.task_names, pairs=e.adversary_pairs(), feature_sizes={"i": dim, "j": dim}
    )
    lever = md.levers.create("erasure", {"mode": mode, **args})
    return lever, lever.build(model)


def cells_data(counts, a, b, n_scale=1, noise=1.0, seed=0):
    """z = a[y_i] + b[y_j] + noise, with ``counts[c][d]`` samples in cell (class c of i, class d of j).

    Returns ``(z (N, D), y_i (N,), y_j (N,))`` shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    yi = torch.cat([torch.full((n * n_scale,), c) for c, row in enumerate(counts) for n in row])
    yj = torch.cat([torch.full((n * n_scale,), d) for row in counts for d, n in enumerate(row)])
    perm = torch.randperm(len(yi), generator=g)
    yi, yj = yi[perm], yj[perm]
    z = a[yi] + b[yj] + noise * torch.randn(len(yi), a.shape[1], generator=g)
    return z, yi, yj


def fit(lever, layer, z, yi, yj, batch=100):
    """Feed the data through the lever in training mode, batch by batch (what the main step does)."""
    for k in range(0, len(z), batch):
        rows = slice(k, k + batch)
        lever.features(layer, {"i": z[rows], "j": z[rows]}, {"i": yi[rows], "j": yj[rows]}, True)


def erase(lever, layer, z):
    """Task i's features through the lever at inference (frozen statistics)."""
    return lever.features(layer, {"i": z, "j": z}, None, False)["i"]


def directions(dim, seed=1, scale=3.0, rows=5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, dim, generator=g) / dim**0.5


# -- what each mode guarantees -----------------------------------------------------------------------
CORRELATED = [[600, 150, 50], [100, 300, 500]]  # i and j correlated, every cell present


@pytest.mark.parametrize("mode", ["conditional", "keep_own"])
def test_conditional_erasure_equalises_j_means_within_each_class_of_i_and_a_probe_reads_chance(mode):
    d = 16
    a, b = directions(d, 1)[:2], directions(d, 2)[:3]
    lever, layer = make(mode, d, momentum=None)
    z, yi, yj = cells_data(CORRELATED, a, b, n_scale=2, seed=0)
    fit(lever, layer, z, yi, yj)
    out = erase(lever, layer, z)
    assert int(layer.sources["i"].rank) == 4 and int(layer.sources["i"].dropped) == 0  # K_i (K_j - 1) directions
    scale = (b[1] - b[0]).norm()
    for c in range(2):
        means = [out[(yi == c) & (yj == k)].mean(0) for k in range(3)]  # on the fitted data: equal to rounding
        raw = [z[(yi == c) & (yj == k)].mean(0) for k in range(3)]
        assert all((m - means[0]).norm() < 1e-4 * scale for m in means[1:])
        assert all((r - raw[0]).norm() > 0.5 * scale for r in raw[1:])
    # held-out data: a converged linear probe fitted within each class of i reads j at its majority rate
    zt, yit, yjt = cells_data(CORRELATED, a, b, n_scale=2, seed=1)
    out_t = erase(lever, layer, zt)
    for c in range(2):
        rows, rows_t = yi == c, yit == c
        before = train_probe(z[rows], yj[rows], 3)
        after = train_probe(out[rows], yj[rows], 3)
        assert after.info["converged"]
        chance = majority_rate(yjt[rows_t], 3)
        assert probe_accuracy(before, zt[rows_t], yjt[rows_t]) > chance + 0.2
        assert probe_accuracy(after, out_t[rows_t], yjt[rows_t]) < chance + 0.03
    # the library's own measure, conditional leakage, agrees
    k = {"i": 2, "j": 3}
    feats, feats_t = {"i": out, "j": out}, {"i": out_t, "j": out_t}
    m = leakage_matrix(feats, {"i": yi, "j": yj}, feats_t, {"i": yit, "j": yjt}, k, conditional=True)
    assert abs(m.normalised[("i", "j")]) < 0.05


def test_marginal_erasure_zeroes_the_cross_covariance_and_a_probe_reads_chance():
    d = 16
    a, b = directions(d, 1)[:2], directions(d, 2)[:3]
    lever, layer = make("marginal", d, momentum=None)
    z, yi, yj = cells_data(CORRELATED, a, b, n_scale=2, seed=0)
    fit(lever, layer, z, yi, yj)
    out = erase(lever, layer, z)
    assert int(layer.sources["i"].rank) == 2  # K_j - 1
    cov = (out - out.mean(0)).t() @ (F.one_hot(yj, 3).float() - F.one_hot(yj, 3).float().mean(0)) / len(out)
    assert cov.abs().max() < 1e-5  # Cov(z', y_j) = 0 on the fitted data
    zt, _, yjt = cells_data(CORRELATED, a, b, n_scale=2, seed=1)
    probe = train_probe(out, yj, 3)
    assert probe.info["converged"]
    assert probe_accuracy(train_probe(z, yj, 3), zt, yjt) > majority_rate(yjt, 3) + 0.2
    assert probe_accuracy(probe, erase(lever, layer, zt), yjt) < majority_rate(yjt, 3) + 0.03


def test_both_gives_the_conditional_and_the_marginal_guarantee_at_once():
    d = 16
    a, b = directions(d, 1)[:2], directions(d, 2)[:3]
    z, yi, yj = cells_data(CORRELATED, a, b, n_scale=2, seed=0)
    erased = {}
    for mode in ("conditional", "marginal", "both"):
        lever, layer = make(mode, d, momentum=None)
        fit(lever, layer, z, yi, yj)
        erased[mode] = (erase(lever, layer, z), int(layer.sources["i"].rank))
    onehot = F.one_hot(yj, 3).float()

    def cross(out):  # max |Cov(z', y_j)| over all samples
        return ((out - out.mean(0)).t() @ (onehot - onehot.mean(0)) / len(out)).abs().max()

    def within(out):  # max distance between j's means within a class of i
        return max(
            (out[(yi == c) & (yj == k)].mean(0) - out[(yi == c) & (yj == 0)].mean(0)).norm()
            for c in range(2)
            for k in (1, 2)
        )

    scale = (b[1] - b[0]).norm()
    out, rank = erased["both"]
    assert cross(out) < 1e-5 and within(out) < 1e-4 * scale  # both guarantees together
    # each single mode gives only its own: the other quantity stays (the data is correlated)
    assert within(erased["marginal"][0]) > 0.05 * scale and cross(erased["conditional"][0]) > 1e-3
    # the span of both: K_i (K_j - 1) = 4 conditional directions plus what the marginal ones add (at most K_j - 1)
    assert erased["conditional"][1] == 4 and 4 < rank <= 6


CIRCLES_ON_WHITE = [[600, 0], [100, 500]]  # (shape, background): circles only ever on white


def test_conditional_keeps_a_perfect_shape_feature_that_marginal_erasure_destroys():
    """Shape features that encode the shape and nothing else still predict the background (circles only on
    white): the marginal erasure removes the shape with it, the conditional one leaves it."""
    d = 16
    a, b = directions(d, 3, scale=4.0)[:2], torch.zeros(2, d)  # nothing of the background in them
    z, yi, yj = cells_data(CIRCLES_ON_WHITE, a, b, n_scale=2, seed=0)
    # held out: the seen cells and the unseen one, circles on black
    zt, yit, _ = cells_data([[200, 200], [200, 200]], a, b, seed=1)
    acc = {}
    for mode in ("conditional", "marginal"):
        lever, layer = make(mode, d, classes=(2, 2), momentum=None)
        fit(lever, layer, z, yi, yj)
        probe = train_probe(erase(lever, layer, z), yi, 2)
        acc[mode] = probe_accuracy(probe, erase(lever, layer, zt), yit)
    raw = probe_accuracy(train_probe(z, yi, 2), zt, yit)
    assert raw > 0.95
    assert acc["conditional"] > raw - 0.02
    assert acc["marginal"] < 0.6  # balanced held-out set: chance is 0.5


def test_keep_own_leaves_the_own_class_means_where_conditional_moves_them():
    d = 16
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, d, generator=g)
    b = torch.randn(3, d, generator=g)
    b = b + 0.8 * (a[1] - a[0])[None, :] * torch.tensor([0.0, 1.0, -1.0])[:, None]  # j's directions lean on i's
    z, yi, yj = cells_data(CORRELATED, a, b, seed=0)
    outs = {}
    for mode in ("conditional", "keep_own"):
        lever, layer = make(mode, d, momentum=None)
        fit(lever, layer, z, yi, yj)
        outs[mode] = erase(lever, layer, z)
        assert int(layer.sources["i"].dropped) == 0
    own = [z[yi == c].mean(0) for c in range(2)]
    gap = (own[1] - own[0]).norm()
    for c in range(2):
        assert (outs["keep_own"][yi == c].mean(0) - own[c]).norm() < 1e-4 * gap
        assert (outs["conditional"][yi == c].mean(0) - own[c]).norm() > 0.05 * gap
        means = [outs["keep_own"][(yi == c) & (yj == k)].mean(0) for k in range(3)]  # and j is still erased
        assert all((m - means[0]).norm() < 1e-4 * gap for m in means[1:])


def test_keep_own_keeps_and_counts_a_direction_it_cannot_erase():
    """Features that tell the shape only through the background (the shortcut): keep_own must keep it."""
    d = 8
    u = directions(d, 5)[0]
    a, b = torch.stack([0 * u, 0 * u]), torch.stack([0 * u, 2 * u])  # z = 2 u y_j + noise
    z, yi, yj = cells_data(CIRCLES_ON_WHITE, a, b, noise=0.1, seed=0)
    lever, layer = make("keep_own", d, classes=(2, 2), momentum=None)
    fit(lever, layer, z, yi, yj)
    source = layer.sources["i"]
    assert int(source.rank) == 0 and int(source.dropped) == 1
    assert torch.allclose(erase(lever, layer, z), z)
    lever, layer = make("conditional", d, classes=(2, 2), momentum=None)
    fit(lever, layer, z, yi, yj)
    assert int(layer.sources["i"].rank) == 1


# -- statistics ----------------------------------------------------------------------------------------
def state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_statistics_are_frozen_in_eval_mode_and_without_labels():
    lever, layer = make(dim=8, min_count=1)
    z, yi, yj = cells_data(CORRELATED, directions(8)[:2], directions(8, 2)[:3], seed=0)
    fit(lever, layer, z[:300], yi[:300], yj[:300])
    before = state(layer)
    feats, labels = {"i": z[300:400], "j": z[300:400]}, {"i": yi[300:400], "j": yj[300:400]}
    lever.features(layer, feats, labels, False)  # eval mode: labels ignored
    lever.features(layer, feats, None, True)  # adversary steps on fresh batches: no labels
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    lever.features(layer, feats, {"i": yi[300:400], "j": torch.full((100,), -1)}, True)  # j unlabelled
    after = state(layer)
    assert torch.equal(after["sources.i.cells.j.count"], before["sources.i.cells.j.count"])
    assert torch.equal(after["sources.i.cells.j.mean"], before["sources.i.cells.j.mean"])
    assert int(after["sources.i.pooled.count"]) == int(before["sources.i.pooled.count"]) + 100
    lever.features(layer, feats, labels, True)  # training main step: updated
    assert not torch.equal(layer.state_dict()["sources.i.cells.j.count"], before["sources.i.cells.j.count"])


def test_momentum_none_is_the_exact_mean_and_momentum_a_per_sample_moving_average():
    lever, layer = make(dim=4, momentum=None, min_count=1)
    z, yi, yj = cells_data(CORRELATED, directions(4)[:2], directions(4, 2)[:3], seed=0)
    fit(lever, layer, z, yi, yj, batch=37)
    cells = layer.sources["i"].cells["j"]
    for c in range(2):
        for k in range(3):
            rows = (yi == c) & (yj == k)
            assert torch.allclose(cells.mean[c, k], z[rows].mean(0), atol=1e-5)
            assert int(cells.count[c, k]) == int(rows.sum())
    assert torch.allclose(layer.sources["i"].pooled.mean[0, 0], z.mean(0), atol=1e-5)

    lever, layer = make(dim=4, momentum=0.1, min_count=1)
    cells = layer.sources["i"].cells["j"]
    first = torch.ones(3, 4)
    fit(lever, layer, first, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert torch.allclose(cells.mean[0, 0], first[0])  # the first samples set the cell
    fit(lever, layer, torch.full((5, 4), 3.0), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    rate = 1 - 0.9**5
    assert torch.allclose(cells.mean[0, 0], torch.full((4,), 1.0 + rate * 2.0))
    assert torch.equal(cells.mean[1], torch.zeros(3, 4))  # cells without samples do not move


def test_min_count_holds_back_rare_cells():
    lever, layer = make(dim=8, classes=(2, 2), min_count=150, momentum=None)
    a, b = directions(8)[:2], directions(8, 2)[:2]
    z, yi, yj = cells_data(CIRCLES_ON_WHITE, a, b, seed=0)  # cell (1, 0) has 100 samples
    fit(lever, layer, z, yi, yj)
    assert int(layer.sources["i"].rank) == 0 and torch.equal(erase(lever, layer, z), z)
    assert int(layer.sources["j"].rank) == 0  # background features: white has both shapes, but rect/white < 150


def test_the_erasure_is_a_fixed_linear_map_for_the_gradient():
    lever, layer = make(dim=8, min_count=1)
    z, yi, yj = cells_data(CORRELATED, directions(8)[:2], directions(8, 2)[:3], seed=0)
    fit(lever, layer, z[:500], yi[:500], yj[:500])
    x = z[500:600].clone().requires_grad_()
    out = lever.features(layer, {"i": x, "j": z[500:600]}, {"i": yi[500:600], "j": yj[500:600]}, True)["i"]
    g = torch.randn_like(out)
    out.backward(g)
    source = layer.sources["i"]
    assert int(source.rank) > 0
    assert torch.allclose(x.grad, g - (g @ source.basis.t()) @ source.reader, atol=1e-6)
    assert all(not v.requires_grad for v in layer.buffers())
    # a second update before the backward of the first graph does not break it (the graph holds copies)
    out = lever.features(layer, {"i": x, "j": z[:100]}, {"i": yi[:100], "j": yj[:100]}, True)["i"]
    lever.features(layer, {"i": z[:100], "j": z[:100]}, {"i": yi[:100], "j": yj[:100]}, True)
    out.sum().backward()


def test_low_precision_features_keep_their_dtype():
    lever, layer = make(dim=8, min_count=1)
    z, yi, yj = cells_data(CORRELATED, directions(8)[:2], directions(8, 2)[:3], seed=0)
    fit(lever, layer, z, yi, yj)
    half = z[:10].bfloat16()
    out = lever.features(layer, {"i": half, "j": half}, None, False)["i"]
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), erase(lever, layer, z[:10]), atol=0.1)


# -- pairs and arguments -------------------------------------------------------------------------------
def test_pairs_default_to_the_enabled_adversary_pairs_and_can_be_chosen():
    _, layer = make()
    assert set(layer.sources) == {"i", "j"} and set(layer.sources["i"].cells) == {"j"}
    lever, layer = make(pairs=["i->j"])
    assert set(layer.sources) == {"i"}
    z = torch.randn(4, 16)
    out = lever.features(layer, {"i": z, "j": z}, {"i": torch.zeros(4, dtype=torch.long)}, True)
    assert out["j"] is z  # not erased
    assert lever.resolve_pairs(SimpleNamespace(task_names=["i", "j"])) == [("i", "j")]
    assert make(pairs=[["j", "i"]])[0].pairs == [["j", "i"]]
    assert "mode='marginal'" in repr(make("marginal")[0])


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"mode": "leace"}, ["mode", "conditional", "marginal", "both", "keep_own"]),
        ({"momentum": 0.0}, ["momentum", "(0, 1]", "None"]),
        ({"momentum": True}, ["momentum"]),
        ({"min_count": 0}, ["min_count", ">= 1"]),
        ({"min_sine": 1.0}, ["min_sine", "(0, 1)"]),
        ({"pairs": []}, ["pairs", "non-empty"]),
        ({"pairs": ["i-j"]}, ["pairs", "source->target"]),
        ({"pairs": ["i->i"]}, ["pairs", "differ"]),
        ({"pairs": ["i->j", ["i", "j"]]}, ["pairs", "twice"]),
        ({"strength": 1}, ["strength", "mode"]),
    ],
)
def test_bad_arguments_name_the_argument_and_what_is_valid(args, names):
    with pytest.raises(md.ComponentError) as info:
        md.levers.create("erasure", args)
    assert all(n in str(info.value) for n in names), str(info.value)


def test_pairs_naming_unknown_tasks_or_none_enabled_are_errors():
    with pytest.raises(md.ComponentError, match=r"pairs: unknown task 'k'.*'i', 'j'"):
        make(pairs=["i->k"])
    e = md.Experiment(
        tasks=[{"name": "i", "num_classes": 2}, {"name": "j", "num_classes": 2}],
        input_shape=(1, 8, 8),
        all_pairs=False,
    )
    model = SimpleNamespace(experiment=e, task_names=e.task_names, pairs=e.adversary_pairs(), feature_sizes={})
    with pytest.raises(md.ComponentError, match="pairs=None.*enables none"):
        md.levers.create("erasure").build(model)


# -- in the model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["conditional", "marginal", "both", "keep_own"])
def test_check_lever_trains_saves_and_loads(mode):
    run = check_lever("erasure", args={"mode": mode, "min_count": 2, "momentum": 0.1}, iterations=3)
    sources = run.model.lever_modules["0"].sources
    assert set(sources) == {"a", "b"} and all(int(s.rank) > 0 for s in sources.values())


def test_statistics_are_checkpointed_and_loaded_with_the_model(tmp_path):
    from conftest import ToyDataset, toy_experiment

    e = toy_experiment(levers=[{"name": "erasure", "args": {"min_count": 2}}], training={"device": "cpu"})
    run = md.train(e, data={"train": ToyDataset(), "val": ToyDataset(40, seed=1)}, out_dir=tmp_path, quiet=True)
    trained = {k: v for k, v in run.model.state_dict().items() if k.startswith("lever_modules.")}
    assert "lever_modules.0.sources.a.basis" in trained and "lever_modules.0.sources.b.cells.a.count" in trained
    assert int(trained["lever_modules.0.sources.a.rank"]) > 0
    loaded = md.load(tmp_path)
    for k, v in loaded.state_dict().items():
        if k.startswith("lever_modules."):
            assert torch.equal(v, trained[k]), k
    x = ToyDataset(8, seed=2).x
    for t, f in run.model.features(x).items():
        assert torch.equal(f, loaded.features(x)[t])
    raw = loaded.encoders["a"].eval()(x)
    assert not torch.allclose(loaded.features(x)["a"], raw)  # the loaded model erases


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_flattened_features_of_thousands_of_dimensions_are_erased_at_cost_linear_in_d():
    """At D = 4096 a training step and an inference batch cost O(B D r): no (D, D) matrix is ever formed.

    Counted, not timed (speed is measured by benchmarks): matrix-product FLOPs stay far below what building or
    applying a (D, D) projector costs (2 D^2 r and 2 B D^2), and no operation outputs a tensor larger than a few
    (B, D) batches.
    """
    d, batch = 4096, 50
    lever, layer = make(dim=d, classes=(2, 2), momentum=None, min_count=2)
    a, b = directions(d, 1, scale=5.0)[:2], directions(d, 2, scale=5.0)[:2]
    z, yi, yj = cells_data([[300, 100], [100, 300]], a, b, seed=0)
    fit(lever, layer, z[:batch], yi[:batch], yj[:batch], batch=batch)  # the basis exists from here on
    rest = z[batch:], yi[batch:], yj[batch:]
    batches = list(z.split(batch))
    with _LargestTensor() as largest:
        with FlopCounterMode(display=False) as train_flops:
            fit(lever, layer, *rest, batch=batch)
        with torch.no_grad(), FlopCounterMode(display=False) as inference_flops:
            for zb in batches:
                erase(lever, layer, zb)
    per_training_step = train_flops.get_total_flops() / (len(z) // batch - 1)
    per_inference = inference_flops.get_total_flops() / (len(z) // batch)
    linear_bound = 2 * batch * d * 64  # 64 directions; one (D, D) projector costs at least 2 D^2 = 8x this
    assert 0 < per_inference <= per_training_step < linear_bound, (per_training_step, per_inference)
    assert largest.numel <= 4 * batch * d < d * d, largest.numel
    # exact on the fitted data at this size too (the statistics are exact cumulative means)
    fitted = layer.sources["i"].cells["j"]
    assert torch.equal(fitted.count, torch.tensor([[300, 100], [100, 300]]))
    out = erase(lever, layer, z)
    for c in range(2):
        gap = (z[(yi == c) & (yj == 1)].mean(0) - z[(yi == c) & (yj == 0)].mean(0)).norm()
        left = (out[(yi == c) & (yj == 1)].mean(0) - out[(yi == c) & (yj == 0)].mean(0)).norm()
        assert left < 1e-4 * gap


TINY = {"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}}


def shapes_experiment(levers):
    return md.Experiment(
        tasks=[{"name": "shape", "num_classes": 2}, {"name": "background", "num_classes": 2}],
        backbone=TINY,
        head={"hidden": [16]},
        adversary={"weight": 0.5, "steps": 2, "features": "reuse", "head": {"hidden": [16]}, "ensemble": 1},
        data={"name": "shapes", "args": {"scale": 0.0625, "seed": 0}},
        levers=levers,
        training={"iterations": 20, "batch_size": 32, "checkpoint_every": 20, "log_every": 20, "device": "cpu"},
    )


@pytest.mark.slow
def test_training_with_erasure_lowers_the_conditional_leakage_on_shapes():
    leakage = {}
    for name, levers in (("plain", []), ("erasure", [{"name": "erasure", "args": {"momentum": None, "min_count": 4}}])):
        run = md.train(shapes_experiment(levers), quiet=True)
        report = md.evaluate(run, which="final", probes=("linear",), layers=("features",))
        leakage[name] = report.conditional_leakage
    for pair in (("shape", "background"), ("background", "shape")):
        assert leakage["erasure"][pair] < leakage["plain"][pair] - 0.2, leakage


# -- distributed: every rank folds in every rank's batch ------------------------------------------------
def _ddp_worker(rank, init, z, yi, yj, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    lever, layer = make(dim=z.shape[1], momentum=0.05, min_count=1)
    half = len(z) // 2
    for k in range(0, half, 50):  # each rank sees its own half of every batch of 100
        rows = slice(rank * half + k, rank * half + k + 50)
        lever.features(layer, {"i": z[rows], "j": z[rows]}, {"i": yi[rows], "j": yj[rows]}, True)
    torch.save(layer.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    _, whole = make(dim=z.shape[1], momentum=None, min_count=1)  # every rank holds the whole batch (fit="after")
    whole.update({"i": z, "j": z}, {"i": yi, "j": yj}, reduce=False)
    torch.save(whole.state_dict(), os.path.join(out, f"whole{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_statistics_of_the_whole_batch(tmp_path):
    z, yi, yj = cells_data(CORRELATED, directions(8)[:2], directions(8, 2)[:3], seed=0)
    z, yi, yj = z[:600], yi[:600], yj[:600]
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_ddp_worker, args=(init, z, yi, yj, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    lever, layer = make(dim=8, momentum=0.05, min_count=1)
    for k in range(0, 300, 50):  # one process, the same batches whole
        rows = torch.cat([torch.arange(k, k + 50), torch.arange(300 + k, 350 + k)])
        lever.features(layer, {"i": z[rows], "j": z[rows]}, {"i": yi[rows], "j": yj[rows]}, True)
    for key, v in layer.state_dict().items():
        assert torch.equal(r0[key], r1[key]), key
        if not key.endswith((".basis", ".reader")):  # an SVD basis is unique only up to signs within its span
            assert torch.allclose(r0[key].float(), v.float(), atol=1e-5), key
    whole = layer.state_dict()
    for s in ("sources.i", "sources.j"):  # the erasure map U R^T itself is unique
        split, one = (st[f"{s}.basis"].T @ st[f"{s}.reader"] for st in (r0, whole))  # (D, D) each
        assert torch.allclose(split, one, atol=1e-4), s
    # reduce=False: a batch every rank holds whole is counted once, as in one process
    _, alone = make(dim=8, momentum=None, min_count=1)
    alone.update({"i": z, "j": z}, {"i": yi, "j": yj})
    for rank in (0, 1):
        got = torch.load(tmp_path / f"whole{rank}.pt")
        assert all(torch.equal(got[k], v) for k, v in alone.state_dict().items() if k.endswith((".count", ".mean")))


# -- fitted after training: fit_erasure ------------------------------------------------------------------
def test_frozen_statistics_never_move_in_training():
    lever, layer = make(frozen=True, min_count=1)
    z, yi, yj = cells_data(CORRELATED, directions(16)[:2], directions(16, 2)[:3], seed=0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    fit(lever, layer, z, yi, yj)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert torch.equal(erase(lever, layer, z), z)  # never fitted: nothing erased


def test_fit_erasure_equalises_the_cell_means_of_the_final_features_on_its_data():
    from conftest import ToyDataset, toy_experiment
    from mtdisent_plugins.levers.erasure import fit_erasure

    from mtdisent.evaluation import collect_features

    model = md.build_model(toy_experiment(backbone={"args": {"filters": [4, 8], "output": "flatten"}})).eval()
    data = ToyDataset(240, seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = fit_erasure(model, data, pairs=["a->b"], min_count=5, batch_size=64)

    def cell_gaps(m):  # per class of a: the largest gap between b's class means of a's features, and their scale
        f, y = collect_features(m, data)
        gaps = []
        for c in range(2):
            means = torch.stack([f["a"][(y["a"] == c) & (y["b"] == d)].mean(0) for d in range(3)])  # (3, D)
            gaps.append(((means - means[0]).abs().max() / means.abs().max()).item())
        return max(gaps), f

    before, f0 = cell_gaps(model)
    after, f1 = cell_gaps(fitted)
    assert before > 1e-2 and after < 1e-5, (before, after)
    assert torch.equal(f0["b"], f1["b"])  # b is not a source: its features are untouched
    assert [c.name for c in fitted.experiment.levers] == ["erasure"]
    assert fitted.experiment.levers[0].args["fit"] == "after"
    assert not model.experiment.levers and all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not fitted.training and int(fitted.lever_modules["0"].sources["a"].rank) == 4  # 2 classes of a x 2 gaps
    with pytest.raises(md.ComponentError, match=r"fit_erasure: data: pass one split"):
        fit_erasure(model, md.DataSource({"train": data}, tasks=model.experiment.tasks))
    with pytest.raises(md.ComponentError, match=r"mode='nope'"):
        fit_erasure(model, data, mode="nope")


def test_fit_erasure_retrains_only_the_erased_sources_classifiers_on_the_erased_features():
    from conftest import ToyDataset, toy_experiment
    from mtdisent_plugins.levers.erasure import fit_erasure
    from test_retrain import Augmented

    from mtdisent.evaluation import collect_features

    model = md.build_model(toy_experiment(backbone={"args": {"filters": [4, 8], "output": "flatten"}})).eval()
    data = ToyDataset(240, seed=3)
    plain = fit_erasure(model, data, pairs=["a->b"], min_count=5)
    kept = fit_erasure(model, data, pairs=["a->b"], min_count=5, retrain_epochs=15, retrain_lr=3e-3, seed=1)
    s_plain, s_kept = plain.state_dict(), kept.state_dict()
    changed = {k for k in s_plain if not torch.equal(s_plain[k], s_kept[k])}
    assert changed and all(k.startswith("classifiers.a.") for k in changed), changed  # encoders, b, erasure kept
    assert not kept.training
    noisy = Augmented(240, seed=3)  # draws from the global generator: the fit is still repeatable
    again = []
    for state in (10, 11):  # whatever the global generator's state
        torch.manual_seed(state)
        again.append(fit_erasure(model, noisy, pairs=["a->b"], min_count=5, retrain_epochs=1, seed=4).state_dict())
    assert all(torch.equal(v, again[1][k]) for k, v in again[0].items())
    accuracy = {
        n: (m.predict(data.x)["a"] == data.a).float().mean().item() for n, m in (("plain", plain), ("kept", kept))
    }
    assert accuracy["kept"] >= 0.95 and accuracy["kept"] > accuracy["plain"] + 0.2, accuracy
    f, _ = collect_features(kept, data)  # a's features, erased
    head = kept.classifiers.head("a")
    pre = f["a"] @ head.body[0].weight.T  # (N, 16): the head's BatchNorm input, on the erased features
    torch.testing.assert_close(head.body[1].running_var, pre.var(0))
    with pytest.raises(md.ComponentError, match=r"fit_erasure: retrain_epochs=-1; expected an integer >= 0"):
        fit_erasure(model, data, retrain_epochs=-1)
    with pytest.raises(md.ComponentError, match=r"retrain_lr=0: expected a number > 0"):
        fit_erasure(model, data, retrain_epochs=1, retrain_lr=0)


# -- fit="after": erasure fitted after training, inside md.train ------------------------------------------
def test_fit_after_trains_as_without_it_and_ends_with_the_model_fit_erasure_gives(tmp_path):
    from conftest import ToyDataset, toy_experiment
    from mtdisent_plugins.levers.erasure import fit_erasure

    from mtdisent._engine._checkpoint import read_checkpoint

    data = {"train": ToyDataset(120, seed=3), "val": ToyDataset(40, seed=4)}
    after = {"fit": "after", "retrain_epochs": 2, "pairs": ["a->b"], "min_count": 5}
    spec = toy_experiment(levers=[{"name": "erasure", "args": after}])
    plain = md.train(toy_experiment(), data, out_dir=tmp_path / "plain", quiet=True)
    run = md.train(spec, data, out_dir=tmp_path / "after", quiet=True)
    # training never saw the layer: every iteration's metrics and the last checkpoint's weights are the plain run's
    keys = ("loss", "val_acc_a", "val_acc_b")
    assert [[h.get(k) for k in keys] for h in run.history] == [[h.get(k) for k in keys] for h in plain.history]
    a, _ = read_checkpoint(tmp_path / "plain" / "checkpoints" / "iter-00000006")
    b, _ = read_checkpoint(tmp_path / "after" / "checkpoints" / "iter-00000006")
    assert all(torch.equal(a[k], b[k]) for k in a) and int(b["model.lever_modules.0.sources.a.rank"]) == 0
    # the final model is fit_erasure's on the plain model with the run's settings, and md.load gives it
    expected = fit_erasure(
        plain.model, data["train"], pairs=["a->b"], min_count=5, retrain_epochs=2, batch_size=20, seed=spec.seed
    )
    layer = run.model.lever_modules["0"].sources["a"]
    assert int(layer.rank) == 4 and run.model.training
    x = data["val"].x
    want = expected.eval().predict_proba(x)
    for model in (run.model, md.load(tmp_path / "after")):
        got = model.eval().predict_proba(x)
        assert all(torch.allclose(got[t], want[t], atol=1e-6) for t in want)
    assert not torch.allclose(plain.model.eval().predict_proba(x)["a"], want["a"], atol=1e-3)  # it did change
    z = {"a": torch.randn(6, layer.basis.shape[1]), "b": torch.randn(6, 8)}
    lever, module = run.model.levers[0], run.model.lever_module(0)
    erased = lever.features(module, z, {"a": torch.zeros(6, dtype=torch.long)}, True)  # training mode erases too
    assert not torch.allclose(erased["a"], z["a"]) and torch.equal(
        erased["a"], lever.features(module, z, None, False)["a"]
    )
    # the checkpoints, best included, hold the model before the fit; model_at and md.load agree on each
    assert run.best is not None and (tmp_path / "after" / "checkpoints" / "best").is_dir()
    for which in ("best", "latest"):
        for model in (run.model_at(which), md.load(tmp_path / "after", which)):
            assert int(model.lever_modules["0"].sources["a"].rank) == 0, which
    assert run.finished and run.model_at("final") is run.model
    with pytest.warns(UserWarning, match=r"best checkpoint holds the model before levers\[0\] 'erasure' changed it"):
        md.evaluate(run, data=data["val"], split="val", probes=())
    # a run resumed after its last iteration is fitted again from the checkpoint: the same final model
    again = md.train(spec, data, out_dir=tmp_path / "after", resume=True, quiet=True)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in run.model.state_dict().items())


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"fit": "end"}, ["fit='end'", "'running'", "'after'"]),
        ({"retrain_epochs": 2}, ["retrain_epochs=2", "fit='after'"]),
        ({"fit": "after", "retrain_epochs": -1}, ["retrain_epochs=-1", ">= 0"]),
    ],
)
def test_fit_and_retrain_epochs_are_checked(args, names):
    with pytest.raises(md.ComponentError) as info:
        md.levers.create("erasure", args)
    assert all(n in str(info.value) for n in names), str(info.value)


def test_check_lever_passes_fit_after():
    run = check_lever("erasure", args={"fit": "after", "retrain_epochs": 1, "min_count": 2}, iterations=3)
    assert {int(s.rank) > 0 for s in run.model.lever_modules["0"].sources.values()} == {True}


def test_a_lever_failing_at_the_end_of_training_is_named_in_one_line():
    from conftest import ToyDataset, toy_experiment

    class Refuses(md.Lever):
        def finish(self, module, model, data):
            raise md.ComponentError("data: 3 samples, need 10")

    md.register("lever", "test_refuses_at_end")(Refuses)
    try:
        with pytest.raises(md.ComponentError) as info:
            md.train(toy_experiment(levers=[{"name": "test_refuses_at_end"}]), ToyDataset(40), quiet=True)
    finally:
        md.levers.unregister("test_refuses_at_end")
    assert str(info.value) == "levers[0] 'test_refuses_at_end', at the end of training: data: 3 samples, need 10"


def test_fit_after_follows_batchnorm_recomputation_and_fits_on_its_own_input(tmp_path):
    from conftest import ToyDataset, toy_experiment
    from mtdisent_plugins.levers.erasure import fit_erasure

    data = ToyDataset(120, seed=3)
    after = {"name": "erasure", "args": {"fit": "after", "pairs": ["a->b"], "min_count": 5}}
    plain = md.train(toy_experiment(training={"batchnorm_stats": "recompute"}), data, quiet=True)
    run = md.train(toy_experiment(levers=[after], training={"batchnorm_stats": "recompute"}), data, quiet=True)
    expected = fit_erasure(plain.model, data, pairs=["a->b"], min_count=5, batch_size=20)  # plain: recomputed
    x = data.x[:40]
    got, want = run.model.eval().predict_proba(x), expected.eval().predict_proba(x)
    assert all(torch.allclose(got[t], want[t], atol=1e-6) for t in want)
    # in memory, the last iteration's model is kept: without the fit, and with the running statistics
    latest, plain_latest = run.model_at("latest").state_dict(), plain.model_at("latest").state_dict()
    assert int(latest["lever_modules.0.sources.a.rank"]) == 0
    assert all(torch.equal(v, latest[k]) for k, v in plain_latest.items())
    # a later lever that changes a's features does not change what the fit="after" layer is fitted on
    later = {"name": "erasure", "args": {"pairs": ["a->b"], "momentum": None, "min_count": 1}}
    model = md.build_model(toy_experiment(levers=[after, later])).eval()
    model.lever_module(1).update({"a": torch.randn(30, 8)}, {"a": torch.arange(30) % 2, "b": torch.arange(30) % 3})
    model.levers[0].finish(model.lever_module(0), model, data)
    with torch.no_grad():
        z = model.lever_module(0).sources["a"].erase(model.encoders["a"](data.x))  # the encoder's output, erased
    for c in range(2):
        means = torch.stack([z[(data.a == c) & (data.b == d)].mean(0) for d in range(3)])  # (3, D)
        assert (means - means[0]).abs().max() < 1e-4 * means.abs().max(), c


def test_a_running_erasure_does_not_finish_and_best_without_validation_is_the_final_model(tmp_path, recwarn):
    from conftest import ToyDataset, toy_experiment

    data = ToyDataset(120, seed=3)
    running = md.train(toy_experiment(levers=[{"name": "erasure", "args": {"min_count": 5}}]), data, quiet=True)
    assert not running.finished and running.model_at("latest") is running.model
    after = {"name": "erasure", "args": {"fit": "after", "pairs": ["a->b"], "min_count": 5}}
    run = md.train(toy_experiment(levers=[after]), data, out_dir=tmp_path / "run", quiet=True)  # no validation
    assert run.finished and run.model_at("best") is run.model
    loaded = md.load(tmp_path / "run", "best")  # the final model, as model_at gives it
    assert int(loaded.lever_modules["0"].sources["a"].rank) == 4
    md.evaluate(running, data=data, probes=())
    md.evaluate(tmp_path / "run", data=data, probes=())
    assert not [w for w in recwarn if "checkpoint holds the model before" in str(w.message)]
