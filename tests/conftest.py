import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def two_tasks():
    import mtdisent as md

    return md.Experiment(
        tasks=[md.Task(name="plane", classes=["3VV", "LVOT", "Abd"]), md.Task(name="shadow", num_classes=2)],
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8, 16], "strides": [1, 2, 2]}},
        input_shape=(1, 16, 24),
        head={"hidden": [8]},
        adversary={"head": {"hidden": [8]}, "layout": "pair"},  # networks named by pair: "plane->shadow"
    )


class ToyDataset(torch.utils.data.Dataset):
    """Two tasks readable from the image: 'a' (2 classes) in the top half, 'b' (3 classes) in the bottom."""

    def __init__(self, n=120, seed=0, size=16, unlabelled_b=0.0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randint(0, 2, (n,), generator=g)
        self.b = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 1, size, size, generator=g) * 0.1
        self.x[:, :, : size // 2] += self.a[:, None, None, None].float()
        self.x[:, :, size // 2 :] += self.b[:, None, None, None].float()
        self.drop_b = torch.rand(n, generator=g) < unlabelled_b

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        labels = {"a": int(self.a[i])}
        if not self.drop_b[i]:
            labels["b"] = int(self.b[i])
        return self.x[i], labels


def toy_experiment(**overrides):
    import mtdisent as md

    spec = dict(
        tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=3)],
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}},
        input_shape=(1, 16, 16),
        head={"hidden": [16]},
        # fresh batches (not the default): the stream and resume tests count k + 1 batches per iteration
        adversary={"head": {"hidden": [16]}, "steps": 2, "weight": 0.1, "features": "fresh"},
        training={"iterations": 6, "batch_size": 20, "optimizer": {"lr": 3e-3}, "checkpoint_every": 3, "log_every": 1},
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return md.Experiment(**spec)


def iterate(loop):
    """Run the loop's next iteration by hand (what ``Loop.run`` does each time), return its metrics."""
    metrics = loop.step.update(loop.iteration)
    loop.iteration += 1
    return metrics
