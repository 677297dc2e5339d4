"""The first-party ``monai`` backbone: MONAI classifiers cut before their classification layer.

MONAI is in the ``test`` and ``dev`` extras, so these tests run (never skip) wherever the suite runs.
Every network is tiny and every input 32 x 32 so that the file runs in seconds on one CPU core.
"""

import sys
import urllib.error

import monai.networks.nets as nets
import pytest
import torch
from conftest import ToyDataset, toy_experiment
from mtdisent_plugins.backbones.monai_backbone import supported_networks

import mtdisent as md
from mtdisent._model import build_backbone
from mtdisent._spec import Component

TINY_DENSENET = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}
TINY_VIT = {"img_size": 32, "patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}

# (name, args for MONAI and the backbone, the classification head of the full MONAI network, full-network extras)
FAMILIES = [
    ("DenseNet121", TINY_DENSENET, lambda n: n.class_layers.out, {"out_channels": 3}),
    ("densenet121", TINY_DENSENET, lambda n: n.class_layers.out, {"out_channels": 3}),  # a MONAI alias
    ("resnet10", {"widen_factor": 0.125}, lambda n: n.fc, {"num_classes": 3}),
    ("resnet50", {"widen_factor": 0.0625, "shortcut_type": "A"}, lambda n: n.fc, {"num_classes": 3}),
    ("EfficientNetBN", {"model_name": "efficientnet-b0"}, lambda n: n._fc, {"num_classes": 3, "pretrained": False}),
    ("SEResNet50", {"layers": [1, 1, 1, 1], "inplanes": 16}, lambda n: n.last_linear, {"num_classes": 3}),
    ("ViT", TINY_VIT, lambda n: n.classification_head, {"classification": True, "num_classes": 3}),
]


def build(network, args=None, in_channels=1, **kw):
    return build_backbone(Component(name="monai", args={"network": network, "args": args or {}, **kw}), in_channels)


def full_monai(network, args, extras, in_channels=1):
    channels = "n_input_channels" if network.startswith("resnet") else "in_channels"
    return getattr(nets, network)(spatial_dims=2, **{channels: in_channels}, **args, **extras).eval()


@pytest.mark.parametrize("network, args, head, extras", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_features_are_exactly_what_monai_feeds_its_classification_layer(tmp_path, network, args, head, extras):
    torch.manual_seed(0)
    full = full_monai(network, args, extras)
    path = tmp_path / "weights.pt"
    torch.save(full.state_dict(), path)  # the full network, head included: the backbone ignores the head's entries
    enc = build(network, args, pretrained=True, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        feats, logits = enc(x), full(x)
    logits = logits[0] if isinstance(logits, tuple) else logits  # ViT: (logits, hidden states)
    linear = next(m for m in head(full).modules() if isinstance(m, torch.nn.Linear))  # ViT: Linear then Tanh
    assert feats.shape == (2, enc.num_features) and enc.num_features == linear.in_features
    assert torch.allclose(head(full)(feats), logits, atol=1e-5)
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 3 for m in enc.modules())


def test_resnet_is_built_without_fc_and_widths_follow_widen_factor():
    enc = build("resnet18", {"widen_factor": 0.25})
    assert enc.net.fc is None and enc.num_features == 128  # 512 * 0.25, basic block (expansion 1)
    assert enc.net.conv1.in_channels == 1  # MONAI's n_input_channels


def test_in_channels_reach_the_stem_of_every_family():
    assert build("DenseNet121", TINY_DENSENET, in_channels=3).net.features.conv0.in_channels == 3
    assert (
        build("SEResNet50", {"layers": [1, 1, 1, 1], "inplanes": 16}, in_channels=2).net.layer0.conv1.in_channels == 2
    )


def test_vit_unused_cross_attention_norms_are_frozen_and_keep_monai_state_dict():
    enc = build("ViT", TINY_VIT)
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert frozen == ["net.blocks.0.norm_cross_attn.weight", "net.blocks.0.norm_cross_attn.bias"]
    full = full_monai("ViT", TINY_VIT, {"classification": True})
    assert set(enc.net.state_dict()) == set(full.state_dict()) - {k for k in full.state_dict() if "classification" in k}


def test_supported_networks_lists_every_family_without_aliases():
    names = supported_networks()
    for name in ("DenseNet121", "resnet18", "EfficientNetBN", "SEResNet50", "SEResNext50", "ViT"):
        assert name in names
    assert "densenet121" not in names and "UNet" not in names and "ResNetFeatures" not in names


@pytest.mark.parametrize(
    "network, args, fragment",
    [
        ("DenseNet12", {}, r"MONAI has no network 'DenseNet12'\. Available: .*'ViT'.*Did you mean 'DenseNet121'"),
        ("resnet181", {}, "Did you mean 'resnet18'"),
        ("DAF3D", {}, r"'DAF3D' is not supported: it is 3-D only .*Supported: DenseNet, .*ViT\."),
        ("UNet", {}, "'UNet' is not supported: it is not one of MONAI's 2-D classifiers.*Supported: DenseNet"),
        ("ResNetFeatures", {}, "multi-scale feature maps.*Supported:"),
        ("DenseNet121", {"growth_rat": 8}, "'DenseNet121' has no argument 'growth_rat'.*Did you mean 'growth_rate'"),
        ("SEResNet50", {"dropout_pro": 0.1}, "'SEResNet50' has no argument 'dropout_pro'.*Did you mean 'dropout_prob'"),
        ("resnet10", {"num_classes": 4}, "'resnet10': argument 'num_classes' is set by the backbone"),
        ("resnet10", {"in_channels": 3}, "argument 'in_channels' is set by the backbone .*input_shape"),
        ("ViT", {**TINY_VIT, "spatial_dims": 3}, "argument 'spatial_dims' is set by the backbone \\(always 2\\)"),
        ("EfficientNetBN", {}, "'EfficientNetBN' could not be built with args {}: TypeError: .*'model_name'"),
        ("ViT", {"img_size": 32, "patch_size": 8, "hidden_size": 30}, "'ViT' could not be built.*divisible"),
    ],
)
def test_errors_name_the_network_and_what_is_valid(network, args, fragment):
    with pytest.raises(md.ComponentError, match=fragment) as info:
        build(network, args)
    assert str(info.value).startswith("backbone 'monai': ") and "\n" not in str(info.value)


def test_pretrained_offline_fails_in_one_line_saying_how_to_supply_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("monai.networks.nets.densenet.load_state_dict_from_url", offline)
    fragment = "could not be loaded .*URLError.*checkpoint_path=.*pretrained=false"
    with pytest.raises(md.ComponentError, match=fragment) as e:
        build("DenseNet121", TINY_DENSENET, pretrained=True)
    assert "\n" not in str(e.value)


def test_pretrained_with_one_channel_warns_that_the_stem_stays_random(monkeypatch):
    monkeypatch.setattr("monai.networks.nets.densenet.load_state_dict_from_url", lambda *a, **k: {})
    with pytest.warns(UserWarning, match="3-channel images.*in_channels=1.*first convolution"):
        build("DenseNet121", TINY_DENSENET, pretrained=True)


@pytest.mark.parametrize(
    "network, args, fragment",
    [
        ("ViT", TINY_VIT, "'ViT' has no pretrained weights in MONAI; give pretrained=true with checkpoint_path="),
        ("resnet10", {}, "'resnet10' has no 2-D pretrained weights in MONAI .*checkpoint_path="),
        ("EfficientNetBN", {"model_name": "efficientnet-b8"}, "no pretrained weights for model_name='efficientnet-b8'"),
    ],
)
def test_pretrained_where_monai_has_no_weights(network, args, fragment):
    with pytest.raises(md.ComponentError, match=fragment):
        build(network, args, pretrained=True)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(md.ComponentError, match="checkpoint_path is only used with pretrained=True"):
        build("DenseNet121", TINY_DENSENET, checkpoint_path=str(tmp_path / "w.pt"))
    with pytest.raises(md.ComponentError, match="is not a file"):
        build("DenseNet121", TINY_DENSENET, pretrained=True, checkpoint_path=str(tmp_path / "w.pt"))
    torch.save(
        full_monai("DenseNet121", {**TINY_DENSENET, "growth_rate": 4}, {"out_channels": 2}).state_dict(),
        tmp_path / "w.pt",
    )
    with pytest.raises(md.ComponentError, match="'DenseNet121': checkpoint_path .* does not fit: .*size mismatch"):
        build("DenseNet121", TINY_DENSENET, pretrained=True, checkpoint_path=str(tmp_path / "w.pt"))


def test_two_tasks_train_on_a_monai_backbone(tmp_path):
    e = toy_experiment(
        backbone={"name": "monai", "args": {"network": "DenseNet121", "args": TINY_DENSENET}},
        training={"iterations": 2, "batch_size": 8},
    )
    run = md.train(e, data=ToyDataset(24), out_dir=tmp_path, quiet=True)
    encoder = run.model.encoders["a"]
    assert type(encoder).__name__ == "MonaiEncoder" and encoder.num_features == 28
    pred = run.model.predict(torch.randn(3, 1, 16, 16))
    assert {k: v.shape for k, v in pred.items()} == {"a": (3,), "b": (3,)}


def test_without_monai_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)  # as if MONAI were not installed
    with pytest.raises(md.ComponentError, match=r"needs MONAI .*pip install 'mtdisent\[monai\]'"):
        build("DenseNet121", TINY_DENSENET)
