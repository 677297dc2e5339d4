"""md.evaluate, Report, figures and the eval / compare / sweep commands, checked against by-hand computations."""

import json
import math
import sys

import pytest
import torch
from conftest import toy_experiment

import mtdisent as md
from mtdisent._cli import main


class Correlated(torch.utils.data.Dataset):
    """Tasks 'a' (2 classes, top half) and 'b' (3 classes, bottom half); ``cells`` lists the (a, b) combinations."""

    def __init__(self, cells, per_cell=12, seed=0, size=16):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.tensor([a for a, _ in cells for _ in range(per_cell)])
        self.b = torch.tensor([b for _, b in cells for _ in range(per_cell)])
        self.x = torch.randn(len(self.a), 1, size, size, generator=g) * 0.1
        self.x[:, :, : size // 2] += self.a[:, None, None, None].float()
        self.x[:, :, size // 2 :] += self.b[:, None, None, None].float()

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return self.x[i], {"a": int(self.a[i]), "b": int(self.b[i])}


SEEN = [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2)]  # (1, 0) is held out of training


def correlated_data(seed=0):
    return {
        "train": Correlated(SEEN, seed=seed),
        "val": Correlated(SEEN, per_cell=4, seed=seed + 1),
        "test": Correlated(SEEN, per_cell=4, seed=seed + 2),
        "unseen": Correlated([(1, 0)], per_cell=6, seed=seed + 3),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    e = toy_experiment(training={"iterations": 8, "checkpoint_every": 8, "log_every": 2})
    return md.train(e, data=correlated_data(), out_dir=out, quiet=True)


def _by_hand_accuracy(pred, y):
    return sum(int(p == t) for p, t in zip(pred.tolist(), y.tolist(), strict=True)) / len(y)


def test_report_numbers_match_the_model_computed_by_hand(run):
    data = correlated_data()
    report = md.evaluate(run, data=data["test"], probe_data=data["train"])
    model = run.model.eval()
    x = data["test"].x
    with torch.no_grad():
        preds = model.predict(x)
        feats = model.features(x)
        adv = model.adversary_logits(feats, labels={"a": data["test"].a, "b": data["test"].b})
    for t, y in (("a", data["test"].a), ("b", data["test"].b)):
        assert report.accuracy[t] == pytest.approx(_by_hand_accuracy(preds[t], y))
        cm = report.metrics[t].confusion
        assert int(torch.as_tensor(cm).sum()) == len(y)
    by_hand = {}  # an ensemble's accuracy is its best member's
    for p, pair in enumerate(model.pairs):
        y = getattr(data["test"], pair.target)
        acc = _by_hand_accuracy(adv[p][:, : model.experiment.task(pair.target).n_classes].argmax(-1), y)
        by_hand[(pair.source, pair.target)] = max(acc, by_hand.get((pair.source, pair.target), 0.0))
    assert report.adversary_accuracy == pytest.approx(by_hand)
    # the majority rate of b on test: each of the 5 cells has 4 samples; b=1 and b=2 occur in 2 cells each
    assert report.adversary_majority[("a", "b")] == pytest.approx(8 / 20)
    for layer in ("features", "penultimate"):
        for kind in ("linear", "mlp"):
            m = report.probes[layer][kind]
            assert set(m.accuracy) == {(i, j) for i in "ab" for j in "ab"}
            for (i, j), acc in m.accuracy.items():
                maj = {"a": 12 / 20, "b": 8 / 20}[j]
                assert m.normalised[(i, j)] == pytest.approx((acc - maj) / (1 - maj))
    off = [v for (i, j), v in report.leakage_normalised.items() if i != j]
    assert report.off_diagonal_leakage() == pytest.approx(sum(off) / len(off))


def test_unseen_combinations_are_told_apart_from_seen_ones(run):
    data = correlated_data()
    mixed = torch.utils.data.ConcatDataset([data["test"], data["unseen"]])
    report = md.evaluate(run, data=mixed, probe_data=data["train"], probes=("linear",), layers=("features",))
    with torch.no_grad():
        x = torch.cat([data["test"].x, data["unseen"].x])
        pred_a = run.model.eval().predict(x)["a"]
    y_a = torch.cat([data["test"].a, data["unseen"].a])
    summary = report.combinations["a"]["summary"]
    assert summary["seen_n"] == 20 and summary["unseen_n"] == 6
    assert summary["unseen_accuracy"] == pytest.approx(_by_hand_accuracy(pred_a[20:], y_a[20:]))
    assert summary["seen_accuracy"] == pytest.approx(_by_hand_accuracy(pred_a[:20], y_a[:20]))
    cells = report.combinations["a"]["per_combination"]
    assert cells["1,0"]["seen"] is False and cells["0,0"]["seen"] is True
    assert "## Factor combinations" in report.to_markdown()


def test_report_saves_json_markdown_and_figures(run, tmp_path):
    import matplotlib  # noqa: F401 (the test extra installs it: figures are tested, not skipped)

    data = correlated_data()
    report = md.evaluate(run, data=data["test"], probe_data=data["train"])
    out = report.save(tmp_path / "eval", figures=True, metrics_file=run.out_dir / "metrics.jsonl")
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["metrics"]["a"]["accuracy"] == pytest.approx(report.accuracy["a"])
    assert loaded["probes"]["features"]["linear"]["tasks"] == ["a", "b"]
    for png in ("pca.png", "leakage_features_linear.png", "leakage_penultimate_mlp.png", "curves.png"):
        data_bytes = (out / png).read_bytes()
        assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 2000, png
    assert "Fresh linear probes on features" in (out / "report.md").read_text()


def test_pca_projects_on_the_directions_of_largest_variance():
    from mtdisent._plots import pca_2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([0.1, 5.0, 0.1, 2.0, 0.1])
    z = pca_2d(x)
    assert z.shape == (200, 2)
    assert float(z[:, 0].var()) == pytest.approx(float(x[:, 1].var()), rel=0.05)
    assert float(z[:, 1].var()) == pytest.approx(float(x[:, 3].var()), rel=0.1)
    assert abs(float(z.mean())) < 1e-4


def test_evaluate_refuses_unknown_sources_and_splits(run):
    with pytest.raises(md.MtdisentError, match="expects a Run"):
        md.evaluate(42)
    with pytest.raises(md.MtdisentError, match="no split 'nope'"):
        md.evaluate(run, data=correlated_data(), split="nope")


@pytest.fixture(scope="module")
def toy_registered():
    md.register("dataset", "correlated_toy", lambda seed=0: correlated_data(seed), override=True)
    yield "correlated_toy"
    md.datasets.unregister("correlated_toy")


def _spec_file(tmp_path, **training):
    e = toy_experiment(
        data={"name": "correlated_toy"},
        training={"iterations": 4, "checkpoint_every": 4, "log_every": 2, **training},
    )
    path = tmp_path / "spec.json"
    path.write_text(e.model_dump_json())
    return path


@pytest.mark.slow
def test_cli_eval_compare_and_sweep(toy_registered, tmp_path, capsys):
    import matplotlib  # noqa: F401 (the test extra installs it: figures are tested, not skipped)

    spec = _spec_file(tmp_path)
    runs = []
    for w in (0.0, 0.1):
        for seed in (0, 1):
            out = tmp_path / f"w{w}_s{seed}"
            args = ["train", str(spec), "--out-dir", str(out), "--quiet", "--set", f"adversary.weight={w}"]
            assert main([*args, "--set", f"seed={seed}"]) == 0
            runs.append(out)
    capsys.readouterr()

    assert main(["eval", str(runs[0]), "--split", "unseen"]) == 0
    printed = capsys.readouterr().out
    assert "## Per task" in printed and "## Fresh linear probes on features" in printed
    report = json.loads((runs[0] / "eval-unseen" / "report.json").read_text())
    assert report["info"]["split"] == "unseen" and report["info"]["n_eval"] == 6
    # every unseen sample's combination (1, 0) is absent from training
    assert report["combinations"]["a"]["summary"]["seen_n"] == 0
    assert report["combinations"]["a"]["summary"]["unseen_n"] == 6
    for png in ("pca.png", "leakage_features_linear.png", "curves.png"):
        assert (runs[0] / "eval-unseen" / png).is_file()

    assert main(["compare", *map(str, runs), "--unseen-split", "unseen", "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    rows = [r for r in table[2:] if r.startswith("|")]
    assert len(rows) == 2, table  # grouped by lambda, seeds pooled
    assert any("adversary.weight=0.0" in r for r in rows) and any("adversary.weight=0.1" in r for r in rows)
    # mean ± std over the two seeds, recomputed from each run's own report
    accs = [json.loads((r / "eval-test" / "report.json").read_text())["metrics"]["a"]["accuracy"] for r in runs[:2]]
    mean = sum(accs) / 2
    std = math.sqrt(sum((a - mean) ** 2 for a in accs))  # n - 1 = 1
    lam0 = next(r for r in rows if "adversary.weight=0.0" in r)
    assert f"{mean:.3f} ± {std:.3f}" in lam0

    sweep_dir = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out-dir", str(sweep_dir), "--weights", "0", "0.1", "--seeds", "0", "1"]
    assert main([*args, "--unseen-split", "unseen", "--unseen-task", "a", "--quiet"]) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(result["points"]) == 4
    scores = {}
    for w in (0.0, 0.1):
        ps = [p for p in result["points"] if p["weight"] == w]
        acc = sum(p["val_accuracy"] for p in ps) / 2
        leak = sum(p["val_leakage"] for p in ps) / 2
        scores[w] = acc - leak
        assert result["scores"][f"{w:g}"] == pytest.approx(scores[w])
    assert result["chosen_weight"] == max(scores, key=scores.get)
    assert (sweep_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "Chosen lambda" in (sweep_dir / "sweep.md").read_text()


def test_cli_eval_of_a_run_without_registered_data_says_so(tmp_path, capsys):
    e = toy_experiment(training={"iterations": 2, "checkpoint_every": 2})
    md.train(e, data=correlated_data(), out_dir=tmp_path / "r", quiet=True)
    assert main(["eval", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no data" in err and "registered dataset" in err


@pytest.mark.slow
def test_demo_trains_both_models_and_reports_seen_unseen_and_leakage(tmp_path, capsys, monkeypatch):
    import matplotlib  # noqa: F401 (the test extra installs it: figures are tested, not skipped)

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells to the terminal width
    assert main(["demo", "--iterations", "4", "--out-dir", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "unseen circle/black, shape accuracy" in printed and "fresh linear probe shape->background" in printed
    for weight in ("0.01", "0"):
        run = tmp_path / f"lambda_{weight}"
        assert md.load(run).experiment.adversary.weight == float(weight)
        unseen = json.loads((run / "eval-unseen" / "report.json").read_text())
        assert unseen["info"]["n_eval"] == 100  # 100 circles on black at every scale
        assert (run / "eval-test" / "pca.png").is_file() and (run / "eval-test" / "curves.png").is_file()


def _two_task_report(normalised_ab=float("nan")):
    from mtdisent.evaluation import LeakageMatrix, task_metrics

    tasks = ["a", "b"]
    metrics = {
        "a": task_metrics(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0]), 2),
        "b": task_metrics(torch.tensor([2, 2, 2, 2]), torch.tensor([2, 2, 2, 2]), 3),  # one class in this split
    }
    acc = {("a", "a"): 0.75, ("a", "b"): 1.0, ("b", "a"): 0.5, ("b", "b"): 1.0}
    norm = {("a", "a"): 0.5, ("a", "b"): normalised_ab, ("b", "a"): 0.0, ("b", "b"): normalised_ab}
    matrix = LeakageMatrix(tasks, acc, {"a": 0.5, "b": 1.0}, norm)
    return md.Report(tasks, metrics, probes={"features": {"linear": matrix}})


def test_undefined_normalised_leakage_is_n_a_with_a_footnote():
    text = _two_task_report().to_markdown()
    assert "nan" not in text
    assert "| a | 0.750 (+0.50) | 1.000 (n/a) |" in text and "| b | 0.500 (+0.00) | 1.000 (n/a) |" in text
    footnote = [x for x in text.splitlines() if x.startswith("n/a:")]
    assert len(footnote) == 1 and "single class" in footnote[0] and "majority rate 1" in footnote[0]
    assert "n/a:" not in _two_task_report(normalised_ab=0.25).to_markdown()  # no footnote when all are defined


def test_report_header_and_rows_use_what_describe_records():
    report = _two_task_report().describe(
        model="in-memory model", split="unseen", probe_split="train", class_names={"a": ["cat", "dog"]}
    )
    text = report.to_markdown()
    assert "- model: in-memory model\n- checkpoint: the model as given\n- scored on split: unseen\n" in text
    assert "- probes fitted on split: train\n" in text
    assert "| a | 0.7500 | 0.7500 | cat 0.500, dog 1.000 | 4 |" in text
    assert "| b | 1.0000 | 1.0000 | 0 -, 1 -, 2 1.000 | 4 |" in text  # no names declared: indices
    assert json.loads(report.to_json())["info"]["class_names"] == {"a": ["cat", "dog"]}
    # keyword arguments of to_markdown describe this text only
    assert "- checkpoint: latest (iteration 7)\n" in report.to_markdown(checkpoint="latest", iteration=7)
    assert "checkpoint" not in report.info


def test_leakage_heatmap_hatches_undefined_cells_and_still_shows_accuracy(tmp_path):
    import matplotlib.pyplot as plt

    from mtdisent._plots import _leakage_figure, plot_leakage

    matrix = _two_task_report().probes["features"]["linear"]
    norm, acc = matrix.as_tensor(normalised=True), matrix.as_tensor()
    fig = _leakage_figure(plt, norm, matrix.tasks, "t", accuracy=acc)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["+0.50\nacc 0.75", "n/a\nacc 1.00", "+0.00\nacc 0.50", "n/a\nacc 1.00"]
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert sorted((p.get_x(), p.get_y()) for p in hatched) == [(0.5, -0.5), (0.5, 0.5)]  # column b, both rows
    assert any("single class" in t.get_text() for t in fig.texts)  # the footnote
    plt.close(fig)
    path = plot_leakage(torch.full((2, 2), float("nan")), ["a", "b"], tmp_path / "all_nan.png", accuracy=acc)
    image = plt.imread(path)
    h, w = image.shape[:2]
    assert abs(float(image[h // 2, int(w * 0.3), 0]) - 0.827) < 0.05  # lightgrey, not a blank cell


def test_training_curves_skip_a_torn_line_with_a_warning(run, tmp_path):
    import matplotlib  # noqa: F401 (the test extra installs it: figures are tested, not skipped)

    from mtdisent._plots import plot_curves

    torn = tmp_path / "metrics.jsonl"
    lines = (run.out_dir / "metrics.jsonl").read_text().splitlines()
    torn.write_text("\n".join(lines) + '\n{"iteration": 9, "acc/a": 0.')
    with pytest.warns(md.FigureWarning, match=rf"skipped 1 unreadable line \({len(lines) + 1};") as record:
        plot_curves(torn, tmp_path / "curves.png")
    assert str(torn) in str(record[0].message)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_report_save_without_matplotlib_writes_the_reports_and_warns_once(run, tmp_path, monkeypatch):
    data = correlated_data()
    report = md.evaluate(run, data=data["test"], probe_data=data["train"], probes=("linear",), layers=("features",))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.warns(md.FigureWarning, match=r"pip install 'mtdisent\[plots\]'") as record:
        out = report.save(tmp_path / "eval", figures=True, metrics_file=run.out_dir / "metrics.jsonl")
    assert len([w for w in record if issubclass(w.category, md.FigureWarning)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_machine_info_names_the_cpu_and_its_instruction_sets(tmp_path, monkeypatch):
    from mtdisent import _machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 sse\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    assert _machine._cpuinfo(str(cpuinfo)) == ("Test CPU", ["avx2", "fma", "avx512f", "avx512_bf16"])
    assert _machine._cpuinfo(str(tmp_path / "absent")) == (None, None)
    arm = tmp_path / "arm"  # Arm Linux lists "Features" and no model name
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve sve2 svebf16 bf16 i8mm\n")
    assert _machine._cpuinfo(str(arm)) == (None, ["asimd", "sve", "sve2", "bf16"])
    monkeypatch.setattr(_machine, "_cpuinfo", lambda: ("Test CPU", ["avx2"]))
    info = md.machine_info()
    assert info["cpu"] == "Test CPU" and info["cpu_flags"] == ["avx2"]
    monkeypatch.setattr(_machine, "_cpuinfo", lambda: (None, None))
    info = md.machine_info()
    assert "cpu_flags" not in info and isinstance(info["cpu"], str)
