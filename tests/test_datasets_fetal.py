"""The simulated fetal ultrasound data: Table 1 structure, shadows that are really there, the data contract."""

import pytest
import torch
from mtdisent_plugins.datasets import fetal_us_sim as mod
from mtdisent_plugins.datasets.fetal_us_sim import (
    OTHER_VIEWS,
    PLANES,
    TABLE1,
    VIEWS,
    FetalUSDataset,
    fetal_us_sim,
    save_grid,
    simulate,
)
from PIL import Image

from mtdisent import ComponentError
from mtdisent.testing import check_dataset

SIZE = (64, 80)
SCALE = 0.05


@pytest.fixture(scope="module")
def source():
    return fetal_us_sim(scale=SCALE, image_size=SIZE, seed=0, return_masks=True)


def combos(ds: FetalUSDataset) -> dict:
    out: dict = {}
    for p, s in zip(ds.labels["plane"].tolist(), ds.labels["shadow"].tolist(), strict=True):
        key = (PLANES[p] if p >= 0 else "Others", bool(s))
        out[key] = out.get(key, 0) + 1
    return out


def test_counts_follow_table1(source):
    assert list(source) == ["train", "val", "test", "lvot_with_shadow", "artifacts_others"]
    for split, table in TABLE1.items():
        expected = {key: max(1, round(n * SCALE)) for key, n in table.items()}
        assert combos(source[split]) == expected, split
        assert source.factors["splits"][split] == [
            {"plane": p, "shadow": "with" if s else "without", "count": c} for (p, s), c in expected.items()
        ]
    assert source.tasks[0].classes == ["3VV", "LVOT", "Abd"] and source.tasks[1].classes == ["without", "with"]
    assert source.input_shape == (1, *SIZE)


def test_lvot_never_with_shadow_in_seen_splits(source):
    lvot = PLANES.index("LVOT")
    for split in ("train", "val", "test"):
        labels = source[split].labels
        assert not ((labels["plane"] == lvot) & (labels["shadow"] == 1)).any(), split
        assert (labels["plane"] == lvot).any(), split
    unseen = source["lvot_with_shadow"]
    assert (unseen.labels["plane"] == lvot).all() and (unseen.labels["shadow"] == 1).all()
    assert (unseen.views == VIEWS.index("LVOT")).all()


def test_artifacts_others_unlabelled_plane(source):
    ds = source["artifacts_others"]
    assert (ds.labels["plane"] == -1).all()
    assert set(ds.labels["shadow"].tolist()) == {0, 1}
    names = ds.view_names()
    assert set(names) == set(OTHER_VIEWS)
    counts = [names.count(v) for v in OTHER_VIEWS]
    assert max(counts) - min(counts) <= 2  # the Others views in turn, per shadow class
    x, labels = ds[0]
    assert labels["plane"] == -1


def test_items_follow_the_contract_and_are_standardised(source):
    check_dataset(source)
    for name in source:
        split = source[name]
        for i in range(len(split)):
            x = split[i][0]
            assert x.dtype == torch.float32 and torch.isfinite(x).all()
            assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(correction=0)) - 1) < 1e-3


def test_ultrasound_geometry(source):
    raw = source["train"].raw[:, 0].float() / 255  # display images in [0, 1]
    # zero outside the fan: the top corners lie beside the apex
    assert (raw[:, :3, :3] == 0).all() and (raw[:, :3, -3:] == 0).all()
    # speckle: the fan is textured, not flat; fluid is dark, echoes reach near white
    inside = raw[:, SIZE[0] // 2]
    assert float(inside.std(dim=1).mean()) > 0.08
    assert float(raw.amax(dim=(1, 2)).min()) > 0.6


def test_shadow_darkens_the_sector_behind_the_occluder():
    """Matched pairs: the same draws with and without shadow differ by a darker sector (and its occluder)."""
    views = [v for v in VIEWS for _ in range(3)]
    shadowed, masks = simulate(views, True, SIZE, seed=7, return_masks=True)
    clean, clean_masks = simulate(views, False, SIZE, seed=7, return_masks=True)
    assert masks.shape == (len(views), *SIZE) and masks.any(dim=(1, 2)).all()
    assert not clean_masks.any()
    for i in range(len(views)):
        m = masks[i]
        inside_s, inside_c = shadowed[i, 0][m], clean[i, 0][m]
        assert float(inside_s.mean()) < float(inside_c.mean()) - 0.05, (views[i], i)
    # outside the shadows and occluders the pair is identical: the only difference is the shadow
    same = (shadowed - clean).abs()[:, 0] < 1e-6
    assert float(same[~masks].float().mean()) > 0.8


def test_shadow_masks_and_strength_recorded(source):
    for name in ("train", "artifacts_others"):
        ds = source[name]
        has = ds.labels["shadow"] == 1
        assert ds.shadow_masks is not None and ds.shadow_masks.shape == (len(ds), *SIZE)
        assert ds.shadow_masks[has].any(dim=(1, 2)).all() and not ds.shadow_masks[~has].any()
        assert ((ds.shadow_strength[has] >= 0.05) & (ds.shadow_strength[has] <= 0.4)).all()
        assert (ds.shadow_strength[~has] == 1).all()


def test_deterministic_by_seed():
    a = fetal_us_sim(scale=SCALE, image_size=SIZE, seed=3, splits=["val"])
    b = fetal_us_sim(scale=SCALE, image_size=SIZE, seed=3, splits=["val"])
    c = fetal_us_sim(scale=SCALE, image_size=SIZE, seed=4, splits=["val"])
    assert list(a) == ["val"]
    assert torch.equal(a["val"].raw, b["val"].raw) and torch.equal(a["val"].labels["plane"], b["val"].labels["plane"])
    assert not torch.equal(a["val"].raw, c["val"].raw)
    before = torch.get_num_threads()
    x1, _ = simulate("Femur", False, (48, 56), seed=1, n=2)
    x2, _ = simulate("Femur", False, (48, 56), seed=1, n=2, num_threads=None)
    assert torch.equal(x1, x2) and x1.shape == (2, 1, 48, 56)
    assert torch.get_num_threads() == before  # the generator's single thread is not left behind


def test_unstandardised_and_other_sizes():
    src = fetal_us_sim(scale=0.01, image_size=(128, 160), standardize=False, splits=["test"])
    x, _ = src["test"][0]
    assert x.shape == (1, 128, 160) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert len(src["test"]) == sum(max(1, round(n * 0.01)) for n in TABLE1["test"].values())


def test_argument_errors():
    with pytest.raises(ComponentError, match="scale"):
        fetal_us_sim(scale=0)
    with pytest.raises(ComponentError, match="image_size"):
        fetal_us_sim(image_size=(16, 20))
    with pytest.raises(ComponentError, match=r"unknown split 'tset'.*Did you mean 'test'"):
        fetal_us_sim(splits=["tset"])
    with pytest.raises(ComponentError, match=r"unknown view 'LVTO'.*Did you mean 'LVOT'"):
        simulate(["LVTO"], False, SIZE)
    with pytest.raises(ComponentError, match="num_threads"):
        simulate(["Abd"], False, SIZE, num_threads=0)
    with pytest.raises(ComponentError, match="shadow has 3 entries"):
        simulate(["Abd", "Abd"], [True, False, True], SIZE)


def test_save_grid(source, tmp_path):
    path = save_grid(source, tmp_path / "grid.png", per_row=3)
    img = Image.open(path)
    rows = 2 * len(VIEWS)  # every (view, shadow) pair occurs in some split (LVOT with shadow in lvot_with_shadow)
    assert img.mode == "L" and img.size[1] == rows * (SIZE[0] + 4)
    save_grid(source["val"], tmp_path / "val.png")
    assert (tmp_path / "val.png").stat().st_size > 0
    assert mod.VIEWS == PLANES + OTHER_VIEWS


def test_train_shift_moves_the_whole_scan_by_whole_pixels_in_train_only():
    shifted = fetal_us_sim(scale=0.02, image_size=(32, 40), seed=3, train_shift=4, standardize=False)
    ds, test = shifted["train"], shifted["test"]
    assert test.shift == 0 and torch.equal(test[0][0], test.raw[0].float() / 255)
    raw = ds.raw[0].float() / 255
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x = ds[0][0]
        match = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(x, torch.nn.functional.pad(raw, (4, 4, 4, 4))[:, 4 + dy : 4 + dy + 32, 4 + dx : 4 + dx + 40])
        ]
        assert match, "not a whole-pixel shift of the stored scan filled with black"
        seen.add(match[0])
    assert len(seen) > 5  # shifts vary from read to read
    with pytest.raises(ComponentError, match="train_shift must be an integer in \\[0, 16\\)"):
        fetal_us_sim(scale=0.02, image_size=(32, 40), train_shift=16)
