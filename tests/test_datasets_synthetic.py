"""The synthetic datasets: the paper's shapes protocol and the K-factor generalisation."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mtdisent_plugins.datasets import shapes as mod
from mtdisent_plugins.datasets.shapes import SHAPES_N_FACTORS, ShapesDataset, shapes, shapes_n

import mtdisent as md
from mtdisent import ComponentError
from mtdisent.testing import check_dataset

BG = {"black": 0, "white": 1}
SH = {"circle": 0, "rectangle": 1}


@pytest.fixture(scope="module")
def quarter():
    return shapes(scale=0.25)


@pytest.fixture(scope="module")
def quarter_raw():
    return shapes(scale=0.25, standardize=False)


def combo_counts(ds: ShapesDataset) -> dict:
    bg, sh = ds.labels["background"], ds.labels["shape"]
    return {
        (s, b): int(((sh == SH[s]) & (bg == BG[b])).sum())
        for s in SH
        for b in BG
        if int(((sh == SH[s]) & (bg == BG[b])).sum())
    }


def held_out_mask(values, patterns, names):
    return torch.tensor(
        [any(all(int(row[names.index(k)]) == v for k, v in p.items()) for p in patterns) for row in values],
        dtype=torch.bool,
    )


# ----------------------------------------------------------------------------------------------------
# shapes: the paper's protocol
# ----------------------------------------------------------------------------------------------------
def test_counts_per_split_and_combination(quarter):
    assert set(quarter) == {"train", "val", "test", "unseen"}
    assert combo_counts(quarter["train"]) == {
        ("circle", "white"): 600,
        ("rectangle", "white"): 100,
        ("rectangle", "black"): 500,
    }
    for split in ("val", "test"):
        assert combo_counts(quarter[split]) == {
            ("circle", "white"): 100,
            ("rectangle", "white"): 100,
            ("rectangle", "black"): 100,
        }
    assert combo_counts(quarter["unseen"]) == {("circle", "black"): 100}
    assert [len(quarter[s]) for s in ("train", "val", "test", "unseen")] == [1200, 300, 300, 100]


def test_train_label_balance(quarter):
    labels = quarter["train"].labels
    assert torch.bincount(labels["shape"]).tolist() == [600, 600]  # circle : rectangle = 1 : 1
    assert torch.bincount(labels["background"]).tolist() == [500, 700]  # black : white = 5 : 7


def test_tasks_and_metadata(quarter):
    assert [t.name for t in quarter.tasks] == ["background", "shape"]
    assert quarter.tasks[0].classes == ["black", "white"] and quarter.tasks[1].classes == ["circle", "rectangle"]
    assert quarter.input_shape == (1, 56, 72)
    assert quarter.factors["held_out"] == [{"shape": "circle", "background": "black"}]
    json.dumps(quarter.factors)  # JSON-able


def test_seen_splits_are_shuffled(quarter):
    shape = quarter["train"].labels["shape"]
    assert (shape[1:] != shape[:-1]).sum() > 100  # not three sorted blocks


def test_raw_pixel_values(quarter_raw):
    for split in quarter_raw.values():
        x = split.images[:, 0]  # (N, H, W)
        bg = split.labels["background"].float()[:, None, None]
        is_shape = x == 0.5
        assert torch.all(is_shape | (x == bg))  # every pixel is the background value or the shape's 0.5
        assert torch.all(is_shape.flatten(1).any(1))  # every image shows its shape
        assert torch.all((~is_shape).flatten(1).any(1))
        assert split.images.dtype == torch.float32


def test_per_image_standardisation(quarter, quarter_raw):
    for name in quarter:
        x = quarter[name].images.flatten(1).double()
        assert torch.allclose(x.mean(1), torch.zeros(len(x), dtype=torch.float64), atol=1e-5)
        assert torch.allclose(x.std(1, correction=0), torch.ones(len(x), dtype=torch.float64), atol=1e-4)
        raw = quarter_raw[name].images.flatten(1).double()
        expected = (raw - raw.mean(1, keepdim=True)) / raw.std(1, correction=0, keepdim=True)
        assert torch.allclose(x, expected, atol=1e-5)  # the same images, standardised
        # black background: the shape is the brightest value; white: the darkest
        black = quarter[name].labels["background"] == 0
        shape_px = quarter_raw[name].images.flatten(1) == 0.5
        shape_value = (x * shape_px).sum(1) / shape_px.sum(1)
        assert torch.all((shape_value > 0) == black)


def _extent_ok(ds, h, w, which, edge=0.5):
    """The shapes lie within the image: pixel i covers [i - 0.5, i + 0.5]; edge=0 asks for pixel centres."""
    g = ds.geometry
    inside = (g["row"] - g["half_height"] >= -edge) & (g["row"] + g["half_height"] <= h - 1 + edge)
    inside &= (g["col"] - g["half_width"] >= -edge) & (g["col"] + g["half_width"] <= w - 1 + edge)
    return inside[which]


def test_circles_fit_inside_and_geometry_matches_pixels(quarter_raw):
    _, h, w = quarter_raw.input_shape
    for split in quarter_raw.values():
        circles = split.labels["shape"] == 0
        assert torch.all(_extent_ok(split, h, w, circles))
        # the geometry describes the drawn pixels: every shape pixel lies within the half sizes
        rows = torch.arange(h, dtype=torch.float64)[None, :, None]
        cols = torch.arange(w, dtype=torch.float64)[None, None, :]
        g = {k: v[:, None, None] for k, v in split.geometry.items()}
        box = ((rows - g["row"]).abs() <= g["half_height"] + 1e-6) & ((cols - g["col"]).abs() <= g["half_width"])
        assert torch.all(~(split.images[:, 0] == 0.5) | box)
        # circles: half_height == half_width == radius in [10, 80) * 0.25
        r = split.geometry["half_height"][circles]
        assert torch.equal(r, split.geometry["half_width"][circles])
        assert r.min() >= 2.5 and r.max() < 20
        d = split.geometry["half_height"][~circles]
        assert torch.allclose(split.geometry["half_width"][~circles], 4 * d)
        if len(d):  # the unseen split has circles only
            assert d.min() >= 2.5 and d.max() < 10


def test_public_placement_clips_rectangles_inside_placement_does_not():
    public = shapes(scale=0.25, size_factor=0.5, standardize=False)["train"]
    inside = shapes(scale=0.25, size_factor=0.5, standardize=False, placement="inside")["train"]
    rect_pub, rect_in = public.labels["shape"] == 1, inside.labels["shape"] == 1
    # the public code checks a rectangle's centre against the drawn radius, not the rectangle: some cross
    assert not torch.all(_extent_ok(public, 56, 72, rect_pub))
    assert torch.all(_extent_ok(inside, 56, 72, rect_in))
    assert torch.all(_extent_ok(inside, 56, 72, inside.labels["shape"] == 0))


def test_public_centre_rule_at_full_resolution():
    ds = shapes(scale=1.0, size_factor=0.05, standardize=False)
    for split in ds.values():
        g = split.geometry
        assert torch.all(g["row"] == g["row"].round()) and torch.all(g["col"] == g["col"].round())
        assert g["row"].min() >= 20 and g["row"].max() < 210 and g["col"].min() >= 20 and g["col"].max() < 260
        circles = split.labels["shape"] == 0
        margin = torch.stack([g["row"], g["col"], 224 - g["row"], 288 - g["col"]]).amin(0)
        assert torch.all(margin[circles] > g["half_height"][circles])
        # exact pixel areas: a circle is every pixel centre within r of the centre
        i, c = int(circles.nonzero()[0]), split.images[int(circles.nonzero()[0]), 0]
        rr, cc = torch.meshgrid(torch.arange(224.0), torch.arange(288.0), indexing="ij")
        expected = (rr - g["row"][i]) ** 2 + (cc - g["col"][i]) ** 2 <= g["half_height"][i] ** 2
        assert torch.equal(c == 0.5, expected)


def test_determinism_by_seed():
    a, b, c = (shapes(scale=0.25, seed=s, size_factor=0.1) for s in (3, 3, 4))
    for name in a:
        assert torch.equal(a[name].images, b[name].images)
        assert all(torch.equal(a[name].labels[k], b[name].labels[k]) for k in a[name].labels)
        assert not torch.equal(a[name].images, c[name].images)
    assert not torch.equal(a["val"].images, a["test"].images)  # independent splits


def test_scale_keeps_proportions():
    full = shapes(scale=1.0, size_factor=0.05, standardize=False)
    quart = shapes(scale=0.25, size_factor=0.05, standardize=False)
    assert full.input_shape == (1, 224, 288) and quart.input_shape == (1, 56, 72)
    assert shapes(scale=0.5, size_factor=0.01).input_shape == (1, 112, 144)
    h, w = shapes(scale=0.3, size_factor=0.01).input_shape[1:]
    assert h % 8 == 0 and w % 8 == 0 and abs(h - 67.2) <= 4 and abs(w - 86.4) <= 4
    for name in full:
        g_full, g_quart = full[name].geometry, quart[name].geometry  # the same shapes, scaled by 1/4
        for key in ("row", "col"):  # pixel i covers [i - 0.5, i + 0.5] at both resolutions
            assert torch.allclose(g_quart[key], (g_full[key] + 0.5) * 0.25 - 0.5)
        for key in ("half_height", "half_width"):
            assert torch.allclose(g_quart[key], g_full[key] * 0.25)
        frac_full = (full[name].images == 0.5).flatten(1).float().mean(1)
        frac_quart = (quart[name].images == 0.5).flatten(1).float().mean(1)
        assert (frac_full - frac_quart).abs().mean() < 0.01  # same area fraction up to rasterisation


def test_size_factor_shrinks_every_combination():
    ds = shapes(scale=0.25, size_factor=0.1)
    assert combo_counts(ds["train"]) == {
        ("circle", "white"): 60,
        ("rectangle", "white"): 10,
        ("rectangle", "black"): 50,
    }
    tiny = shapes(scale=0.25, size_factor=1e-6)
    assert {k: len(v) for k, v in tiny.items()} == {"train": 3, "val": 3, "test": 3, "unseen": 1}


def test_unseen_is_exactly_circle_on_black(quarter):
    unseen = quarter["unseen"]
    assert torch.all(unseen.labels["shape"] == 0) and torch.all(unseen.labels["background"] == 0)
    for name in ("train", "val", "test"):
        lab = quarter[name].labels
        assert not torch.any((lab["shape"] == 0) & (lab["background"] == 0))


def test_items_follow_the_data_contract(quarter):
    check_dataset(quarter)
    image, labels = quarter["train"][0]
    assert image.shape == (1, 56, 72) and set(labels) == {"background", "shape"}
    assert all(type(v) is int for v in labels.values())


def test_tiny_scale_still_draws_every_shape():
    ds = shapes(scale=0.06, size_factor=0.2, standardize=False)
    assert ds.input_shape == (1, 16, 16)
    for split in ds.values():
        assert torch.all((split.images == 0.5).flatten(1).any(1))
    assert torch.isfinite(shapes(scale=0.06, size_factor=0.2)["train"].images).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": 0.0}, "scale"),
        ({"scale": 0.04}, "scale must be >="),
        ({"scale": float("nan")}, "scale"),
        ({"size_factor": -1}, "size_factor"),
        ({"placement": "clip"}, "placement must be one of"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"standardize": "yes"}, "standardize"),
    ],
)
def test_shapes_bad_arguments(kwargs, match):
    with pytest.raises(ComponentError, match=match):
        shapes(**kwargs)


# ----------------------------------------------------------------------------------------------------
# shapes_n: K factors
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(2, 9))
def test_shapes_n_every_k(k):
    ds = shapes_n(num_tasks=k, n_train=200, n_eval=40)
    names = list(SHAPES_N_FACTORS)[:k]
    assert [t.name for t in ds.tasks] == names
    assert all(t.classes == SHAPES_N_FACTORS[t.name] for t in ds.tasks)
    assert ds.input_shape == (1, 56, 72)
    assert {s: len(v) for s, v in ds.items()} == {"train": 200, "val": 40, "test": 40, "unseen": 40}
    patterns = [{names[0]: 0, names[1]: 0}]
    for split in ("train", "val", "test"):
        values = torch.stack([ds[split].labels[n] for n in names], 1)
        assert not held_out_mask(values, patterns, names).any()
        # both classes of the main task are shown, each with the other factor's classes except the held-out cell
        cells = {tuple(r) for r in values[:, :2].tolist()}
        assert cells == {(0, 1), (1, 0), (1, 1)} if split == "train" else cells <= {(0, 1), (1, 0), (1, 1)}
    unseen = torch.stack([ds["unseen"].labels[n] for n in names], 1)
    assert torch.all((unseen[:, 0] == 0) & (unseen[:, 1] == 0))
    check_dataset(ds, splits=["train", "unseen"])
    json.dumps(ds.factors)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(2, 8),
    data=st.data(),
)
def test_shapes_n_holdout_patterns_never_leak(k, data):
    names = list(SHAPES_N_FACTORS)[:k]
    n_patterns = data.draw(st.integers(1, 3))
    patterns = []
    for _ in range(n_patterns):
        keys = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=min(3, k), unique=True))
        patterns.append({key: data.draw(st.integers(0, 1)) for key in keys})
    combos = torch.cartesian_prod(*[torch.tensor([0, 1])] * k).reshape(-1, k)
    held = held_out_mask(combos, patterns, names)
    if any(held[combos[:, 0] == v].all() for v in (0, 1)):  # a class of the main task would never be seen
        with pytest.raises(ComponentError, match="every combination with shape="):
            shapes_n(num_tasks=k, holdout=patterns, n_train=50, n_eval=20)
        return
    ds = shapes_n(num_tasks=k, holdout=patterns, n_train=100, n_eval=30, correlation=0.3, image_size=(16, 16))
    for split in ("train", "val", "test"):
        values = torch.stack([ds[split].labels[n] for n in names], 1)
        assert not held_out_mask(values, patterns, names).any()
    unseen = torch.stack([ds["unseen"].labels[n] for n in names], 1)
    assert held_out_mask(unseen, patterns, names).all()


def test_shapes_n_holdout_by_class_name_and_empty():
    ds = shapes_n(num_tasks=3, holdout=[{"foreground": "bright", "background": "light"}], n_train=200, n_eval=40)
    assert torch.all((ds["unseen"].labels["foreground"] == 1) & (ds["unseen"].labels["background"] == 1))
    assert not torch.any((ds["train"].labels["foreground"] == 1) & (ds["train"].labels["background"] == 1))
    none = shapes_n(num_tasks=3, holdout=[], n_train=200, n_eval=40)
    assert set(none) == {"train", "val", "test"}
    assert len(torch.stack([none["train"].labels[n] for n in ("shape", "background")], 1).unique(dim=0)) == 4


@pytest.mark.parametrize("rho", [0.0, 0.6, -0.5])
def test_shapes_n_correlation_is_honoured(rho):
    ds = shapes_n(num_tasks=5, correlation=rho, n_train=4000, n_eval=50, image_size=(16, 16))
    for split in ("train", "val", "test"):  # the same law in every seen split
        lab = ds[split].labels
        tol = 0.03 if split == "train" else 0.15
        assert abs(lab["shape"].float().mean() - 0.5) < tol  # the main factor stays balanced
        for name in ("foreground", "texture", "size"):
            agree = (lab[name] == lab["shape"]).float().mean().item()
            assert abs(agree - (1 + rho) / 2) < tol, (split, name, agree)
        # factor 1 is shaped by the holdout: no (ellipse, dark) pair, rectangles light (1 + rho) / 2 of the time
        assert not torch.any((lab["shape"] == 0) & (lab["background"] == 0))
    lab = ds["train"].labels
    light_given_rect = lab["background"][lab["shape"] == 1].float().mean().item()
    assert abs(light_given_rect - (1 + rho) / 2) < 0.04


def test_shapes_n_paper_like_two_factors():
    ds = shapes_n(num_tasks=2, correlation=-2 / 3, n_train=6000, n_eval=100, image_size=(16, 16))
    lab = ds["train"].labels
    counts = {(s, b): int(((lab["shape"] == s) & (lab["background"] == b)).sum()) for s in (0, 1) for b in (0, 1)}
    # the paper's 600 circle/white : 100 rectangle/white : 500 rectangle/black, times 5
    assert counts[(0, 0)] == 0
    assert abs(counts[(0, 1)] - 3000) < 200 and abs(counts[(1, 1)] - 500) < 100 and abs(counts[(1, 0)] - 2500) < 200


def test_shapes_n_per_factor_correlation():
    ds = shapes_n(num_tasks=4, correlation=[0.0, 0.9, 0.0], holdout=[], n_train=3000, n_eval=20, image_size=(16, 16))
    lab = ds["train"].labels
    assert abs((lab["foreground"] == lab["shape"]).float().mean() - 0.95) < 0.02
    assert abs((lab["texture"] == lab["shape"]).float().mean() - 0.5) < 0.04
    assert ds.factors["correlation"] == {"background": 0.0, "foreground": 0.9, "texture": 0.0}


def test_shapes_n_factors_are_rendered():
    k = 7  # no noise: raw images are piecewise constant
    ds = shapes_n(num_tasks=k, holdout=[], correlation=0.0, n_train=400, n_eval=10, standardize=False)
    tr = ds["train"]
    x = tr.images[:, 0].double()  # (N, H, W)
    lab, g = tr.labels, tr.geometry
    _, h, w = ds.input_shape
    bg = torch.tensor(mod.BG_LEVELS, dtype=torch.float64)[lab["background"]]
    fg = torch.tensor(mod.FG_LEVELS, dtype=torch.float64)[lab["foreground"]]
    corner_free = x.flatten(1).mode(1).values  # the background covers most of the image
    assert torch.allclose(corner_free, bg, atol=1e-6)
    assert torch.allclose(x.flatten(1).max(1).values, fg, atol=1e-6)  # the shape's level
    dark, dim = lab["background"] == 0, lab["foreground"] == 0
    assert corner_free[dark].max() + 0.2 < corner_free[~dark].min()  # the classes differ visibly
    assert x.flatten(1).max(1).values[dim].max() + 0.2 < x.flatten(1).max(1).values[~dim].min()
    levels = torch.tensor([len(img.unique()) for img in x])
    assert torch.equal(levels == 3, lab["texture"] == 1)  # striped: a second, darker level
    major = torch.maximum(g["half_height"], g["half_width"])
    small = lab["size"] == 0
    u = min(h, w)
    assert major[small].max() <= 0.17 * u and major[~small].min() >= 0.22 * u
    mid = (h - 1) / 2
    assert torch.equal(g["row"] < mid, lab["position"] == 0)
    assert torch.equal(g["half_height"] > g["half_width"], lab["orientation"] == 1)
    assert torch.all(_extent_ok(tr, h, w, torch.ones(len(tr), dtype=torch.bool), edge=0.0))
    # ellipse vs rectangle of the same half-axes: the rectangle fills its box, the ellipse about pi/4 of it
    is_shape = (x - bg[:, None, None]).abs() > 1e-6
    fill = is_shape.flatten(1).sum(1) / ((2 * g["half_height"] + 1) * (2 * g["half_width"] + 1))
    rect = lab["shape"] == 1
    assert fill[rect].min() > fill[~rect].max()
    assert fill[~rect].mean() < 0.75 < fill[rect].mean()


def test_shapes_n_noise_factor():
    ds = shapes_n(num_tasks=8, holdout=[], correlation=0.0, n_train=200, n_eval=10, standardize=False)
    tr = ds["train"]
    levels = torch.tensor([len(img.unique()) for img in tr.images])
    assert torch.equal(levels > 10, tr.labels["noise"] == 1)


def test_shapes_n_global_standardisation():
    kw = dict(num_tasks=4, n_train=300, n_eval=60, seed=2, image_size=(32, 32))
    std, raw = shapes_n(**kw), shapes_n(**kw, standardize=False)
    x = std["train"].images
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    norm = std.factors["normalisation"]
    for name in std:  # one affine map for every split, so absolute levels survive
        expected = (raw[name].images - norm["mean"]) / norm["std"]
        assert torch.allclose(std[name].images, expected, atol=1e-5)
    assert std["unseen"].images.mean().item() < -0.1  # dark backgrounds only: darker than the training mean


def test_shapes_n_determinism_and_image_size():
    a = shapes_n(num_tasks=6, image_size=(64, 64), n_train=100, n_eval=20, seed=5)
    b = shapes_n(num_tasks=6, image_size=[64, 64], n_train=100, n_eval=20, seed=5)
    c = shapes_n(num_tasks=6, image_size=(64, 64), n_train=100, n_eval=20, seed=6)
    assert a.input_shape == (1, 64, 64) and a["train"].images.shape == (100, 1, 64, 64)
    for name in a:
        assert torch.equal(a[name].images, b[name].images)
        assert all(torch.equal(a[name].labels[k], b[name].labels[k]) for k in a[name].labels)
        assert not torch.equal(a[name].images, c[name].images)
    assert torch.isfinite(a["train"].images).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tasks": 1}, "num_tasks must be an integer in \\[2, 8\\]"),
        ({"num_tasks": 9}, "num_tasks"),
        ({"correlation": 1.0}, "correlation must be a number > -1.0 and < 1.0"),
        ({"correlation": -1.0}, "correlation must be a number > -1.0 and < 1.0"),
        ({"correlation": [0.1, 2.0, 0.0]}, "correlation\\[1\\]"),
        ({"correlation": [0.1, 0.2]}, "K - 1 = 3"),
        ({"holdout": [{"colour": 0}]}, "unknown factor 'colour'"),
        ({"holdout": [{"shape": "square"}]}, "must be 0, 1 or one of"),
        ({"holdout": [{}]}, "non-empty"),
        ({"holdout": {"shape": 0}}, "list of patterns"),
        ({"holdout": [{"shape": 0}, {"shape": 1}]}, "every combination with shape='ellipse'"),
        ({"num_tasks": 3, "holdout": [{"shape": 1, "background": 0}, {"shape": 1, "background": 1}]}, "rectangle"),
        ({"image_size": (8, 64)}, "image_size"),
        ({"image_size": (64,)}, "image_size"),
        ({"n_train": 0}, "n_train"),
    ],
)
def test_shapes_n_bad_arguments(kwargs, match):
    with pytest.raises(ComponentError, match=match):
        shapes_n(**kwargs)


def test_factories_accept_json_arguments():
    # arguments as a spec would carry them (JSON values: lists, not tuples)
    spec_args = {"num_tasks": 3, "image_size": [32, 32], "holdout": [{"shape": "ellipse", "background": "dark"}]}
    comp = md.Component(name="shapes_n", args={**spec_args, "n_train": 50, "n_eval": 10})
    ds = shapes_n(**comp.args)
    assert ds.input_shape == (1, 32, 32)
    ds2 = shapes(**md.Component(name="shapes", args={"scale": 0.25, "size_factor": 0.05}).args)
    assert math.isclose(len(ds2["train"]), 60)


def test_same_data_on_any_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [shapes(scale=0.25, size_factor=0.1), shapes_n(num_tasks=8, n_train=300, n_eval=30)]
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(2, threads))
    try:
        many = [shapes(scale=0.25, size_factor=0.1), shapes_n(num_tasks=8, n_train=300, n_eval=30)]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        assert all(torch.equal(a[name].images, b[name].images) for name in a)


def test_dataset_class_checks_sizes():
    ds = ShapesDataset(torch.zeros(3, 1, 4, 4), {"a": torch.tensor([0, 1, 0])}, {"row": torch.zeros(3)})
    assert len(ds) == 3 and ds[1][1] == {"a": 1} and ds[1][0].shape == (1, 4, 4)
    with pytest.raises(md.DataError, match="per-sample"):
        ShapesDataset(torch.zeros(3, 1, 4, 4), {"a": torch.zeros(2)}, {})
