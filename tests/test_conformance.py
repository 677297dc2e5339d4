"""The conformance kit applied to every registered backbone and objective."""

import pytest
import torch

import mtdisent as md
from mtdisent.testing import backbone_names, check_backbone, check_lever, check_objective, objective_names

# Small configurations so every backbone runs quickly on the CPU.
BACKBONE_ARGS = {
    "dltk_residual": [
        {"filters": [4, 8, 16], "strides": [1, 2, 2]},
        {"filters": [4, 8, 4], "strides": [1, 2, [1, 2]], "units_per_scale": 2, "output": "pool"},
    ],
    "timm": [{"model": "resnet18"}],
    # One small member of each family the monai backbone cuts (tests/test_monai_backbone.py has the rest).
    "monai": [
        {"network": "DenseNet121", "args": {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}},
        {"network": "resnet10", "args": {"widen_factor": 0.125}},
        {"network": "EfficientNetBN", "args": {"model_name": "efficientnet-b0"}},
        {"network": "SEResNet50", "args": {"layers": [1, 1, 1, 1], "inplanes": 16}},
        {"network": "ViT", "args": {"img_size": 32, "patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}},
    ],
}


@pytest.mark.parametrize("name", backbone_names())
def test_backbone_conformance(name):
    assert name in BACKBONE_ARGS, f"add a small configuration for new backbone {name!r}"
    for args in BACKBONE_ARGS[name]:
        check_backbone(name, args=args, in_channels=2, input_size=(32, 32))


@pytest.mark.parametrize("name", objective_names())
def test_objective_conformance(name):
    check_objective(name)


def test_check_backbone_catches_a_bad_backbone():
    class Bad(torch.nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.used = torch.nn.Conv2d(in_channels, 2, 1)
            self.unused = torch.nn.Linear(2, 2)
            self.num_features = 2

        def forward(self, x):
            return self.used(x).mean(dim=(2, 3))

    md.register("backbone", "test_bad_bb", Bad)
    try:
        with pytest.raises(AssertionError, match="no gradient.*unused"):
            check_backbone("test_bad_bb")
    finally:
        md.backbones.unregister("test_bad_bb")


def test_check_objective_catches_a_detached_term():
    class Detached(md.Objective):
        def encoder_term(self, logits, target, weight):
            return logits.detach().sum() * 0 + torch.tensor(1.0, requires_grad=True)

    with pytest.raises(AssertionError, match="no gradient to features"):
        check_objective(Detached)


def test_check_objective_catches_a_batched_path_that_disagrees():
    class Sloppy(md.Objective):
        def encoder_term(self, logits, target, weight):
            return -weight * torch.nn.functional.cross_entropy(logits, target)

        def encoder_terms(self, logits, targets, weights, num_classes):  # forgets to mask unlabelled samples
            return -weights * torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
            ).mean(1)

    with pytest.raises(AssertionError, match="differ from the per-pair"):
        check_objective(Sloppy)


def test_objective_rejects_unknown_kwargs_by_name():
    with pytest.raises(
        md.ComponentError, match="objective 'minmax': unknown argument 'strength'. It takes no arguments"
    ):
        md.objectives.create("minmax", {"strength": 2})
    with pytest.raises(md.ComponentError, match="unknown argument 'kernal'.*Did you mean 'kernel'"):
        md.objectives.create("hsic", {"kernal": "linear"})


def test_check_lever_catches_state_left_out_of_checkpoints():
    class Forgetful(md.Lever):
        """Noise from a generator that checkpoints do not hold: resuming replays different draws."""

        def __init__(self):
            self.generator = torch.Generator().manual_seed(0)

        def features(self, module, features, labels, training):
            if labels is None:
                return features
            return {t: f + 0.1 * torch.randn(f.shape, generator=self.generator) for t, f in features.items()}

    md.register("lever", "test_forgetful", Forgetful)
    try:
        with pytest.raises(AssertionError, match="lever 'test_forgetful': resumed training differs"):
            check_lever("test_forgetful", iterations=2)
    finally:
        md.levers.unregister("test_forgetful")
