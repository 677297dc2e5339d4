"""The README's code examples run as written."""

import json
import re
from pathlib import Path

import torch
from conftest import ToyDataset, toy_experiment

import mtdisent as md

README = (Path(__file__).parent.parent / "README.md").read_text()


def example(name):
    """The Python block after ``<!-- README example: NAME ... -->``."""
    match = re.search(rf"<!-- README example: {name}\b.*?-->\s*```python\n(.*?)```", README, re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


class FallingMetric(md.Metric):
    """A validation metric that gets worse every time: only the first validation is ever the best."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def update(self, logits, labels):
        pass

    def compute(self):
        self.calls += 1
        return {"falling": -float(self.calls)}


def test_the_early_stopping_callback_from_the_readme_stops_early_and_is_checkpointed(tmp_path):
    namespace = {}
    exec(example("callback"), namespace)  # defines EarlyStop
    early_stop = namespace["EarlyStop"]
    e = toy_experiment(training={"iterations": 40, "eval_every": 1, "select_metric": "falling", "checkpoint_every": 2})
    data = {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}
    run = md.train(e, data=data, out_dir=tmp_path, callbacks=[early_stop(patience=3)], metrics=[FallingMetric()])
    assert run.best["iteration"] == 1 and run.iteration == 4  # validations 2, 3, 4 found nothing better
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoints" / "iter-00000004").is_dir()
    state = json.loads((tmp_path / "checkpoints" / "iter-00000004" / "state.json").read_text())
    assert state["callbacks"]["EarlyStop"] == {"bad": 3}  # its state_dict travels with the checkpoint
    saved = md.load(tmp_path / "checkpoints" / "iter-00000004")
    assert all(torch.equal(v, run.model.state_dict()[k].cpu()) for k, v in saved.state_dict().items())
