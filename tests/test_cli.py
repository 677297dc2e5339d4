import json
import shutil
import sys

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
    assert "adversary a->*" in capsys.readouterr().out  # one network per source task, the default


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


# ----------------------------------------------------------------------------------------------------
# runs trained from a Python spec file that defines its own data
# ----------------------------------------------------------------------------------------------------
INLINE_DATA = """
import torch


class Inline(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randint(0, 2, (n,), generator=g)
        self.b = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 1, 8, 8, generator=g) * 0.1
        self.x[:, :, :4] += self.a[:, None, None, None].float()
        self.x[:, :, 4:] += self.b[:, None, None, None].float()

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.x[i], {"a": int(self.a[i]), "b": int(self.b[i])}


data = {"train": Inline(40, 0), "val": Inline(20, 1), "test": Inline(20, 2)}
"""

INLINE_SPEC = (
    INLINE_DATA
    + """
import mtdisent as md

experiment = md.Experiment(
    tasks=[md.Task(name="a", classes=["left", "right"]), md.Task(name="b", classes=["red", "green", "blue"])],
    backbone={"name": "dltk_residual", "args": {"filters": [4], "strides": [1], "output": "pool"}},
    head={"hidden": [8]},
    adversary={"head": {"hidden": [8]}, "steps": 1, "ensemble": 1},
    training={"iterations": 2, "batch_size": 10, "checkpoint_every": 2, "log_every": 1},
)
"""
)


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    """A run trained by ``mtdisent train`` from a spec file whose data is an inline Dataset (no registry)."""
    root = tmp_path_factory.mktemp("inline")
    spec = root / "spec.py"
    spec.write_text(INLINE_SPEC)
    run = root / "run"
    assert main(["train", str(spec), "--out-dir", str(run), "--quiet"]) == 0
    return spec, run


def test_eval_and_compare_rerun_the_spec_file_for_its_data(inline_run, tmp_path, capsys):
    spec, run = inline_run
    assert md.load_spec(spec).data is None  # no registered dataset: the data lives in the spec file only
    record = json.loads((run / "spec_source.json").read_text())
    assert record["path"] == str(spec.resolve())
    assert main(["eval", str(run), "--no-figures", "--no-probes"]) == 0
    report = json.loads((run / "eval-test" / "report.json").read_text())
    assert report["info"]["n_eval"] == 20 and report["info"]["split"] == "test"
    assert (run / "eval-test" / "report.md").is_file()
    capsys.readouterr()
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    rows = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert rows[2].startswith("| all runs | 2 |"), rows


def test_a_moved_or_edited_spec_file_is_named_and_data_can_be_given(inline_run, tmp_path, capsys):
    spec, run = inline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    moved = tmp_path / "spec.py"
    moved.write_text(spec.read_text() + "\n# edited\n")
    (copy / "spec_source.json").write_text(json.dumps({"path": str(moved), "sha256": "0" * 64}))
    assert main(["eval", str(copy), "--no-figures", "--no-probes"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(moved) in line and "changed since" in line and "--data PATH" in line
    moved.unlink()
    assert main(["eval", str(copy), "--no-figures", "--no-probes"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(moved) in line and "no longer exists" in line and "--data PATH" in line
    # --data: a file that defines data (an experiment is not needed)
    data_file = tmp_path / "data.py"
    data_file.write_text(INLINE_DATA)
    assert main(["eval", str(copy), "--no-figures", "--no-probes", "--data", str(data_file)]) == 0
    assert main(["compare", str(copy), "--data", str(data_file)]) == 0
    capsys.readouterr()
    assert main(["eval", str(copy), "--data", str(tmp_path / "nothing.py")]) == 2
    assert "nothing.py" in _error_line(capsys.readouterr().err)


def test_sweep_takes_its_data_from_a_data_file_and_its_runs_can_be_evaluated(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    namespace: dict = {}
    exec(INLINE_SPEC, namespace)
    e = apply_overrides(namespace["experiment"], ["training.iterations=1", "training.checkpoint_every=1"])
    spec.write_text(e.model_dump_json())
    (tmp_path / "data.py").write_text(INLINE_DATA)
    args = [
        "sweep",
        str(spec),
        "--out-dir",
        str(tmp_path / "sw"),
        "--weights",
        "0",
        "--data",
        str(tmp_path / "data.py"),
    ]
    assert main([*args, "--quiet"]) == 0
    run = tmp_path / "sw" / "w0_s0"
    assert json.loads((run / "spec_source.json").read_text())["path"] == str((tmp_path / "data.py").resolve())
    assert main(["eval", str(run), "--no-figures", "--no-probes"]) == 0


# ----------------------------------------------------------------------------------------------------
# one-line errors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "missing", ["does not exist"]),
        (lambda d: d / "runs_*", ["matches no run directory"]),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", ["is a file, not a run directory"]),
        (lambda d: (d / "empty").mkdir() or d / "empty", ["holds no spec.json"]),
        (
            lambda d: (d / "bad").mkdir() or (d / "bad" / "spec.json").write_text("{garbage") and d / "bad",
            ["spec.json", "is not valid JSON"],
        ),
    ],
)
def test_compare_refuses_what_is_not_a_run_in_one_line(make, fragments, tmp_path, capsys):
    target = make(tmp_path)
    assert main(["compare", str(target)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(target) in line, line
    for f in fragments:
        assert f in line, line


def test_eval_skips_a_torn_metrics_line_with_one_warning(inline_run, tmp_path, capsys):
    import matplotlib  # noqa: F401 (the test extra installs it: figures are tested, not skipped)

    _, run = inline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = copy / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    with metrics.open("a") as f:
        f.write('{"iteration": 3, "acc/a": 0.')  # a write cut short by a crash
    assert main(["eval", str(copy), "--no-probes"]) == 0
    warnings_ = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(warnings_) == 1 and warnings_[0].startswith("warning: "), warnings_
    assert str(metrics) in warnings_[0] and f"({n_lines + 1};" in warnings_[0]
    assert (copy / "eval-test" / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------------
# reports say what they scored
# ----------------------------------------------------------------------------------------------------
def test_eval_report_names_model_checkpoint_splits_and_classes(inline_run, tmp_path, capsys):
    _, run = inline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["eval", str(copy), "--no-figures"]) == 0
    md_text = (copy / "eval-test" / "report.md").read_text()
    assert f"- model: {copy}\n" in md_text
    assert "- checkpoint: best (iteration 2)\n" in md_text
    assert "- scored on split: test (20 samples)\n" in md_text
    assert "- probes fitted on split: train (40 samples)\n" in md_text
    per_class = next(r for r in md_text.splitlines() if r.startswith("| a |")).split("|")[4]  # the Per task table
    assert "left " in per_class and "right " in per_class, per_class
    worst = [r for r in md_text.splitlines() if r.startswith("| b |") and "(n=" in r][0]
    assert any(f"b={c}" in worst for c in ("red", "green", "blue")), worst
    info = json.loads((copy / "eval-test" / "report.json").read_text())["info"]
    assert info["class_names"] == {"a": ["left", "right"], "b": ["red", "green", "blue"]}
    assert (info["model"], info["checkpoint"], info["checkpoint_iteration"]) == (str(copy), "best", 2)
    assert main(["eval", str(copy), "--no-figures", "--no-probes", "--which", "final"]) == 0
    md_text = (copy / "eval-test" / "report.md").read_text()
    assert "- checkpoint: final (iteration 2)\n" in md_text and "- probes: none fitted\n" in md_text


# ----------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------
def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 4:
            rows[cells[0]] = cells[1:]
    return rows


def _build_table(tmp_path, capsys, tasks, adversary) -> tuple[md.Experiment, dict[str, list[str]]]:
    """``mtdisent build`` of a tiny pooled-feature experiment with ``tasks`` and ``adversary``: it, its table rows."""
    e = md.Experiment(
        tasks=tasks,
        input_shape=(1, 8, 8),
        backbone={"name": "dltk_residual", "args": {"filters": [4], "strides": [1], "output": "pool"}},
        adversary=adversary,
    )
    spec = tmp_path / "spec.json"
    spec.write_text(e.model_dump_json())
    assert main(["build", str(spec)]) == 0
    return e, _table_rows(capsys.readouterr().out)


def test_build_takes_input_shape_from_the_data_and_counts_stacked_heads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    spec = tmp_path / "spec.py"
    spec.write_text(INLINE_SPEC)  # no input_shape: the data's images are 1 x 8 x 8
    assert main(["build", str(spec)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows["encoder a"][0] == "1x8x8"
    separate = md.build_model(
        md.load_spec(spec).model_copy(update={"execution": md.ExecutionSpec(heads="separate")}), (1, 8, 8)
    )
    for name in ("a", "b"):
        expected = sum(p.numel() for p in separate.classifiers[name].parameters())
        assert rows[f"classifier {name}"][2] == f"{expected:,}"
    for key in ("a->*", "b->*"):  # one network per source task, the default
        expected = sum(p.numel() for p in separate.adversaries[key].parameters())
        assert expected > 0 and rows[f"adversary {key} (w=1)"][2] == f"{expected:,}"
    assert rows["total"][2] == f"{sum(p.numel() for p in separate.parameters()):,}"


def test_build_lists_one_adversary_network_per_source_with_its_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tasks = [md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=3), md.Task(name="c", num_classes=2)]
    e, rows = _build_table(tmp_path, capsys, tasks, {"layout": "source", "ensemble": 1, "head": {"hidden": [8]}})
    separate = md.build_model(e.model_copy(update={"execution": md.ExecutionSpec(heads="separate")}))
    assert [k for k in rows if k.startswith("adversary")] == [
        "adversary a->* (b w=1, c w=1)",
        "adversary b->* (a w=1, c w=1)",
        "adversary c->* (a w=1, b w=1)",
    ]
    # input: 4 features and the source's one-hot label (conditional); output: every target's classes
    for source, inputs, outputs in (("a", 6, 5), ("b", 7, 4), ("c", 6, 5)):
        row = rows[next(k for k in rows if k.startswith(f"adversary {source}->*"))]
        expected = sum(p.numel() for p in separate.adversaries[f"{source}->*"].parameters())
        assert row == [str(inputs), str(outputs), f"{expected:,}"]
    assert rows["total"][2] == f"{sum(p.numel() for p in separate.parameters()):,}"


def test_build_lists_one_network_per_pair_with_its_members_for_pair_shared(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    tasks = [md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=3)]
    _, rows = _build_table(tmp_path, capsys, tasks, {"layout": "pair_shared", "ensemble": 2, "head": {"hidden": [8]}})
    assert rows["adversary a->b (b w=0.5, b#1 w=0.5)"][:2] == ["6", "6"]  # 4 features + a's one-hot; 2 x 3 classes
    assert rows["adversary b->a (a w=0.5, a#1 w=0.5)"][:2] == ["7", "4"]


def test_build_without_input_shape_or_data_says_what_to_give(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(md.Experiment(tasks=[md.Task(name="a", num_classes=2)]).model_dump_json())
    assert main(["build", str(spec)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "input_shape: not set" in line and str(spec) in line and "input_shape=(channels, height, width)" in line


# ----------------------------------------------------------------------------------------------------
# without matplotlib
# ----------------------------------------------------------------------------------------------------
def test_without_matplotlib_eval_writes_the_reports_and_warns_once(inline_run, tmp_path, capsys, monkeypatch):
    _, run = inline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["eval", str(copy), "--no-probes"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "pip install 'mtdisent[plots]'" in lines[0]
    written = sorted(p.name for p in (copy / "eval-test").iterdir())
    assert written == ["report.json", "report.md"]
