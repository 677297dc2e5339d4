import math

import pytest
import torch

import mtdisent as md


def dltk(**kw):
    return md.backbones.get("dltk_residual")(in_channels=1, **kw)


def test_paper_flatten_size_at_full_resolution():
    enc = dltk().eval()
    with torch.no_grad():
        assert enc(torch.zeros(1, 1, 224, 288)).shape == (1, 64 * 28 * 36)  # 64,512 features, as the paper


def test_residual_unit_structure():
    enc = dltk(filters=[8, 16, 32, 64])
    unit = enc.blocks[0]
    assert unit.conv0[1].kernel_size == (4, 4) and unit.conv0[1].stride == (2, 2)  # 2 x stride on strided axes
    assert unit.conv1[1].kernel_size == (3, 3)
    assert isinstance(unit.pool, torch.nn.MaxPool2d)
    assert unit.bn0.eps == 1e-3 and unit.bn0.momentum == 0.01  # TF1 defaults
    assert all(m.bias is None for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
    assert isinstance(enc.stem[1], torch.nn.Conv2d) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.stem)
    lrelu = [m for m in enc.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert lrelu and all(m.negative_slope == 0.1 for m in lrelu)


@pytest.mark.parametrize(("kernel", "stride"), [((3, 3), (1, 1)), ((4, 4), (2, 2)), ((6, 3), (3, 1))])
def test_same_convolutions_pad_as_tf_whether_they_pad_themselves_or_not(kernel, stride):
    from mtdisent_plugins.backbones.dltk import _same_conv

    conv = _same_conv(3, 4, kernel, stride)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    # TF 'same': out = in / stride, total padding k - s, the odd pixel after (bottom, right)
    total = [k - s for k, s in zip(kernel, stride, strict=True)]
    padded = torch.nn.functional.pad(
        x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
    )
    want = torch.nn.functional.conv2d(padded, conv[1].weight, stride=stride)
    got = conv(x)
    assert got.shape == (2, 4, 12 // stride[0], 12 // stride[1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    symmetric = all(t % 2 == 0 for t in total)
    assert isinstance(conv[0], torch.nn.Identity) == symmetric  # no padded copy where the convolution pads alike
    assert [k for k, _ in conv.named_parameters()] == ["1.weight"]  # the weights' names do not depend on it


def test_shortcut_zero_pads_channels_split_before_and_after():
    enc = dltk(filters=[2, 5], strides=[1, 1]).eval()
    unit = enc.blocks[0]
    for m in (unit.conv0[1], unit.conv1[1]):
        torch.nn.init.zeros_(m.weight)  # branch outputs zero: the output is the shortcut alone
    x = torch.randn(1, 2, 4, 4)
    out = unit(x)
    assert torch.equal(out[:, :1], torch.zeros(1, 1, 4, 4))  # floor(3/2) = 1 channel before
    assert torch.equal(out[:, 1:3], x)
    assert torch.equal(out[:, 3:], torch.zeros(1, 2, 4, 4))  # ceil(3/2) = 2 channels after


def test_narrowing_unit_projects_with_conv_and_strided_shortcut_pools():
    enc = dltk(filters=[8, 4], strides=[1, 2]).eval()
    unit = enc.blocks[0]
    assert unit.project is not None and unit.project[1].kernel_size == (3, 3)
    for m in (unit.conv0[1], unit.conv1[1]):
        torch.nn.init.zeros_(m.weight)
    torch.nn.init.zeros_(unit.project[1].weight)
    unit.project[1].weight.data[0, 0, 1, 1] = 1.0  # shortcut channel 0 = pooled input channel 0
    x = torch.randn(1, 8, 4, 4)
    out = unit(x)
    assert torch.allclose(out[0, 0], torch.nn.functional.max_pool2d(x, 2)[0, 0])


def test_variance_scaling_init_bounds():
    enc = dltk()
    conv = enc.blocks[0].conv0[1]
    bound = math.sqrt(3.0 / (conv.in_channels * 16))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound


def test_units_per_scale_and_pool_output():
    enc = dltk(filters=[4, 8, 16], strides=[1, 2, 2], units_per_scale=[2, 3], output="pool")
    assert len(enc.blocks) == 5 and enc.num_features == 16
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 16)


@pytest.mark.parametrize(
    "filters, strides",
    [([4], [(1, 1)]), ([4, 8, 16], [(1, 1), (2, 2), (2, 2)]), ([8, 16, 32, 64], [(1, 1), (2, 2), (2, 2), (2, 2)])],
)
def test_default_strides_follow_the_number_of_filters(filters, strides):
    enc = dltk(filters=filters, output="pool").eval()  # no strides: 1 for the stem, then 2 per further scale
    assert enc.strides == strides and enc.num_features == filters[-1]
    size = 2 ** (len(filters) - 1) * 2
    assert enc(torch.zeros(1, 1, size, size)).shape == (1, filters[-1])


def test_default_strides_keep_the_paper_configuration():
    assert dltk().strides == dltk(strides=[1, 2, 2, 2]).strides == [(1, 1), (2, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(filters=[4, 8], strides=[1]), "strides has 1 entries"),
        (dict(filters=[4, 8, 16], strides=[1, 2, 2, 2]), "strides has 4 entries but filters has 3.*leave strides"),
        (dict(filters=[4, 8], strides=[1, 2], units_per_scale=[1, 1]), "units_per_scale"),
        (dict(activation="swish"), "activation 'swish'"),
        (dict(output="mean"), "output 'mean'"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(md.ComponentError, match=fragment):
        dltk(**kwargs)


def test_timm_backbone_features_and_errors():
    timm_bb = md.backbones.get("timm")
    enc = timm_bb(in_channels=1, model="resnet18")
    assert enc.num_features == 512 and enc(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    with pytest.raises(md.ComponentError, match="timm has no model 'resnet181'.*Did you mean"):
        timm_bb(in_channels=1, model="resnet181")
    with pytest.raises(md.ComponentError, match="checkpoint_path=|could not be loaded"):
        timm_bb(in_channels=1, model="resnet18", pretrained=True, checkpoint_path="/nonexistent/weights.pth")


def test_three_tasks_on_timm_two_on_dltk():
    e3 = md.Experiment(
        tasks=[md.Task(name=n, num_classes=k) for n, k in [("plane", 3), ("shadow", 2), ("machine", 4)]],
        backbone={"name": "timm", "args": {"model": "resnet18"}},
        input_shape=(3, 32, 32),
    )
    m3 = md.build_model(e3)
    p = m3.predict(torch.randn(2, 3, 32, 32))
    assert {k: v.shape for k, v in p.items()} == {"plane": (2,), "shadow": (2,), "machine": (2,)}
    ensemble = e3.adversary.ensemble
    # the default layout: one network per source task and member, each predicting the two other tasks
    assert len({p.pair_key for p in m3.pairs}) == 6 and len(m3.adversaries) == 3 * ensemble


def test_bn_momentum_is_configurable_and_checked():
    enc = dltk(bn_momentum=0.1)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 and m.eps == 1e-3 for m in bns)
    assert all(m.momentum == 0.01 for m in dltk().modules() if isinstance(m, torch.nn.BatchNorm2d))  # TF default
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(md.ComponentError, match="bn_momentum"):
            dltk(bn_momentum=bad)
