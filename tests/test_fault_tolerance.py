"""Crashes at chosen and random points, then resume: the run always completes, exactly."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtdisent as md

WORKER = Path(__file__).parent / "fault_worker.py"
pytestmark = pytest.mark.slow


def run_worker(out, mode="none", n=0, wait=True):
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), mode, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if wait:
        proc.wait(timeout=300)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = run_worker(out)
    assert proc.returncode == 0, proc.stderr.read()
    return md.load(out).state_dict()


def assert_same(model, reference):
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for k in state:
        assert torch.equal(state[k], reference[k]), k


def no_valid_looking_partials(out):
    for d in (out / "checkpoints").iterdir():
        if d.name.startswith("iter-") or d.name == "best":
            md.load(d)  # every complete-looking directory verifies


@pytest.mark.parametrize(
    "mode, n",
    [
        ("replace", 1),  # first checkpoint, before its rename
        ("replace", 4),  # mid-run, during a checkpoint rename
        ("fsync", 3),  # tensors written, state.json not yet
        ("fsync", 9),
        ("replace", 13),  # exporting the final model's tensors
        ("replace", 14),  # exporting the final model's metadata (tensors already replaced)
    ],
)
def test_sigkill_during_writes_then_resume_completes_exactly(tmp_path, reference, mode, n):
    proc = run_worker(tmp_path, mode, n)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read())
    if (tmp_path / "checkpoints").exists():
        no_valid_looking_partials(tmp_path)
    proc = run_worker(tmp_path)
    assert proc.returncode == 0, proc.stderr.read()
    assert_same(md.load(tmp_path), reference)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # temporaries cleaned


def test_sigkill_at_random_moments(tmp_path, reference):
    rng = random.Random(1234)
    for _ in range(3):
        proc = run_worker(tmp_path, "slow", 0, wait=False)
        time.sleep(rng.uniform(1.5, 4.5))  # startup is ~2 s; training 8 x ~0.3 s
        proc.kill()
        proc.wait()
        if (tmp_path / "checkpoints").exists():
            no_valid_looking_partials(tmp_path)
    proc = run_worker(tmp_path)
    assert proc.returncode == 0, proc.stderr.read()
    assert_same(md.load(tmp_path), reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_then_exit_cleanly(tmp_path, reference, sig):
    proc = run_worker(tmp_path, "slow", 0, wait=False)
    deadline = time.time() + 60
    while not (tmp_path / "checkpoints").exists() and time.time() < deadline:  # training has started
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    stopped = int(out.split("INTERRUPTED ")[1])
    state = json.loads((tmp_path / "checkpoints" / f"iter-{stopped:08d}" / "state.json").read_text())
    assert state["iteration"] == stopped
    proc = run_worker(tmp_path)
    assert proc.returncode == 0
    assert_same(md.load(tmp_path), reference)


json_leaf = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
VALID = md.Experiment(
    tasks=[md.Task(name="a", classes=["x", "y"]), md.Task(name="b", num_classes=3)], input_shape=(1, 8, 8)
).model_dump(mode="json")


def mutate(data, path, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaf_paths(v, (*prefix, i))
    yield prefix


ALL_PATHS = [p for p in leaf_paths(VALID) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzzed_json_specs_validate_or_raise_spec_error(value):
    try:
        md.Experiment.model_validate_json(json.dumps(value))
    except md.SpecError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), json_values)
def test_mutated_specs_validate_or_raise_spec_error(path, value):
    data = mutate(json.loads(json.dumps(VALID)), path, value)
    try:
        e = md.Experiment.model_validate_json(json.dumps(data))
    except md.SpecError as exc:
        assert str(exc).startswith("invalid Experiment")
    else:
        assert md.Experiment.model_validate_json(e.model_dump_json()) == e
