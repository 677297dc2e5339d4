"""Multi-scale adversaries (``adversary.scales="all"``): adversaries read every pooled scale of their source encoder."""

import pytest
import torch
from conftest import ToyDataset, iterate, toy_experiment
from test_execution import NTaskData, assert_states_close
from test_speed_paths import assert_same_training

import mtdisent as md
from mtdisent.engine import build_loop

DLTK = {"name": "dltk_residual", "args": {"filters": [4, 8, 16], "strides": [1, 2, 2], "output": "flatten"}}


class BrightnessBlind(torch.nn.Module):
    """Last features blind to an additive brightness offset; the pooled first scale (the stem) reads it.

    The stem is a 1x1 convolution, so ``stem(x + c) = stem(x) + w c``; the last features are computed from the
    stem's output minus its spatial mean, which removes that shift exactly (and any change of the stem's bias).
    """

    def __init__(self, in_channels):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, 3, 1)
        self.body = torch.nn.Conv2d(3, 4, 3, padding=1)

    def scale_modules(self):
        return [self.stem]

    def forward(self, x):
        h = self.stem(x)  # (B, 3, H, W)
        h = h - h.mean(dim=(2, 3), keepdim=True)
        return torch.tanh(self.body(h)).flatten(1)  # (B, 4 H W)


class NoScales(torch.nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class ForeignScales(NoScales):
    def scale_modules(self):
        return [torch.nn.Identity()]  # not one of its own modules


class Twice(NoScales):
    def scale_modules(self):
        return [self.conv]

    def forward(self, x):
        return self.conv(self.conv(x)[:, :1]).mean(dim=(2, 3)) if x.shape[1] == 1 else self.conv(x).mean(dim=(2, 3))


for _name, _cls in [
    ("test_brightness_blind", BrightnessBlind),
    ("test_no_scales", NoScales),
    ("test_foreign_scales", ForeignScales),
    ("test_twice", Twice),
]:
    if _name not in md.backbones.names():
        md.register("backbone", _name, _cls)


class Brightness(torch.utils.data.Dataset):
    """Task a: which half of the image holds a bar; task b (the nuisance): a global brightness offset."""

    def __init__(self, n=80, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randint(0, 2, (n,), generator=g)
        self.b = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
        for i in range(n):
            self.x[i, :, :, :4] += 1.0 if self.a[i] else 0.0
            self.x[i, :, :, 4:] += 0.0 if self.a[i] else 1.0
        self.x += 2.0 * self.b[:, None, None, None].float()

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.x[i], {"a": int(self.a[i]), "b": int(self.b[i])}


def experiment(scales, backbone=DLTK, **adversary):
    return toy_experiment(backbone=backbone, adversary={"scales": scales, **adversary})


def test_adversary_input_grows_by_the_sum_of_the_scale_widths():
    for conditional in (False, True):
        last, every = (md.build_model(experiment(s, conditional=conditional)) for s in ("last", "all"))
        assert every.scale_sizes == {"a": [4, 8, 16], "b": [4, 8, 16]}  # the stem and each further scale
        assert last.scale_sizes == {}
        for p in last.pairs:
            grown = every.adversary(p.source, p.target, p.member).in_features
            assert grown == last.adversary(p.source, p.target, p.member).in_features + 28
        x = torch.randn(5, 1, 16, 16)
        labels = {"a": torch.randint(0, 2, (5,)), "b": torch.randint(0, 3, (5,))}
        every.eval()
        with torch.no_grad():
            feats = every.encode(x)
            inputs = every.adversary_inputs(feats, labels)
        extra = {"a": 2, "b": 3} if conditional else {"a": 0, "b": 0}
        for h, z in zip(every.adversary_heads, inputs, strict=True):
            assert z.shape == (5, every.feature_sizes[h.source] + 28 + extra[h.source])
            assert torch.equal(z[:, : every.feature_sizes[h.source]], feats[h.source])  # the last features first
        assert every.feature_sizes == last.feature_sizes  # the classifiers read the last features only
        assert every.classifiers["a"].in_features == last.classifiers["a"].in_features


def test_dltk_scales_are_the_pooled_stem_and_last_unit_of_each_scale():
    e = toy_experiment(
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "units_per_scale": 2, "output": "flatten"}},
        adversary={"scales": "all"},
    )
    model = md.build_model(e).eval()
    encoder = model.encoders["a"]
    assert [m is n for m, n in zip(encoder.scale_modules(), [encoder.stem, encoder.blocks[1]], strict=True)]
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        feats = model.encode(x)
        stem = encoder.stem(x).mean(dim=(2, 3))
        last = feats["a"].view(3, 8, 8, 8).mean(dim=(2, 3))  # flatten output: the last scale's map
    assert torch.allclose(feats.scales["a"], torch.cat([stem, last], dim=1), atol=1e-6)


def held_out_accuracy(model, data):
    """Accuracy of the adversary a->b on ``data`` (eval mode)."""
    y = {"a": data.a, "b": data.b}
    model.eval()
    with torch.no_grad():
        logits = model.adversary_logits(model.encode(data.x), labels=y)[0]  # (B, K_max)
    model.train()
    return float((logits.argmax(-1) == data.b).float().mean())


def test_an_adversary_reads_a_nuisance_visible_only_in_the_first_scale():
    train, test = Brightness(), Brightness(n=400, seed=1)
    accuracy = {}
    for scales in ("last", "all"):
        e = toy_experiment(
            tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=2)],
            backbone="test_brightness_blind",
            input_shape=(1, 8, 8),
            pairs=[md.Pair(source="b", target="a", enabled=False)],  # one adversary: b from a's features
            adversary={"scales": scales, "conditional": False, "ensemble": 1, "steps": 0},
            training={"adversary_optimizer": {"name": "adam", "lr": 1e-2}},
        )
        loop = build_loop(e, {"train": train})
        with torch.no_grad():
            feats = loop.model.encode(train.x)
        for _ in range(150):
            loop.step.adversary_step(feats, {"a": train.a, "b": train.b})
        accuracy[scales] = held_out_accuracy(loop.model, test)
    assert accuracy["last"] < 0.65  # the last features carry nothing of the brightness (chance: 0.5 +- 0.025)
    assert accuracy["all"] > 0.95  # the pooled stem does


def reading_only_the_scales(scales):
    """A model whose adversary a->b has zero weights on the last features: it reads only the scales (and label)."""
    e = toy_experiment(
        backbone=DLTK,
        adversary={"scales": scales, "steps": 0, "weight": 1.0, "ensemble": 1, "layout": "pair"},
        pairs=[md.Pair(source="b", target="a", enabled=False)],
        tasks=[md.Task(name="a", num_classes=2, loss_weight=0), md.Task(name="b", num_classes=3, loss_weight=0)],
        training={"l2": 0.0, "hflip": False, "batch_size": 40, "optimizer": {"name": "sgd", "lr": 0.05}},
        execution={"heads": "separate"},
    )
    loop = build_loop(e, {"train": ToyDataset(40)})
    first = loop.model.adversaries["a->b"].body[0]
    with torch.no_grad():
        first.weight[:, : loop.model.feature_sizes["a"]] = 0.0  # (hidden, D + S + K): the last features' columns
    return loop


def test_the_adversarial_term_reaches_early_layers_through_the_scales():
    data = ToyDataset(40)
    y = {"a": data.a, "b": data.b}
    grads = {}
    for scales in ("last", "all"):
        loop = reading_only_the_scales(scales)
        loop.model.train()
        loop.step._pair_terms(loop.model.encode(data.x, y), y, 1.0).sum().backward()
        grads[scales] = loop.model.encoders["a"].stem[1].weight.grad  # the stem's convolution
    assert grads["last"] is None or grads["last"].abs().max() == 0  # nothing reaches the encoder
    assert grads["all"].abs().max() > 1e-4  # through the pooled stem (and the later scales)


def test_the_encoder_removes_what_an_early_scale_adversary_reads():
    # only the adversarial term acts (task weights 0): the encoder raises the loss of an adversary that reads the
    # scales alone, so it must change what its early layers carry
    data = ToyDataset(40)
    loop = reading_only_the_scales("all")
    adversary, model = loop.model.adversaries["a->b"], loop.model

    def loss():
        model.train()
        with torch.no_grad(), torch.random.fork_rng():
            z = model.adversary_inputs(model.encode(data.x), {"a": data.a, "b": data.b})[0]
            saved = {k: v.clone() for k, v in adversary.state_dict().items()}
            value = float(torch.nn.functional.cross_entropy(adversary(z), data.b))
            adversary.load_state_dict(saved)
        return value

    before = loss()
    for _ in range(5):
        loop.step.main_step(1.0)
    assert loss() > before


def test_a_backbone_without_scales_is_a_one_line_error_naming_it():
    with pytest.raises(md.SpecError) as info:
        md.build_model(experiment("all", backbone="test_no_scales"))
    message = str(info.value)
    assert "\n" not in message
    assert "adversary.scales" in message and "'test_no_scales'" in message and "scale_modules()" in message
    md.build_model(experiment("last", backbone="test_no_scales"))  # fine without scales
    single = toy_experiment(backbone="test_no_scales", tasks=[md.Task(name="a", num_classes=2)])
    md.build_model(single.model_copy(update={"adversary": md.AdversarySpec(scales="all")}))  # no adversaries
    with pytest.raises(md.ComponentError, match="'test_foreign_scales'.*the backbone's own submodules"):
        md.build_model(experiment("all", backbone="test_foreign_scales"))
    with pytest.raises(md.ComponentError, match="'test_twice'.*exactly once per forward pass.*one ran twice"):
        md.build_model(experiment("all", backbone="test_twice"))


def test_features_without_their_scales_are_refused():
    model = md.build_model(experiment("all"))
    feats = model.features(torch.randn(4, 1, 16, 16))
    plain = dict(feats)  # what concatenating batches by hand gives
    labels = {"a": torch.zeros(4, dtype=torch.long), "b": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(md.MtdisentError, match="scales='all'.*do not carry.*model.encode"):
        model.adversary_logits(plain, labels=labels)
    assert model.adversary_logits(feats, labels=labels).shape[:2] == (len(model.pairs), 4)


@pytest.mark.parametrize("objective", ["minmax", "gradient_reversal", "projection"])
@pytest.mark.parametrize("features", ["reuse", "fresh"])
def test_stacked_and_separate_heads_agree_with_scales(objective, features):
    data = NTaskData([3, 2, 2], unlabelled=0.2)
    loops = []
    for heads in ("stacked", "separate"):
        e = md.Experiment(
            tasks=[md.Task(name=f"t{i}", num_classes=k) for i, k in enumerate([3, 2, 2])],
            backbone={"name": "dltk_residual", "args": {"filters": [2, 4], "strides": [1, 2], "output": "pool"}},
            input_shape=(1, 8, 8),
            head={"hidden": [8]},
            adversary={
                "head": {"hidden": [6]},
                "objective": objective,
                "steps": 2,
                "weight": 0.3,
                "features": features,
                "scales": "all",
            },
            pairs=[md.Pair(source="t1", target="t2", enabled=False)],
            training={
                "batch_size": 10,
                "optimizer": {"name": "sgd", "lr": 1e-2},
                "adversary_optimizer": {"name": "sgd", "lr": 1e-2},
            },
            execution={"heads": heads},
        )
        loops.append(build_loop(e, {"train": data}))
    fast, ref = loops
    assert fast.step.gram == (features == "reuse") and not ref.step.gram  # the Gram shortcut reads the scales too
    assert fast.model.adversary("t0", "t1").in_features == 4 + 6 + 3  # last features, scales, own label
    for _ in range(4):
        mf, mr = iterate(fast), iterate(ref)
        for key in ("loss/main", *[k for k in mr if k.startswith(("acc/", "adv_acc/"))]):
            assert mf[key] == pytest.approx(mr[key], abs=1e-4), key
    assert_states_close(fast.model, ref.model)


def test_gram_steps_equal_plain_steps_with_scales():
    out = []
    for mode in ("gram", "plain"):
        e = toy_experiment(
            backbone=DLTK,
            adversary={"features": "reuse", "steps": 4, "scales": "all", "reinit_every": 3},
            training={"l2": 1e-3, "adversary_optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
            execution={"adversary_steps": mode},
        )
        out.append(build_loop(e, {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}))
    assert out[0].step.gram and not out[1].step.gram
    assert_same_training(*out, 5)


def test_scales_train_save_load_and_evaluate(tmp_path):
    e = experiment("all", features="fresh")
    e = e.model_copy(update={"training": e.training.model_copy(update={"iterations": 4, "checkpoint_every": 2})})
    data = {"train": ToyDataset(), "val": ToyDataset(40, seed=1), "test": ToyDataset(40, seed=2)}
    run = md.train(e, data=data, out_dir=tmp_path, quiet=True)
    assert "adv_acc/a->b" in run.history[-1]
    loaded = md.load(tmp_path)
    x = ToyDataset(6, seed=3).x
    a, b = run.model.features(x), loaded.features(x)
    assert torch.equal(a.scales["a"], b.scales["a"])
    report = md.evaluate(loaded, data, probe_data=False)
    assert ("a", "b") in report.adversary_accuracy


def test_compiled_encoders_capture_the_same_scales():
    # forward hooks are registered around each forward; torch.compile must not bypass them (checked here with the
    # cheap "eager" backend; training.compile uses the default backend, checked by hand with inductor on the CPU)
    model = md.build_model(experiment("all")).eval()
    compiled = {t: torch.compile(m, backend="eager") for t, m in model.encoders.items()}
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = model.encode(x)
        for _ in range(2):  # the hooks of a second forward are new objects: no stale capture
            got = model.encode_with(compiled, x)
            for t in ref.scales:
                assert torch.allclose(got.scales[t], ref.scales[t], atol=1e-6)


def test_check_backbone_checks_the_scales_contract():
    from mtdisent.testing import check_backbone

    check_backbone("dltk_residual", args={"filters": [4, 8], "units_per_scale": 2})
    with pytest.raises(AssertionError, match="'test_twice'.*exactly once"):
        check_backbone("test_twice")
    with pytest.raises(AssertionError, match="'test_foreign_scales'.*own submodules"):
        check_backbone("test_foreign_scales")
