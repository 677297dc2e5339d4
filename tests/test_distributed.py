"""DDP under torchrun with two CPU processes (gloo)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mtdisent as md

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def ranks(out):
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


@pytest.mark.parametrize("model", ["plain", "plain_projection", "plain_erase_after"])
def test_ranks_agree_and_match_a_single_process_run(tmp_path, model):
    # plain_projection: the projection objective takes its gradients with torch.autograd.grad, which DDP's hooks
    # do not see; the step averages them over the processes itself before projecting. plain_erase_after: every
    # rank fits the erasure on the whole training split and retrains the heads when training ends
    torchrun(HERE / "ddp_worker.py", tmp_path, model, 6)
    r0, r1 = ranks(tmp_path)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    sys.path.insert(0, str(HERE))
    import ddp_worker

    single = md.train(ddp_worker.experiment(model, 6), data=ddp_worker.data(), quiet=True)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, r0[k], rtol=1e-4, atol=1e-5), k
    # only rank 0 wrote the run directory, and it holds the same model
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "iter-00000003", "iter-00000006"]
    for k, v in md.load(tmp_path).state_dict().items():
        assert torch.equal(v, r0[k]), k
    if model == "plain_erase_after":  # fitted once, on every sample once: the counts of one process
        counts = [k for k in r0 if k.endswith(".count")]
        assert counts and all(torch.equal(r0[k], single.model.state_dict()[k]) for k in counts)
        assert all(int(r0[f"lever_modules.0.sources.{t}.rank"]) > 0 for t in ("a", "b"))


def test_batchnorm_model_ranks_identical_and_resume_under_ddp(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(HERE / "ddp_worker.py", full, "dltk", 6)
    r0, r1 = ranks(full)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # parameters, and buffers broadcast from rank 0
    torchrun(HERE / "ddp_worker.py", part, "dltk", 3)
    torchrun(HERE / "ddp_worker.py", part, "dltk", 6, "resume")
    p0, _ = ranks(part)
    for k in r0:
        assert torch.allclose(r0[k], p0[k], rtol=1e-5, atol=1e-6), k


def test_torchrun_module_cli(tmp_path):
    spec = tmp_path / "spec.py"
    spec.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
        "from ddp_worker import experiment as make, data as make_data\n"
        "experiment = make('dltk', 4)\ndata = make_data()\n"
    )
    proc = torchrun("-m", "mtdisent", "train", spec, "--out-dir", tmp_path / "run", "--quiet")
    assert proc.stdout.count("trained 4 iterations") == 2  # both ranks finish
    assert isinstance(md.load(tmp_path / "run"), md.MultiTaskModel)
