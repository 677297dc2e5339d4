"""Resume never hides a corrupt checkpoint; restart keeps what it replaces; one metrics line per iteration."""

import json
import os
import stat

import pytest
from conftest import ToyDataset, toy_experiment

import mtdisent as md
from mtdisent.engine import CheckpointWarning


def corrupt(checkpoint):
    tensors = checkpoint / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])


def logged(run_dir):
    return [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(tmp_path):
    e = toy_experiment(training={"iterations": 6, "checkpoint_every": 2, "keep_last": 3})
    md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    return e, tmp_path


def test_all_checkpoints_corrupt_is_an_error_naming_them(trained):
    e, run_dir = trained
    for name in ("iter-00000002", "iter-00000004", "iter-00000006"):
        corrupt(run_dir / "checkpoints" / name)
    longer = toy_experiment(training={"iterations": 8, "checkpoint_every": 2, "keep_last": 3})
    with pytest.raises(md.CheckpointError, match=r"none of the 3 checkpoints.*iter-00000006.*iter-00000002") as err:
        md.train(longer, data=ToyDataset(), out_dir=run_dir, resume=True, quiet=True)
    assert "\n" not in str(err.value)
    assert logged(run_dir) == [1, 2, 3, 4, 5, 6]  # nothing was trained or logged again


def test_restart_sets_the_old_outputs_aside_and_trains_from_zero(trained):
    e, run_dir = trained
    for name in ("iter-00000002", "iter-00000004", "iter-00000006"):
        corrupt(run_dir / "checkpoints" / name)
    with pytest.warns(UserWarning, match="restart: the previous outputs"):
        run = md.train(e, data=ToyDataset(), out_dir=run_dir, resume=True, restart=True, quiet=True)
    assert run.iteration == 6 and logged(run_dir) == [1, 2, 3, 4, 5, 6]
    (aside,) = [p for p in run_dir.iterdir() if p.name.startswith("discarded-")]
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "iter-00000002",
        "iter-00000004",
        "iter-00000006",
    ]
    assert (aside / "metrics.jsonl").is_file() and (aside / "model.safetensors").is_file()


def test_without_resume_or_restart_a_used_directory_is_refused(trained):
    e, run_dir = trained
    with pytest.raises(md.CheckpointError, match=r"resume=True \(--resume\).*restart=True \(--restart\)"):
        md.train(e, data=ToyDataset(), out_dir=run_dir, quiet=True)


def test_resume_cuts_metrics_logged_after_the_checkpoint_and_a_torn_line(trained):
    e, run_dir = trained
    metrics = run_dir / "metrics.jsonl"
    # as if the run had died after logging iteration 7 and half of 8 but before checkpointing them
    metrics.write_text(metrics.read_text() + json.dumps({"iteration": 7}) + '\n{"iterat')
    longer = toy_experiment(training={"iterations": 8, "checkpoint_every": 2, "keep_last": 3})
    md.train(longer, data=ToyDataset(), out_dir=run_dir, resume=True, quiet=True)
    assert logged(run_dir) == list(range(1, 9))


def test_run_files_are_readable_by_the_group_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        md.train(toy_experiment(), data=ToyDataset(), out_dir=tmp_path, quiet=True)
    finally:
        os.umask(old)
    for path in [tmp_path / "model.safetensors", tmp_path / "spec.json", tmp_path / "checkpoints" / "iter-00000006"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (path, oct(mode))
    assert stat.S_IMODE((tmp_path / "checkpoints" / "iter-00000006" / "state.json").stat().st_mode) == 0o644


def test_print_run_is_one_line(tmp_path):
    run = md.train(toy_experiment(), data={"train": ToyDataset(), "val": ToyDataset(40, seed=1)}, quiet=True)
    text = repr(run)
    assert "\n" not in text and "6 iterations" in text and "in memory" in text and len(text) < 120


def test_a_warning_is_not_needed_when_the_newest_checkpoint_is_fine(trained, recwarn):
    e, run_dir = trained
    longer = toy_experiment(training={"iterations": 8, "checkpoint_every": 2, "keep_last": 3})
    md.train(longer, data=ToyDataset(), out_dir=run_dir, resume=True, quiet=True)
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]


def test_restored_tensors_own_aligned_memory(trained):
    # views into the safetensors file (unaligned offsets) changed the last bit of in-place products after resume
    from mtdisent._engine._checkpoint import read_checkpoint

    _, run_dir = trained
    tensors, _ = read_checkpoint(run_dir / "checkpoints" / "iter-00000006")
    storages = {v.untyped_storage().data_ptr() for v in tensors.values()}
    assert len(storages) == len(tensors) and all(v.data_ptr() % 64 == 0 for v in tensors.values())
