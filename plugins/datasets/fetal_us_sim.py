"""Simulated fetal ultrasound with acoustic shadows: the paper's fetal experiment on data anyone can make.

The fetal data set of Meng et al. (2019) is private. :func:`fetal_us_sim` generates a stand-in with the
structure of the paper's Table 1: standard planes (3VV, LVOT, Abd), a binary shadow-artifact label, LVOT
only ever without shadow in the seen splits, an ``lvot_with_shadow`` split of the combination training never
shows, and an ``artifacts_others`` split of other planes (4CH, femur, kidneys, lips, RVOT) labelled only for
shadow.

Images are simulated the way a B-mode scanner forms them, in polar beam coordinates ``(r, theta)``:

1. **Fan geometry.** A curvilinear probe whose apex lies above the top centre of the image; the fan covers
   ``r in [rmin, rmax]`` and ``|theta| <= theta_max`` (36-42 degrees, narrowed to no less than 30 where the fan
   would overflow the image width by more than 10%: about 37 degrees at 224 x 288), varying a little per image.
2. **Reflectivity** (scatterer intensity): near-black amniotic fluid, a layered maternal abdominal wall under
   the probe, sometimes a placenta or uterine wall at the back, and the fetal anatomy of the plane, drawn with
   random scale, rotation, mirror and position: a thorax or abdomen disc with a bright skin line, ribs and a
   bright spine, anechoic vessels, heart chambers or stomach with bright walls (see :data:`VIEWS`).
3. **Speckle.** Complex Gaussian scatterers times ``sqrt(reflectivity)``, blurred by a Gaussian point-spread
   function that is short along the beam (``r``) and wide across it (``theta``), so the beam widens with depth;
   the envelope is Rayleigh-distributed in uniform tissue. A weak noise floor keeps fluid from being exactly 0.
4. **Attenuation** ``exp(-2 alpha r)`` (15-30 dB round trip at full depth), compensated by a time-gain curve
   with a random slope error (+-35%) and random wobble, so images are unevenly bright with depth.
5. **Acoustic shadows.** Behind a bright occluder (a rib- or bone-like echo) at depth ``r_s``, the angular
   sector ``[theta_1, theta_2]`` at ``r > r_s`` is multiplied (in amplitude) by ``s in [0.05, 0.4]`` with soft
   edges along ``theta``; one to three sectors per shadow image. Half of the shadow-free images show such a bright
   echo with nothing behind it, so the shadow itself, not the bright echo, tells the classes apart.
6. **Log compression** to a 50-60 dB dynamic range, scan conversion to the image grid (bilinear), 0 outside
   the fan, 8-bit quantisation as a scanner's display image. Items are then standardised per image.

Images smaller than 112 rows are rendered at twice the size and averaged down, as a downsampled scanner image
would be. Everything is vectorised with ``torch`` (tens to hundreds of images per batch of tensor operations,
about 3 MPixel at a time) and deterministic by ``seed``: each split draws from its own generator seeded from
``(seed, split)``, so generating fewer splits does not change the others. Scale 0.1 (840 images) takes a few
seconds on one CPU core at 224 x 288.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtdisent import ComponentError, DataError, DataSource, Task, did_you_mean

__all__ = [
    "PLANES",
    "OTHER_VIEWS",
    "VIEWS",
    "SHADOW_CLASSES",
    "TABLE1",
    "FetalUSDataset",
    "simulate",
    "fetal_us_sim",
    "save_grid",
]

PLANES = ["3VV", "LVOT", "Abd"]
"""Classes of the ``plane`` task: three vessels view, left ventricular outflow tract, abdominal circumference."""
OTHER_VIEWS = ["4CH", "Femur", "Kidneys", "Lips", "RVOT"]
"""The "Others" planes of the ``artifacts_others`` split (never a class of the ``plane`` task)."""
VIEWS = PLANES + OTHER_VIEWS
"""Every simulated view, the index space of :attr:`FetalUSDataset.views`."""
SHADOW_CLASSES = ["without", "with"]
"""Classes of the ``shadow`` task."""

TABLE1: dict[str, dict[tuple[str, bool], int]] = {
    "train": {("3VV", False): 180, ("3VV", True): 320, ("LVOT", False): 500, ("Abd", False): 125, ("Abd", True): 375},
    "val": {("3VV", False): 50, ("3VV", True): 50, ("LVOT", False): 50, ("Abd", False): 50, ("Abd", True): 50},
    "test": {("3VV", False): 334, ("3VV", True): 41, ("LVOT", False): 79, ("Abd", False): 190, ("Abd", True): 220},
    "lvot_with_shadow": {("LVOT", True): 418},
    "artifacts_others": {("Others", False): 3159, ("Others", True): 2211},
}
"""The paper's Table 1: split -> (plane, with shadow) -> number of images. ``"Others"`` cycles over
:data:`OTHER_VIEWS`."""

MIN_SIZE = 32
_CHUNK_PIXELS = 3_000_000  # pixels rendered at once (48 images at 224 x 288): bounds memory to a few 100 MB

# reflectivity levels (scatterer intensity relative to fetal soft tissue = 1)
FLUID = 1.5e-3
BONE = 100.0
SKIN = 6.0
WALL = 3.5
NOISE_FLOOR = 2e-4  # intensity of the receiver noise floor


# ----------------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------------
class FetalUSDataset(Dataset):
    """One split of simulated fetal ultrasound, held in memory as 8-bit display images.

    Items follow the data contract: ``(image (1, H, W) float32, {"plane": k, "shadow": k})``, the image
    standardised per image (``(x - mean) / std``) unless ``standardize`` is false (then in ``[0, 1]``). The
    plane label is ``-1`` (unlabelled) for the Others views.

    Attributes:
        raw: ``(N, 1, H, W)`` uint8 display images (0 outside the fan).
        labels: Task name -> ``LongTensor[N]``.
        views: ``LongTensor[N]`` index into :data:`VIEWS` (the Others views are told apart here).
        shadow_strength: ``FloatTensor[N]``: the strongest shadow's amplitude factor ``s`` (1.0 without shadow).
        shadow_masks: ``BoolTensor[N, H, W]`` of shadowed pixels when requested, else ``None``.
        standardize: Whether items are standardised per image.
        shift: Largest random whole-pixel shift (each axis) of the scan, fan included, filled with black, drawn
            from torch's global generator each time an item is read (0: none). Whole pixels keep the speckle's
            statistics; interpolating shifts smooth it, and BatchNorm statistics gathered on smoothed images then
            no longer fit the test images (see FETAL_SETUP.md).
    """

    def __init__(
        self,
        raw: torch.Tensor,
        labels: Mapping[str, torch.Tensor],
        views: torch.Tensor,
        shadow_strength: torch.Tensor,
        shadow_masks: torch.Tensor | None = None,
        standardize: bool = True,
        shift: int = 0,
    ) -> None:
        n = raw.shape[0]
        if raw.ndim != 4 or raw.dtype != torch.uint8 or any(v.shape != (n,) for v in [*labels.values(), views]):
            raise DataError(f"FetalUSDataset: raw must be uint8 (N, 1, H, W), got {raw.dtype} {tuple(raw.shape)}")
        self.raw = raw
        self.labels = {k: v.long() for k, v in labels.items()}
        self.views = views.long()
        self.shadow_strength = shadow_strength.float()
        self.shadow_masks = shadow_masks
        self.standardize = standardize
        self.shift = int(shift)

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        x = self.raw[index].float() / 255.0  # (1, H, W)
        if self.shift:
            s, (h, w) = self.shift, x.shape[-2:]
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            x = F.pad(x, (s, s, s, s))[:, s + dy : s + dy + h, s + dx : s + dx + w]
        if self.standardize:
            x = (x - x.mean()) / x.std(correction=0).clamp_min(1e-6)
        return x, {name: int(v[index]) for name, v in self.labels.items()}

    def view_names(self) -> list[str]:
        """The view of every sample by name (e.g. ``"Femur"`` for an Others image)."""
        return [VIEWS[int(i)] for i in self.views]

    def __repr__(self) -> str:
        return f"FetalUSDataset(n={len(self)}, image={tuple(self.raw.shape[1:])}, tasks={list(self.labels)})"


# ----------------------------------------------------------------------------------------------------
# random helpers and drawing primitives (body units: the anatomy's radius is 1)
# ----------------------------------------------------------------------------------------------------
def _generator(*keys: Any) -> torch.Generator:
    """A CPU generator seeded from a stable hash of ``keys`` (the same on every machine and Python run)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class _Ctx:
    """Per-chunk drawing context: body coordinates ``u, v`` ``(n, h, w)`` and a generator."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, tex: torch.Tensor, g: torch.Generator) -> None:
        self.u, self.v, self.tex, self.g = u, v, tex, g
        self.n = u.shape[0]
        self.body = torch.zeros_like(u)  # the anatomy's outline, filled (set by the view)

    def rand(self, lo: float, hi: float) -> torch.Tensor:
        """Uniform ``(n, 1, 1)`` in ``[lo, hi)``."""
        return lo + (hi - lo) * torch.rand(self.n, 1, 1, generator=self.g)

    def local(self, cu: Any, cv: Any, ang: Any) -> tuple[torch.Tensor, torch.Tensor]:
        du, dv = self.u - cu, self.v - cv
        c, s = torch.cos(torch.as_tensor(ang)), torch.sin(torch.as_tensor(ang))
        return du * c + dv * s, dv * c - du * s

    def ellipse(self, cu: Any, cv: Any, a: Any, b: Any, ang: Any = 0.0, edge: float = 0.03) -> torch.Tensor:
        """Soft filled ellipse (1 inside, 0 outside, a linear edge about ``edge`` wide)."""
        p, q = self.local(cu, cv, ang)
        rho2 = (p / a) ** 2 + (q / b) ** 2
        size = torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
        return ((1 - rho2) * (size / (2 * edge)) + 0.5).clamp_(0, 1)

    def ring(self, cu: Any, cv: Any, a: Any, b: Any, ang: Any = 0.0, width: float = 0.03) -> torch.Tensor:
        """Soft elliptical outline about ``width`` thick."""
        p, q = self.local(cu, cv, ang)
        rho = ((p / a) ** 2 + (q / b) ** 2).sqrt_()
        size = torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
        return (1 - (rho - 1).abs_() * (size / width)).clamp_(0, 1)

    def capsule(self, u0: Any, v0: Any, u1: Any, v1: Any, width: Any, edge: float = 0.02) -> torch.Tensor:
        """Soft segment from ``(u0, v0)`` to ``(u1, v1)``: 1 within ``width`` of it, a linear edge ``edge`` wide."""
        du, dv = u1 - u0, v1 - v0
        l2 = du * du + dv * dv + 1e-9
        t = (((self.u - u0) * du + (self.v - v0) * dv) / l2).clamp_(0, 1)
        d = ((self.u - u0 - t * du) ** 2 + (self.v - v0 - t * dv) ** 2).sqrt_()
        return ((width - d) / edge + 0.5).clamp_(0, 1)


def _paint(refl: torch.Tensor, mask: torch.Tensor, level: Any) -> None:
    """``refl <- refl + mask * (level - refl)`` in place (draw a region of reflectivity ``level``)."""
    refl.add_(mask * (level - refl))


# ----------------------------------------------------------------------------------------------------
# anatomy of the views (u across the body, v from back (spine, v < 0) to front; mirrored at random)
# ----------------------------------------------------------------------------------------------------
def _trunk(ctx: _Ctx, refl: torch.Tensor, aspect: torch.Tensor, level: torch.Tensor) -> None:
    """A fetal thorax or abdomen: soft tissue disc, bright skin line, spine at the back."""
    ctx.body = ctx.ellipse(0.0, 0.0, 1.0, aspect, edge=0.02)
    _paint(refl, ctx.body, level * ctx.tex)
    refl.add_(SKIN * ctx.rand(0.7, 1.3) * ctx.ring(0.0, 0.0, 1.0, aspect, width=0.035))
    # spine: vertebral body and two posterior ossification centres, bright; a dark canal between
    sv = -0.66 * aspect + ctx.rand(-0.04, 0.04)
    su = ctx.rand(-0.06, 0.06)
    bright = BONE * ctx.rand(0.6, 1.0)
    _paint(refl, ctx.ellipse(su, sv - 0.1, 0.09, 0.06, edge=0.02), FLUID * 20)
    refl.add_(bright * ctx.ellipse(su, sv, 0.085, 0.075, edge=0.02))
    for side in (-1.0, 1.0):
        refl.add_(0.8 * bright * ctx.capsule(su + 0.07 * side, sv - 0.1, su + 0.13 * side, sv - 0.2, 0.025))


def _ribs(ctx: _Ctx, refl: torch.Tensor, aspect: torch.Tensor, n_ribs: float = 1.0) -> None:
    """Short bright rib arcs along both sides of the body wall."""
    gate = (ctx.u.abs() > 0.45).float() * (torch.sin(ctx.v * 9.0 + ctx.rand(0, 6.28)) > 0.2 / n_ribs).float()
    refl.add_(0.35 * BONE * gate * ctx.ring(0.0, 0.0, 0.9, 0.9 * aspect, width=0.035))


def _vessel(ctx: _Ctx, refl: torch.Tensor, cu: Any, cv: Any, r: Any, wall: float = 1.0) -> None:
    """An anechoic round vessel with a bright wall."""
    _paint(refl, ctx.ellipse(cu, cv, r, r, edge=0.015), FLUID)
    refl.add_(wall * WALL * ctx.ring(cu, cv, r * 1.08, r * 1.08, width=0.025))


def _heart(ctx: _Ctx, refl: torch.Tensor, cu: Any, cv: Any, a: Any, b: Any, ang: Any) -> None:
    """Myocardium: a slightly brighter ellipse with a bright pericardium."""
    _paint(refl, ctx.ellipse(cu, cv, a, b, ang, edge=0.03), 1.4 * ctx.tex)
    refl.add_(WALL * 0.8 * ctx.ring(cu, cv, a, b, ang, width=0.025))


def _view_3vv(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.8, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.7, 1.1))
    _paint(refl, ctx.ellipse(-0.55, 0.1, 0.4, 0.55, 0.3, edge=0.1) * (ctx.u < -0.3), 1.5 * ctx.tex)  # lungs
    _paint(refl, ctx.ellipse(0.55, 0.1, 0.4, 0.55, -0.3, edge=0.1) * (ctx.u > 0.3), 1.5 * ctx.tex)
    _ribs(ctx, refl, aspect)
    # the three vessels in an oblique row: pulmonary artery, aorta, superior vena cava (decreasing size)
    ang = ctx.rand(0.25, 0.55)
    u0, v0 = ctx.rand(-0.45, -0.3), ctx.rand(0.2, 0.35)
    step = ctx.rand(0.24, 0.3)
    for i, r in enumerate((0.13, 0.1, 0.075)):
        d = step * i
        _vessel(ctx, refl, u0 + d * torch.cos(ang), v0 - d * torch.sin(ang), r * ctx.rand(0.85, 1.15))
    refl.add_(WALL * ctx.ring(ctx.rand(0.05, 0.15), ctx.rand(-0.35, -0.25), 0.05, 0.05, width=0.02))  # trachea


def _view_lvot(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.8, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.7, 1.1))
    _ribs(ctx, refl, aspect)
    ang = ctx.rand(0.5, 0.9)
    cu, cv = ctx.rand(-0.25, -0.1), ctx.rand(0.15, 0.3)
    _heart(ctx, refl, cu, cv, 0.5, 0.38, ang)
    c, s = torch.cos(ang), torch.sin(ang)
    # left ventricle (long dark chamber) and right ventricle in front of it, the septum between
    _paint(refl, ctx.ellipse(cu - 0.02 * c + 0.12 * s, cv - 0.02 * s - 0.12 * c, 0.33, 0.11, ang), FLUID)
    _paint(refl, ctx.ellipse(cu + 0.05 * c - 0.14 * s, cv + 0.05 * s + 0.14 * c, 0.25, 0.09, ang), FLUID)
    # the aorta leaving the left ventricle toward the right shoulder, anechoic with bright walls
    a0u, a0v = cu - 0.2 * c + 0.1 * s, cv - 0.2 * s - 0.1 * c
    a1u, a1v = a0u + ctx.rand(0.3, 0.45), a0v + ctx.rand(-0.3, -0.1)
    refl.add_(WALL * ctx.capsule(a0u, a0v, a1u, a1v, 0.1))
    _paint(refl, ctx.capsule(a0u, a0v, a1u, a1v, 0.075), FLUID)


def _view_abd(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.88, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.6, 0.95))
    _ribs(ctx, refl, aspect, n_ribs=0.6)
    # stomach bubble (anechoic, on the left), umbilical vein (a dark curved tube), aorta in front of the spine
    _paint(refl, ctx.ellipse(ctx.rand(-0.45, -0.3), ctx.rand(0.0, 0.25), 0.26, 0.16, ctx.rand(-0.4, 0.4)), FLUID)
    bu, bv = ctx.rand(0.05, 0.2), ctx.rand(0.1, 0.25)
    mu, mv = bu + ctx.rand(0.15, 0.25), bv + ctx.rand(0.15, 0.25)
    _paint(refl, ctx.capsule(bu, bv, mu, mv, 0.04), FLUID)
    _paint(refl, ctx.capsule(mu, mv, mu + ctx.rand(-0.05, 0.05), mv + 0.3, 0.04), FLUID)
    _vessel(ctx, refl, ctx.rand(0.08, 0.15), -0.45 * aspect, 0.05, wall=0.5)


def _view_4ch(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.8, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.7, 1.1))
    _ribs(ctx, refl, aspect)
    ang = ctx.rand(0.6, 0.9)
    cu, cv = ctx.rand(-0.2, -0.05), ctx.rand(0.15, 0.3)
    _heart(ctx, refl, cu, cv, 0.5, 0.45, ang)
    c, s = torch.cos(ang), torch.sin(ang)
    for p, q, a, b in (
        (0.2, 0.17, 0.22, 0.13),
        (0.2, -0.17, 0.22, 0.13),
        (-0.22, 0.17, 0.15, 0.13),
        (-0.22, -0.17, 0.15, 0.13),
    ):
        _paint(refl, ctx.ellipse(cu + p * c - q * s, cv + p * s + q * c, a, b, ang, edge=0.02), FLUID)
    _vessel(ctx, refl, ctx.rand(0.1, 0.2), -0.45 * aspect, 0.06, wall=0.5)


def _view_rvot(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.8, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.7, 1.1))
    _ribs(ctx, refl, aspect)
    ang = ctx.rand(0.4, 0.8)
    cu, cv = ctx.rand(-0.2, -0.05), ctx.rand(0.2, 0.35)
    _heart(ctx, refl, cu, cv, 0.45, 0.35, ang)
    _paint(refl, ctx.ellipse(cu, cv + 0.05, 0.28, 0.12, ang), FLUID)  # right ventricle
    # pulmonary trunk crossing backwards and its bifurcation
    p0u, p0v = cu + 0.1, cv - 0.05
    p1u, p1v = p0u - ctx.rand(0.05, 0.15), p0v - ctx.rand(0.3, 0.4)
    for eu, ev in ((p1u - 0.25, p1v - 0.1), (p1u + 0.2, p1v - 0.15)):
        refl.add_(WALL * ctx.capsule(p1u, p1v, eu, ev, 0.065))
        _paint(refl, ctx.capsule(p1u, p1v, eu, ev, 0.045), FLUID)
    refl.add_(WALL * ctx.capsule(p0u, p0v, p1u, p1v, 0.095))
    _paint(refl, ctx.capsule(p0u, p0v, p1u, p1v, 0.07), FLUID)


def _view_kidneys(ctx: _Ctx, refl: torch.Tensor) -> None:
    aspect = ctx.rand(0.88, 1.0)
    _trunk(ctx, refl, aspect, ctx.rand(0.6, 0.95))
    _paint(refl, ctx.ellipse(0.0, 0.35, 0.55, 0.4, edge=0.1), 1.6 * ctx.tex**2)  # bowel, brighter and coarser
    for side in (-1.0, 1.0):
        ku, kv, ka = 0.36 * side + ctx.rand(-0.05, 0.05), -0.42 * aspect + ctx.rand(-0.05, 0.05), ctx.rand(-0.6, 0.6)
        _paint(refl, ctx.ellipse(ku, kv, 0.2, 0.14, ka), 0.25)  # hypoechoic kidney
        refl.add_(WALL * ctx.ring(ku, kv, 0.21, 0.15, ka, width=0.025))  # capsule
        _paint(refl, ctx.ellipse(ku, kv, 0.07, 0.035, ka, edge=0.015), FLUID)  # renal pelvis


def _view_femur(ctx: _Ctx, refl: torch.Tensor) -> None:
    thick = ctx.rand(0.3, 0.42)
    ctx.body = ctx.ellipse(0.0, 0.0, 1.0, thick, edge=0.04)
    _paint(refl, ctx.body, ctx.rand(0.7, 1.1) * ctx.tex)  # the thigh
    refl.add_(SKIN * ctx.ring(0.0, 0.0, 1.0, thick, width=0.03))
    half = ctx.rand(0.6, 0.8)
    bend = ctx.rand(-0.04, 0.04)
    bright = BONE * ctx.rand(0.8, 1.2)
    refl.add_(bright * ctx.capsule(-half, bend, 0.0, 0.0, 0.03))  # a slightly bowed diaphysis
    refl.add_(bright * ctx.capsule(0.0, 0.0, half, bend, 0.03))
    for end in (-1.0, 1.0):  # metaphyses a little wider, cartilage ends dark
        refl.add_(0.7 * bright * ctx.ellipse(end * half, bend, 0.06, 0.055, edge=0.02))
        _paint(refl, ctx.ellipse(end * (half + 0.1), bend, 0.07, 0.07, edge=0.03), 0.15)


def _view_lips(ctx: _Ctx, refl: torch.Tensor) -> None:
    ctx.body = ctx.ellipse(0.0, 0.0, 0.9, 0.75, edge=0.05)
    _paint(refl, ctx.body, ctx.rand(0.8, 1.2) * ctx.tex)  # face
    refl.add_(SKIN * ctx.ring(0.0, 0.0, 0.9, 0.75, width=0.04))
    # upper and lower lip: bright curved outlines; the mouth a dark line; nostrils two dark dots
    refl.add_(0.8 * SKIN * ctx.ring(0.0, -0.25, 0.45, 0.25, width=0.04) * (ctx.v < -0.1))
    refl.add_(0.8 * SKIN * ctx.ring(0.0, 0.18, 0.4, 0.22, width=0.04) * (ctx.v > 0.05))
    _paint(refl, ctx.capsule(-0.38, 0.0, 0.38, ctx.rand(-0.03, 0.03), 0.025), FLUID)
    for side in (-1.0, 1.0):
        _paint(refl, ctx.ellipse(0.15 * side, -0.55, 0.07, 0.05, edge=0.02), FLUID)


_RENDERERS: dict[str, Callable[[_Ctx, torch.Tensor], None]] = {
    "3VV": _view_3vv,
    "LVOT": _view_lvot,
    "Abd": _view_abd,
    "4CH": _view_4ch,
    "Femur": _view_femur,
    "Kidneys": _view_kidneys,
    "Lips": _view_lips,
    "RVOT": _view_rvot,
}
_SIZE = {"Femur": (0.3, 0.42), "Lips": (0.22, 0.32)}  # anatomy radius / image height; default below
_DEFAULT_SIZE = (0.22, 0.33)


# ----------------------------------------------------------------------------------------------------
# the scanner
# ----------------------------------------------------------------------------------------------------
def _smooth_noise(n: int, h: int, w: int, cells: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Smooth zero-mean unit-ish random field ``(n, h, w)`` (bicubic upsampling of a coarse grid)."""
    coarse = torch.randn(n, 1, *cells, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[:, 0]


def _gauss(sigma: float) -> torch.Tensor:
    """1-D Gaussian kernel with unit energy (sum of squares 1), so speckle keeps the scatterers' power."""
    half = max(1, math.ceil(3 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.pow(2).sum().sqrt()


def _filter(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Valid 1-D correlation of ``x`` with ``kernel`` along ``dim``, as shifted adds.

    On CPU this is several times faster than a one-channel ``conv2d`` with a 1-D kernel.
    """
    n = x.shape[dim] - len(kernel) + 1
    out = x.narrow(dim, 0, n) * float(kernel[0])
    for t in range(1, len(kernel)):
        out.add_(x.narrow(dim, t, n), alpha=float(kernel[t]))
    return out


def _sector(tn: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """Soft angular gate: 1 for ``|theta - centre| < half - edge / 2``, 0 beyond ``half + edge / 2``."""
    return ((half - (tn - centre).abs()) / edge + 0.5).clamp(0, 1)


def _render(views: torch.Tensor, shadow: torch.Tensor, h: int, w: int, g: torch.Generator, want_mask: bool) -> tuple:
    """Render ``n`` images: ``(display (n, h, w) in [0, 1], shadow mask (n, h, w) or None, strength (n,))``."""
    n = views.shape[0]

    def rand(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    # ---- 1. fan geometry (pixels; the apex at row -apex, column (w - 1) / 2) --------------------------
    rmin = rand(0.14, 0.24) * h
    apex = rmin - rand(0.01, 0.03) * h
    rmax = h - 1 - rand(0.01, 0.03) * h + apex
    fit = torch.asin((1.1 * (w - 1) / 2 / rmax).clamp(max=1.0))  # the deepest corners may be cut a little
    tmax = torch.minimum(rand(36.0, 42.0) * math.pi / 180, fit).clamp(min=30 * math.pi / 180)
    span = rmax - rmin

    # polar grids (normalised depth rn in [0, 1], angle tn in [-1, 1]): full resolution (nr x nt) for the
    # speckle, half resolution (hr x ht) for the anatomy, which the point-spread function blurs anyway
    nr, nt = h, w
    hr, ht = (nr // 2, nt // 2) if nr >= 128 else (nr, nt)
    rn_lo, tn_lo = torch.linspace(0, 1, hr)[None, :, None], torch.linspace(-1, 1, ht)[None, None, :]
    rn, tn = torch.linspace(0, 1, nr)[None, :, None], torch.linspace(-1, 1, nt)[None, None, :]
    r_lo = rmin[:, None, None] + span[:, None, None] * rn_lo  # (n, hr, 1) pixels
    th_lo = tmax[:, None, None] * tn_lo  # (n, 1, ht) radians
    row = -apex[:, None, None] + r_lo * torch.cos(th_lo)  # (n, hr, ht)
    col = (w - 1) / 2 + r_lo * torch.sin(th_lo)

    # ---- 2. reflectivity: fluid, maternal wall, uterine wall / placenta at the back, the anatomy ---------
    tex = torch.exp(0.35 * _smooth_noise(n, hr, ht, (10, 12), g) + 0.2 * _smooth_noise(n, hr, ht, (36, 44), g))
    refl = FLUID * tex
    wall0 = rand(0.08, 0.22, 1, 1)
    wall = wall0 + 0.015 * torch.sin(rand(1, 3, 1, 1) * tn_lo + rand(0, 6.28, 1, 1))  # (n, 1, ht)
    layers = 0.8 + 0.5 * torch.sin(rand(30, 60, 1, 1) * rn_lo + rand(0, 6.28, 1, 1) + 0.3 * tex)
    fat = ((rn_lo - 0.4 * wall) / 0.01).clamp(0, 1) * 0.7 + 0.3  # subcutaneous fat darker than muscle
    _paint(refl, ((wall - rn_lo) / 0.01).clamp(0, 1), rand(0.4, 1.0, 1, 1) * layers * fat * tex)
    refl.add_(WALL * (1 - ((rn_lo - wall) / 0.012).abs()).clamp(0, 1))  # uterine wall / fascia
    back = rand(0.8, 0.98, 1, 1) + 0.04 * torch.sin(rand(1, 4, 1, 1) * tn_lo + rand(0, 6.28, 1, 1))
    has_back = (torch.rand(n, 1, 1, generator=g) < 0.5).float()
    _paint(refl, has_back * ((rn_lo - back) / 0.02).clamp(0, 1), rand(0.3, 0.8, 1, 1) * tex.square())
    refl.add_(has_back * 0.5 * WALL * (1 - ((rn_lo - back) / 0.01).abs()).clamp(0, 1))

    # anatomy placement: centre (rc, tc) inside the fan below the wall; radius in pixels; random rotation
    size_lo = torch.tensor([_SIZE.get(v, _DEFAULT_SIZE)[0] for v in VIEWS])[views]
    size_hi = torch.tensor([_SIZE.get(v, _DEFAULT_SIZE)[1] for v in VIEWS])[views]
    radius = (size_lo + (size_hi - size_lo) * rand(0, 1)) * h
    rc_lo = rmin + span * (wall0.view(n) + 0.03) + radius
    rc_hi = rmax - 0.75 * radius
    rc = rc_lo + (rc_hi - rc_lo).clamp(min=0) * rand(0, 1)
    tc = tmax * 0.7 * (1 - radius / rc).clamp(min=0) * rand(-1, 1)
    crow, ccol = -apex + rc * torch.cos(tc), (w - 1) / 2 + rc * torch.sin(tc)
    phi = torch.where(views == VIEWS.index("Femur"), rand(-0.45, 0.45), rand(0, 2 * math.pi))  # femurs lengthwise
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    inv = (1 / radius)[:, None, None]
    dx, dy = (col - ccol[:, None, None]) * inv, (row - crow[:, None, None]) * inv
    c, s = torch.cos(phi)[:, None, None], torch.sin(phi)[:, None, None]
    u, v = (dx * c + dy * s) * flip[:, None, None], dy * c - dx * s
    body = torch.zeros(n, hr, ht)
    for k, name in enumerate(VIEWS):
        idx = (views == k).nonzero().squeeze(1)
        if len(idx):
            sub, ctx = refl[idx], _Ctx(u[idx], v[idx], tex[idx], g)
            _RENDERERS[name](ctx, sub)
            refl[idx], body[idx] = sub, ctx.body

    # ---- 5. occluders and shadows (drawn for every image, so a shadow-free twin keeps the same anatomy) ----
    k_sh = 3
    n_active = 1 + (torch.rand(n, 1, generator=g) > torch.tensor([[0.55, 0.85]])).sum(1, keepdim=True)  # 1..3
    half_body = torch.asin((radius / rc).clamp(max=1.0)) / tmax  # the body's angular half-width, normalised
    centre = ((tc / tmax)[:, None] + half_body[:, None] * rand(-0.7, 0.7, k_sh)).clamp(-0.9, 0.9)  # (n, k)
    # the occluder sits where the beam first meets the anatomy (ray-marched on the body mask), a bit inside
    cols = ((centre + 1) / 2 * (ht - 1)).round().long()  # (n, k)
    hits = torch.gather(body, 2, cols[:, None, :].expand(n, hr, k_sh)) > 0.5  # (n, hr, k)
    first = torch.where(hits.any(1), hits.float().argmax(1).float() / (hr - 1), rand(0.3, 0.6, k_sh))
    r_s = (first + (radius / span)[:, None] * rand(0.0, 0.35, k_sh)).clamp(max=0.85)
    r_s = torch.maximum(r_s, wall0.view(n, 1) + 0.05)
    half = rand(2.0, 6.0, k_sh) * (math.pi / 180) / tmax[:, None]
    edge = half * rand(0.3, 0.8, k_sh)
    thick = rand(0.012, 0.025, k_sh)
    strength = rand(0.05, 0.4, k_sh)
    distractor = torch.rand(n, generator=g) < 0.5
    bone = BONE * rand(0.5, 1.0, k_sh)
    active = torch.arange(k_sh)[None, :] < n_active  # (n, k)
    occluder = torch.where(shadow[:, None], active, (torch.arange(k_sh)[None, :] == 0) & distractor[:, None])
    casts = shadow[:, None] & active
    refl = F.interpolate(refl[:, None], size=(nr, nt), mode="bilinear", align_corners=True)[:, 0].clamp_(min=0)
    factor = torch.ones(n, nr, nt)
    for j in range(k_sh):
        gate = _sector(tn, centre[:, j, None, None], half[:, j, None, None], edge[:, j, None, None])  # (n, 1, nt)
        mid, t = r_s[:, j, None, None], thick[:, j, None, None]
        curve = mid + 0.3 * t * ((tn - centre[:, j, None, None]) / half[:, j, None, None]).square()  # rib-like arc
        arc = (1 - (rn - curve).abs() / t).clamp_(0, 1) * gate
        refl.add_((occluder[:, j] * bone[:, j])[:, None, None] * arc)
        behind = ((rn - curve - 0.5 * t) / 0.015).clamp(0, 1) * gate  # (n, nr, nt)
        factor.mul_(1 - (casts[:, j] * (1 - strength[:, j]))[:, None, None] * behind)
    strongest = torch.where(casts, strength, torch.ones_like(strength)).amin(1)

    # ---- 4. attenuation exp(-2 alpha r) with imperfect time-gain compensation, in dB along depth -----------
    atten_db = rand(15.0, 30.0, 1, 1)  # round-trip loss at full depth
    err = rand(-0.35, 0.35, 1, 1)  # the TGC's slope error
    wobble = F.interpolate(rand(-2.5, 2.5, 1, 5), size=nr, mode="linear", align_corners=True).view(n, nr, 1)
    net_db = -atten_db * rn + atten_db * (1 + err) * rn + wobble + rand(-3.0, 3.0, 1, 1)

    # ---- 3. speckle: complex scatterers * sqrt(reflectivity), anisotropic PSF, envelope --------------------
    amp = (refl.mul_(factor.square()).mul_(torch.pow(10.0, net_db / 10)).add_(NOISE_FLOOR)).sqrt_()
    z = torch.randn(2, n, nr, nt, generator=g).mul_(amp).view(2 * n, 1, nr, nt)
    f = h / 224
    kr, kt = _gauss(max(0.7 * f, 0.45)), _gauss(max(1.6 * f, 0.6))
    z = F.pad(z, (len(kt) // 2, len(kt) // 2, len(kr) // 2, len(kr) // 2), mode="reflect")[:, 0]
    z = _filter(_filter(z, kr, dim=1), kt, dim=2).view(2, n, nr, nt)
    power = z[0].square_().add_(z[1].square_())

    # ---- 6. log compression, scan conversion, zero outside the fan -------------------------------------
    dyn = rand(50.0, 60.0, 1, 1)
    top = rand(24.0, 30.0, 1, 1)  # the level above soft tissue (dB) shown as white
    disp = power.clamp_(min=1e-12).log10_().mul_(10).sub_(top - dyn).div_(dyn).clamp_(0, 1)
    ii = torch.arange(h, dtype=torch.float32)[None, :, None] + apex[:, None, None]
    jj = torch.arange(w, dtype=torch.float32)[None, None, :] - (w - 1) / 2
    gx = torch.atan2(jj, ii) / tmax[:, None, None]
    gy = (torch.sqrt(ii**2 + jj**2) - rmin[:, None, None]) * (2 / span)[:, None, None] - 1
    grid = torch.stack([gx, gy], dim=-1)  # (n, h, w, 2)
    img = F.grid_sample(disp[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    mask = None
    if want_mask:
        loss = F.grid_sample((1 - factor)[:, None], grid, mode="bilinear", align_corners=True)[:, 0]
        mask = loss > 0.3
    return img, mask, strongest


def _render_display(
    views: torch.Tensor, shadow: torch.Tensor, h: int, w: int, g: torch.Generator, want_mask: bool
) -> tuple:
    """:func:`_render` at ``(h, w)``, small images at twice the size and averaged down.

    A scanner's image downsampled to a small size keeps a fine speckle grain; rendering small images directly
    would turn speckle into pixel noise.
    """
    ss = 2 if h < 112 else 1
    img, mask, strongest = _render(views, shadow, ss * h, ss * w, g, want_mask)
    if ss > 1:
        img = F.avg_pool2d(img[:, None], ss)[:, 0]
        if mask is not None:
            mask = F.avg_pool2d(mask[:, None].float(), ss)[:, 0] > 0.5
    return img, mask, strongest


@contextlib.contextmanager
def _intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` intra-op threads (``None``: unchanged), restoring torch's setting afterwards."""
    before = torch.get_num_threads()
    if num_threads is not None and num_threads != before:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _render_many(
    views: torch.Tensor,
    shadow: torch.Tensor,
    h: int,
    w: int,
    g: torch.Generator,
    want_mask: bool,
    num_threads: Any,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Render any number of images in chunks of bounded memory: ``(images (N, H, W), masks or None, strengths)``.

    ``quantize`` stores each chunk as uint8 display images (0-255) right away, so a large split never exists in
    float32.
    """
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ComponentError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
    images, masks, strengths = [], [], []
    chunk = max(8, _CHUNK_PIXELS // (h * w))
    with _intra_op_threads(num_threads):
        for start in range(0, len(views), chunk):
            img, mask, strong = _render_display(
                views[start : start + chunk], shadow[start : start + chunk], h, w, g, want_mask
            )
            images.append((img * 255).round_().to(torch.uint8) if quantize else img)
            strengths.append(strong)
            if mask is not None:
                masks.append(mask)
    return torch.cat(images), (torch.cat(masks) if want_mask else None), torch.cat(strengths)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------
def _image_size(image_size: Any) -> tuple[int, int]:
    ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) and x >= MIN_SIZE for x in image_size)
    if not ok:
        raise ComponentError(
            f"image_size must be (height, width), integers >= {MIN_SIZE} (multiples of 8 suit most backbones, "
            f"e.g. (224, 288) or (64, 80)); got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def _view_indices(views: str | Sequence[str], n: int | None) -> torch.Tensor:
    names = [views] * (n if n is not None else 1) if isinstance(views, str) else list(views)
    for name in names:
        if name not in VIEWS:
            raise ComponentError(f"unknown view {name!r}. {did_you_mean(str(name), VIEWS)}")
    return torch.tensor([VIEWS.index(v) for v in names], dtype=torch.long)


def simulate(
    views: str | Sequence[str],
    shadow: bool | Sequence[bool] | torch.Tensor,
    image_size: tuple[int, int] = (224, 288),
    seed: int | torch.Generator = 0,
    n: int | None = None,
    return_masks: bool = False,
    num_threads: int | None = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simulate fetal ultrasound images of given views, with or without acoustic shadows.

    Every random quantity is drawn whether or not an image has a shadow, so two calls with the same ``seed``
    and views that differ only in ``shadow`` give the same anatomy, speckle and gain: a matched pair whose only
    difference is the shadow (and its occluder).

    Args:
        views: One name of :data:`VIEWS` (then give ``n``) or one name per image.
        shadow: Whether each image has an acoustic shadow (one bool for all, or one per image).
        image_size: ``(H, W)``; images are generated at this size directly.
        seed: An int seed or a ``torch.Generator``.
        n: Number of images when ``views`` is a single name.
        return_masks: Also return the shadowed pixels.
        num_threads: Intra-op threads while rendering (see :func:`fetal_us_sim`).

    Returns:
        ``(images, masks)``: display images ``(N, 1, H, W)`` float in ``[0, 1]`` (0 outside the fan, not yet
        standardised), and ``(N, H, W)`` bool shadow masks (``None`` unless ``return_masks``).

    Raises:
        ComponentError: An unknown view, a bad size, or ``shadow`` of the wrong length.
    """
    h, w = _image_size(tuple(image_size))
    idx = _view_indices(views, n)
    flags = torch.as_tensor(shadow, dtype=torch.bool).flatten()
    if flags.numel() == 1:
        flags = flags.expand(len(idx))
    if flags.numel() != len(idx):
        raise ComponentError(f"shadow has {flags.numel()} entries for {len(idx)} images; give one or one per image")
    g = seed if isinstance(seed, torch.Generator) else _generator("fetal_us_sim.simulate", int(seed))
    images, masks, _ = _render_many(idx, flags, h, w, g, return_masks, num_threads)
    return images[:, None], masks


def _count(base: int, scale: float) -> int:
    return max(1, round(base * scale)) if base > 0 else 0


def fetal_us_sim(
    scale: float = 0.1,
    image_size: tuple[int, int] = (224, 288),
    seed: int = 0,
    standardize: bool = True,
    return_masks: bool = False,
    splits: Sequence[str] | None = None,
    num_threads: int | None = 1,
    train_shift: int = 0,
) -> DataSource:
    """Simulated fetal ultrasound with the split structure of the paper's Table 1 (Meng et al. 2019).

    Splits (counts at ``scale=1``; each multiplied by ``scale``, rounded, at least 1):

    ==================== ====================================================================================
    ``train``            3VV 180 without / 320 with shadow, LVOT 500 without, Abd 125 without / 375 with
    ``val``              50 of each of those five (plane, shadow) combinations
    ``test``             3VV 334 / 41, LVOT 79 without, Abd 190 / 220 (seen combinations only)
    ``lvot_with_shadow`` LVOT with shadow, 418: the combination never seen in training
    ``artifacts_others`` Others (4CH, femur, kidneys, lips, RVOT in turn) 3159 without / 2211 with shadow;
                         plane label -1 (unlabelled: Others is not a class of the plane task)
    ==================== ====================================================================================

    See the module docstring for how the images are formed. Samples are shuffled within each split.

    Args:
        scale: Multiplies every count of Table 1 (0.1 gives 840 images in all; 1.0 the paper's 8,400).
        image_size: ``(H, W)`` of the images (each >= 32; multiples of 8 suit most backbones), e.g. ``(64, 80)``
            for quick CPU runs. Images are generated at this size directly.
        seed: Seed of the data; every split draws from its own generator.
        standardize: Standardise each image (``(x - mean) / std``) when it is read; ``False`` gives ``[0, 1]``.
        return_masks: Keep per-pixel shadow masks on each split (``FetalUSDataset.shadow_masks``).
        splits: Generate only these splits (default: all five).
        num_threads: Intra-op threads torch uses while generating; its setting is restored afterwards. The work
            is thousands of memory-bound elementwise operations, which gain little from more threads and can
            slow down many times over when the CPU is shared (each parallel operation waits for its threads to
            be scheduled), so the default is 1. ``None`` keeps torch's current setting (try it on an idle
            machine with many cores).
        train_shift: Random whole-pixel shifts of up to this many pixels for the ``train`` split (augmentation;
            0: none). The shortcut stays: shadows move with the scan.

    Returns:
        A :class:`DataSource` of :class:`FetalUSDataset` splits, tasks ``plane`` (3VV, LVOT, Abd) and
        ``shadow`` (without, with), input shape ``(1, H, W)``.

    Raises:
        ComponentError: An argument is out of range or a split name is unknown.
    """
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
    if not ok:
        raise ComponentError(f"scale must be a number > 0 (0.1 gives 840 images, 1.0 the paper's 8,400); got {scale!r}")
    h, w = _image_size(tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ComponentError(f"seed must be an integer >= 0, got {seed!r}")
    for name, flag in (("standardize", standardize), ("return_masks", return_masks)):
        if not isinstance(flag, bool):
            raise ComponentError(f"{name} must be true or false, got {flag!r}")
    if isinstance(train_shift, bool) or not isinstance(train_shift, int) or not 0 <= train_shift < min(h, w) // 2:
        raise ComponentError(f"train_shift must be an integer in [0, {min(h, w) // 2}), got {train_shift!r}")
    wanted = list(TABLE1) if splits is None else list(splits)
    for name in wanted:
        if name not in TABLE1:
            raise ComponentError(f"unknown split {name!r}. {did_you_mean(str(name), TABLE1)}")

    out: dict[str, FetalUSDataset] = {}
    counts: dict[str, list[dict[str, Any]]] = {}
    for split in wanted:
        views, shadows, planes = [], [], []
        counts[split] = []
        for (plane, with_shadow), base in TABLE1[split].items():
            m = _count(base, scale)
            if plane == "Others":  # the Others views in turn
                views += [VIEWS.index(OTHER_VIEWS[i % len(OTHER_VIEWS)]) for i in range(m)]
            else:
                views += [VIEWS.index(plane)] * m
            shadows += [with_shadow] * m
            planes += [PLANES.index(plane) if plane in PLANES else -1] * m
            counts[split].append({"plane": plane, "shadow": SHADOW_CLASSES[int(with_shadow)], "count": m})
        g = _generator("fetal_us_sim", seed, split)
        perm = torch.randperm(len(views), generator=g)  # shuffled, then rendered in mixed chunks
        view_t, shadow_t = torch.tensor(views)[perm], torch.tensor(shadows)[perm]
        raw, masks, strengths = _render_many(view_t, shadow_t, h, w, g, return_masks, num_threads, quantize=True)
        out[split] = FetalUSDataset(
            raw[:, None],
            {"plane": torch.tensor(planes)[perm], "shadow": shadow_t.long()},
            view_t,
            strengths,
            masks,
            standardize=standardize,
            shift=train_shift if split == "train" else 0,
        )

    tasks = [Task(name="plane", classes=list(PLANES)), Task(name="shadow", classes=list(SHADOW_CLASSES))]
    factors = {
        "dataset": "fetal_us_sim",
        "protocol": "Meng et al. 2019, Table 1 structure; simulated B-mode images",
        "image_size": [h, w],
        "scale": float(scale),
        "seed": seed,
        "train_shift": train_shift,
        "standardize": "per_image" if standardize else "none",
        "views": {"planes": list(PLANES), "others": list(OTHER_VIEWS)},
        "shadow_strength": [0.05, 0.4],
        "dynamic_range_db": [50, 60],
        "splits": counts,
        "held_out": [{"plane": "LVOT", "shadow": "with"}],
    }
    return DataSource(out, tasks=tasks, input_shape=(1, h, w), factors=factors)


def _grid_key(ds: Any, i: int, tasks: Sequence[Task] | None) -> tuple[tuple, str]:
    """Sort key and row title of sample ``i``: its view and shadow class for simulated data, else its labels."""
    if isinstance(ds, FetalUSDataset):
        view, sh = int(ds.views[i]), int(ds.labels["shadow"][i])
        return (view, sh), f"{VIEWS[view]} / {SHADOW_CLASSES[sh]} shadow"
    labels = getattr(ds, "labels", None)
    if isinstance(labels, Mapping) and all(isinstance(v, torch.Tensor) for v in labels.values()):
        values = {k: int(v[i]) for k, v in labels.items()}
    else:
        values = {k: int(v) for k, v in ds[i][1].items()}
    names = {t.name: t.class_names for t in tasks or []}
    parts = []
    for k, v in sorted(values.items()):
        cls = names[k][v] if k in names and 0 <= v < len(names[k]) else ("?" if v < 0 else str(v))
        parts.append(f"{k}={cls}")
    return tuple(sorted(values.items())), ", ".join(parts)


def _grid_image(ds: Any, i: int) -> torch.Tensor:
    """Sample ``i`` as a uint8 ``(H, W)`` image: the stored display image, else the item min-max scaled."""
    if isinstance(ds, FetalUSDataset):
        return ds.raw[i, 0]
    x = ds[i][0].float().mean(0)  # channels averaged
    return ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-6) * 255).round().to(torch.uint8)


def save_grid(data: DataSource | Dataset, path: str | Path, per_row: int = 6, max_scan: int = 5000) -> Path:
    """Save a PNG grid of sample images to check data by eye: one row per (view, shadow) or label combination.

    Works for any data source or split in the data contract: simulated data is grouped by view and shadow (the
    Others views told apart), other data by its labels (class names from the source's tasks).

    Args:
        data: A :class:`DataSource` (rows gathered from every split) or one split.
        path: Where to write the PNG.
        per_row: Images per row.
        max_scan: Samples looked at per split (at most) to fill the rows.

    Returns:
        The path written.

    Raises:
        DataError: Pillow is not installed, or there is nothing to draw.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:  # pragma: no cover - Pillow ships with the test extras
        raise DataError("save_grid needs Pillow: pip install pillow") from exc
    datasets = [data[k] for k in data] if isinstance(data, DataSource) else [data]
    tasks = data.tasks if isinstance(data, DataSource) else None
    rows: dict[tuple, tuple[str, list[torch.Tensor]]] = {}
    for ds in datasets:
        for i in range(min(len(ds), max_scan)):
            key, title = _grid_key(ds, i, tasks)
            _, images = rows.setdefault(key, (title, []))
            if len(images) < per_row:
                images.append(_grid_image(ds, i))
    if not rows:
        raise DataError("save_grid: no images to draw")
    h, w = next(iter(rows.values()))[1][0].shape
    pad = 4
    label_w = 12 + 6 * max(len(title) for title, _ in rows.values())
    canvas = Image.new("L", (label_w + per_row * (w + pad), len(rows) * (h + pad)), 40)
    draw = ImageDraw.Draw(canvas)
    for r, key in enumerate(sorted(rows)):
        title, images = rows[key]
        y = r * (h + pad)
        draw.text((6, y + h // 2 - 6), title, fill=255)
        for c, img in enumerate(images):
            if tuple(img.shape) == (h, w):
                canvas.paste(_to_pil(img), (label_w + c * (w + pad), y))
    path = Path(path)
    canvas.save(path)
    return path


def _to_pil(img: torch.Tensor) -> Any:
    """A uint8 ``(H, W)`` tensor as a PIL grayscale image (no numpy needed)."""
    from PIL import Image

    h, w = img.shape
    return Image.frombytes("L", (w, h), bytes(img.to(torch.uint8).contiguous().clone().untyped_storage()))
