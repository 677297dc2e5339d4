import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import mtdisent as md


def make_distribution(root, dist, module, source, entry_points):
    """Write an installed-distribution layout (dist-info + module) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = []
    for group, items in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in items.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    from mtdisent._registry import REGISTRIES

    monkeypatch.syspath_prepend(str(tmp_path))
    for reg in REGISTRIES.values():
        reg.refresh()
    yield tmp_path
    monkeypatch.undo()
    for reg in REGISTRIES.values():
        reg.refresh()


TINY = """
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, in_channels, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.num_features = width

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))

def tiny(in_channels, width=4):
    return Tiny(in_channels, width)
"""


def test_third_party_backbone_used_by_name(site):
    make_distribution(
        site, "thirdparty_tiny", "thirdparty_tiny", TINY, {"mtdisent.backbones": {"tiny": "thirdparty_tiny:tiny"}}
    )
    md.backbones.refresh()
    assert "tiny" in md.backbones.names()
    assert "thirdparty_tiny" not in sys.modules  # lazy: declared, not imported
    e = md.Experiment(
        tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=3)],
        backbone={"name": "tiny", "args": {"width": 6}},
        input_shape=(2, 8, 8),
    )
    model = md.build_model(e)
    assert model.feature_sizes == {"a": 6, "b": 6}
    assert model.predict(torch.randn(3, 2, 8, 8))["b"].shape == (3,)
    info = {i.name: i for i in md.list_plugins("backbone")}
    assert info["tiny"].source == "thirdparty_tiny 0.1"
    assert info["dltk_residual"].source.startswith("mtdisent ")


def test_broken_plugin_warns_and_others_keep_working(site):
    make_distribution(
        site,
        "broken_pkg",
        "broken_pkg",
        "raise RuntimeError('boom at import')\n",
        {"mtdisent.backbones": {"broken": "broken_pkg:factory"}},
    )
    md.backbones.refresh()
    with pytest.warns(md.PluginWarning, match="'broken'.*broken_pkg.*boom at import"):
        names = md.backbones.list()
    assert "broken" not in names and "dltk_residual" in names
    with pytest.raises(md.PluginLoadError, match="broken_pkg"):
        md.backbones.get("broken")
    # the working plugins are unaffected
    assert callable(md.backbones.get("dltk_residual"))


def test_duplicate_entry_points_are_reported(site):
    make_distribution(site, "dup_one", "dup_one", TINY, {"mtdisent.backbones": {"twin": "dup_one:tiny"}})
    make_distribution(site, "dup_two", "dup_two", TINY, {"mtdisent.backbones": {"twin": "dup_two:tiny"}})
    md.backbones.refresh()
    with pytest.warns(md.PluginWarning, match="'twin' is declared twice.*dup_one.*dup_two"):
        md.backbones.names()


def test_register_decorator_get_list_and_duplicates():
    reg = md.Registry("widget", "mtdisent.test_widgets_none")

    @reg.register("alpha")
    def alpha():
        return 1

    assert reg.get("alpha") is alpha and reg.list() == ["alpha"]
    with pytest.raises(md.DuplicateComponentError, match="'alpha' is already registered"):
        reg.register("alpha", lambda: 2)
    reg.register("alpha", lambda: 3, override=True)
    assert reg.get("alpha")() == 3
    with pytest.raises(md.UnknownComponentError) as info:
        reg.get("alpah")
    assert "Available: 'alpha'" in str(info.value) and "Did you mean 'alpha'" in str(info.value)
    assert isinstance(info.value, md.MtdisentError)


def test_public_register_used_from_spec():
    @md.register("backbone", "test_linear_bb")
    class LinearBackbone(nn.Module):
        def __init__(self, in_channels, dim=5):
            super().__init__()
            self.fc = nn.LazyLinear(dim)
            self.num_features = dim

        def forward(self, x):
            return self.fc(x.flatten(1))

    try:
        e = md.Experiment(
            tasks=[md.Task(name="a", num_classes=2), md.Task(name="b", num_classes=2)],
            backbone="test_linear_bb",
            input_shape=(1, 4, 4),
        )
        assert md.build_model(e).feature_sizes["a"] == 5
        with pytest.raises(md.UnknownComponentError, match="kind 'gizmo'"):
            md.register("gizmo", "x")
    finally:
        md.backbones.unregister("test_linear_bb")


def test_unknown_get_lists_available():
    with pytest.raises(md.UnknownComponentError) as info:
        md.objectives.get("minimax")
    assert "'minmax'" in str(info.value) and "'confusion'" in str(info.value)


def test_listing_emits_no_warning_for_first_party_plugins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = {(i.kind, i.name) for i in md.list_plugins()}
    assert {
        ("backbone", "dltk_residual"),
        ("backbone", "timm"),
        ("backbone", "monai"),
        ("objective", "minmax"),
        ("objective", "confusion"),
        ("objective", "gradient_reversal"),
    } <= names
