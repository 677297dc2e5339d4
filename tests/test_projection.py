"""Gradient projection (objective ``projection``, Zhang, Lemoine & Mitchell 2018) and the combine_gradients hook."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mtdisent_plugins.objectives.projection import Projection, project_out

import mtdisent as md
from mtdisent._objectives import masked_pair_cross_entropy
from mtdisent.engine import build_loop
from mtdisent.testing import check_objective


class Correlated(torch.utils.data.Dataset):
    """Three tasks on 8x8 images; b mostly equals a (correlated factors, as when disentanglement is needed)."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(0, 2, (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.8, a, 1 - a)
        c = torch.randint(0, 3, (n,), generator=g)
        c[::5] = -1  # partly unlabelled
        self.y = {"a": a, "b": b, "c": c}
        self.x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
        self.x[:, :, :4] += a[:, None, None, None].float()
        self.x[:, :, 4:] += b[:, None, None, None].float() * 0.5
        self.x[:, :, :, :4] += c.clamp(min=0)[:, None, None, None].float() * 0.3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {t: int(v[i]) for t, v in self.y.items()}


class FixedFeed:
    """Always the same batch, so a step can be recomputed by hand."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def next(self):
        return self.x.clone(), {k: v.clone() for k, v in self.y.items()}


DLTK = {"name": "dltk_residual", "args": {"filters": [3, 6], "strides": [1, 2], "output": "pool"}}


def trainer(
    objective_args=None,
    *,
    heads="stacked",
    layout="pair",
    conditional=False,
    ensemble=1,
    l2=0.0,
    lr=0.1,
    scales="last",
    objective="projection",
    tasks=("a", "b", "c"),
):
    classes = {"a": 2, "b": 2, "c": 3}
    e = md.Experiment(
        tasks=[md.Task(name=t, num_classes=classes[t]) for t in tasks],
        backbone=DLTK,
        input_shape=(1, 8, 8),
        head={"hidden": [8]},
        adversary={
            "objective": {"name": objective, "args": objective_args or {}},
            "head": {"hidden": [8]},
            "steps": 0,
            "weight": 0.5,
            "ensemble": ensemble,
            "reinit_every": 0,
            "conditional": conditional,
            "layout": layout,
            "scales": scales,
        },
        pairs=[md.Pair(source="a", target="b", weight=2.0)] if "b" in tasks else [],
        training={
            "batch_size": 24,
            "l2": l2,
            "hflip": False,
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.0},
            "adversary_optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
        },
        execution={"heads": heads},
    )
    data = Correlated()
    loop = build_loop(e, {"train": data})
    idx = torch.arange(24)
    x, y = data.x[idx], {t: v[idx] for t, v in data.y.items()}
    loop.step.feed = FixedFeed(x, y)
    return loop, x, y


def hand_gradients(model, x, y, lam, pair_weights=True):
    """Per encoder: (task gradient, adversary gradient) flattened, and the classifiers' task gradients, by hand."""
    model = copy.deepcopy(model)
    model.train()
    feats = model.encode(x, y)
    logits = model.classify(feats)
    task_loss = sum(
        model.experiment.task(t).loss_weight * F.cross_entropy(logits[t][y[t] >= 0], y[t][y[t] >= 0])
        for t in model.task_names
    )
    targets = torch.stack([y[p.target] for p in model.pairs])
    ce = masked_pair_cross_entropy(model.adversary_logits(feats, labels=y), targets)[0]  # (P,)
    weights = torch.tensor([lam * p.weight for p in model.pairs])
    adv_loss = (weights * ce).sum() if pair_weights else ce.sum()
    out = {}
    for t in model.task_names:
        params = list(model.encoders[t].parameters())
        gt = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        ga = torch.autograd.grad(adv_loss, params, retain_graph=True, allow_unused=True)
        out[t] = (flat(gt, params), flat(ga, params))
    cls = torch.autograd.grad(task_loss, list(model.classifiers.parameters()), allow_unused=True)
    return out, cls


def flat(grads, params):
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


CONFIGS = [
    dict(heads="stacked", layout="pair", conditional=False, ensemble=1),
    dict(heads="separate", layout="pair", conditional=True, ensemble=2),
    dict(heads="stacked", layout="source", conditional=True, ensemble=2),
    dict(heads="stacked", layout="pair", conditional=True, ensemble=1, scales="all"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("pair_weights", [True, False])
def test_encoder_update_is_the_projection_formula(config, pair_weights):
    # SGD without momentum: the step's parameter change is -lr * (direction + 2 l2 W), W the weight matrices
    alpha, lam, lr, l2 = 0.7, 0.5, 0.1, 1e-3
    loop, x, y = trainer({"alpha": alpha, "pair_weights": pair_weights}, l2=l2, lr=lr, **config)
    model = loop.model
    grads, cls_grads = hand_gradients(model, x, y, lam, pair_weights)
    before = {t: flat_params(model.encoders[t]) for t in model.task_names}
    cls_before = [p.detach().clone() for p in model.classifiers.parameters()]
    decayed = {id(w) for w in model.classifiers.weight_matrices()}
    adv_before = copy.deepcopy(model.adversaries.state_dict())
    metrics, _, _ = loop.step.main_step(lam)
    for t in model.task_names:
        g_task, g_adv = grads[t]
        assert g_adv.abs().sum() > 0  # every task is the source of some pair
        direction = g_task - (g_task.dot(g_adv) / g_adv.dot(g_adv)) * g_adv - alpha * g_adv
        kernels = [p for p in model.encoders[t].parameters() if p.ndim > 1]  # what L2 acts on
        decay = torch.cat(
            [
                (2 * l2 * p.detach() if any(p is k for k in kernels) else torch.zeros_like(p)).reshape(-1)
                for p in model.encoders[t].parameters()
            ]
        )
        expected = before[t] - lr * (direction + decay)  # decay of the weights before the step
        got = flat_params(model.encoders[t])
        error, change = float((got - expected).abs().max()), float((expected - before[t]).abs().max())
        assert error <= 1e-3 * change, (t, error, change)  # float32 sums in a different order: ~1e-4 relative
        assert metrics[f"grad_cos/{t}"] == pytest.approx(
            float(g_task.dot(g_adv) / (g_task.norm() * g_adv.norm()).clamp_min(1e-30)), abs=1e-4
        )
    for p, p0, g in zip(model.classifiers.parameters(), cls_before, cls_grads, strict=True):  # task gradient only
        g = torch.zeros_like(p0) if g is None else g
        expected = p0 - lr * (g + (2 * l2 * p0 if id(p) in decayed else 0.0))
        assert torch.allclose(p.detach(), expected, atol=1e-6, rtol=1e-4)
    for k, v in model.adversaries.state_dict().items():
        assert torch.equal(v, adv_before[k]), k  # the adversaries are left as they were


def test_classifier_l2_follows_the_plain_path():
    # the classifiers' update is the same whether the encoders' gradients are combined or not
    loops = [trainer({"alpha": 0.7}, l2=1e-2)[0], trainer(objective="minmax", l2=1e-2)[0]]
    for loop in loops:
        loop.step.main_step(0.5)
    a, b = (dict(loop.model.classifiers.state_dict()) for loop in loops)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def adversary_loss(model, x, y, lam=0.5):
    """The pair-weighted adversaries' loss on a fixed batch, in float64 (train-mode BatchNorm, on a copy)."""
    model = copy.deepcopy(model).double()
    model.train()
    with torch.no_grad():
        feats = model.encode(x.double(), y)
        logits = model.adversary_logits(feats, labels=y)  # (P, B, K_max)
        total = 0.0
        for p, pair in enumerate(model.pairs):
            m = y[pair.target] >= 0
            k = model.pair_classes[p]
            total += lam * pair.weight * float(F.cross_entropy(logits[p, m, :k], y[pair.target][m]))
    return total


def taught(loop, x, y, steps=40):
    """Teach the adversaries first, so that their gradient points somewhere meaningful."""
    for _ in range(steps):
        with torch.no_grad():
            feats = loop.model.encode(x, y)
        loop.step.adversary_step(feats, y)
    return loop


def reflected(model, before):
    """A copy of ``model`` whose encoders took the opposite step: 2 * before - after."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t, params in before.items():
            for p, p0 in zip(other.encoders[t].parameters(), params, strict=True):
                p.copy_(2 * p0 - p)
    return other


def test_task_part_of_the_update_does_not_help_the_adversaries_to_first_order():
    # The first-order change of the adversaries' loss over the encoders' step, by a central difference in float64:
    # (L(theta + step) - L(theta - step)) / 2 = <grad L, step> + O(|step|^3), free of the second-order term.
    # A small learning rate keeps the step away from the kinks of leaky ReLU and max-pooling (at 1e-3 they show).
    changes = {}
    for name, args, lam in [
        ("plain", {"alpha": 0.0}, 0.0),  # lambda 0: the task gradient alone, nothing projected
        ("projected", {"alpha": 0.0}, 0.5),
        ("pushed", {"alpha": 1.0}, 0.5),
    ]:
        loop, x, y = trainer(args, lr=1e-4)
        taught(loop, x, y)
        before = {t: [p.detach().clone() for p in loop.model.encoders[t].parameters()] for t in loop.model.task_names}
        loop.step.main_step(lam)
        after, back = adversary_loss(loop.model, x, y), adversary_loss(reflected(loop.model, before), x, y)
        changes[name] = (after - back) / 2
    # the plain task step helps the adversaries (their loss falls: the factors are correlated) ...
    assert changes["plain"] < 0
    # ... the projected one does not, to first order ...
    assert abs(changes["projected"]) < 0.01 * abs(changes["plain"])
    # ... and alpha > 0 raises their loss
    assert changes["pushed"] > 5 * abs(changes["plain"])


def test_projection_removes_exactly_the_component_along_the_adversary_gradient():
    lr = 0.1
    loop, x, y = trainer({"alpha": 0.0}, lr=lr)
    grads, _ = hand_gradients(loop.model, x, y, 0.5)
    before = {t: flat_params(loop.model.encoders[t]) for t in ("a", "c")}
    loop.step.main_step(0.5)
    for t, p0 in before.items():
        g_task, g_adv = grads[t]
        direction = (p0 - flat_params(loop.model.encoders[t])) / lr  # l2 = 0, plain SGD
        assert abs(float(g_task.dot(g_adv))) > 1e-3 * float(g_task.norm() * g_adv.norm())  # there was something
        assert abs(float(direction.dot(g_adv))) < 1e-4 * float(direction.norm() * g_adv.norm())
        # and nothing else was removed: the change is g_task minus a multiple of g_adv
        residual = direction - g_task
        assert abs(abs(float(residual.dot(g_adv))) - float(residual.norm() * g_adv.norm())) < 1e-4 * float(
            residual.norm() * g_adv.norm()
        )


def test_project_out_on_vectors():
    g = torch.tensor([3.0, 4.0, 0.0])
    a = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(project_out(g, a, 0.0), torch.tensor([0.0, 4.0, 0.0]))
    assert torch.equal(project_out(g, a, 2.0), torch.tensor([-2.0, 4.0, 0.0]))  # minus alpha * a
    assert torch.equal(project_out(g, torch.zeros(3), 5.0), g)  # no adversary gradient: the task gradient
    assert torch.equal(project_out(g, 2 * a, 0.0), project_out(g, a, 0.0))  # independent of the scale of a


@pytest.mark.parametrize("args", [{}, {"alpha": 0.0, "pair_weights": False}, {"alpha": 3.0}])
def test_projection_passes_the_conformance_kit(args):
    objective = check_objective("projection", args=args)
    assert objective.combines_gradients and not objective.single_pass


def test_projection_arguments_are_checked():
    with pytest.raises(md.ComponentError, match="alpha=-1.*>= 0"):
        md.objectives.create("projection", {"alpha": -1})
    with pytest.raises(md.ComponentError, match="pair_weights='yes'"):
        md.objectives.create("projection", {"pair_weights": "yes"})
    with pytest.raises(md.ComponentError, match="unknown argument 'alpah'.*Did you mean 'alpha'"):
        md.objectives.create("projection", {"alpah": 1})


def test_check_objective_catches_a_combination_that_changes_the_task_gradient():
    class Drops(md.Objective):
        combines_gradients = True

        def encoder_term(self, logits, target, weight):
            return weight * F.cross_entropy(logits, target)

        def combine_gradients(self, task, adversary):
            return 0.5 * task - adversary

    with pytest.raises(AssertionError, match="zero adversary gradient"):
        check_objective(Drops)


def test_single_pass_objectives_cannot_combine_gradients():
    class Both(Projection):
        single_pass = True

    md.register("objective", "test_both", Both)
    try:
        with pytest.raises(md.ComponentError, match="'test_both' sets both single_pass and combines_gradients"):
            trainer(objective="test_both")
    finally:
        md.objectives.unregister("test_both")


def test_the_default_path_takes_no_extra_gradient(monkeypatch):
    loop, _, _ = trainer(objective="minmax")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.autograd.grad called on the default path")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    metrics, _, _ = loop.step.main_step(0.5)
    assert not any(k.startswith("grad_cos/") for k in metrics)


def test_an_encoder_without_adversaries_gets_its_task_gradient():
    # one task (no adversaries) and lambda 0: the combined path equals the plain one exactly
    for tasks, lam in [(("a",), 0.5), (("a", "b", "c"), 0.0)]:
        proj, _, _ = trainer({"alpha": 1.0}, tasks=tasks)
        plain, _, _ = trainer(objective="minmax", tasks=tasks)
        proj.step.main_step(lam)
        plain.step.main_step(lam)
        for k, v in plain.model.state_dict().items():
            assert torch.allclose(v, proj.model.state_dict()[k], atol=1e-7), (tasks, k)


def test_projection_trains_end_to_end(tmp_path):
    loop, _, _ = trainer({"alpha": 1.0})
    e = loop.experiment.model_copy(
        update={
            "adversary": loop.experiment.adversary.model_copy(update={"steps": 2}),
            "training": loop.experiment.training.model_copy(update={"iterations": 4, "checkpoint_every": 2}),
        }
    )
    run = md.train(e, data={"train": Correlated(), "val": Correlated(24, seed=1)}, out_dir=tmp_path, quiet=True)
    assert all("grad_cos/a" in m for m in run.history)
    assert md.load(tmp_path).experiment.adversary.objective.name == "projection"
