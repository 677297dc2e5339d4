import json
import math
import pickle

import pytest
import torch
from conftest import ToyDataset, iterate, toy_experiment

import mtdisent as md
from mtdisent.engine import build_loop, lambda_schedule, masked_cross_entropy


def trainer_for(data_size=120, **overrides):
    e = toy_experiment(**overrides)
    return build_loop(e, {"train": ToyDataset(data_size), "val": ToyDataset(40, seed=1)})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("objective", ["minmax", "confusion", "projection"])
def test_main_step_leaves_adversaries_untouched(objective):
    tr = trainer_for(adversary={"objective": objective})
    adv, enc, cls = snapshot(tr.model.adversaries), snapshot(tr.model.encoders), snapshot(tr.model.classifiers)
    tr.step.main_step(lam=0.5)
    assert changed(adv, tr.model.adversaries) == set()  # weights and BatchNorm statistics
    assert changed(enc, tr.model.encoders) and changed(cls, tr.model.classifiers)


@pytest.mark.parametrize("features", ["fresh", "reuse"])
def test_adversary_steps_leave_encoders_and_classifiers_untouched(features):
    tr = trainer_for(adversary={"features": features})
    _, feats, y = tr.step.main_step(lam=0.5)
    enc, cls, adv = snapshot(tr.model.encoders), snapshot(tr.model.classifiers), snapshot(tr.model.adversaries)
    for _ in range(3):
        tr.step.adversary_step(feats if features == "reuse" else None, y if features == "reuse" else None)
    assert changed(enc, tr.model.encoders) == set()  # fresh passes restore BatchNorm running statistics
    assert changed(cls, tr.model.classifiers) == set()
    assert changed(adv, tr.model.adversaries)


def test_fresh_features_draw_new_batches_and_reuse_does_not():
    fresh = trainer_for(adversary={"features": "fresh"})
    reuse = trainer_for(adversary={"features": "reuse"})
    iterate(fresh)
    iterate(reuse)
    assert fresh.feed.stream.offset == 20 * 3 and reuse.feed.stream.offset == 20  # 1 main + 2 adversary batches


def test_gradient_reversal_updates_adversaries_in_the_main_step():
    tr = trainer_for(adversary={"objective": "gradient_reversal", "steps": 0})
    adv = snapshot(tr.model.adversaries)
    tr.step.main_step(lam=0.5)
    assert changed(adv, tr.model.adversaries)


def _adversary_view(tr, x, y):
    """Adversary a->b logits on a fixed batch (train-mode BatchNorm, statistics restored), and CE against b."""
    saved = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with torch.no_grad():
        logits = tr.model.adversaries["a->b"](tr.model.encoders["a"](x))
    tr.model.load_state_dict(saved)
    return logits, torch.nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize("objective", ["minmax", "confusion", "gradient_reversal", "projection"])
def test_encoder_update_opposes_the_adversary(objective):
    # Only the adversarial term acts on the encoder (task losses and L2 weighted 0, one pair): the sign of
    # the encoder gradient decides whether the adversary's loss goes up (minmax, reversal, projection: its
    # -alpha * g_adv) or its prediction moves toward uniform (confusion). A sign error fails this test.
    tr = trainer_for(
        adversary={"objective": objective, "steps": 0, "ensemble": 1, "conditional": False, "layout": "pair"},
        tasks=[md.Task(name="a", num_classes=2, loss_weight=0), md.Task(name="b", num_classes=3, loss_weight=0)],
        pairs=[md.Pair(source="b", target="a", enabled=False)],
        training={
            "l2": 0.0,
            "hflip": False,
            "batch_size": 40,
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.0},
            "adversary_optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
        },
        data_size=40,
    )
    ds = tr.feed.view.dataset
    x, y = ds.x[:40], ds.b[:40]
    adv = tr.model.adversaries["a->b"]
    for _ in range(50):  # teach the adversary first, so it is far from uniform
        tr.step.adversary_step({"a": tr.model.encoders["a"](x).detach()}, {"a": ds.a[:40], "b": y})
    if objective == "gradient_reversal":  # keep the adversary fixed to isolate the encoder's move
        for p in tr.model.adversary_parameters():
            p.requires_grad_(False)
        tr.step.adversary_params = []
    assert adv is tr.model.adversary("a", "b")
    before_logits, before_ce = _adversary_view(tr, x, y)
    for _ in range(5):
        tr.step.main_step(lam=1.0)
    after_logits, after_ce = _adversary_view(tr, x, y)
    if objective == "confusion":
        uniform = torch.full_like(before_logits, 1 / 3)
        kl = lambda logits: torch.nn.functional.kl_div(logits.log_softmax(-1), uniform, reduction="batchmean")  # noqa: E731
        assert kl(after_logits) < kl(before_logits)
    else:
        assert after_ce > before_ce


def test_masked_labels_contribute_no_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, -1, 2, -1])
    masked_cross_entropy(logits, target).backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 3)) and logits.grad[[0, 2]].abs().sum() > 0
    assert masked_cross_entropy(logits, torch.full((4,), -1)) is None


def test_unlabelled_task_gives_its_classifier_and_adversaries_no_gradient():
    # the separate path owns one module per head, so per-head gradients can be read directly (the stacked path
    # is proved equal to it in test_execution.py); gradient reversal trains the adversaries in the main step,
    # so their gradients there exist: the adversary predicting the unlabelled task must get none, the other some
    tr = trainer_for(
        adversary={"steps": 0, "objective": "gradient_reversal", "ensemble": 1, "layout": "pair"},
        training={"l2": 0.0},
        execution={"heads": "separate"},
    )
    ds = tr.feed.view.dataset
    ds.drop_b[:] = True  # nobody labelled for task b
    tr.model.zero_grad(set_to_none=True)
    tr.step.main_optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients for inspection
    tr.step.adversary_optimizer.zero_grad = lambda set_to_none=True: None
    metrics, _, _ = tr.step.main_step(lam=1.0)

    def got_gradient(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert not got_gradient(tr.model.classifiers["b"]) and got_gradient(tr.model.classifiers["a"])
    assert "acc/b" not in metrics and "acc/a" in metrics
    assert not got_gradient(tr.model.adversaries["a->b"]) and got_gradient(tr.model.adversaries["b->a"])


def test_partial_labels_train_end_to_end():
    e = toy_experiment(training={"iterations": 40})
    run = md.train(e, data={"train": ToyDataset(unlabelled_b=0.5)}, quiet=True)
    last = run.history[-1]
    assert last["acc/a"] > 0.9 and "adv_acc/a->b" in last


def test_lambda_schedules():
    assert lambda_schedule("constant", 0, 10, 100) == 1.0
    assert lambda_schedule("linear", 0, 10, 100) == pytest.approx(0.1)
    assert lambda_schedule("linear", 50, 10, 100) == 1.0
    assert lambda_schedule("sigmoid", 0, 0, 100) == 0.0
    assert lambda_schedule("sigmoid", 50, 0, 100) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    tr = trainer_for(adversary={"schedule": "linear", "warmup": 4})
    assert [iterate(tr)["lambda"] for _ in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("features", ["fresh", "reuse"])
def test_exact_resume_is_bitwise(tmp_path, features):
    e = toy_experiment(adversary={"features": features}, training={"iterations": 6, "checkpoint_every": 3})
    data = {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}
    full = md.train(e, data=data, out_dir=tmp_path / "full", quiet=True)
    short = e.model_copy(update={"training": e.training.model_copy(update={"iterations": 3})})
    md.train(short, data=data, out_dir=tmp_path / "part", quiet=True)
    resumed = md.train(e, data=data, out_dir=tmp_path / "part", resume=True, quiet=True)
    assert resumed.iteration == 6
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refuses_to_overwrite_and_resume_checks_the_spec(tmp_path):
    e = toy_experiment()
    md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    with pytest.raises(md.CheckpointError, match="resume=True"):
        md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    other = e.model_copy(update={"seed": 5})
    with pytest.raises(md.CheckpointError, match="differs in seed"):
        md.train(other, data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True)
    lr = e.model_copy(update={"training": e.training.model_copy(update={"l2": 0.5})})
    with pytest.raises(md.CheckpointError, match=r"differs in training\.l2 \("):  # the field, not only its section
        md.train(lr, data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True)


def test_a_run_started_under_the_per_pair_default_resumes_with_it(tmp_path):
    # a checkpoint whose spec predates adversary.layout: its adversaries were per pair, today's default is per source
    e = toy_experiment(adversary={"layout": "pair"}, training={"iterations": 2, "checkpoint_every": 1})
    md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    for state in (tmp_path / "checkpoints").glob("iter-*/state.json"):
        saved = json.loads(state.read_text())
        del saved["experiment"]["adversary"]["layout"]
        state.write_text(json.dumps(saved))
    longer = {"iterations": 3, "checkpoint_every": 1}
    today = toy_experiment(training=longer)  # no layout: today's default
    with pytest.raises(md.CheckpointError, match=r"differs in adversary\.layout .*layout='pair'"):
        md.train(today, data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True)
    run = md.train(
        toy_experiment(adversary={"layout": "pair"}, training=longer),
        data=ToyDataset(),
        out_dir=tmp_path,
        resume=True,
        quiet=True,
    )
    assert run.iteration == 3 and "a->b" in run.model.adversaries.keys()


def test_a_run_started_with_contiguous_encoders_resumes_with_them(tmp_path):
    # channels_last was False by default before 2026-12-05 ("auto" since); a checkpoint older than the field reads False
    e = toy_experiment(training={"iterations": 2, "checkpoint_every": 1, "channels_last": False})
    md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    state = sorted((tmp_path / "checkpoints").glob("iter-*/state.json"))[-1]
    saved = json.loads(state.read_text())
    del saved["experiment"]["training"]["channels_last"]
    state.write_text(json.dumps(saved))
    longer = {"iterations": 3, "checkpoint_every": 1}
    hint = r"training\.channels_last .*channels_last=False \(the default was False before 2026-12-05 and is 'auto'"
    with pytest.raises(md.CheckpointError, match="differs in " + hint):
        md.train(toy_experiment(training=longer), data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True)
    contiguous = toy_experiment(training={**longer, "channels_last": False})
    assert md.train(contiguous, data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True).iteration == 3
    # "auto" is compared as the layout it gives: a run saved with "auto" on the CPU resumes with True; not with False,
    # and then without the changed-default hint (it was not trained under the old default)
    auto = tmp_path / "auto"
    first = toy_experiment(training={"iterations": 2, "checkpoint_every": 1})
    md.train(first, data=ToyDataset(), out_dir=auto, quiet=True)
    explicit = toy_experiment(training={**longer, "channels_last": True})
    assert md.train(explicit, data=ToyDataset(), out_dir=auto, resume=True, quiet=True).iteration == 3
    with pytest.raises(md.CheckpointError, match=r"differs in training\.channels_last \(only") as refused:
        md.train(contiguous, data=ToyDataset(), out_dir=auto, resume=True, quiet=True)
    assert "the default was" not in str(refused.value)


def test_a_run_saved_before_adversary_layout_existed_loads_as_it_was_trained(tmp_path):
    # saved specs hold every field; one without adversary.layout predates it, when every adversary was per pair
    e = toy_experiment(adversary={"layout": "pair", "features": "reuse"})
    run = md.train(e, data={"train": ToyDataset(), "val": ToyDataset(40, seed=1)}, out_dir=tmp_path, quiet=True)
    for name in ("model.json", "spec.json"):
        saved = json.loads((tmp_path / name).read_text())
        del saved.get("experiment", saved)["adversary"]["layout"]
        (tmp_path / name).write_text(json.dumps(saved))
    model = md.load(tmp_path)
    assert model.experiment.adversary.layout == "pair" and {"a->b", "b->a"} <= set(model.adversaries.keys())
    x = ToyDataset(8, seed=3).x
    run.model.eval()
    assert torch.equal(model.predict(x)["a"], run.model.predict(x)["a"])
    assert md.AdversarySpec().layout == "source"  # a spec written today without the field gets today's default


def test_load_gives_the_trained_model(tmp_path):
    run = md.train(
        toy_experiment(), data={"train": ToyDataset(), "val": ToyDataset(40, seed=1)}, out_dir=tmp_path, quiet=True
    )
    model = md.load(tmp_path)
    assert not model.training
    x = ToyDataset(8, seed=3).x
    run.model.eval()
    for t in ("a", "b"):
        assert torch.equal(model.predict(x)[t], run.model.predict(x)[t])
    assert isinstance(md.load(tmp_path, which="best"), md.MultiTaskModel)
    assert isinstance(md.load(tmp_path, which="latest"), md.MultiTaskModel)
    assert json.loads((tmp_path / "spec.json").read_text())["tasks"][0]["name"] == "a"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 6 and "acc/a" in json.loads(lines[0])


def test_corrupt_or_truncated_checkpoints_are_refused_by_name(tmp_path):
    md.train(toy_experiment(), data=ToyDataset(), out_dir=tmp_path, quiet=True)
    ckpt = tmp_path / "checkpoints" / "iter-00000006"
    tensor_file = ckpt / "tensors.safetensors"
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(md.CheckpointError, match="iter-00000006.*tensors.safetensors"):
        md.load(ckpt)
    (ckpt / "state.json").write_text("{trunc")
    with pytest.raises(md.CheckpointError, match="state.json"):
        md.load(ckpt)
    # resume skips the broken newest checkpoint, saying so by name, and continues from the previous valid one
    with pytest.warns(md.engine.CheckpointWarning, match=r"iter-00000006.*state\.json"):
        run = md.train(
            toy_experiment(training={"iterations": 8}), data=ToyDataset(), out_dir=tmp_path, resume=True, quiet=True
        )
    assert run.iteration == 8
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, 9))  # logged once each: what followed the resumed checkpoint was cut
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(md.CheckpointError, match="model.safetensors"):
        md.load(tmp_path)


def test_a_pickle_payload_is_never_executed(tmp_path):
    md.train(toy_experiment(), data=ToyDataset(), out_dir=tmp_path, quiet=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(md.CheckpointError):
        md.load(tmp_path)
    ckpt = tmp_path / "checkpoints" / "iter-00000006"
    (ckpt / "tensors.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(md.CheckpointError):
        md.load(ckpt)
    assert not marker.exists()


def test_non_finite_loss_stops_naming_iteration_and_term(tmp_path):
    class NanLater(md.Objective):
        calls = 0

        def encoder_term(self, logits, target, weight):
            NanLater.calls += 1
            term = -weight * torch.nn.functional.cross_entropy(logits, target)
            return term * float("nan") if NanLater.calls > 6 else term  # 2 pairs: iteration 4 turns NaN

    md.register("objective", "test_nan_later", NanLater)
    try:
        e = toy_experiment(
            adversary={"objective": "test_nan_later", "ensemble": 1}, training={"iterations": 6, "checkpoint_every": 2}
        )
        with pytest.raises(md.TrainingError, match=r"iteration 4, main step: loss terms? 'adv/a->b'.* not finite"):
            md.train(e, data=ToyDataset(), out_dir=tmp_path, quiet=True)
    finally:
        md.objectives.unregister("test_nan_later")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter-00000002"]  # the last good one stays
    assert isinstance(md.load(tmp_path, which="latest"), md.MultiTaskModel)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda ds: ds.b.__setitem__(5, 7), r"sample 5, task 'b': label 7 is out of range; expected 0..2"),
        (lambda ds: ds.x.__setitem__(3, float("nan")), r"sample 3: image contains NaN"),
    ],
)
def test_bad_samples_are_named(mutate, fragment):
    ds = ToyDataset(20)
    mutate(ds)
    with pytest.raises(md.DataError, match=fragment):
        md.train(toy_experiment(training={"iterations": 3, "batch_size": 20}), data=ds, quiet=True)


def test_wrong_shape_empty_and_missing_split():
    class Wrong(ToyDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x[:, :8], y

    with pytest.raises(md.DataError, match=r"sample \d+: image has shape \(1, 8, 16\), expected \(1, 16, 16\)"):
        md.train(toy_experiment(), data=Wrong(20), quiet=True)
    with pytest.raises(md.DataError, match="split 'train' is empty"):
        md.train(toy_experiment(), data=ToyDataset(0), quiet=True)
    with pytest.raises(md.DataError, match="no split 'train'"):
        md.train(toy_experiment(), data={"training": ToyDataset()}, quiet=True)
    with pytest.raises(md.DataError, match="no data"):
        md.train(toy_experiment(), quiet=True)


def test_fast_tensor_datasets_are_validated_too():
    ds = ToyDataset(20)
    ds.images, ds.labels = ds.x, {"a": ds.a.clone(), "b": ds.b.clone()}
    ds.labels["a"][4] = 2
    with pytest.raises(md.DataError, match=r"sample 4, task 'a': label 2 is out of range"):
        md.train(toy_experiment(), data=ds, quiet=True)


def test_paper_preset_hyperparameters_reach_the_optimisers():
    e = md.preset("paper_synthetic", scale=0.25)
    e = e.model_copy(
        update={"backbone": md.Component(name="dltk_residual", args={"filters": [2, 2], "strides": [1, 8]})}
    )
    step = build_loop(e, {"train": ToyDataset(4, size=16)}).step
    assert isinstance(step.main_optimizer, torch.optim.Adam) and step.main_optimizer.defaults["betas"] == (0.0, 0.9)
    assert step.main_optimizer.defaults["lr"] == 1e-5 and step.main_optimizer.defaults["eps"] == 1e-5
    assert (
        isinstance(step.adversary_optimizer, torch.optim.SGD) and step.adversary_optimizer.defaults["momentum"] == 0.9
    )


def test_without_an_adversary_term_each_branch_is_its_single_task_network():
    # examples/fetal_us.py reports the lambda = 0 model's branches as the single-task networks; with separate
    # encoders, lambda = 0 and reused features (adversaries only monitor) they are the same computation
    both = toy_experiment(adversary={"weight": 0.0, "features": "reuse"}, training={"iterations": 5})
    alone = toy_experiment(
        tasks=[md.Task(name="a", num_classes=2)], adversary={"weight": 0.0}, training={"iterations": 5}
    )
    data = {"train": ToyDataset()}
    a, b = md.train(both, data=data, quiet=True).model, md.train(alone, data=data, quiet=True).model
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sb if k.startswith(("encoders.a.", "classifiers.a."))]
    assert shared and all(torch.equal(sa[k], sb[k]) for k in shared)
