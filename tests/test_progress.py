"""Progress a user can read: plain periodic lines when the output is a file, a bar that keeps its ETA on a terminal."""

import io
import re

import pytest
from conftest import ToyDataset, toy_experiment

import mtdisent as md
from mtdisent.engine import Progress, build_loop


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_with_iteration_eta_and_accuracy_when_not_a_terminal():
    out = io.StringIO()
    e = toy_experiment(training={"iterations": 6, "log_every": 1})
    md.train(e, data=ToyDataset(), callbacks=[Progress(every=0.0, stream=out)], quiet=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # every=0: one line per iteration
    assert re.match(
        r"iteration 1/6 \(17%\) elapsed \d+:\d\d eta \d+:\d\d \| a loss \d\.\d{3} acc \d\.\d\d \| b loss", lines[0]
    )
    assert lines[-1].startswith("iteration 6/6 (100%)") and "eta 0:00" in lines[-1]
    assert "adv a->b" in lines[-1]


def test_plain_lines_are_periodic_not_per_iteration():
    out = io.StringIO()
    e = toy_experiment(training={"iterations": 6})
    md.train(e, data=ToyDataset(), callbacks=[Progress(every=3600.0, stream=out)], quiet=True)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1/6", "6/6"]  # the first iteration and the end


def test_on_a_narrow_terminal_the_bar_keeps_counter_and_eta():
    out = Terminal()
    e = toy_experiment(training={"iterations": 6})
    md.train(e, data=ToyDataset(), callbacks=[Progress(stream=out)], quiet=True)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # drop terminal control sequences
    bar_lines = [line for line in text.splitlines() if "train" in line and "6/6" in line]
    assert bar_lines, text
    assert re.search(r"\d+:\d\d:\d\d", bar_lines[-1])  # elapsed and remaining time are shown
    assert all(len(line) <= 80 for line in text.splitlines())  # the metrics line is cut, not the bar
    assert "a loss" in text


def test_chance_of_a_conditional_adversary_is_the_within_class_majority_rate():
    source = md.datasets.get("shapes")(scale=0.0625, seed=0)  # train: 600 circle/white, 100 rect/white, 500 rect/black
    base = dict(
        tasks=source.tasks,
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8], "strides": [1, 2], "output": "pool"}},
        head={"hidden": [8]},
        training={"iterations": 1, "batch_size": 10},
    )
    conditional = build_loop(md.Experiment(**base, adversary={"conditional": True, "head": {"hidden": [8]}}), source)
    plain = build_loop(md.Experiment(**base, adversary={"conditional": False, "head": {"hidden": [8]}}), source)
    assert conditional.chance["shape->background"] == pytest.approx((600 + 500) / 1200)
    assert plain.chance["shape->background"] == pytest.approx(700 / 1200)
    assert plain.chance["background->shape"] == pytest.approx(600 / 1200)
