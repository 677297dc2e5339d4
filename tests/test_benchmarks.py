"""The benchmark scripts run end to end at a tiny setting and write the files the README points to."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtdisent as md

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script, *args, cwd, ok=True):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_disentangle_study_rows_and_append(tmp_path):
    common = ["--quick", "--threads", "1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    run(
        "disentangle.py",
        "--workloads",
        "shapes",
        "shapes_n",
        "--methods",
        "lambda0",
        "paper",
        "--seeds",
        "0",
        *common,
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "results.json").read_text())
    keys = [(r["workload"], r["method"], r["seed"]) for r in result["rows"]]
    assert keys == [
        ("shapes", "lambda0", 0),
        ("shapes", "paper", 0),
        ("shapes_n", "lambda0", 0),
        ("shapes_n", "paper", 0),
    ]
    shapes_row, n_row = result["rows"][0], result["rows"][2]
    assert set(shapes_row["linear_conditional_leakage"]) == {"shape->background"}
    assert set(n_row["mlp_leakage"]) == {"shape->background", "shape->foreground", "shape->texture"}
    assert len(shapes_row["unseen_confusion"]) == 2
    # the same final model scored again with BatchNorm statistics recomputed on train
    bn = n_row["recomputed_bn"]
    assert set(bn["test_accuracy"]) == set(n_row["test_accuracy"]) and 0.0 <= bn["unseen_accuracy"] <= 1.0
    assert set(bn["adversary_accuracy"]) == set(n_row["adversary_accuracy"])
    table = (tmp_path / "results.md").read_text()
    assert "| unseen, BN recomputed | seen, BN recomputed |" in table
    assert "## shapes: unseen = shape accuracy on `unseen`" in table and "| paper |" in table
    # --append runs only what is missing, and reuses finished runs
    run(
        "disentangle.py",
        "--append",
        "--workloads",
        "shapes",
        "--methods",
        "lambda0",
        "--seeds",
        "0",
        "1",
        *common,
        cwd=tmp_path,
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["workload"], r["method"], r["seed"]) for r in rows] == [*keys, ("shapes", "lambda0", 1)]
    assert rows[0] == shapes_row  # kept, not retrained
    # --no-probes leaves the leakage empty; --fill-probes gives that row its probes from the finished run
    chosen = ["--workloads", "shapes", "--methods", "default", "--seeds", "0", *common]
    run("disentangle.py", "--append", "--no-probes", *chosen, cwd=tmp_path)
    row = json.loads((tmp_path / "results.json").read_text())["rows"][-1]
    assert row["method"] == "default" and row["mlp_conditional_leakage"] == {} and row["test_accuracy"]
    run("disentangle.py", "--append", "--fill-probes", *chosen, cwd=tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 6  # filled in place, nothing trained or appended
    assert set(rows[-1]["mlp_conditional_leakage"]) == {"shape->background"}
    unchanged = [k for k in row if "leakage" not in k]
    assert all(rows[-1][k] == row[k] for k in unchanged)


def test_rescore_scores_a_recompute_run_three_ways(tmp_path):
    # intervene_bn trains with batchnorm_stats="recompute": its last checkpoint has the running statistics, its
    # final model the replayed ones, and the plain pass is computed from the checkpoint
    common = ["--quick", "--no-probes", "--threads", "1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    run("disentangle.py", "--workloads", "shapes", "--methods", "intervene_bn", "--seeds", "0", *common, cwd=tmp_path)
    out = tmp_path / "rescore.json"
    run_dir = tmp_path / "runs" / "quick" / "shapes" / "intervene_bn" / "seed_0"
    args = ["--unseen", "unseen", "--main", "shape", "--threads", "1", "--out", str(out), str(run_dir)]
    proc = run("rescore_bn.py", *args, cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert {"running", "recomputed", "replayed"} <= set(row)
    assert all(set(row[k]["test_accuracy"]) == {"shape", "background"} for k in ("running", "recomputed", "replayed"))
    assert "(running, recomputed, replayed)" in proc.stdout
    study = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert study["test_accuracy"] == row["replayed"]["test_accuracy"]  # the study scored the same final model


def test_rescore_erasure_scores_the_final_model_and_its_erased_copy(tmp_path):
    common = ["--quick", "--no-probes", "--threads", "1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    run("disentangle.py", "--workloads", "shapes", "--methods", "default", "--seeds", "0", *common, cwd=tmp_path)
    out = tmp_path / "erased.json"
    run_dir = tmp_path / "runs" / "quick" / "shapes" / "default" / "seed_0"
    args = ["--unseen", "unseen", "--main", "shape", "--threads", "1", "--no-before", "--out", str(out), str(run_dir)]
    proc = run("rescore_erasure.py", *args, "--retrain", "2", cwd=tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert "linear_conditional_leakage" not in row["final"]  # --no-before: the study has those
    assert set(row["erased"]["mlp_conditional_leakage"]) == {"shape->background"}
    assert row["erased_rank"] >= 1 and row["mode"] == "conditional" and "conditional linear leakage" in proc.stdout
    study = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert study["test_accuracy"] == row["final"]["test_accuracy"]  # the study scored the same final model
    # --retrain: the erased copy and the final model, each with the main head retrained; only that head's scores move
    assert row["retrain"]["epochs"] == 2 and row["retrain"]["seconds"] > 0
    for kind, base in (("retrained", "erased"), ("retrained_plain", "final")):
        assert row[kind]["test_accuracy"]["background"] == row[base]["test_accuracy"]["background"], kind
        assert "mlp_conditional_leakage" not in row[kind]  # the same features as its base: no probes of its own
    assert row["retrained_plain"]["test_accuracy"]["shape"] != row["final"]["test_accuracy"]["shape"]


def test_disentangle_methods_resolve_the_workloads_nuisance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("disentangle", BENCHMARKS / "disentangle.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    flipped = {w: study.experiment(w, "recombine_nuisance", 0, True).levers[0].args["tasks"] for w in study.WORKLOADS}
    assert flipped == {
        "shapes": ["background"],
        "shapes_n": ["background", "foreground", "texture"],
        "fetal": ["shadow"],
    }
    assert study.METHODS["recombine_nuisance"][1]["levers"][0]["args"]["tasks"] == "nuisance"  # not mutated
    # the study's paper method keeps the paper's layout under the library's default one
    assert {w: study.experiment(w, "paper", 0, True).adversary.layout for w in study.WORKLOADS} == dict.fromkeys(
        study.WORKLOADS, "pair"
    )
    assert {w: study.experiment(w, "default", 0, True).adversary.layout for w in study.WORKLOADS} == dict.fromkeys(
        study.WORKLOADS, "source"
    )
    erasure = study.experiment("shapes", "erasure_cumulative", 0, True).levers[0]
    assert (erasure.name, erasure.args) == ("erasure", {"momentum": None})
    # shapes_n's intervention: the dark background's level in the data's own standardised units
    lever = study.experiment("shapes_n", "intervene", 0, True).levers[0].args
    norm = md.datasets.create("shapes_n", study.shapes_n(0, True)["data"]["args"]).factors["normalisation"]
    assert lever["transform"] == "background" and (lever["source"], lever["target"]) == (["light"], "dark")
    assert lever["args"]["level"] == pytest.approx(-norm["mean"] / norm["std"])


@pytest.mark.slow
def test_speed_benchmark_quick_gates_and_reports(tmp_path):
    proc = run(
        "speed.py",
        "--quick",
        "--threads",
        "1",
        "--only",
        "profile",
        "gates",
        "ratio",
        "default",
        "layout",
        "--out",
        str(tmp_path),
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "speed_quick.json").read_text())
    sections = ["profile", "gates", "ratio", "default", "layout"]
    assert [k for k in result if k in sections] == sections  # run and written in the order given
    prof = result["profile"]
    assert prof["operators_per_iteration"] > 0 and len(prof["top"]) == 15
    assert any("convolution" in e["name"] for e in prof["top"]) and all(e["self_cpu_ms"] >= 0 for e in prof["top"])
    assert set(result["gates"]) == {"N=2", "N=3", "N=3 default"}
    for gate in result["gates"].values():
        assert gate["gram_weights_median"] <= 1e-5 and gate["gram_weights"] <= 1e-3 and gate["naive_loss"] <= 2e-3
    for r in result["ratio"]:
        assert r["ratio"] == pytest.approx(r["fast"]["iteration_s"] / r["naive"]["iteration_s"])
        assert r["ratio_naive_cl"] == pytest.approx(r["fast"]["iteration_s"] / r["naive_cl"]["iteration_s"])
    d = result["default"]  # the default, the paper's and its variants, timed in one run
    assert set(d["variant_ratios"]) == {"pair", "narrow", "single", "shared"}
    assert d["variants"]["narrow"] == {"ensemble": 3, "head": {"hidden": [86]}} and d["variants"]["single"] == {
        "ensemble": 1
    }
    assert d["variants"]["shared"] == {"layout": "pair_shared"} and d["variants"]["pair"] == {"layout": "pair"}
    assert d["default_adversary"]["layout"] == "source"
    for name, r in {"default": d["ratio"], **d["variant_ratios"]}.items():
        assert r == pytest.approx(d[name]["iteration_s"] / d["paper"]["iteration_s"])
    by_n = {r["tasks"]: r for r in result["layout"]}
    # one network per source serves its 7 targets: 7x fewer first layers (the output layers are the same size)
    assert by_n[8]["paper_pair"] / by_n[8]["paper_source"] == pytest.approx(7, rel=1e-3)
    # three members sharing their first layer: about a third of three separate members (their output layers remain)
    assert 2.95 < by_n[8]["default_pair"] / by_n[8]["default_pair_shared"] < 3
    report = (tmp_path / "speed_quick.md").read_text()
    assert "Iteration time: fast / naive" in report and "Variants of the default" in report
    assert "Profile of the fast path" in report and "wrote" in proc.stdout


@pytest.mark.slow
def test_fetal_setup_recommended_two_tasks_tiny(tmp_path):
    log = tmp_path / "rows.jsonl"
    tiny = ["--scale", "0.02", "--size", "32", "40", "--iterations", "3", "--eval-every", "2", "--batch", "8"]
    args = ["--recommended", "--tasks", "plane", "shadow", "--artifacts", "--recalibrate-bn", *tiny]
    run("fetal_setup.py", *args, "--seeds", "0", "--log", str(log), "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    row = json.loads(log.read_text().splitlines()[-1])
    assert row["settings"]["units"] == [2] and row["settings"]["output"] == "pool" and row["settings"]["shift"] == 6
    assert row["settings"]["iterations"] == 3  # an explicit flag wins over --recommended
    for key in ("final", "recalibrated_bn"):
        cells = row[key]
        assert 0.0 <= cells["test"]["plane"] <= 1.0 and 0.0 <= cells["lvot_with_shadow"]["plane"] <= 1.0
        assert 0.0 <= cells["artifacts_others"]["shadow"] <= 1.0 and len(cells["test"]["plane_per_class"]) == 3


def test_trajectory_points_end_at_the_final_model(tmp_path):
    import mtdisent as md

    args = ["--quick", "--workload", "shapes", "--method", "lambda0", "--seeds", "0", "--threads", "1"]
    paths = ["--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    run("trajectory.py", *args, "--every", "2", "--average", "1", "2", *paths, cwd=tmp_path)
    result = json.loads((tmp_path / "trajectory.json").read_text())
    points, avgs = result["runs"][0]["points"], result["runs"][0]["averages"]
    assert [a["iterations"] for a in avgs] == [[4], [2, 4]]
    assert [p["iteration"] for p in points] == [2, 4]
    # the last checkpoint is the run's final model: the study's unseen accuracy for that run
    out = tmp_path / "runs" / "shapes" / "lambda0" / "seed_0"
    final = md.evaluate(out, which="final", split="unseen", probe_data=False, device="cpu")
    assert points[-1]["unseen_accuracy"] == final.accuracy["shape"]
    early = md.evaluate(out / "checkpoints" / "iter-00000002", split="test", probe_data=False, device="cpu")
    assert points[0]["test_accuracy"] == early.accuracy  # every checkpoint kept, each scored on its own
    assert "| 4 |" in (tmp_path / "trajectory.md").read_text()
    refused = run("trajectory.py", *args, "--every", "3", *paths, cwd=tmp_path, ok=False)
    assert "--every: 3 does not divide the run's 4 iterations" in refused.stderr
    refused = run("trajectory.py", *args, "--every", "2", "--average", "3", *paths, cwd=tmp_path, ok=False)
    assert "--average: each K must be in 1..2" in refused.stderr


def test_trajectory_average_is_the_mean_of_the_weights_with_batchnorm_reestimated(tmp_path, monkeypatch):
    import torch

    import mtdisent as md

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import trajectory

    args = ["--quick", "--workload", "shapes", "--method", "lambda0", "--seeds", "0", "--threads", "1"]
    run("trajectory.py", *args, "--every", "2", "--out", str(tmp_path), "--runs", str(tmp_path / "r"), cwd=tmp_path)
    ckpts = [tmp_path / "r" / "shapes" / "lambda0" / "seed_0" / "checkpoints" / f"iter-{i:08d}" for i in (2, 4)]
    e = trajectory.experiment("shapes", "lambda0", 0, True)
    train = md.datasets.create(e.data.name, e.data.args)["train"]
    model = trajectory.averaged(ckpts, train)
    a, b, avg = md.load(ckpts[0]).state_dict(), md.load(ckpts[1]).state_dict(), model.state_dict()
    weights = [k for k in avg if avg[k].is_floating_point() and "running" not in k]
    assert weights and all(torch.allclose(avg[k], (a[k] + b[k]) / 2) for k in weights)
    first_bn = next(m for m in model.encoders["shape"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    stats = [k for k in avg if k.endswith("running_mean")]
    assert not model.training and all(not torch.equal(avg[k], b[k]) for k in stats)  # re-estimated, not kept
    assert first_bn.momentum is not None  # update_bn restores the layers' own momentum


def test_fetal_oracle_trains_with_the_held_out_combination(tmp_path):
    out = tmp_path / "oracle.json"
    proc = run(
        "fetal_oracle.py", "--quick", "--seeds", "0", "--extra", "40", "--threads", "1", "--out", str(out), cwd=tmp_path
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["seed"] == 0 and row["extra"] == 40  # LVOT-with-shadow images added to the training split
    assert 0.0 <= row["unseen_accuracy"] <= 1.0 and 0.0 <= row["test_plane_accuracy"] <= 1.0
    assert "fetal oracle seed=0" in proc.stdout


@pytest.mark.slow
def test_speed_demo_section_runs_the_demo_as_a_user_and_reads_its_reports(tmp_path):
    run("speed.py", "--quick", "--only", "demo", "--out", str(tmp_path), cwd=tmp_path)
    d = json.loads((tmp_path / "speed_quick.json").read_text())["demo"]
    assert d["iterations"] == 4 and d["wall_s"] > 0 and d["cpu_s"] > 0
    assert set(d["models"]) == {"lambda=0.01", "lambda=0"}
    for m in d["models"].values():
        assert set(m["test_accuracy"]) == {"background", "shape"}
        assert all(0 <= a <= 1 for a in [*m["test_accuracy"].values(), m["unseen_shape_accuracy"]])
    assert "`mtdisent demo` (4 iterations" in (tmp_path / "speed_quick.md").read_text()
    assert not list(tmp_path.glob("runs"))  # the demo wrote into a temporary folder, not the working directory
