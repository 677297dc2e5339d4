"""Synthetic shape datasets: the paper's 2-task experiment and an N-factor generalisation.

* :func:`shapes` reproduces the synthetic experiment of Meng et al. (2019), following the authors' public
  ``generatedata.py``: a gray (0.5) circle or rectangle on a black (0) or white (1) background, then
  per-image standardisation. Training never shows a circle on black; the ``unseen`` split shows only that.
* :func:`shapes_n` generalises it to ``K = 2..8`` binary factors (shape, background, foreground, texture,
  size, position, orientation, noise), one task per factor, with chosen correlations between the main factor
  and the nuisance factors in every seen split and held-out factor combinations in an ``unseen`` split.

Everything is generated in memory with ``torch`` (no files), vectorised, and deterministic by ``seed``:
each split (and each combination of :func:`shapes`) draws from its own generator seeded from
``(seed, split, ...)``, so splits are independent of each other and identical across calls.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mtdisent import ComponentError, DataError, DataSource, Task, did_you_mean

__all__ = ["ShapesDataset", "SHAPES_N_FACTORS", "shapes", "shapes_n"]

# ----------------------------------------------------------------------------------------------------
# the public protocol (224 x 288 pixels; every geometric quantity is given at this resolution)
# ----------------------------------------------------------------------------------------------------
BASE_H, BASE_W = 224, 288
R_RANGE = (10, 80)  # circle radius, and the radius every candidate centre is checked against
D_RANGE = (10, 40)  # rectangle half-height d; half-width 4d
ROW_RANGE = (20, 210)  # centre row
COL_RANGE = (20, 260)  # centre column
SHAPE_VALUE = 0.5
BACKGROUNDS = {"black": 0.0, "white": 1.0}
SHAPE_CLASSES = ["circle", "rectangle"]
SHAPES_COUNTS: dict[str, dict[tuple[str, str], int]] = {
    "train": {("circle", "white"): 600, ("rectangle", "white"): 100, ("rectangle", "black"): 500},
    "val": {("circle", "white"): 100, ("rectangle", "white"): 100, ("rectangle", "black"): 100},
    "test": {("circle", "white"): 100, ("rectangle", "white"): 100, ("rectangle", "black"): 100},
    "unseen": {("circle", "black"): 100},
}
PLACEMENTS = ("public", "inside")
MIN_SIZE = 16
_CHUNK = 1024  # candidates drawn per round: fixed, so a smaller count draws a prefix of a larger one


class ShapesDataset(Dataset):
    """One split of a synthetic dataset, held in memory.

    Items follow the data contract: ``(image (C, H, W) float32, {task: class index})``.

    Attributes:
        images: All images of the split, ``(N, C, H, W)`` float32.
        labels: Task name -> ``LongTensor[N]`` of class indices.
        geometry: Per-sample shape geometry in pixels of the stored image: ``row`` and ``col`` (centre),
            ``half_height`` and ``half_width`` (a circle's are both its radius), each a float tensor ``[N]``.
            Pixel ``(i, j)`` has its centre at ``(i, j)``, so the image covers ``[-0.5, H - 0.5] x [-0.5, W - 0.5]``;
            a pixel belongs to the shape when its centre lies inside it.
    """

    def __init__(
        self, images: torch.Tensor, labels: Mapping[str, torch.Tensor], geometry: Mapping[str, torch.Tensor]
    ) -> None:
        n = images.shape[0]
        if images.ndim != 4 or any(v.shape != (n,) for v in [*labels.values(), *geometry.values()]):
            sizes = {k: tuple(v.shape) for k, v in [*labels.items(), *geometry.items()]}
            raise DataError(f"ShapesDataset: images {tuple(images.shape)} (N, C, H, W) but per-sample tensors {sizes}")
        self.images = images
        self.labels = {k: v.long() for k, v in labels.items()}
        self.geometry = dict(geometry)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        return self.images[index], {name: int(v[index]) for name, v in self.labels.items()}

    def __repr__(self) -> str:
        return f"ShapesDataset(n={len(self)}, image={tuple(self.images.shape[1:])}, tasks={list(self.labels)})"


# ----------------------------------------------------------------------------------------------------
# argument checks and helpers
# ----------------------------------------------------------------------------------------------------
def _generator(*keys: Any) -> torch.Generator:
    """A CPU generator seeded from a stable hash of ``keys`` (the same on every machine and Python run)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _int_arg(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        valid = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ComponentError(f"{name} must be {valid}, got {value!r}")
    return value


def _float_arg(name: str, value: Any, *, lo: float, hi: float | None = None, lo_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value < hi)
    if not ok:
        lower = f"> {lo}" if lo_open else f">= {lo}"
        valid = f"a number {lower}" + (f" and < {hi}" if hi is not None else "")
        raise ComponentError(f"{name} must be {valid}, got {value!r}")
    return float(value)


def _image_size(scale: Any, image_size: Any = None) -> tuple[int, int]:
    """``(H, W)``: ``image_size`` when given, else ``224 x 288`` times ``scale`` rounded to multiples of 8."""
    if image_size is not None:
        if not (isinstance(image_size, (list, tuple)) and len(image_size) == 2):
            raise ComponentError(f"image_size must be (height, width) with both >= {MIN_SIZE}, got {image_size!r}")
        h, w = (_int_arg(f"image_size[{i}]", v, MIN_SIZE) for i, v in enumerate(image_size))
        return h, w
    s = _float_arg("scale", scale, lo=0.0)
    h, w = (8 * math.floor(base * s / 8 + 0.5) for base in (BASE_H, BASE_W))
    if min(h, w) < MIN_SIZE:
        min_scale = (MIN_SIZE / 8 - 0.5) * 8 / BASE_H
        raise ComponentError(
            f"scale={scale} gives {h} x {w} images; images must be at least {MIN_SIZE} x {MIN_SIZE}, "
            f"so scale must be >= {min_scale:.4f} (0.25 gives 56 x 72, 1.0 the paper's 224 x 288)"
        )
    return h, w


def _standardize_per_image(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over each image (population std, as numpy's), ``x`` (N, C, H, W)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), correction=0, keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def _rasterize(
    h: int, w: int, row: torch.Tensor, col: torch.Tensor, hh: torch.Tensor, hw: torch.Tensor, ellipse: torch.Tensor
) -> torch.Tensor:
    """Masks ``(N, H, W)`` of axis-aligned ellipses (``ellipse`` True) or rectangles, pixel centres at integers.

    A pixel is inside when its centre is: ``(dy/hh)^2 + (dx/hw)^2 <= 1`` or ``|dy| <= hh and |dx| <= hw``.
    The pixel nearest the centre is always inside, so no shape vanishes at tiny scales.
    """
    n = row.shape[0]
    tol = 1e-6  # boundary pixels of integer geometry are exactly on the boundary; float32 may miss them
    dy = (torch.arange(h)[None, :] - row[:, None]).abs().float() / hh[:, None].float()  # (N, H)
    dx = (torch.arange(w)[None, :] - col[:, None]).abs().float() / hw[:, None].float()  # (N, W)
    mask = torch.empty(n, h, w, dtype=torch.bool)
    e, r = ellipse.nonzero().squeeze(1), (~ellipse).nonzero().squeeze(1)
    if len(e):
        mask[e] = dy[e, :, None] ** 2 + dx[e, None, :] ** 2 <= 1.0 + tol  # (Ne, H, W)
    if len(r):
        mask[r] = (dy[r, :, None] <= 1.0 + tol) & (dx[r, None, :] <= 1.0 + tol)  # (Nr, H, W)
    r0 = row.round().long().clamp(0, h - 1)
    c0 = col.round().long().clamp(0, w - 1)
    mask[torch.arange(n), r0, c0] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# shapes: the paper's 2-task experiment
# ----------------------------------------------------------------------------------------------------
def _sample_geometry(shape: str, n: int, g: torch.Generator, placement: str) -> dict[str, torch.Tensor]:
    """``n`` accepted (row, col, half_height, half_width) at 224 x 288, by the public code's rejection rule."""
    kept: list[torch.Tensor] = []
    got = 0
    while got < n:
        r = torch.randint(*R_RANGE, (_CHUNK,), generator=g)
        d = torch.randint(*D_RANGE, (_CHUNK,), generator=g)
        row = torch.randint(*ROW_RANGE, (_CHUNK,), generator=g)
        col = torch.randint(*COL_RANGE, (_CHUNK,), generator=g)
        if shape == "circle":
            hh = hw = r
        else:
            hh, hw = d, 4 * d
        if shape == "circle" or placement == "public":
            # public rule: the distance of the centre to every edge must exceed the drawn radius r
            margin = torch.stack([row, col, BASE_H - row, BASE_W - col]).amin(0)
            ok = margin > r
        else:  # "inside": the rectangle itself must fit, by the same strict rule
            ok = (row > hh) & (BASE_H - row > hh) & (col > hw) & (BASE_W - col > hw)
        cand = torch.stack([row, col, hh, hw], dim=1)[ok]  # (M, 4)
        kept.append(cand)
        got += cand.shape[0]
    geo = torch.cat(kept)[:n].double()
    return {"row": geo[:, 0], "col": geo[:, 1], "half_height": geo[:, 2], "half_width": geo[:, 3]}


def shapes(
    scale: float = 1.0,
    seed: int = 0,
    size_factor: float = 1.0,
    placement: str = "public",
    standardize: bool = True,
) -> DataSource:
    """The synthetic experiment of Meng et al. (2019): circles and rectangles on black or white.

    Protocol (the authors' public ``generatedata.py``), at 224 x 288: background 0 (black) or 1 (white), one
    shape of gray value 0.5, then per-image standardisation ``(x - mean) / std``. Circle radius r uniform
    integer in [10, 80); rectangle half-height d uniform integer in [10, 40), half-width 4d; centre row
    uniform in [20, 210), column in [20, 260). Each candidate also draws a radius r, and its centre is kept
    only when its distance to every image edge exceeds r; for circles r is the circle's radius, so every
    circle fits inside the image.

    Splits (counts per combination, at every scale): ``train`` 600 circle/white, 100 rectangle/white,
    500 rectangle/black (circle:rectangle 1:1, black:white 5:7); ``val`` and ``test`` 100 of each of those
    three; ``unseen`` 100 circle/black, the combination training never shows. Seen splits are shuffled.

    Args:
        scale: Image size relative to 224 x 288; height and width are rounded to multiples of 8 (0.25 gives
            56 x 72). The geometry is drawn at 224 x 288 and scaled with the image (centres per axis, sizes by
            the smaller axis factor, so shapes that fit at full size fit at every scale), so every proportion
            is kept and a seed gives the same shapes at every scale.
        seed: Seed of the data; splits and combinations draw from independent generators.
        size_factor: Multiplies every count (rounded, at least 1 per combination), e.g. 0.1 for a quick run.
        placement: ``"public"`` (default) is the public code's rule: a rectangle's centre is checked against
            the independently drawn radius r, not against the rectangle, so wide rectangles can cross the
            image border and are clipped there, as in the paper's data. ``"inside"`` redraws rectangles
            until the whole rectangle fits (which needs d <= 35 at 288 pixels wide, so d's range shrinks).
        standardize: Per-image standardisation (the protocol). ``False`` keeps raw values (background
            exactly 0 or 1, shape 0.5).

    Returns:
        A :class:`DataSource` with splits ``train``, ``val``, ``test``, ``unseen`` of :class:`ShapesDataset`,
        tasks ``background`` (black, white) and ``shape`` (circle, rectangle), input shape ``(1, H, W)``.

    Raises:
        ComponentError: An argument is out of range (the message names it and what is valid).
    """
    h, w = _image_size(scale)
    seed = _int_arg("seed", seed, 0)
    size_factor = _float_arg("size_factor", size_factor, lo=0.0)
    if placement not in PLACEMENTS:
        raise ComponentError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if not isinstance(standardize, bool):
        raise ComponentError(f"standardize must be true or false, got {standardize!r}")
    sy, sx = h / BASE_H, w / BASE_W
    s_size = min(sy, sx)

    splits: dict[str, ShapesDataset] = {}
    described: dict[str, list[dict[str, Any]]] = {}
    for split, combos in SHAPES_COUNTS.items():
        images, bg_labels, shape_labels, geos = [], [], [], []
        described[split] = []
        for (shape, background), base_count in combos.items():
            n = max(1, round(base_count * size_factor))
            geo = _sample_geometry(shape, n, _generator("shapes", seed, split, shape, background), placement)
            geo = {  # to pixels of the scaled image; pixel i covers [i - 0.5, i + 0.5] at both resolutions
                "row": (geo["row"] + 0.5) * sy - 0.5,
                "col": (geo["col"] + 0.5) * sx - 0.5,
                "half_height": geo["half_height"] * s_size,
                "half_width": geo["half_width"] * s_size,
            }
            ellipse = torch.full((n,), shape == "circle")
            mask = _rasterize(h, w, geo["row"], geo["col"], geo["half_height"], geo["half_width"], ellipse)
            x = torch.where(mask, SHAPE_VALUE, BACKGROUNDS[background]).float()[:, None]  # (n, 1, H, W)
            images.append(x)
            bg_labels.append(torch.full((n,), list(BACKGROUNDS).index(background)))
            shape_labels.append(torch.full((n,), SHAPE_CLASSES.index(shape)))
            geos.append(geo)
            described[split].append({"shape": shape, "background": background, "count": n})
        x = torch.cat(images)
        labels = {"background": torch.cat(bg_labels), "shape": torch.cat(shape_labels)}
        geometry = {k: torch.cat([g[k] for g in geos]) for k in geos[0]}
        if split != "unseen":  # the public code shuffles the seen splits
            perm = torch.randperm(x.shape[0], generator=_generator("shapes", seed, split, "order"))
            x, labels, geometry = (
                x[perm],
                {k: v[perm] for k, v in labels.items()},
                {k: v[perm] for k, v in geometry.items()},
            )
        if standardize:
            x = _standardize_per_image(x)
        splits[split] = ShapesDataset(x.contiguous(), labels, geometry)

    tasks = [Task(name="background", classes=list(BACKGROUNDS)), Task(name="shape", classes=list(SHAPE_CLASSES))]
    factors = {
        "dataset": "shapes",
        "protocol": "Meng et al. 2019, public generatedata.py",
        "image_size": [h, w],
        "scale": float(scale),
        "seed": seed,
        "size_factor": size_factor,
        "placement": placement,
        "standardize": "per_image" if standardize else "none",
        "values": {"background": dict(BACKGROUNDS), "shape": SHAPE_VALUE},
        "geometry_at_224x288": {
            "circle_radius": list(R_RANGE),
            "rectangle_half_height": list(D_RANGE),
            "rectangle_half_width": "4 * half_height",
            "centre_row": list(ROW_RANGE),
            "centre_col": list(COL_RANGE),
        },
        "splits": described,
        "held_out": [{"shape": "circle", "background": "black"}],
    }
    return DataSource(splits, tasks=tasks, input_shape=(1, h, w), factors=factors)


# ----------------------------------------------------------------------------------------------------
# shapes_n: K binary factors
# ----------------------------------------------------------------------------------------------------
SHAPES_N_FACTORS: dict[str, list[str]] = {
    "shape": ["ellipse", "rectangle"],
    "background": ["dark", "light"],
    "foreground": ["dim", "bright"],
    "texture": ["flat", "striped"],
    "size": ["small", "large"],
    "position": ["top", "bottom"],
    "orientation": ["horizontal", "vertical"],
    "noise": ["clean", "noisy"],
}
"""Factor name -> class names, in task order: ``shapes_n(num_tasks=K)`` uses the first K."""

BG_LEVELS = (0.0, 0.3)  # background dark / light
FG_LEVELS = (0.6, 0.9)  # foreground dim / bright (always brighter than any background)
FG_INACTIVE = 0.75
STRIPE_DEPTH = 0.2  # striped: every other diagonal band is this much darker than the foreground
NOISE_STD = 0.05  # noisy: additive Gaussian noise over the whole image
SIZE_RANGES = ((0.13, 0.17), (0.22, 0.28))  # major half-axis / min(H, W): small, large
ELONGATION = 2.0  # major / minor half-axis of both shapes
_MAX_ROUNDS = 10_000


def _check_holdout(holdout: Any, names: list[str]) -> list[dict[str, int]]:
    """Normalise ``holdout`` to patterns ``{factor: value index}``."""
    if not isinstance(holdout, (list, tuple)):
        raise ComponentError(
            f"holdout must be a list of patterns such as [{{'{names[0]}': 0, '{names[1]}': 0}}], got {holdout!r}"
        )
    patterns = []
    for k, pattern in enumerate(holdout):
        if not isinstance(pattern, Mapping) or not pattern:
            raise ComponentError(f"holdout[{k}] must be a non-empty mapping from factor name to value, got {pattern!r}")
        out = {}
        for name, value in pattern.items():
            if name not in names:
                raise ComponentError(
                    f"holdout[{k}]: unknown factor {name!r}; the factors of this dataset are {names}. "
                    f"{did_you_mean(str(name), names)}"
                )
            classes = SHAPES_N_FACTORS[name]
            if isinstance(value, str) and value in classes:
                value = classes.index(value)
            if isinstance(value, bool) or value not in (0, 1):
                raise ComponentError(f"holdout[{k}][{name!r}] must be 0, 1 or one of {classes}, got {value!r}")
            out[name] = int(value)
        patterns.append(out)
    return patterns


def _held_out(values: torch.Tensor, patterns: list[dict[str, int]], names: list[str]) -> torch.Tensor:
    """Bool ``[N]``: rows of ``values`` (N, K) matching any pattern."""
    hit = torch.zeros(values.shape[0], dtype=torch.bool)
    for pattern in patterns:
        match = torch.ones(values.shape[0], dtype=torch.bool)
        for name, v in pattern.items():
            match &= values[:, names.index(name)] == v
        hit |= match
    return hit


def _draw_nuisances(main: torch.Tensor, rho: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Nuisance values ``(M, K-1)`` given factor 0 ``(M,)``: nuisance j follows it with probability ``|rho[j]|``.

    Following means copying factor 0 when ``rho[j] >= 0`` and taking the other value when ``rho[j] < 0``;
    otherwise the nuisance is uniform. Either way it agrees with factor 0 with probability ``(1 + rho[j]) / 2``.
    """
    m, k1 = main.shape[0], rho.shape[0]
    follow = torch.rand(m, k1, generator=g) < rho.abs()  # (M, K-1)
    linked = torch.where(rho >= 0, main[:, None], 1 - main[:, None])  # (M, K-1)
    uniform = torch.randint(0, 2, (m, k1), generator=g)  # (M, K-1)
    return torch.where(follow, linked, uniform)


def _sample_seen(
    n: int, rho: torch.Tensor, g: torch.Generator, held: Callable[[torch.Tensor], torch.Tensor], split: str
) -> torch.Tensor:
    """``n`` factor vectors ``(n, K)``: factor 0 uniform; held-out vectors redraw their nuisances only.

    So factor 0 stays balanced, and nuisances not named in a holdout pattern keep their law given factor 0.
    """
    main = torch.randint(0, 2, (n,), generator=g)  # (n,)
    values = torch.cat([main[:, None], _draw_nuisances(main, rho, g)], dim=1)  # (n, K)
    bad = held(values)
    for _ in range(_MAX_ROUNDS):
        if not bad.any():
            return values
        idx = bad.nonzero().squeeze(1)
        values[idx, 1:] = _draw_nuisances(main[idx], rho, g)
        bad[idx] = held(values[idx])
    raise ComponentError(f"split {split!r}: the holdout leaves almost no probability to draw seen samples from")


def _sample_unseen(
    n: int, rho: torch.Tensor, g: torch.Generator, held: Callable[[torch.Tensor], torch.Tensor], split: str
) -> torch.Tensor:
    """``n`` factor vectors ``(n, K)`` of the same process as the seen splits, restricted to held-out ones."""
    kept: list[torch.Tensor] = []
    got = 0
    for _ in range(_MAX_ROUNDS):
        if got >= n:
            return torch.cat(kept)[:n]
        main = torch.randint(0, 2, (_CHUNK,), generator=g)
        values = torch.cat([main[:, None], _draw_nuisances(main, rho, g)], dim=1)  # (CHUNK, K)
        values = values[held(values)]
        kept.append(values)
        got += values.shape[0]
    raise ComponentError(f"split {split!r}: the held-out combinations have almost no probability to draw from")


def _uniform(g: torch.Generator, n: int, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _render_n(values: torch.Tensor, names: list[str], h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Raw images ``(N, 1, H, W)`` in [0, 1] (plus noise) and the geometry, for factor values ``(N, K)``."""
    n = values.shape[0]

    def factor(name: str) -> torch.Tensor | None:
        return values[:, names.index(name)] if name in names else None

    u = min(h, w)
    size = factor("size")
    lo = torch.tensor([r[0] for r in SIZE_RANGES], dtype=torch.float64) * u
    hi = torch.tensor([r[1] for r in SIZE_RANGES], dtype=torch.float64) * u
    if size is None:  # inactive: anywhere in both ranges
        major = _uniform(g, n, lo[0].item(), hi[1].item())
    else:
        major = _uniform(g, n, lo[size], hi[size])
    minor = major / ELONGATION
    orientation = factor("orientation")
    vertical = orientation == 1 if orientation is not None else torch.zeros(n, dtype=torch.bool)
    hh = torch.where(vertical, major, minor)
    hw = torch.where(vertical, minor, major)

    mid = (h - 1) / 2
    position = factor("position")
    if position is None:  # inactive: anywhere the shape fits
        row = _uniform(g, n, hh, h - 1 - hh)
    else:  # top: centre above the middle row by at least one pixel; bottom: below it
        top = position == 0
        row = torch.where(top, _uniform(g, n, hh, mid - 1), _uniform(g, n, mid + 1, h - 1 - hh))
    col = _uniform(g, n, hw, w - 1 - hw)

    mask = _rasterize(h, w, row, col, hh, hw, values[:, 0] == 0)  # (N, H, W)
    bg = torch.tensor(BG_LEVELS)[values[:, names.index("background")]]  # (N,)
    fg_f = factor("foreground")
    fg = torch.tensor(FG_LEVELS)[fg_f] if fg_f is not None else torch.full((n,), FG_INACTIVE)  # (N,)

    shade = fg[:, None, None].expand(n, h, w).clone()  # (N, H, W)
    texture = factor("texture")
    if texture is not None:  # diagonal stripes, band width period/2, random phase
        period = max(4, round(u / 10))
        phase = torch.randint(0, period, (n,), generator=g)
        diag = torch.arange(h)[:, None] + torch.arange(w)[None, :]  # (H, W)
        dark_band = ((diag[None] + phase[:, None, None]) % period) >= period // 2  # (N, H, W)
        shade -= STRIPE_DEPTH * (dark_band & (texture == 1)[:, None, None]).float()
    x = torch.where(mask, shade, bg[:, None, None])  # (N, H, W)
    noise = factor("noise")
    eps = torch.randn(n, h, w, generator=g)  # drawn always, so the other factors' rendering never depends on it
    if noise is not None:
        x = x + NOISE_STD * eps * (noise == 1).float()[:, None, None]
    geometry = {"row": row, "col": col, "half_height": hh, "half_width": hw}
    return x[:, None].float(), geometry


def shapes_n(
    num_tasks: int = 4,
    scale: float = 0.25,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 500,
    correlation: float | Sequence[float] = 0.5,
    holdout: Sequence[Mapping[str, int | str]] | None = None,
    image_size: Sequence[int] | None = None,
    standardize: bool = True,
) -> DataSource:
    """``K = num_tasks`` binary factors, one task each, with correlated nuisances and held-out combinations.

    Factors, in task order (the first K are used; see :data:`SHAPES_N_FACTORS`):

    ========== ======================= =====================================================================
    factor     classes                 rendering (sizes relative to u = min(H, W))
    ========== ======================= =====================================================================
    shape      ellipse / rectangle     both with half-axes a x a/2 (elongation 2), so only the outline differs
    background dark / light            background level 0.0 / 0.3
    foreground dim / bright            shape level 0.6 / 0.9 (inactive: 0.75)
    texture    flat / striped          striped: every other diagonal band 0.2 darker (period ~u/10, >= 4 px)
    size       small / large           major half-axis a uniform in [0.13, 0.17] u / [0.22, 0.28] u
    position   top / bottom            centre at least one pixel above / below the middle row
    orientation horizontal / vertical  the major axis along the width / the height (inactive: horizontal)
    noise      clean / noisy           noisy: additive Gaussian noise, std 0.05
    ========== ======================= =====================================================================

    Inactive factors (index >= K) are fixed (texture flat, noise clean, orientation horizontal, foreground
    0.75) or spread over both classes' ranges (size, position). Position is top/bottom, not left/right, so
    random horizontal flips never change a label. Shapes always lie fully inside the image.

    Sampling: factor 0 (the main task) is uniform in every split. Each nuisance j follows factor 0 with
    probability ``|correlation|`` (copying its value when ``correlation >= 0``, taking the other value when
    it is negative) and is uniform otherwise, so it agrees with factor 0 with probability
    ``(1 + correlation) / 2``. In ``train``, ``val`` and ``test`` a vector matching a ``holdout`` pattern
    redraws its nuisances (factor 0 is kept, so it stays balanced); ``unseen`` is the same process restricted
    to the held-out combinations, so only the held-out factors' relation differs from ``test``. The holdout
    shapes the factors it names: with the default one, every training ellipse is on a light background, so
    "dark" means "rectangle" in training as "black" does in the paper; ``correlation`` for factor 1 then only
    sets how often rectangles are light ((1 + correlation) / 2; the paper's 1 in 6 is ``correlation=-2/3``).

    Args:
        num_tasks: K, from 2 to 8.
        scale: Image size relative to 224 x 288, rounded to multiples of 8 (0.25 gives 56 x 72).
        seed: Seed of the data; every split draws from its own generator.
        n_train: Training images.
        n_eval: Images in each of ``val``, ``test`` and ``unseen``.
        correlation: In (-1, 1): how strongly each nuisance follows factor 0 (see above); one number for every
            nuisance or a list of K - 1 numbers (factor 1 first).
        holdout: Held-out combinations as patterns ``{factor: value}`` (value a class index or name); a sample
            is held out when it matches every entry of any pattern. ``None`` (default) holds out every
            combination with factor 0 and factor 1 at their first class, ``[{"shape": 0, "background": 0}]``
            (an ellipse on a dark background, generalising the paper's circle on black); ``[]`` holds out
            nothing and gives no ``unseen`` split.
        image_size: ``(H, W)`` overriding ``scale`` (each >= 16), e.g. ``(64, 64)``.
        standardize: Map pixel values by one affine map ``(x - mean) / std`` with the training split's pixel
            mean and std, the same for every split. Per-image standardisation would erase the absolute
            background and foreground levels, so it is not used here. ``False`` keeps raw values.

    Returns:
        A :class:`DataSource` with splits ``train``, ``val``, ``test`` (and ``unseen``) of
        :class:`ShapesDataset`, one :class:`~mtdisent.Task` per factor, input shape ``(1, H, W)``.

    Raises:
        ComponentError: An argument is out of range, or a held-out combination reached a seen split.
    """
    k = _int_arg("num_tasks", num_tasks, 2, len(SHAPES_N_FACTORS))
    h, w = _image_size(scale, image_size)
    seed = _int_arg("seed", seed, 0)
    n_train = _int_arg("n_train", n_train, 1)
    n_eval = _int_arg("n_eval", n_eval, 1)
    if not isinstance(standardize, bool):
        raise ComponentError(f"standardize must be true or false, got {standardize!r}")
    names = list(SHAPES_N_FACTORS)[:k]
    if isinstance(correlation, (list, tuple)):
        if len(correlation) != k - 1:
            raise ComponentError(
                f"correlation has {len(correlation)} entries; give one number or K - 1 = {k - 1} (for {names[1:]})"
            )
        rhos = [_float_arg(f"correlation[{i}]", c, lo=-1.0, hi=1.0) for i, c in enumerate(correlation)]
    else:
        rhos = [_float_arg("correlation", correlation, lo=-1.0, hi=1.0)] * (k - 1)
    rho = torch.tensor(rhos)
    patterns = _check_holdout([{names[0]: 0, names[1]: 0}] if holdout is None else holdout, names)

    # enumerate the 2^K combinations: both classes of factor 0 must keep seen combinations
    combos = torch.cartesian_prod(*[torch.tensor([0, 1])] * k).reshape(-1, k)  # (2^K, K)
    held = _held_out(combos, patterns, names)
    for v, cls in enumerate(SHAPES_N_FACTORS[names[0]]):
        if held[combos[:, 0] == v].all():
            raise ComponentError(
                f"holdout {holdout!r} holds out every combination with {names[0]}={cls!r}; "
                f"training would never show that class of the main task"
            )

    def is_held(v: torch.Tensor) -> torch.Tensor:
        return _held_out(v, patterns, names)

    split_sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    if patterns:
        split_sizes["unseen"] = n_eval
    raw: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}
    for split, n in split_sizes.items():
        g = _generator("shapes_n", seed, k, split)
        unseen = split == "unseen"
        values = (_sample_unseen if unseen else _sample_seen)(n, rho, g, is_held, split)
        hit = is_held(values)
        if (unseen and not hit.all()) or (not unseen and hit.any()):
            raise ComponentError(f"split {split!r}: a held-out combination leaked into a seen split (or vice versa)")
        x, geometry = _render_n(values, names, h, w, g)
        raw[split] = (x, values, geometry)

    norm: dict[str, Any] = {"kind": "none"}
    if standardize:
        # float64 statistics rounded to 6 decimals: the same on any number of threads
        train_x = raw["train"][0].double()
        mean, std = round(train_x.mean().item(), 6), round(train_x.std().item(), 6)
        norm = {"kind": "global", "mean": mean, "std": std}
    splits = {}
    for split, (x, values, geometry) in raw.items():
        if standardize:
            x = (x - norm["mean"]) / norm["std"]
        labels = {name: values[:, i] for i, name in enumerate(names)}
        splits[split] = ShapesDataset(x.contiguous(), labels, geometry)

    tasks = [Task(name=name, classes=list(SHAPES_N_FACTORS[name])) for name in names]
    factors = {
        "dataset": "shapes_n",
        "factors": {name: list(SHAPES_N_FACTORS[name]) for name in names},
        "image_size": [h, w],
        "seed": seed,
        "correlation": dict(zip(names[1:], rhos, strict=True)),
        "held_out": [{name: SHAPES_N_FACTORS[name][v] for name, v in p.items()} for p in patterns],
        "held_out_combinations": [
            {name: SHAPES_N_FACTORS[name][int(v)] for name, v in zip(names, c, strict=True)} for c in combos[held]
        ],
        "splits": {split: len(ds) for split, ds in splits.items()},
        "normalisation": norm,
    }
    return DataSource(splits, tasks=tasks, input_shape=(1, h, w), factors=factors)
