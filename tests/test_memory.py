"""Memory checks before building and training: a clear error instead of a process killed for lack of memory."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyDataset, toy_experiment
from hypothesis import given, settings
from hypothesis import strategies as st

import mtdisent as md
from mtdisent import _memory
from mtdisent._heads import MLPHead
from mtdisent._spec import HeadSpec, OptimizerSpec


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 40),
    k=st.integers(1, 7),
    hidden=st.lists(st.integers(1, 12), max_size=3),
    batchnorm=st.booleans(),
    bias=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
)
def test_parameter_count_is_that_of_the_built_head(d, k, hidden, batchnorm, bias, dropout):
    spec = HeadSpec(hidden=hidden, batchnorm=batchnorm, bias=bias, dropout=dropout)
    built = sum(p.numel() for p in MLPHead(d, k, spec).parameters())
    assert MLPHead.parameter_count(d, k, spec) == built


def adversary_bytes(e):
    """Bytes of the adversaries' float32 weights in the model ``e`` builds (checks off)."""
    off = e.model_copy(update={"execution": e.execution.model_copy(update={"memory_check": False})})
    return 4 * sum(p.numel() for p in md.build_model(off).adversary_parameters())


@pytest.mark.parametrize("layout", ["pair", "source", "pair_shared"])
def test_building_adversaries_larger_than_free_memory_is_refused_in_one_line(monkeypatch, layout):
    e = toy_experiment(adversary={"layout": layout, "ensemble": 2, "conditional": True})
    need = adversary_bytes(e) * 2  # stacked: the heads and their stack
    calls = []
    monkeypatch.setattr(_memory, "free_bytes", lambda device: calls.append(device) or need - 1)
    with pytest.raises(md.SpecError) as info:
        md.build_model(e)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("adversary: ") and calls == [torch.device("cpu")]
    assert f"layout {layout!r}, ensemble 2" in msg and "execution.memory_check=false" in msg
    # two tasks: "source" is the pair layout renamed, so only sharing the members' hidden layer is smaller
    assert "adversary.layout='source'" not in msg
    assert ("adversary.layout='pair_shared'" in msg) == (layout != "pair_shared")
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need)  # exactly enough: built
    assert md.build_model(e).adversary_parameters()


def test_the_refusal_offers_each_smaller_layout_with_its_size(monkeypatch):
    # four tasks, two members: 24 networks per pair and member, 12 per pair, 8 per source and member
    tasks = [md.Task(name=n, num_classes=2) for n in "abcd"]
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1)
    msgs, sizes = {}, {}
    for layout in ("pair", "source", "pair_shared"):
        e = toy_experiment(tasks=tasks, adversary={"layout": layout, "ensemble": 2})
        with pytest.raises(md.SpecError) as info:
            md.build_model(e)
        msgs[layout], sizes[layout] = str(info.value), adversary_bytes(e) // 4
    assert sizes["pair"] > sizes["pair_shared"] > sizes["source"]
    for layout, msg in msgs.items():
        for other in msgs:
            offered = f"adversary.layout={other!r} ({'one network' if other == 'source' else 'ensemble'}"
            assert (offered in msg) == (sizes[other] < sizes[layout]), (layout, other)
        # members of a shared network cost only their output rows: fewer of them is no advice there
        assert ("fewer adversary.ensemble members" in msg) == (layout != "pair_shared")


def test_separate_heads_need_one_copy_and_the_check_can_be_turned_off(monkeypatch):
    e = toy_experiment(execution={"heads": "separate"})
    need = adversary_bytes(e)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need)
    md.build_model(e)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need - 1)
    with pytest.raises(md.SpecError, match="building them needs at least"):
        md.build_model(e)
    md.build_model(toy_experiment(execution={"heads": "separate", "memory_check": False}))


@pytest.mark.parametrize("features", ["fresh", "reuse"])
def test_training_that_cannot_fit_stops_before_the_first_step(monkeypatch, tmp_path, features):
    # Adam (2 states) for the main parameters, SGD with momentum (1) for the adversaries; with reused features the
    # Gram shortcut moves the adversaries without gradients, with fresh ones they get gradients
    e = toy_experiment(adversary={"features": features})
    model = md.build_model(e)
    main = sum(p.numel() for p in model.main_parameters())
    adv = sum(p.numel() for p in model.adversary_parameters())
    assert set(model.adversary_widths().values()) == {8 + 2, 8 + 3}  # tasks a (2 classes) and b (3)
    inputs = 20 * sum(model.adversary_widths()[h.source] for h in model.adversary_heads)  # (G, B, D + K): a batch
    need = 4 * (2 * main + adv + (adv if features == "fresh" else 0) + inputs)
    free = iter([10**12, need - 1])  # building fits; training does not
    monkeypatch.setattr(_memory, "free_bytes", lambda device: next(free))
    with pytest.raises(md.SpecError) as info:
        md.train(e, data=ToyDataset(), out_dir=tmp_path / "run", quiet=True)
    msg = str(info.value)
    assert msg.startswith("training: the optimisers' state") and "\n" not in msg
    assert "training.optimizer 'adam' keeps 2" in msg and "training.adversary_optimizer 'sgd' 1" in msg
    assert ("the adversaries' gradients" in msg) == (features == "fresh") and "stacked inputs" in msg
    assert "adversary.layout='pair_shared'" in msg and "adversary.layout='source'" not in msg  # two tasks
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing trained, nothing written as if it had
    free = iter([10**12, need])  # exactly enough
    assert md.train(e, data=ToyDataset(), quiet=True).model is not None


def test_optimizer_states():
    assert _memory.optimizer_states(OptimizerSpec(name="adam")) == 2
    assert _memory.optimizer_states(OptimizerSpec(name="adamw")) == 2
    assert _memory.optimizer_states(OptimizerSpec(name="sgd", momentum=0.9)) == 1
    assert _memory.optimizer_states(OptimizerSpec(name="sgd", momentum=0.0)) == 0


def test_host_free_memory_is_capped_by_a_cgroup_limit(monkeypatch, tmp_path):
    meminfo = _memory._host_free_bytes()
    if meminfo is None:
        pytest.skip("no /proc/meminfo and no cgroup files on this platform")
    assert meminfo > 0
    limit, usage = tmp_path / "limit", tmp_path / "usage"
    limit.write_text("1000000\n")
    usage.write_text("400000\n")
    monkeypatch.setattr(_memory, "_CGROUP_FILES", ((str(limit), str(usage)),))
    assert _memory._host_free_bytes() == min(meminfo, 600000)
    limit.write_text("max\n")  # cgroup v2: no limit
    unlimited = _memory._host_free_bytes()
    assert unlimited is not None and unlimited > 600000  # MemAvailable again, not capped
    usage.write_text("2000000\n")  # over a (v1) limit: nothing free
    limit.write_text("1000000\n")
    assert _memory._host_free_bytes() == 0


def test_processes_on_one_host_share_its_free_memory(monkeypatch):
    monkeypatch.setattr(_memory, "_host_free_bytes", lambda: 12_000)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _memory.free_bytes(torch.device("cpu")) == 12_000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4
    assert _memory.free_bytes(torch.device("cpu")) == 3_000
    monkeypatch.setattr(_memory, "_host_free_bytes", lambda: None)
    assert _memory.free_bytes(torch.device("cpu")) is None  # unknown: no check
