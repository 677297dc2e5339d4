"""One data path for training and evaluation: the contract's checks, DataLoader workers, transforms."""

import pytest
import torch
from conftest import ToyDataset, toy_experiment

import mtdisent as md
from mtdisent.evaluation import EvaluationError, collect_features
from mtdisent.testing import check_dataset


class ItemDataset(torch.utils.data.Dataset):
    """Data contract items; 'shadow' is missing for every third sample."""

    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 16, 24, generator=g)
        self.plane = torch.randint(0, 3, (n,), generator=g)
        self.shadow = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.plane)

    def __getitem__(self, i):
        labels = {"plane": int(self.plane[i])}
        if i % 3:
            labels["shadow"] = torch.tensor(int(self.shadow[i]))
        return self.x[i], labels


class TensorDataset(ItemDataset):
    """The same data exposing ``images`` and a label table (the tensor-backed path)."""

    def __init__(self, n=10):
        super().__init__(n)
        self.images = self.x
        shadow = self.shadow.clone()
        shadow[::3] = -1
        self.labels = {"plane": self.plane, "shadow": shadow}


# -- features over a dataset ---------------------------------------------------------------------------
def test_collect_features_item_path(two_tasks):
    model = md.build_model(two_tasks)
    model.train()
    ds = ItemDataset(10)
    feats, labels = collect_features(model, ds, batch_size=4)
    assert model.training  # mode restored
    assert set(feats) == set(labels) == {"plane", "shadow"}
    assert feats["plane"].shape == (10, 16 * 4 * 6)
    assert torch.allclose(feats["plane"], model.features(ds.x)["plane"], atol=1e-5)
    assert labels["plane"].tolist() == ds.plane.tolist()
    assert labels["shadow"].tolist() == [-1 if i % 3 == 0 else int(ds.shadow[i]) for i in range(10)]
    pen, _ = collect_features(model, ds, layer="penultimate")
    assert pen["shadow"].shape == (10, 8)
    feats["plane"].requires_grad_(True)  # ordinary tensors a probe can be trained on, not inference tensors


def test_collect_features_tensor_path_matches_item_path_and_workers(two_tasks):
    model = md.build_model(two_tasks)
    fast, fast_labels = collect_features(model, TensorDataset(10), batch_size=3)
    slow, slow_labels = collect_features(model, ItemDataset(10), batch_size=7)
    workers, worker_labels = collect_features(model, ItemDataset(10), batch_size=2, num_workers=2)
    assert torch.allclose(fast["plane"], slow["plane"], atol=1e-5)
    assert torch.equal(slow["plane"], workers["plane"])
    assert fast_labels["shadow"].tolist() == slow_labels["shadow"].tolist() == worker_labels["shadow"].tolist()


def test_collect_features_rejects_bad_layer_and_items(two_tasks):
    model = md.build_model(two_tasks)
    with pytest.raises(EvaluationError, match="unknown layer 'logits'"):
        collect_features(model, ItemDataset(2), layer="logits")

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 16, 24)

    with pytest.raises(md.DataError, match=r"split 'test', sample 0: expected \(image, labels\)"):
        collect_features(model, Bad(), split="test")


# -- the contract ---------------------------------------------------------------------------------------
class ExtraFactor(ToyDataset):
    """ToyDataset whose items also carry a factor the experiment does not declare."""

    def __getitem__(self, i):
        x, labels = super().__getitem__(i)
        return x, {**labels, "pos": i % 4}


def test_labels_of_undeclared_tasks_are_ignored():
    run = md.train(toy_experiment(training={"iterations": 2}), data=ExtraFactor(), quiet=True)
    assert run.iteration == 2


def test_a_declared_task_without_any_label_is_refused():
    e = toy_experiment(training={"iterations": 12})
    items = ToyDataset(40)
    items.drop_b[:] = True  # no label for task b anywhere: known after one pass
    with pytest.raises(md.DataError, match="split 'train': task 'b' has no labelled sample"):
        md.train(e, data=items, quiet=True)
    table = TensorDataset(10)
    table.labels["shadow"][:] = -1  # a label table says so up front
    two = md.Experiment(tasks=[md.Task(name="plane", num_classes=3), md.Task(name="shadow", num_classes=2)])
    with pytest.raises(md.DataError, match="split 'train': task 'shadow' has no labelled sample"):
        md.train(two, data=table, quiet=True)


def test_errors_found_in_a_worker_are_one_line():
    ds = ToyDataset(40)
    ds.x[13] = float("nan")
    e = toy_experiment(training={"iterations": 3, "num_workers": 2, "batch_size": 40})
    with pytest.raises(md.DataError) as err:
        md.train(e, data=ds, quiet=True)
    assert str(err.value) == "split 'train', sample 13: image contains NaN or inf values"


@pytest.mark.parametrize("features", ["fresh", "reuse"])
def test_workers_give_the_same_training_and_resume_exactly(tmp_path, features):
    def experiment(iterations, workers):
        return toy_experiment(
            adversary={"features": features},
            training={"iterations": iterations, "checkpoint_every": 3, "num_workers": workers, "hflip": True},
        )

    data = {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}
    plain = md.train(experiment(6, 0), data=data, quiet=True)
    md.train(experiment(3, 2), data=data, out_dir=tmp_path, quiet=True)
    resumed = md.train(experiment(6, 2), data=data, out_dir=tmp_path, resume=True, quiet=True)
    a, b = plain.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class AugmentedToy(ToyDataset):
    """ToyDataset with noise drawn from torch's global RNG in ``__getitem__``, as random crops and shifts are."""

    def __getitem__(self, i):
        x, labels = super().__getitem__(i)
        return x + 0.1 * torch.randn(x.shape), labels


def test_augmentation_from_the_global_rng_follows_the_experiment_seed_and_resumes_exactly(tmp_path):
    e = toy_experiment(training={"iterations": 6, "checkpoint_every": 3})
    data = {"train": AugmentedToy()}
    torch.manual_seed(1)  # the caller's stream: a new process starts it at a random seed
    plain = md.train(e, data=data, quiet=True)
    torch.manual_seed(2)
    caller = torch.get_rng_state()
    short = e.model_copy(update={"training": e.training.model_copy(update={"iterations": 3})})
    md.train(short, data=data, out_dir=tmp_path, quiet=True)
    resumed = md.train(e, data=data, out_dir=tmp_path, resume=True, quiet=True)
    assert torch.equal(torch.get_rng_state(), caller)  # training drew from streams of its own
    a, b = plain.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- per-sample transforms -------------------------------------------------------------------------------
def test_with_transform_applies_to_the_chosen_splits_only():
    source = md.DataSource({"train": TensorDataset(6), "test": TensorDataset(6)})
    seen = []

    def shift(image):
        seen.append(image.shape)
        return (image + 100.0).numpy()  # NumPy out, as MONAI and albumentations may give

    out = source.with_transform(shift)
    x, labels = out["train"][1]
    assert isinstance(x, torch.Tensor) and torch.equal(x, source["train"][1][0] + 100.0)
    assert labels == source["train"][1][1] and out["test"] is source["test"]
    assert seen == [(1, 16, 24)]
    table = out["train"].labels  # the label table passes through
    assert table.keys() == {"plane", "shadow"} and all(torch.equal(table[t], source["train"].labels[t]) for t in table)
    with pytest.raises(md.DataError, match="no split 'tets'.*'test'"):
        source.with_transform(shift, splits=["tets"])


def test_transforms_run_during_training_and_failures_name_the_sample():
    calls = []

    def flip(image):
        calls.append(1)
        return image.flip(-1)

    data = md.DataSource({"train": ToyDataset(40)}).with_transform(flip)
    md.train(toy_experiment(training={"iterations": 2}), data=data, quiet=True)
    assert len(calls) == 2 * 3 * 20  # 2 iterations x (1 main + 2 fresh adversary batches) x 20 images

    def broken(image):
        raise ValueError("bad crop")

    data = md.DataSource({"train": ToyDataset(40)}).with_transform(broken)
    with pytest.raises(md.DataError, match=r"sample \d+: the transform broken failed: ValueError: bad crop"):
        md.train(toy_experiment(training={"iterations": 2}), data=data, quiet=True)


# -- conformance of dataset plugins -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, args",
    [("shapes", {"scale": 0.0625}), ("shapes_n", {"num_tasks": 3, "n_train": 40, "n_eval": 8, "image_size": [32, 32]})],
)
def test_first_party_datasets_pass_check_dataset(name, args):
    source = check_dataset(name, args=args)
    assert "train" in source


def test_check_dataset_catches_a_dataset_that_breaks_its_contract():
    good = TensorDataset(6)
    tasks = [md.Task(name="plane", num_classes=3), md.Task(name="shadow", num_classes=2)]
    check_dataset(md.DataSource({"train": good}, tasks=tasks, input_shape=(1, 16, 24)))

    class Transforming(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x * 2, y  # dataset[i] no longer equals images[i]

    with pytest.raises(AssertionError, match="sample 0: dataset\\[i\\] differs from images\\[i\\]"):
        check_dataset(md.DataSource({"train": Transforming(6)}, tasks=tasks, input_shape=(1, 16, 24)))
    bad = TensorDataset(6)
    bad.labels["plane"][2] = 5
    with pytest.raises(AssertionError, match="sample 2, task 'plane': label 5 is out of range"):
        check_dataset(md.DataSource({"train": bad}, tasks=tasks, input_shape=(1, 16, 24)))
