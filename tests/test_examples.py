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


def check_fetal_results(out, main, nuisance, unseen):
    result = json.loads((out / "results.json").read_text())
    rows = [r["row"] for r in result["rows"]]
    assert rows == [f"{main} only", f"{nuisance} only", "lambda0", "paper", "default", "features of the other task"]
    plane_only = result["rows"][0]["cells"]
    assert f"test/{main}" in plane_only and not any(k.startswith(f"test/{nuisance}") for k in plane_only)
    lam0 = next(r for r in result["rows"] if r["row"] == "lambda0")
    assert set(lam0["leakage"]) == {"linear", "mlp", "linear_conditional", "mlp_conditional"}
    text = (out / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model | plane"))
    assert f"{main} on {unseen}" in header
    assert f"What the models call the images of `{unseen}`" in text
    return result, text


@pytest.mark.slow
def test_fetal_us_on_simulated_data(tmp_path):
    run(
        "fetal_us.py", "--quick", "--seeds", "0", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), cwd=tmp_path
    )
    result, text = check_fetal_results(tmp_path, "plane", "shadow", "lvot_with_shadow")
    assert "*paper: lambda0*" in text and "| shadow only | - | - | - | - |" in text
    assert (tmp_path / "curves.png").is_file()
    # a second run reuses the finished runs instead of training again, and their evaluations (study_rows.json)
    before = (tmp_path / "runs" / "quick" / "fetal" / "default" / "seed_0" / "train_seconds.json").read_text()
    rows_file = tmp_path / "runs" / "quick" / "fetal" / "lambda0" / "seed_0" / "study_rows.json"
    cached = json.loads(rows_file.read_text())
    assert [r["row"] for r in cached] == ["lambda0", "plane only", "shadow only"]
    cached[0]["cells"]["unseen/plane"] = 0.125  # marks the cached rows: a re-evaluation would overwrite it
    rows_file.write_text(json.dumps(cached))
    run(
        "fetal_us.py", "--quick", "--seeds", "0", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), cwd=tmp_path
    )
    assert (tmp_path / "runs" / "quick" / "fetal" / "default" / "seed_0" / "train_seconds.json").read_text() == before
    again = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert next(r for r in again if r["row"] == "lambda0")["cells"]["unseen/plane"] == 0.125
    assert [r for r in again if r["row"] != "lambda0"] == [r for r in result["rows"] if r["row"] != "lambda0"]


def write_fetal_planes_db(root):
    """A small copy of FETAL_PLANES_DB's public format: ';' CSV (trailing space in 'Train '), Images/*.png."""
    from PIL import Image

    (root / "Images").mkdir(parents=True)
    planes, machines = ["Fetal brain", "Fetal abdomen", "Fetal femur"], ["Voluson E6", "Aloka", "Other"]
    lines = ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "]
    for i in range(120):
        plane, machine = planes[i % 3], machines[(i // 3) % 3]
        name = f"Patient{i:05d}_Plane1_1_of_1"
        lines.append(f"{name};{i};{plane};Not A Brain;Op. 1;{machine};{int(i % 5 != 0)}")
        img = Image.new("L", (48 + i % 7, 40), 40 + 60 * (i % 3) + 20 * ((i // 3) % 3))
        img.putpixel((i % 40, 3), 255)
        img.save(root / "Images" / f"{name}.png")
    (root / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_fetal_us_on_a_copy_of_fetal_planes_db(tmp_path):
    write_fetal_planes_db(tmp_path / "fpdb")
    args = ["--quick", "--seeds", "0", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    run(
        "fetal_us.py",
        *args,
        "--fetal-planes-db",
        str(tmp_path / "fpdb"),
        "--holdout",
        "Fetal brain",
        "Aloka",
        cwd=tmp_path,
    )
    result, text = check_fetal_results(tmp_path, "plane", "us_machine", "unseen")
    assert "*paper:" not in text  # the paper's numbers belong to its private data only
    assert result["settings"]["workload"] == "fetal_planes_db"


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
