"""The benchmark scripts run end to end at a tiny setting and write the files the README points to."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run(script, *args, cwd, ok=True):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_disentangle_study_rows_selection_and_append(tmp_path):
    tiny = ["--scale", "0.0625", "--iterations", "4", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)]
    run("disentangle.py", "--methods", "minmax", "conditional_select", "--seeds", "0", *tiny, cwd=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [("minmax", 0), ("conditional_select", 0)]
    plain, selected = result["rows"]
    assert plain["evaluated"] == "final" and selected["evaluated"].startswith("best (iteration ")
    for row in result["rows"]:
        assert set(row["linear_leakage"]) == {"shape->background", "background->shape"}
        assert 0.0 <= row["unseen_shape_accuracy"] <= 1.0
    table = (tmp_path / "results.md").read_text()
    assert "| minmax |" in table and "| conditional_select |" in table and '"scale": 0.0625' in table

    # --append runs only what is missing, and refuses to mix settings
    run("disentangle.py", "--append", "--methods", "minmax", "--seeds", "0", "1", *tiny, cwd=tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("minmax", 0), ("conditional_select", 0), ("minmax", 1)]
    assert rows[0] == plain  # kept, not retrained
    other = [a if a != "4" else "5" for a in tiny]
    proc = run("disentangle.py", "--append", "--methods", "minmax", *other, cwd=tmp_path, ok=False)
    assert "iterations: 4 there, 5 now" in proc.stderr


@pytest.mark.slow
def test_speed_harness_gates_and_times_both_paths(tmp_path):
    proc = run("speed.py", "--grid", "quick", "--out", str(tmp_path), cwd=tmp_path)
    assert "ratio" in proc.stdout
    result = json.loads((tmp_path / "speed_quick.json").read_text())
    assert [r["tasks"] for r in result["results"]] == [2, 4]
    for r in result["results"]:
        assert r["stacked"]["iteration_s"] > 0 and r["separate"]["iteration_s"] > 0
        assert r["gate_max_rel_diff"] <= 2e-3
        assert r["ratio"] == pytest.approx(r["stacked"]["iteration_s"] / r["separate"]["iteration_s"], rel=1e-6)
    assert "speed_quick" in proc.stdout and (tmp_path / "speed_quick.md").is_file()


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
