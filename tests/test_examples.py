"""The examples run end to end (at a few iterations) and write the result tables they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(script, *args, cwd):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_shapes_paper(tmp_path):
    args = ["--quick", "--iterations", "3", "--seeds", "0", "1", "--out", str(tmp_path)]
    run("shapes_paper.py", *args, "--quiet", cwd=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["weight"], r["seed"]) for r in result["rows"]] == [(0.01, 0), (0.01, 1), (0.0, 0), (0.0, 1)]
    assert result["settings"]["scale"] == 0.125 and result["settings"]["iterations"] == 3
    table = (tmp_path / "results.md").read_text()
    assert "unseen circle/black, shape accuracy" in table and "lambda = 0.01" in table
    assert (tmp_path / "lambda_0.01" / "seed_0" / "eval-test" / "pca.png").is_file()


@pytest.mark.slow
def test_fetal_us_on_simulated_data(tmp_path):
    args = ["--quick", "--iterations", "3", "--scale", "0.04", "--out", str(tmp_path)]
    run("fetal_us.py", *args, "--quiet", cwd=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    models = [r["model"] for r in result["rows"]]
    assert models == [
        "plane only",
        "shadow only",
        "two tasks, lambda = 0",
        "full model, lambda = 0.01",
        "full model, features of the other task (MLP probe)",
    ]
    plane_only = result["rows"][0]["cells"]
    assert set(plane_only) == {"test/plane", "unseen/plane"} and len(plane_only["test/plane"]) == 4  # 3 + overall
    table = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| model"))
    assert "plane on lvot_with_shadow" in header and "shadow on artifacts_others" in header
    assert next(line for line in table if line.startswith("| shadow only")).count(" - ") == 5


@pytest.mark.slow
def test_n_tasks(tmp_path):
    args = ["--quick", "--tasks", "3", "--iterations", "3", "--seeds", "0", "--out", str(tmp_path), "--quiet"]
    run("n_tasks.py", *args, cwd=tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["tasks"], r["weight"]) for r in rows] == [(3, 0.1), (3, 0.0)]
    assert set(rows[0]["test_accuracy"]) == {"shape", "background", "foreground"}


@pytest.mark.slow
def test_custom_data(tmp_path):
    out = run("custom_data.py", "--iterations", "3", cwd=tmp_path)
    assert "lambda = 0:" in out and "lambda = 0.1:" in out
    assert (tmp_path / "runs" / "custom_data" / "lambda_0.1" / "model.safetensors").is_file()
