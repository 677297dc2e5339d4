"""The stacked (fast) and separate (reference) execution paths compute the same thing."""

import pytest
import torch
from conftest import iterate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent.engine import build_loop


class NTaskData(torch.utils.data.Dataset):
    def __init__(self, classes, n=40, seed=0, unlabelled=0.0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = {f"t{i}": torch.randint(0, k, (n,), generator=g) for i, k in enumerate(classes)}
        for v in self.y.values():
            v[torch.rand(n, generator=g) < unlabelled] = -1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {t: int(v[i]) for t, v in self.y.items()}


def experiment(classes, mask, objective, heads, features="reuse", hidden=(8,), optimizer="adam"):
    names = [f"t{i}" for i in range(len(classes))]
    ordered = [(s, t) for s in names for t in names if s != t]
    return md.Experiment(
        tasks=[md.Task(name=n, num_classes=k) for n, k in zip(names, classes, strict=True)],
        backbone={"name": "dltk_residual", "args": {"filters": [2, 4], "strides": [1, 2], "output": "pool"}},
        input_shape=(1, 8, 8),
        head={"hidden": list(hidden)},
        adversary={"head": {"hidden": [6]}, "objective": objective, "steps": 2, "weight": 0.3, "features": features},
        pairs=[md.Pair(source=s, target=t, enabled=m) for (s, t), m in zip(ordered, mask, strict=True)],
        training={"batch_size": 10, "optimizer": {"name": optimizer, "lr": 1e-2}, "adversary_optimizer": {"lr": 1e-2}},
        execution={"heads": heads},
    )


def trainers(classes, mask, objective, features="reuse", unlabelled=0.0, optimizer="adam"):
    data = NTaskData(classes, unlabelled=unlabelled)
    out = []
    for heads in ("stacked", "separate"):
        e = experiment(classes, mask, objective, heads, features, optimizer=optimizer)
        out.append(build_loop(e, {"train": data}))
    return out


def assert_states_close(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=1e-4), k


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(2, 4), min_size=2, max_size=4),
    st.data(),
    st.sampled_from(["minmax", "confusion", "gradient_reversal", "projection"]),
    st.sampled_from(["reuse", "fresh"]),
)
def test_stacked_and_separate_paths_agree(classes, data, objective, features):
    n = len(classes)
    mask = data.draw(st.lists(st.booleans(), min_size=n * (n - 1), max_size=n * (n - 1)))
    # SGD: Adam's normalised steps would amplify float-summation differences of near-zero gradients
    fast, ref = trainers(classes, mask, objective, features, unlabelled=0.2, optimizer="sgd")
    assert_states_close(fast.model, ref.model, atol=0)  # same initial weights
    for _ in range(4):
        mf, mr = iterate(fast), iterate(ref)
        for key in ("loss/main", *[k for k in mr if k.startswith(("acc/", "adv_acc/"))]):
            assert mf[key] == pytest.approx(mr[key], abs=1e-4), key
    assert_states_close(fast.model, ref.model)


def test_gate_twenty_steps_of_the_paper_like_configuration():
    fast, ref = trainers([3, 2, 4, 2], [True] * 12, "minmax", "fresh")  # Adam, the library default
    for step in range(20):
        mf, mr = iterate(fast), iterate(ref)
        assert mf["loss/main"] == pytest.approx(mr["loss/main"], rel=2e-3, abs=2e-3), step
    assert_states_close(fast.model, ref.model, atol=5e-3)


@pytest.mark.parametrize("src, dst", [("stacked", "separate"), ("separate", "stacked")])
def test_state_dict_round_trip_between_paths(src, dst):
    e = experiment([3, 2, 2], [True, False, True, True, True, False], "minmax", src, hidden=(8, 5))
    a = md.build_model(e)
    with torch.no_grad():  # make every tensor distinct from its initial value
        for t in a.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    b = md.build_model(e.model_copy(update={"execution": md.ExecutionSpec(heads=dst), "seed": 7}))
    b.load_state_dict(a.state_dict())
    assert_states_close(a, b, atol=0)
    x = torch.randn(5, 1, 8, 8)
    a.eval(), b.eval()
    with torch.no_grad():
        oa, ob = a(x), b(x)
    for k in oa.logits:
        assert torch.allclose(oa.logits[k], ob.logits[k], atol=1e-6)
    for k in oa.adversary_logits:
        assert torch.allclose(oa.adversary_logits[k], ob.adversary_logits[k], atol=1e-6)
    pa, pb = a.penultimate(x), b.penultimate(x)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


def test_checkpoint_keys_are_one_entry_per_head(tmp_path):
    e = experiment([3, 2], [True, True], "minmax", "stacked")
    e = e.model_copy(update={"training": e.training.model_copy(update={"iterations": 3})})
    run = md.train(e, data=NTaskData([3, 2]), out_dir=tmp_path, quiet=True)
    keys = set(run.model.state_dict())
    assert "classifiers.t0.out.weight" in keys and "adversaries.t0->*.body.0.weight" in keys  # one network per source
    assert not any("stacks" in k for k in keys)
    separate = md.load(tmp_path)  # the run's own execution
    assert separate.experiment.execution.heads == "stacked"


def test_head_views_behave_like_heads():
    e = experiment([3, 2], [True, True], "minmax", "stacked")
    ref = md.build_model(e.model_copy(update={"execution": md.ExecutionSpec(heads="separate")}))
    fast = md.build_model(e)
    fast.eval(), ref.eval()
    z = torch.randn(4, fast.feature_sizes["t0"])
    with torch.no_grad():
        za = torch.randn(4, fast.adversary("t0", "t1").in_features)  # features (+ one-hot label when conditional)
        assert torch.allclose(fast.adversary("t0", "t1")(za), ref.adversary("t0", "t1")(za), atol=1e-6)
        assert torch.allclose(fast.classifiers["t0"].penultimate(z), ref.classifiers["t0"].penultimate(z), atol=1e-6)
    assert fast.adversary("t0", "t1").num_classes == 2 and fast.classifiers["t0"].in_features == z.shape[1]
