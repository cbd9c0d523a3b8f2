"""Synthetic H&E whole-slide images for the demo pipeline and the tests.

:func:`make_demo_slide` writes a deterministic, pyramidal, tiled, JPEG-compressed TIFF that
OpenSlide reads as a "generic-tiff" slide, with its resolution in the TIFF resolution tags
(centimetre unit), which OpenSlide reports as ``openslide.mpp-x/y``.

Two kinds share one H&E palette and differ only in morphology, so a model must look at structure:

* ``scc`` (squamous cell carcinoma): solid nests of large, crowded, pleomorphic, hyperchromatic
  nuclei, and keratin pearls (concentric eosinophilic whorls), in a fibrous stroma;
* ``normal`` (benign lung-like parenchyma): thin alveolar septa around empty air spaces, with
  small regular nuclei, and a few vessels.

Colour is rendered by Beer-Lambert mixing of haematoxylin and eosin optical densities (the stain
vectors of Ruifrok & Johnston 2001, as in ``skimage.color.rgb_from_hed``). After the morphology is
laid out, each slide's stain amounts are rescaled so the mean RGB of its tissue equals one fixed
target: the two kinds then have the same mean colour, and mean colour alone cannot separate them.

Drawing is vectorised (NumPy / OpenCV) and done in horizontal strips from a list of objects, so a
20,000 x 20,000 pixel slide needs only its own RGB array in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from simclr_path.config import DEMO_SLIDE_MPP, DEMO_SLIDE_SIDE
from simclr_path.errors import SimclrPathError, check_int, check_number
from simclr_path.outputs import atomic_output, check_can_write

KINDS = ("scc", "normal")
ARTEFACTS = ("pen", "glass", "fold")

# Stain optical-density vectors (R, G, B), Ruifrok & Johnston 2001 (skimage rgb_from_hed rows).
_H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_VEC = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_GLASS_OD = np.array([0.035, 0.045, 0.03], dtype=np.float32)  # slightly bluish-white glass
_NEUTRAL_OD = np.array([1.0, 1.0, 1.0], dtype=np.float32) / math.sqrt(3)
_INK_OD = np.array([1.7, 0.75, 0.35], dtype=np.float32)  # blue-green marker ink
_PEN_WIDTH_UM = 60.0  # a fine marker; real marker strokes are 0.3-1 mm wide
# Mean RGB of the tissue of every demo slide, whatever its kind (see module docstring).
TARGET_TISSUE_RGB = np.array([197.0, 144.0, 212.0])
_PLAN_UM = 8.0  # resolution of the low-frequency layout (um per plan pixel)
_STRIP = 512  # rows rendered at a time


@dataclass
class _Objects:
    """Ellipses in level-0 pixels: centres (n,), semi-axes (n,), angles (deg), intensities."""

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    value: np.ndarray

    @staticmethod
    def empty() -> _Objects:
        z = np.zeros(0, dtype=np.float32)
        return _Objects(z, z, z, z, z, z)

    def concat(self, other: _Objects) -> _Objects:
        return _Objects(*[np.concatenate([getattr(self, f), getattr(other, f)])
                          for f in ("cx", "cy", "a", "b", "angle", "value")])

    def sorted(self) -> _Objects:
        order = np.argsort(self.cy, kind="stable")
        return _Objects(*[getattr(self, f)[order] for f in ("cx", "cy", "a", "b", "angle", "value")])

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Indices of objects that may touch rows [y0, y1)."""
        if len(self.cy) == 0:
            return np.zeros(0, dtype=np.int64)
        margin = float(max(self.a.max(), self.b.max())) + 2
        lo = np.searchsorted(self.cy, y0 - margin, side="left")
        hi = np.searchsorted(self.cy, y1 + margin, side="right")
        return np.arange(lo, hi)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise, standardised: float32 (h, w), mean 0, sd 1."""
    f = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), max(sigma, 0.5),
                         borderType=cv2.BORDER_REFLECT)
    return (f - f.mean()) / (f.std() + 1e-6)


def _jittered_grid(rng: np.random.Generator, width: int, height: int, spacing: float,
                   jitter: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Points on a grid of ``spacing`` px with uniform jitter: a cheap blue-noise layout."""
    xs = np.arange(spacing / 2, width, spacing)
    ys = np.arange(spacing / 2, height, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx.ravel() + rng.uniform(-jitter, jitter, gx.size) * spacing
    gy = gy.ravel() + rng.uniform(-jitter, jitter, gy.size) * spacing
    return gx.astype(np.float32), gy.astype(np.float32)


def _sample_plan(plan: np.ndarray, x: np.ndarray, y: np.ndarray, px_per_plan: float) -> np.ndarray:
    """Nearest plan value at level-0 points (x, y)."""
    h, w = plan.shape
    i = np.clip((y / px_per_plan).astype(np.int64), 0, h - 1)
    j = np.clip((x / px_per_plan).astype(np.int64), 0, w - 1)
    return plan[i, j]


class _Layout:
    """Everything random about one slide, decided once; strips are rendered from it."""

    def __init__(self, kind: str, seed: int, width: int, height: int, mpp: float,
                 artefacts: tuple[str, ...]) -> None:
        self.kind, self.seed, self.width, self.height, self.mpp = kind, seed, width, height, mpp
        rng = np.random.default_rng([seed, KINDS.index(kind)])
        um = 1.0 / mpp  # level-0 pixels per micron
        self.px_per_plan = _PLAN_UM * um
        ph = max(16, math.ceil(height / self.px_per_plan))
        pw = max(16, math.ceil(width / self.px_per_plan))
        self.plan_shape = (ph, pw)
        size_um = min(width, height) * mpp

        # tissue: a few smooth blobs kept away from the slide border
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        r2 = ((xx + 0.5) / pw - 0.5) ** 2 + ((yy + 0.5) / ph - 0.5) ** 2
        blob = _smooth_field(rng, (ph, pw), sigma=min(ph, pw) / 7) + 3.2 * (0.16 - r2) / 0.16
        border = np.minimum.reduce([xx, yy, pw - 1 - xx, ph - 1 - yy]) / max(2.0, 0.04 * min(ph, pw))
        self.tissue_field = np.minimum(blob - 0.6, np.clip(border - 1.0, -5, 5)).astype(np.float32)
        if "glass" in artefacts:  # an empty (torn-away) region across part of the tissue
            cx, cy = rng.uniform(0.3, 0.7) * pw, rng.uniform(0.3, 0.7) * ph
            rx, ry = rng.uniform(0.12, 0.2) * pw, rng.uniform(0.12, 0.2) * ph
            hole = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            self.tissue_field[hole] = -3.0
            self.tissue_field = cv2.GaussianBlur(self.tissue_field, (0, 0), 1.0)
        # tumour nests (scc) / denser connective tissue (normal), scale about 150 um
        self.nest_field = _smooth_field(rng, (ph, pw), sigma=max(1.0, 150 / _PLAN_UM))
        tissue_plan = self.tissue_field > 0

        def in_tissue(x, y):
            return _sample_plan(tissue_plan, x, y, self.px_per_plan)

        def in_nest(x, y):
            return _sample_plan(self.nest_field, x, y, self.px_per_plan) > -0.1

        nuclei = _Objects.empty()
        self.pearls = _Objects.empty()
        self.alveoli = _Objects.empty()
        if kind == "scc":
            # crowded, large, pleomorphic, hyperchromatic tumour nuclei in nests
            x, y = _jittered_grid(rng, width, height, 15.0 * um)
            keep = in_tissue(x, y) & in_nest(x, y)
            x, y = x[keep], y[keep]
            a = rng.uniform(4.5, 7.5, x.size) * um
            nuclei = nuclei.concat(_Objects(x, y, a, a * rng.uniform(0.55, 1.0, x.size),
                                            rng.uniform(0, 180, x.size), rng.uniform(1.1, 1.6, x.size)))
            # keratin pearls: about one per (300 um)^2 of nest
            n_pearls = max(1, int(keep.sum() * (15.0 / 300) ** 2))
            if x.size:
                idx = rng.choice(x.size, size=min(n_pearls, x.size), replace=False)
                px, py = x[idx], y[idx]
                pa = rng.uniform(30, 70, px.size) * um
                self.pearls = _Objects(px, py, pa, pa * rng.uniform(0.7, 1.0, px.size),
                                       rng.uniform(0, 180, px.size), np.ones(px.size, np.float32))
            stroma_spacing, stroma_mask = 28.0, lambda x, y: in_tissue(x, y) & ~in_nest(x, y)
        else:
            # alveoli: empty air spaces separated by thin septa
            ax_, ay_ = _jittered_grid(rng, width, height, 80 * um, jitter=0.25)
            keep = in_tissue(ax_, ay_) & ~(_sample_plan(self.nest_field, ax_, ay_,
                                                        self.px_per_plan) > 1.5)
            ax_, ay_ = ax_[keep], ay_[keep]
            ar = rng.uniform(25, 33, ax_.size) * um
            # air spaces lie inside the tissue: none cut notches into its outline
            for ang in np.linspace(0, 2 * math.pi, 8, endpoint=False):
                reach = ar + 10 * um
                inside = in_tissue(ax_ + reach * math.cos(ang), ay_ + reach * math.sin(ang))
                ax_, ay_, ar = ax_[inside], ay_[inside], ar[inside]
            self.alveoli = _Objects(ax_, ay_, ar, ar * rng.uniform(0.75, 1.0, ax_.size),
                                    rng.uniform(0, 180, ax_.size), np.ones(ax_.size, np.float32))
            # small regular nuclei lining the septa (those inside air spaces are carved away)
            x, y = _jittered_grid(rng, width, height, 10.0 * um)
            keep = in_tissue(x, y)
            x, y = x[keep], y[keep]
            a = rng.uniform(2.6, 3.4, x.size) * um
            nuclei = nuclei.concat(_Objects(x, y, a, a * rng.uniform(0.8, 1.0, x.size),
                                            rng.uniform(0, 180, x.size), rng.uniform(0.9, 1.1, x.size)))
            stroma_spacing, stroma_mask = 30.0, in_tissue
        # spindle-shaped stromal nuclei along the (horizontal-ish) fibres
        x, y = _jittered_grid(rng, width, height, stroma_spacing * um)
        keep = stroma_mask(x, y)
        x, y = x[keep], y[keep]
        a = rng.uniform(3.5, 5.5, x.size) * um
        nuclei = nuclei.concat(_Objects(x, y, a, a * 0.35, rng.normal(0, 15, x.size),
                                        rng.uniform(0.8, 1.0, x.size)))
        self.nuclei = nuclei.sorted()
        self.pearls = self.pearls.sorted()
        self.alveoli = self.alveoli.sorted()

        # artefacts in level-0 pixels
        self.pen: np.ndarray | None = None
        self.fold: np.ndarray | None = None
        if "pen" in artefacts:  # a smooth stroke across a corner region
            t = np.linspace(0, 1, 40)
            x0, y0 = rng.uniform(0.1, 0.3) * width, rng.uniform(0.05, 0.2) * height
            x1, y1 = rng.uniform(0.6, 0.9) * width, rng.uniform(0.05, 0.3) * height
            wob = np.sin(t * math.pi * rng.uniform(1, 3)) * 0.05 * height
            self.pen = np.stack([x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + wob], 1)
            # a marker stroke: wider than the tissue mask's pixels (8 um), as real ones are
            self.pen_width = max(6, int(0.02 * min(width, height)), round(_PEN_WIDTH_UM * um))
        if "fold" in artefacts:  # a band of doubled tissue through the centre
            t = np.linspace(0, 1, 40)
            ang = rng.uniform(0, math.pi)
            L = 0.5 * min(width, height)
            cx, cy = width / 2, height / 2
            self.fold = np.stack([cx + (t - 0.5) * L * math.cos(ang)
                                  + np.sin(t * 6) * 0.03 * L * math.sin(ang),
                                  cy + (t - 0.5) * L * math.sin(ang)], 1)
            self.fold_width = max(6, int(min(120 * um, 0.05 * size_um * um)))
        self.scales = np.ones(3, dtype=np.float32)  # H, E, neutral: set by _equalise

    # ----------------------------------------------------------------- strip rendering
    def _upsample(self, plan: np.ndarray, y0: int, y1: int) -> np.ndarray:
        """Bilinear plan values at every pixel of rows [y0, y1): float32 (y1 - y0, width)."""
        mx = ((np.arange(self.width, dtype=np.float32) + 0.5) / self.px_per_plan - 0.5)
        my = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / self.px_per_plan - 0.5)
        map_x = np.broadcast_to(mx[None, :], (y1 - y0, self.width)).astype(np.float32)
        map_y = np.broadcast_to(my[:, None], (y1 - y0, self.width)).astype(np.float32)
        return cv2.remap(plan, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def stains(self, y0: int, y1: int) -> tuple[np.ndarray, ...]:
        """Stain amounts of rows [y0, y1) before equalisation.

        Returns: nuclear haematoxylin, background haematoxylin, eosin (float32 (h, width)), the
        tissue mask and the stained mask (tissue without air spaces), bool (h, width).
        """
        h, w = y1 - y0, self.width
        rng = np.random.default_rng([self.seed, KINDS.index(self.kind), 1000 + y0])
        um = 1.0 / self.mpp
        tissue = self._upsample(self.tissue_field, y0, y1) > 0
        nest = self._upsample(self.nest_field, y0, y1)
        # fibrous stroma: anisotropic (horizontal) noise
        fib = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0),
                               sigmaX=max(0.8, 5 * um), sigmaY=max(0.5, 0.8 * um))
        fib /= fib.std() + 1e-6
        E = (0.5 + 0.15 * fib).astype(np.float32)
        Hb = np.full((h, w), 0.05, dtype=np.float32)
        if self.kind == "scc":
            inn = nest > -0.1
            E[inn] = 0.42 + 0.04 * fib[inn]  # tumour cytoplasm: less fibrous, slightly purple
            Hb[inn] = 0.12
        else:
            dense = nest > 1.5
            E[dense] += 0.1
        # nuclei (with coarse chromatin texture)
        Hn = np.zeros((h, w), dtype=np.float32)
        self._draw(Hn, self.nuclei, y0, y1)
        chrom = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), max(0.5, 0.6 * um))
        has = Hn > 0
        Hn[has] *= 0.75 + 0.5 * chrom[has]
        E[has] *= 0.4
        Hb[has] = 0
        if len(self.pearls.cx):  # keratin pearls: concentric eosinophilic lamellae, no nuclei
            self._pearls(Hn, Hb, E, y0, y1)
        stained = tissue.copy()
        if len(self.alveoli.cx):  # air spaces: no stain at all
            air = np.zeros((h, w), dtype=np.uint8)
            self._draw(air, self.alveoli, y0, y1)
            stained &= air == 0
        for a in (Hn, Hb, E):
            a[~stained] = 0
        return Hn, Hb, E, tissue, stained

    def _draw(self, img: np.ndarray, obj: _Objects, y0: int, y1: int) -> None:
        for i in obj.rows(y0, y1):
            cv2.ellipse(img, (round(obj.cx[i] * 4), round((obj.cy[i] - y0) * 4)),
                        (max(1, round(obj.a[i] * 4)), max(1, round(obj.b[i] * 4))),
                        float(obj.angle[i]), 0, 360, float(obj.value[i]), -1, cv2.LINE_8, 2)

    def _pearls(self, Hn: np.ndarray, Hb: np.ndarray, E: np.ndarray, y0: int, y1: int) -> None:
        period = 7.0 / self.mpp
        for i in self.pearls.rows(y0, y1):
            cx, cy, a, b = (float(v[i]) for v in (self.pearls.cx, self.pearls.cy,
                                                   self.pearls.a, self.pearls.b))
            r = math.ceil(a) + 1
            xa, xb = max(0, int(cx) - r), min(self.width, int(cx) + r + 1)
            ya, yb = max(y0, int(cy) - r), min(y1, int(cy) + r + 1)
            if xa >= xb or ya >= yb:
                continue
            yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
            th = math.radians(float(self.pearls.angle[i]))
            dx, dy = xx - cx, yy - cy
            u = (dx * math.cos(th) + dy * math.sin(th)) / a
            v = (-dx * math.sin(th) + dy * math.cos(th)) / b
            rho = np.sqrt(u * u + v * v)
            inside = rho < 1
            rings = 0.8 + 0.35 * np.cos(2 * math.pi * rho * a / period)
            sl = (slice(ya - y0, yb - y0), slice(xa, xb))
            Hn[sl][inside] = 0
            Hb[sl][inside] = 0
            E[sl][inside] = rings[inside]

    def rgb(self, y0: int, y1: int) -> np.ndarray:
        """Final RGB uint8 (h, width, 3) of rows [y0, y1), artefacts included."""
        Hn, Hb, E, tissue, stained = self.stains(y0, y1)
        od = self._od(Hn, Hb, E, stained)
        if self.fold is not None:  # folded tissue is two layers thick
            band = np.zeros(E.shape, dtype=np.uint8)
            pts = np.round((self.fold - [0, y0]) * 4).astype(np.int32)
            cv2.polylines(band, [pts], False, 1, self.fold_width, cv2.LINE_8, 2)
            fold = (band > 0) & tissue
            od[fold] = od[fold] * 1.9 + 0.1
        if self.pen is not None:
            ink = np.zeros(E.shape, dtype=np.uint8)
            pts = np.round((self.pen - [0, y0]) * 4).astype(np.int32)
            cv2.polylines(ink, [pts], False, 1, self.pen_width, cv2.LINE_8, 2)
            od[ink > 0] += _INK_OD
        rng = np.random.default_rng([self.seed, KINDS.index(self.kind), 2_000_000 + y0])
        out = 255.0 * np.exp(-od)
        out += rng.normal(0, 1.5, size=(out.shape[0], out.shape[1], 1)).astype(np.float32)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _od(self, Hn: np.ndarray, Hb: np.ndarray, E: np.ndarray,
            stained: np.ndarray) -> np.ndarray:
        """Optical density (h, w, 3): Beer-Lambert sum of the scaled stains, glass and section."""
        sn, sb, se = (float(s) for s in self.scales)
        H = sn * Hn + sb * Hb
        od = H[..., None] * _H_VEC + (se * E)[..., None] * _E_VEC + _GLASS_OD
        od += stained[..., None].astype(np.float32) * (0.05 * _NEUTRAL_OD)
        return od

    def equalise(self, target: np.ndarray = TARGET_TISSUE_RGB, n_samples: int = 60000) -> None:
        """Scale the stains so the mean RGB of the tissue equals ``target`` (see module doc).

        Three scales are fitted on a sample of tissue pixels: nuclear haematoxylin (kept within
        +-30 % so nuclei keep their look), background haematoxylin and eosin.
        """
        from scipy.optimize import least_squares

        rng = np.random.default_rng([self.seed, KINDS.index(self.kind), 7])
        parts: list[list[np.ndarray]] = [[], [], [], []]
        n_strips = math.ceil(self.height / _STRIP)
        per_strip = max(1, n_samples // n_strips)
        for y0 in range(0, self.height, _STRIP):
            Hn, Hb, E, tissue, stained = self.stains(y0, min(self.height, y0 + _STRIP))
            idx = np.flatnonzero(tissue)
            if idx.size:
                pick = rng.choice(idx, size=min(per_strip, idx.size), replace=False)
                for lst, arr in zip(parts, (Hn, Hb, E, stained)):
                    lst.append(arr.ravel()[pick])
        if not parts[0]:
            return
        Hn, Hb, E, St = (np.concatenate(p)[:, None].astype(np.float64) for p in parts)

        def resid(s):
            od = ((s[0] * Hn + s[1] * Hb) * _H_VEC + s[2] * E * _E_VEC + _GLASS_OD
                  + St * 0.05 * _NEUTRAL_OD)
            return (255.0 * np.exp(-od)).mean(axis=0) - target

        sol = least_squares(resid, x0=[1.0, 1.0, 1.0], bounds=([0.7, 0.0, 0.3], [1.3, 8.0, 5.0]))
        self.scales = sol.x.astype(np.float32)
        self.residual = resid(sol.x)


DEMO_MAX_SIDE = 32768  # drawn in memory at full size: 3 GB of RGB at this side


def parse_artefacts(artefacts: str | Iterable[str]) -> tuple[str, ...]:
    """Artefact names from "pen,glass" (as the CLI and the workflow's demo.artefacts give them)
    or a sequence; one clear error for a name not in :data:`ARTEFACTS`."""
    if isinstance(artefacts, str):
        artefacts = artefacts.split(",")
    arts = tuple(a.strip() for a in artefacts if a and a.strip())
    bad = [a for a in arts if a not in ARTEFACTS]
    if bad:
        raise SimclrPathError(f"unknown artefact(s) {', '.join(bad)}; choose from "
                              f"{', '.join(ARTEFACTS)}")
    return arts


def make_demo_slide(out: str | os.PathLike, kind: str = "scc", seed: int = 0,
                    width: int = DEMO_SLIDE_SIDE, height: int = DEMO_SLIDE_SIDE,
                    mpp: float = DEMO_SLIDE_MPP, artefacts: Iterable[str] = (),
                    force: bool = False, tile: int = 256, quality: int = 90,
                    level_factor: int = 2) -> Path:
    """Write a synthetic H&E slide: pyramidal tiled JPEG TIFF with mpp metadata.

    Args:
        out: output ``.tif``/``.tiff`` path (written atomically).
        kind: ``"scc"`` or ``"normal"``.
        seed: layout seed; the same arguments always give the same file.
        width, height: level-0 size in pixels.
        mpp: level-0 microns per pixel (stored in the TIFF resolution tags).
        artefacts: any of ``"pen"`` (blue marker stroke), ``"glass"`` (an empty region where
            tissue is missing), ``"fold"`` (a band of doubled, darker tissue).
        force: overwrite an existing file.
        tile: TIFF tile side (multiple of 16).
        quality: JPEG quality.
        level_factor: downsample between pyramid levels (2, or 4 as in many Aperio scans).

    Returns:
        the path written. Levels: level 0 and reductions by ``level_factor`` until the smaller
        side is at most 1024 px, at least 3 levels.
    """
    import tifffile

    if Path(out).suffix.lower() not in (".tif", ".tiff"):
        # the file is a TIFF whatever its name: another suffix would mislead readers that go by it
        raise SimclrPathError(f"{out}: a demo slide is a pyramidal TIFF; give an --out path "
                              "ending in .tif or .tiff")
    if kind not in KINDS:
        raise SimclrPathError(f"demo slide kind {kind!r} unknown; choose one of {', '.join(KINDS)}")
    arts = parse_artefacts(artefacts)
    width, height = check_int(width, "demo slide", "width"), check_int(height, "demo slide", "height")
    mpp = check_number(mpp, "demo slide", "mpp")
    seed = check_int(seed, "demo slide", "seed")
    if min(width, height) < 256 or max(width, height) > DEMO_MAX_SIDE:
        # (the slide is drawn in memory: 1.5 TB for a side of 1e11 px)
        raise SimclrPathError(f"demo slide {width}x{height} (--width x --height) is out of range; "
                              f"use 256 to {DEMO_MAX_SIDE} px a side")
    if not (0.05 <= mpp <= 10):
        raise SimclrPathError(f"demo slide mpp {mpp} is outside 0.05-10 um/px")
    if tile % 16 or tile < 16:
        raise SimclrPathError(f"TIFF tile size must be a multiple of 16, got {tile}")
    if level_factor < 2:
        raise SimclrPathError(f"level_factor must be >= 2, got {level_factor}")
    check_can_write(out, force)

    layout = _Layout(kind, int(seed), int(width), int(height), float(mpp), arts)
    layout.equalise()
    level0 = np.empty((height, width, 3), dtype=np.uint8)
    for y0 in range(0, height, _STRIP):
        y1 = min(height, y0 + _STRIP)
        level0[y0:y1] = layout.rgb(y0, y1)
    levels = [level0]
    while len(levels) < 3 or min(levels[-1].shape[:2]) > 1024:
        prev = levels[-1]
        nh, nw = prev.shape[0] // level_factor, prev.shape[1] // level_factor
        if min(nh, nw) < 16:
            break
        levels.append(cv2.resize(prev, (nw, nh), interpolation=cv2.INTER_AREA))
    desc = (f"simclr-path demo slide: kind={kind} seed={seed} mpp={mpp} "
            f"artefacts={','.join(arts) or 'none'}")
    with atomic_output(out, force=force) as tmp, \
            tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * level0.shape[1] / lv.shape[1])  # pixels per centimetre
            tw.write(lv, tile=(tile, tile), compression="jpeg",
                     compressionargs={"level": quality}, photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1, description=desc if i == 0 else None,
                     metadata=None, software="simclr-path", maxworkers=2)
    return Path(out)
