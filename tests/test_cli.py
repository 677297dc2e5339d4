import json

import pytest

import mtdisent as md
from mtdisent._cli import apply_overrides, main

SPEC_PY = """
import sys
sys.path.insert(0, {tests!r})
from conftest import ToyDataset, toy_experiment

experiment = toy_experiment(training={{"iterations": 4, "checkpoint_every": 2}})
data = {{"train": ToyDataset(), "val": ToyDataset(40, seed=1)}}
"""


def test_train_resume_and_build_from_the_command_line(tmp_path, capsys):
    import pathlib

    spec = tmp_path / "spec.py"
    spec.write_text(SPEC_PY.format(tests=str(pathlib.Path(__file__).parent)))
    out = tmp_path / "run"
    assert main(["train", str(spec), "--out-dir", str(out), "--quiet", "--set", "training.iterations=2"]) == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    assert main(["train", str(spec), "--out-dir", str(out), "--quiet", "--resume"]) == 0
    assert "trained 4 iterations" in capsys.readouterr().out
    assert md.load(out).experiment.training.iterations == 4
    assert main(["build", str(spec)]) == 0
    assert "adversary a->b" in capsys.readouterr().out


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(
        md.Experiment(
            tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=2)], input_shape=(1, 8, 8)
        ).model_dump_json()
    )
    assert main(["train", str(spec), "--out-dir", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no data" in capsys.readouterr().err
    assert main(["build", str(spec), "--set", "adversary.weight=-1"]) == 2
    assert "adversary.weight" in capsys.readouterr().err


def test_overrides():
    e = md.Experiment(tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=2)])
    e2 = apply_overrides(
        e, ["training.iterations=500", "tasks.1.loss_weight=2", "adversary.objective.name=confusion", "name=my run"]
    )
    assert e2.training.iterations == 500 and e2.tasks[1].loss_weight == 2.0
    assert e2.adversary.objective.name == "confusion" and e2.name == "my run"
    with pytest.raises(md.SpecError, match="KEY=VALUE"):
        apply_overrides(e, ["training.iterations"])
    with pytest.raises(md.SpecError, match="index below 2"):
        apply_overrides(e, ["tasks.5.loss_weight=1"])
    with pytest.raises(md.SpecError, match="unknown field 'iteratons'"):
        apply_overrides(e, ["training.iteratons=5"])
    assert json.loads(e2.model_dump_json())["training"]["iterations"] == 500


def test_plugins_command_lists_distributions(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "dltk_residual" in out and "minmax" in out and "mtdisent" in out
