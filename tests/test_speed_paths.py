"""Faster paths compute the same thing: the Gram shortcut for reused features, the per-source adversary layout,
channels-last encoders."""

import pytest
import torch
from conftest import ToyDataset, iterate, toy_experiment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent.engine import build_loop

FLAT = {"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "flatten"}}  # D = 512


def loops(adversary=None, training=None, modes=("gram", "plain"), heads="auto"):
    out = []
    for mode in modes:
        e = toy_experiment(
            backbone=FLAT,
            adversary={"features": "reuse", "steps": 4, **(adversary or {})},
            training={"l2": 1e-3, **(training or {})},
            execution={"adversary_steps": mode, "heads": heads},
        )
        out.append(build_loop(e, {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}))
    return out


def assert_same_training(a, b, iterations, rtol=1e-4):
    for i in range(iterations):
        ma, mb = iterate(a), iterate(b)
        for key in ("loss/main", *[k for k in mb if k.startswith(("acc/", "adv_acc/"))]):
            assert ma[key] == pytest.approx(mb[key], rel=rtol, abs=1e-5), (i, key)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        scale = float(sb[k].float().abs().max()) + 1e-6
        assert float((sa[k].float() - sb[k].float()).abs().max()) <= 1e-4 * scale, k
    oa, ob = a.step.adversary_optimizer.state, b.step.adversary_optimizer.state
    for pa, pb in zip(a.step.adversary_params, b.step.adversary_params, strict=True):
        ma, mb = oa.get(pa, {}).get("momentum_buffer"), ob.get(pb, {}).get("momentum_buffer")
        assert (ma is None) == (mb is None)
        if ma is not None:
            assert torch.allclose(ma, mb, rtol=1e-3, atol=1e-5 * (float(mb.abs().max()) + 1e-6))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-3]),
    conditional=st.booleans(),
    ensemble=st.integers(1, 2),
    layout=st.sampled_from(["pair", "source"]),
)
def test_gram_steps_equal_plain_steps(momentum, weight_decay, conditional, ensemble, layout):
    # reinit every 3 iterations clears the momentum buffers mid-run; conditional inputs differ in size per
    # source (2 vs 3 classes), so the adversaries form two stacks
    adversary = {"conditional": conditional, "ensemble": ensemble, "reinit_every": 3, "layout": layout}
    sgd = {"name": "sgd", "lr": 0.05, "momentum": momentum, "weight_decay": weight_decay}
    gram, plain = loops(adversary, {"adversary_optimizer": sgd})
    assert gram.step.gram and not plain.step.gram
    assert_same_training(gram, plain, 5)


def test_twenty_iterations_of_the_paper_like_setting_agree():
    gram, plain = loops({"ensemble": 1, "conditional": False, "reinit_every": 0, "steps": 5})
    assert_same_training(gram, plain, 20)


def test_gram_is_used_only_where_it_is_exact():
    adam = {"adversary_optimizer": {"name": "adam", "lr": 1e-3}}
    (auto,) = loops(training=adam, modes=("auto",))
    assert not auto.step.gram  # Adam's per-coordinate scaling leaves the row space: plain steps
    (fresh,) = loops({"features": "fresh"}, modes=("auto",))
    assert not fresh.step.gram
    with pytest.raises(md.SpecError, match="execution.adversary_steps: 'gram' needs"):
        loops(training=adam, modes=("gram",))
    (separate,) = loops(modes=("auto",), heads="separate")
    assert not separate.step.gram


def test_two_tasks_source_layout_is_the_pair_layout_renamed():
    pair, source = (loops({"layout": layout}, modes=("auto",))[0] for layout in ("pair", "source"))
    renamed = {
        k.replace("->*", "->b" if k.startswith("adversaries.a") else "->a"): v
        for k, v in source.model.state_dict().items()
    }
    assert renamed.keys() == pair.model.state_dict().keys()
    for _ in range(3):
        assert iterate(pair)["loss/main"] == iterate(source)["loss/main"]


def experiment_n(n, layout, ensemble=2):
    return md.Experiment(
        tasks=[{"name": f"t{i}", "num_classes": 2 + i % 2} for i in range(n)],
        backbone=FLAT,
        input_shape=(1, 16, 16),
        head={"hidden": [8]},
        adversary={"head": {"hidden": [8]}, "layout": layout, "ensemble": ensemble},
        pairs=[{"source": "t0", "target": "t1", "enabled": False}],
    )


def test_source_layout_grows_linearly_and_predicts_each_target_from_its_slice():
    counts = {}
    for n in (3, 4, 6):
        for layout in ("pair", "source"):
            counts[(n, layout)] = sum(p.numel() for p in md.build_model(experiment_n(n, layout)).adversary_parameters())
    first_layer = 2 * (512 + 3) * 8  # two members' first layers dominate each network
    assert (
        counts[(6, "source")] - counts[(4, "source")]
        < 2 * (counts[(4, "source")] - counts[(3, "source")]) + first_layer
    )
    assert counts[(6, "pair")] > 2 * counts[(6, "source")]
    model = md.build_model(experiment_n(4, "source"))
    assert [h.name for h in model.adversary_heads][:3] == ["t0->*", "t0->*#1", "t1->*"]
    model.eval()
    feats = {f"t{i}": torch.randn(5, 512) for i in range(4)}
    labels = {f"t{i}": torch.randint(0, 2, (5,)) for i in range(4)}
    logits = model.adversary_logits(feats, labels=labels)  # (P, B, K_max)
    for p, pair in enumerate(model.pairs):
        k = model.pair_classes[p]
        z = model.adversary_inputs(feats, labels)[
            [h.name for h in model.adversary_heads].index(
                f"{pair.source}->*" + (f"#{pair.member}" if pair.member else "")
            )
        ]
        direct = model.adversary(pair.source, pair.target, pair.member)(z)
        assert torch.allclose(logits[p, :, :k], direct, atol=1e-6), pair
        assert torch.isinf(logits[p, :, k:]).all()
    assert "t0->t1" not in [p.key for p in model.pairs]  # a switched-off pair has no output


def test_two_tasks_source_layout_is_the_pair_layout_renamed_under_gradient_reversal():
    pair, source = (
        loops({"layout": layout, "objective": "gradient_reversal"}, modes=("auto",))[0] for layout in ("pair", "source")
    )
    for _ in range(3):
        assert iterate(pair)["loss/main"] == iterate(source)["loss/main"]
    for name, value in pair.model.named_parameters():
        renamed = name.replace("->b", "->*") if name.startswith("adversaries.a") else name.replace("->a", "->*")
        assert torch.equal(value, source.model.get_parameter(renamed)), name


def test_source_layout_reverses_each_networks_gradient_with_its_pairs_weight():
    # three tasks, two members, one network per source and member serving its targets: with reversal the
    # adversaries' gradients are those of their plain losses and each source's features get -its weight times theirs
    objective = md.objectives.create("gradient_reversal")
    e = experiment_n(3, "source", ensemble=2).model_copy(update={"pairs": []})  # every pair on
    model = md.build_model(e)
    torch.manual_seed(0)
    feats = {t: torch.randn(6, d, requires_grad=True) for t, d in model.feature_sizes.items()}
    labels = {t.name: torch.randint(0, t.num_classes, (6,)) for t in model.experiment.tasks}
    by_source = {"t0": 0.3, "t1": 0.5, "t2": 0.7}
    weights = torch.tensor([by_source[p.source] for p in model.pairs])

    def grads(transform):
        model.zero_grad()
        for z in feats.values():
            z.grad = None
        logits = model.adversary_logits(feats, transform, weights, labels)  # (P, B, K_max)
        loss = sum(
            torch.nn.functional.cross_entropy(logits[p, :, :k], labels[pair.target])
            for p, (pair, k) in enumerate(zip(model.pairs, model.pair_classes, strict=True))
        )
        loss.backward()
        return [z.grad.clone() for z in feats.values()], [p.grad.clone() for p in model.adversary_parameters()]

    plain_feats, plain_params = grads(None)
    reversed_feats, reversed_params = grads(objective.adversary_input)
    assert len(model.adversary_heads) == 6 and len(model.pairs) == 12
    for a, b, w in zip(reversed_feats, plain_feats, by_source.values(), strict=True):
        assert torch.allclose(a, -w * b, atol=1e-7)
    for a, b in zip(reversed_params, plain_params, strict=True):
        assert torch.equal(a, b)


def test_source_layout_with_reversal_refuses_pairs_of_one_network_with_different_weights():
    spec = experiment_n(3, "source", ensemble=1).model_dump()
    spec["pairs"] = [{"source": "t0", "target": "t1", "weight": 2.0}]  # t0 -> t2 keeps weight 1
    spec["adversary"]["objective"] = {"name": "gradient_reversal"}
    e = md.Experiment(**spec)
    data = [(torch.randn(1, 16, 16), {"t0": i % 2, "t1": i % 3, "t2": 0}) for i in range(20)]
    with pytest.raises(md.SpecError, match=r"pairs: .*'gradient_reversal'.* task 't0' one network .*different weights"):
        build_loop(e, {"train": data})


@pytest.mark.parametrize("heads", ["stacked", "separate"])
def test_pair_shared_members_share_hidden_layers_and_read_their_own_rows(heads):
    e = experiment_n(4, "pair_shared", ensemble=3).model_copy(update={"execution": md.ExecutionSpec(heads=heads)})
    model = md.build_model(e)
    pairs = [p for p in model.pairs if p.member == 0]
    assert [h.name for h in model.adversary_heads] == [p.pair_key for p in pairs]  # one network per pair

    def count(m):  # parameters of the networks as built (stacks pad output layers to the widest)
        return sum(p.numel() for h in m.adversary_heads for p in m.adversaries.head(h.name).parameters())

    single = md.build_model(experiment_n(4, "pair", ensemble=1))
    # each pair adds two more output layers (8 x k weights and k biases each) and nothing else
    extra = sum(2 * (8 * k + k) for p, k in zip(model.pairs, model.pair_classes, strict=True) if p.member == 0)
    assert count(model) - count(single) == extra
    model.eval()
    feats = {f"t{i}": torch.randn(5, 512) for i in range(4)}
    labels = {f"t{i}": torch.randint(0, 2, (5,)) for i in range(4)}
    logits = model.adversary_logits(feats, labels=labels)  # (P, B, K_max)
    inputs = dict(zip([h.name for h in model.adversary_heads], model.adversary_inputs(feats, labels), strict=True))
    for p, pair in enumerate(model.pairs):
        k = model.pair_classes[p]
        network = model.adversaries.head(pair.pair_key).eval()  # a standalone copy, in eval mode as the model
        rows = slice(pair.member * k, (pair.member + 1) * k)  # the member's rows of the shared network's output
        assert torch.allclose(logits[p, :, :k], network(inputs[pair.pair_key])[:, rows], atol=1e-6), pair
        assert torch.allclose(
            logits[p, :, :k], model.adversary(pair.source, pair.target, pair.member)(inputs[pair.pair_key]), atol=1e-6
        )
    members = logits[[i for i, q in enumerate(model.pairs) if q.pair_key == "t1->t0"]]
    assert not torch.allclose(members[0], members[1])  # members start from different output layers


@pytest.mark.parametrize("heads", ["stacked", "separate"])
def test_pair_shared_reinitialises_a_members_rows_and_member_zero_the_whole_network(heads):
    def states(member):
        e = experiment_n(3, "pair_shared", ensemble=3)
        model = md.build_model(e.model_copy(update={"execution": md.ExecutionSpec(heads=heads)}))
        for h in model.adversary_heads:  # BatchNorm statistics as after training, so a reset shows
            head = model.adversaries.head(h.name)
            head.body[1].running_mean.fill_(1.0)
            model.adversaries.load_head(h.name, head)
        before = {h.name: model.adversaries.head(h.name).state_dict() for h in model.adversary_heads}
        model.reinitialise_adversaries(member, seed=11)
        return before, {h.name: model.adversaries.head(h.name).state_dict() for h in model.adversary_heads}, model

    before, after, model = states(1)
    _, again, _ = states(1)
    for name, state in after.items():
        k = model.adversaries.head(name).num_classes // 3
        for key, value in state.items():
            assert torch.equal(value, again[name][key])  # deterministic given the seed
            if key.startswith("out."):
                changed = (value != before[name][key]).reshape(value.shape[0], -1).any(1)  # per output row
                assert changed.tolist() == [False] * k + [True] * k + [False] * k, (name, key)
            else:
                assert torch.equal(value, before[name][key]), (name, key)  # shared layers and BatchNorm untouched
    before, after, _ = states(0)
    for name, state in after.items():
        assert not torch.equal(state["body.0.weight"], before[name]["body.0.weight"])  # the shared layer renewed
        assert (state["out.weight"] != before[name]["out.weight"]).any(1).all()  # and every member's rows
        assert not state["body.1.running_mean"].any()  # and the BatchNorm statistics


def test_pair_shared_with_one_member_is_the_pair_layout():
    pair, shared = (loops({"layout": layout, "ensemble": 1}, modes=("auto",))[0] for layout in ("pair", "pair_shared"))
    assert shared.model.state_dict().keys() == pair.model.state_dict().keys()
    for _ in range(3):
        assert iterate(pair)["loss/main"] == iterate(shared)["loss/main"]


def test_pair_shared_gram_steps_equal_plain_steps_across_reinitialisations():
    # ensemble 2, reinit every 2: member 0 renewed at iteration 2 (whole networks), member 1 at 4 (its rows only)
    adversary = {"layout": "pair_shared", "ensemble": 2, "reinit_every": 2}
    gram, plain = loops(adversary, {"adversary_optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}})
    assert gram.step.gram and not plain.step.gram
    assert_same_training(gram, plain, 5)


@pytest.mark.parametrize("setting", [True, "auto"])  # "auto": channels-last on the CPU
def test_channels_last_encoders_compute_the_same(setting):
    experiments = [toy_experiment(training={"channels_last": c}) for c in (False, setting)]
    loops = [build_loop(e, {"train": ToyDataset()}) for e in experiments]
    convs = [
        next(m for m in lp.model.encoders.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        for lp in loops
    ]
    assert [c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs] == [False, True]
    a, b = loops
    for _ in range(3):
        assert iterate(a)["loss/main"] == pytest.approx(iterate(b)["loss/main"], rel=1e-5)


class _Flattening(torch.nn.Module):
    """A user's encoder that flattens with .view, which a channels-last map does not allow."""

    num_features = 4 * 16 * 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1)


def test_channels_last_auto_keeps_an_encoder_that_cannot_take_it_contiguous(monkeypatch):
    from mtdisent._engine import _setup

    e = toy_experiment()
    model = md.build_model(e)
    for task in model.encoders:
        model.encoders[task] = _Flattening()
    assert not _setup._channels_last(model, "auto", torch.device("cpu"))
    assert model.encoders["a"].conv.weight.is_contiguous()  # put back, and nothing ran in training mode
    with pytest.raises(md.SpecError, match=r"training\.channels_last=true: the encoder of task 'a' fails"):
        _setup._channels_last(model, True, torch.device("cpu"))
    assert not _setup._channels_last(model, "auto", torch.device("cuda"))  # off there until measured


@pytest.mark.parametrize("a", [0.97, 0.3])  # 0.3: W_0 nearly gone from W_k, the momentum is formed from W_0 first
@pytest.mark.parametrize("carried", [True, False])
def test_materialised_first_layer_is_the_closed_form(a, carried):
    """The in-place write equals W_k = a W_0 + b m_0 + X^T P and m_k = a2 W_0 + b2 m_0 + X^T Q."""
    from types import SimpleNamespace

    from mtdisent._engine._gram import _Block

    g, b, d, h = 3, 5, 7, 4
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(g, b, d, generator=gen), torch.randn(g, d, h, generator=gen)
    m0 = torch.randn(g, d, h, generator=gen) if carried else None
    p, q = torch.randn(g, b, h, generator=gen), torch.randn(g, b, h, generator=gen)
    w0, old_m = w.clone(), None if m0 is None else m0.clone()
    block = _Block(SimpleNamespace(weights=[w], kept_first=None), [0, 1, 2], x, ["s", "s", "t"], m0)  # type: ignore[arg-type]
    block.p_t, block.q_t = p.clone(), q.clone()
    block.a, block.b, block.a2, block.b2 = a, (-0.2 if carried else 0.0), 0.05, (0.6 if carried else 0.0)
    block.materialise(momentum=True)
    xt = x.transpose(1, 2)
    want_w, want_m = a * w0 + xt @ p, 0.05 * w0 + xt @ q
    if old_m is not None:
        want_w, want_m = want_w - 0.2 * old_m, want_m + 0.6 * old_m
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-5)
    assert block.new_momentum is not None
    torch.testing.assert_close(block.new_momentum, want_m, rtol=1e-5, atol=1e-5)


def test_gram_steps_start_from_the_main_steps_first_layer_product():
    """The main step's X W_0 is reused (one (G, B, D) x (G, D, H) product fewer) only while X and W_0 are unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    (loop,) = loops({"ensemble": 2, "reinit_every": 0, "conditional": False}, modes=("gram",))  # one stack
    iterate(loop)  # optimiser state exists from here on
    stack = loop.model.adversaries._stacks[0]
    g, d, h = stack.weights[0].shape
    b = loop.experiment.training.batch_size

    def flops(keep: bool) -> int:
        stack.keep_first = keep
        with FlopCounterMode(display=False) as counter:
            iterate(loop)
        assert stack.kept_first is None  # consumed (or never recorded), never left for a later batch
        return counter.get_total_flops()

    assert flops(False) - flops(True) == 2 * g * b * d * h
    # weights changed after the main step (a re-initialisation bumps their version): the product is recomputed
    stack.keep_first = True
    main = loop.step.main_step

    def main_then_reinitialise(lam):
        out = main(lam)
        loop.model.adversaries.reinitialise(loop.model.adversaries.names[:1], seed=1)
        return out

    loop.step.main_step = main_then_reinitialise
    with FlopCounterMode(display=False) as counter:
        iterate(loop)
    loop.step.main_step = main
    assert counter.get_total_flops() == flops(False)


@pytest.mark.parametrize("heads", ["separate", "stacked"])
@pytest.mark.parametrize("layout", ["pair", "source", "pair_shared"])
def test_bf16_autocast_runs_every_head_path_and_tracks_float32(heads, layout):
    """``training.amp="bf16"`` (what ``"auto"`` gives on CUDA) on every head path and layout: the losses stay within
    bf16 rounding of float32's. Adversaries split over several stacks (conditional inputs of tasks with different class
    counts, as in the fetal-US experiment) once wrote their bf16 logits into a float32 buffer by an indexed write,
    which does not cast, and failed on the first step."""
    adversary = {"layout": layout, "ensemble": 2, "reinit_every": 2}
    bf16, fp32 = (loops(adversary, {"amp": amp}, modes=("auto",), heads=heads)[0] for amp in ("bf16", "off"))
    for _ in range(4):
        mb, mf = iterate(bf16), iterate(fp32)
        for key in ("loss/main", "loss/a", "loss/b"):
            assert mb[key] == pytest.approx(mf[key], rel=0.03), key
