"""md.retrain_classifiers: heads trained again on a model's fixed features."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyDataset, toy_experiment

import mtdisent as md
from mtdisent.evaluation import collect_features


def toy_model(heads="stacked"):
    e = toy_experiment(backbone={"args": {"filters": [4, 8], "output": "flatten"}}, execution={"heads": heads})
    return md.build_model(e).eval()


def accuracy(model, data, task):
    return (model.predict(data.x)[task] == getattr(data, task)).float().mean().item()


@pytest.mark.parametrize("heads", ["stacked", "separate"])
def test_only_the_named_heads_learn_and_their_statistics_are_exact(heads):
    model, data = toy_model(heads), ToyDataset(240, seed=3, unlabelled_b=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert md.retrain_classifiers(model, data, tasks=["b"], epochs=15, lr=3e-3) is model
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("classifiers.b.") for k in changed), changed
    assert accuracy(model, data, "b") >= 0.95, accuracy(model, data, "b")  # random encoder, retrained head
    f, y = collect_features(model, data)
    head = model.classifiers.head("b")
    pre = f["b"][y["b"] >= 0] @ head.body[0].weight.T  # (M, 16) the BatchNorm input of the labelled samples
    torch.testing.assert_close(head.body[1].running_mean, pre.mean(0))
    torch.testing.assert_close(head.body[1].running_var, pre.var(0))


class Augmented(ToyDataset):
    """Each read adds noise drawn from torch's global generator (as ``fetal_us_sim``'s random shifts do)."""

    def __getitem__(self, i):
        x, labels = super().__getitem__(i)
        return x + 0.3 * torch.randn_like(x), labels


def test_the_seed_decides_and_the_default_retrains_every_head():
    data = Augmented(120, seed=1)
    runs = []
    for state, seed in ((10, 0), (11, 0), (11, 1)):  # the global generator's state does not matter, the seed does
        model = toy_model()
        torch.manual_seed(state)
        runs.append(md.retrain_classifiers(model, data, epochs=2, seed=seed).state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    differ = {k.split(".")[1] for k, v in runs[0].items() if not torch.equal(v, runs[2][k])}
    assert differ == {"a", "b"}


def test_bad_arguments_are_one_line_errors_before_any_work():
    model, data = toy_model(), ToyDataset(40, seed=0, unlabelled_b=1.0)
    cases = [
        ({"tasks": ["bb"]}, r"unknown task 'bb'.*'b'"),
        ({"tasks": "a"}, r"tasks='a': expected a non-empty list"),
        ({"epochs": 0}, r"epochs=0: expected an integer >= 1"),
        ({"lr": -1.0}, r"lr=-1.0: expected a number > 0"),
        ({"tasks": ["b"]}, r"task 'b': 0 labelled samples, need 2"),
    ]
    for kwargs, message in cases:
        with pytest.raises(md.MtdisentError, match=message):
            md.retrain_classifiers(model, data, **kwargs)
    with pytest.raises(md.MtdisentError, match=r"data: pass one split"):
        md.retrain_classifiers(model, md.DataSource({"train": data}, tasks=model.experiment.tasks))
