"""md.evaluate, Report, figures and the eval / compare / sweep commands, checked against by-hand computations."""

import json
import math

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
    pytest.importorskip("matplotlib")  # the dev and plots extras install it; CI runs this
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
    pytest.importorskip("matplotlib")
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
    pytest.importorskip("matplotlib")
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
