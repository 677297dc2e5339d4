"""BatchNorm statistics recomputed from data: exact averages, every kind of head, and the final model only."""

import copy
import types

import pytest
import torch
from conftest import ToyDataset, toy_experiment
from torch.optim.swa_utils import update_bn

import mtdisent as md


def stats(model):
    """Every running statistic by name (canonical keys: the same for stacked and separate heads)."""
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" not in k and "num_batches" not in k}


def trained_model(**overrides):
    run = md.train(toy_experiment(**overrides), data=ToyDataset(), quiet=True)
    return run.model


class Images(torch.utils.data.Dataset):
    """The toy images alone, for torch's update_bn (which calls model(x))."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0]


def test_statistics_are_torch_update_bn_exact_averages_over_full_batches():
    # separate heads, unconditional adversaries: every BatchNorm is a torch module that update_bn also resets
    model = trained_model(execution={"heads": "separate"}, adversary={"conditional": False})
    data = ToyDataset(n=110)  # two full batches of 50, the 10 left over are skipped
    reference = copy.deepcopy(model)
    update_bn(torch.utils.data.DataLoader(torch.utils.data.Subset(Images(data), range(100)), batch_size=50), reference)
    before = stats(model)
    md.recompute_batchnorm(model, data, batch_size=50)
    after, expected = stats(model), stats(reference)
    moved = [k for k in after if "running_mean" in k and not torch.allclose(after[k], before[k])]
    assert any(k.startswith("encoders.") for k in moved) and any(k.startswith("adversaries.") for k in moved)
    for key in after:
        if "num_batches" not in key:
            torch.testing.assert_close(after[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_stacked_heads_recompute_as_separate_heads_do():
    # conditional adversaries read the dataset's labels here; stacked BatchNorm must equal torch's per head
    stacked = trained_model(execution={"heads": "stacked"})
    separate = md.build_model(toy_experiment(execution={"heads": "separate"}))
    separate.load_state_dict(stacked.state_dict())
    for model in (stacked, separate):
        md.recompute_batchnorm(model, ToyDataset(n=100), batch_size=25)
    a, b = stats(stacked), stats(separate)
    assert a.keys() == b.keys() and any(k.startswith("adversaries.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(int(v.reshape(-1)[0]) == 4 for k, v in a.items() if "num_batches" in k)  # 100 / 25 batches


def test_weights_mode_and_momentum_are_left_as_they_were():
    model = trained_model()
    model.train()
    momenta = {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")}
    before = weights(model)
    md.recompute_batchnorm(model, ToyDataset(), batch_size=20)
    assert model.training and all(m.training for m in model.modules())
    assert {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_predictions_use_the_recomputed_statistics():
    model = trained_model()
    x = ToyDataset(n=40, seed=3).x
    logits_before = model.predict_proba(x)["a"]
    md.recompute_batchnorm(model, ToyDataset(), batch_size=20)
    assert not torch.allclose(model.predict_proba(x)["a"], logits_before)


@pytest.mark.parametrize(
    "data, batch_size, error, match",
    [
        (ToyDataset(n=30), 50, md.DataError, r"^holdout: .*one full batch of 50 images, the data has 30"),
        (ToyDataset(n=30), 1, md.MtdisentError, r"^batch_size: expected an integer of at least 2.*got 1"),
        (ToyDataset(n=30), -1, md.MtdisentError, r"^batch_size: .*got -1"),
        ({"train": ToyDataset(n=30)}, 10, md.MtdisentError, r"^data: pass one split .*\['train'\]"),
    ],
)
def test_bad_input_is_one_line_naming_what_is_wrong(data, batch_size, error, match):
    model = md.build_model(toy_experiment())
    before = stats(model)
    with pytest.raises(error, match=match) as err:
        md.recompute_batchnorm(model, data, batch_size=batch_size, split="holdout")
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, stats(model)[k]) for k, v in before.items())


class BreaksAt(ToyDataset):
    """Breaks the data contract (a label out of range) at one index."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def __getitem__(self, i):
        x, labels = super().__getitem__(i)
        return (x, {**labels, "a": 7}) if i == self.index else (x, labels)


def test_a_pass_that_fails_leaves_the_statistics_momentum_and_mode_as_they_were():
    model = trained_model()
    model.eval()
    before, momenta = stats(model), {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")}
    with pytest.raises(md.DataError):
        md.recompute_batchnorm(model, BreaksAt(70, n=100), batch_size=20)  # fails in the fourth batch
    assert all(torch.equal(v, stats(model)[k]) for k, v in before.items())
    assert {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    assert not any(m.training for m in model.modules())
    assert all(s.batchnorm_training is None for s in model.modules() if hasattr(s, "batchnorm_training"))


class Pooled(torch.nn.Module):
    """A backbone without BatchNorm: a convolution, then global average pooling."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv, self.num_features = torch.nn.Conv2d(in_channels, 4, 3), 4

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))  # (B, 4)


def test_a_model_without_batchnorm_is_returned_unchanged():
    md.register("backbone", "test_pooled", Pooled)
    try:
        model = md.build_model(
            toy_experiment(
                backbone={"name": "test_pooled", "args": {}},
                head={"hidden": [16], "batchnorm": False},
                adversary={"head": {"hidden": [16], "batchnorm": False}},
            )
        )
    finally:
        md.backbones.unregister("test_pooled")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert md.recompute_batchnorm(model, ToyDataset(n=10), batch_size=50) is model  # no error: nothing to do
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_training_option_recomputes_the_final_model_and_keeps_checkpoints_resumable(tmp_path):
    from mtdisent._engine._checkpoint import read_checkpoint

    plain = md.train(toy_experiment(), data=ToyDataset(), out_dir=tmp_path / "running", quiet=True)
    spec = toy_experiment(training={"batchnorm_stats": "recompute"})
    run = md.train(spec, data=ToyDataset(), out_dir=tmp_path / "recompute", quiet=True)
    # the last checkpoint is the running-statistics state, bit for bit what training without the option writes
    a, _ = read_checkpoint(tmp_path / "running" / "checkpoints" / "iter-00000006")
    b, _ = read_checkpoint(tmp_path / "recompute" / "checkpoints" / "iter-00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the final model: the same weights, statistics recomputed on the training split at the training batch size
    expected = md.recompute_batchnorm(copy.deepcopy(plain.model), ToyDataset(), batch_size=20)
    exported = md.load(tmp_path / "recompute")
    for model in (run.model, exported):
        for key, value in stats(expected).items():
            torch.testing.assert_close(stats(model)[key], value, msg=key)
        assert all(torch.equal(weights(model)[k], v) for k, v in weights(plain.model).items())
    assert any(not torch.equal(stats(plain.model)[k], v) for k, v in stats(expected).items())

    # a run a callback stops between periodic checkpoints: its last checkpoint still holds the running statistics
    class StopAt4(md.Callback):
        def on_iteration_end(self, loop, metrics):
            loop.should_stop = loop.iteration == 4

    stopped = md.train(spec, data=ToyDataset(), out_dir=tmp_path / "stopped", quiet=True, callbacks=[StopAt4()])
    last, _ = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "iter-00000004")
    reference = md.train(toy_experiment(training={"iterations": 4}), data=ToyDataset(), quiet=True).model
    assert stopped.iteration == 4
    assert all(torch.equal(last[f"model.{k}"], v) for k, v in reference.state_dict().items())
    # switching the option on resume is allowed: it changes no iteration
    longer = toy_experiment(training={"iterations": 9, "batchnorm_stats": "recompute"})
    resumed = md.train(longer, data=ToyDataset(), out_dir=tmp_path / "running", resume=True, quiet=True)
    assert resumed.iteration == 9
    assert not all(
        torch.equal(stats(resumed.model)[k], v) for k, v in stats(md.load(tmp_path / "running", "latest")).items()
    )


def test_training_refuses_recompute_without_a_full_batch_before_training(tmp_path):
    spec = toy_experiment(training={"batchnorm_stats": "recompute", "batch_size": 50})
    with pytest.raises(md.DataError, match=r"^training.batchnorm_stats: 'recompute' needs one full batch of 50"):
        md.train(spec, data=ToyDataset(n=40), out_dir=tmp_path, quiet=True)
    assert not (tmp_path / "checkpoints").exists()


class Transformed(torch.utils.data.Dataset):
    """``data`` with ``fn`` applied to each image (what a transform does to a whole batch, done per sample)."""

    def __init__(self, data, fn):
        self.data, self.fn = data, fn

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, labels = self.data[i]
        return self.fn(x), labels


def test_transform_changes_each_batch_before_its_forward_and_moves_no_statistic_itself():
    model = trained_model()
    data = ToyDataset(n=100)
    before = copy.deepcopy(model).eval()
    reference = md.recompute_batchnorm(copy.deepcopy(model), Transformed(data, lambda x: 2 * x + 1), batch_size=25)
    seen = []

    def transform(x, y):
        # a lever that runs the model (as recombine does) computes with the statistics the model came with and
        # must not count its forwards into the new ones
        seen.append(x.shape[0])
        assert not model.training
        features = model.encode(x)
        torch.testing.assert_close(features, before.encode(x))
        model.adversary_logits(features, labels=y)
        model.classify(model.encode(-x))
        return 2 * x + 1, y

    md.recompute_batchnorm(model, data, batch_size=25, transform=transform)
    assert seen == [25, 25, 25, 25]
    for key, value in stats(reference).items():
        torch.testing.assert_close(stats(model)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_training_option_replays_the_levers_batches_and_leaves_their_state(tmp_path):
    # intervene appends negated copies of 'b' images relabelled 0: the statistics training normalised with
    negate = {"name": "intervene", "args": {"task": "b", "transform": "negate", "target": 0, "source": [1, 2]}}
    spec = toy_experiment(levers=[negate], training={"batchnorm_stats": "recompute"})
    run = md.train(spec, data=ToyDataset(), out_dir=tmp_path / "run", quiet=True)
    running = md.train(toy_experiment(levers=[negate]), data=ToyDataset(), quiet=True)
    # the lever's last choices are training's last step's, not the replay's
    (lever,), (unreplayed,) = run.model.levers, running.model.levers
    assert lever.metrics() == unreplayed.metrics() and all(map(torch.equal, lever.last, unreplayed.last))
    last = md.load(tmp_path / "run", "latest")  # the same weights, running statistics
    plain = md.recompute_batchnorm(copy.deepcopy(last), ToyDataset(), batch_size=20)
    counters = dict(run.model.lever_modules.state_dict())
    assert counters and all(int(v) == 6 for v in counters.values())  # six main steps, none added by the replay
    assert all(torch.equal(v, last.lever_modules.state_dict()[k]) for k, v in counters.items())
    moved = [k for k, v in stats(plain).items() if "running_var" in k and not torch.allclose(stats(run.model)[k], v)]
    assert any(k.startswith("encoders.b") for k in moved)

    # the replay itself: the lever's augment on each training batch, its draws continuing from step 6
    replay = md.build_model(spec)
    replay.load_state_dict(last.state_dict())
    step = types.SimpleNamespace(model=replay, experiment=spec)
    augment = replay.levers[0].augment
    md.recompute_batchnorm(replay, ToyDataset(), batch_size=20, transform=lambda x, y: augment(step, x, y))
    for key, value in stats(replay).items():
        torch.testing.assert_close(stats(run.model)[key], value, msg=key)
