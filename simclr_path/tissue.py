"""Tissue detection on a low-resolution slide image, and per-patch filters.

The mask follows the common recipe of WSI toolkits (e.g. CLAM, Lu et al. 2021, Nat. Biomed.
Eng.): stained tissue is saturated and glass is not, so Otsu's threshold (Otsu 1979) on the
median-blurred HSV saturation separates them. The threshold never goes below a floor, so a blank
slide (whose saturation is only noise) yields no tissue instead of half of its noise. Closing joins
nearby fragments; small objects (dust) and small holes (lumens) are removed
(connected components, OpenCV). Pen ink is saturated
too, so it can optionally be suppressed: blue / green ink absorbs far more red than green, which
neither stain does, and black ink is dark and neutral (see :func:`pen_mask`).
"""

from __future__ import annotations

import cv2
import numpy as np

from simclr_path.config import TileConfig

# Pen ink vs stain. Hematoxylin is blue-purple too, so hue alone (the old rule) removed nuclei-rich
# tissue. What tells them apart is how much more red than green a pixel absorbs: hematoxylin
# (optical density about 0.65 red, 0.70 green) and eosin (0.07, 0.99) absorb green at least as much
# as red, while blue, cyan and green marker inks absorb red far more. Thresholds measured on real
# H&E: 0.06 % of the pixels of the LC25000 dev patches pass at full resolution (the hue rule: 20 %),
# none of CMU-1's or TCGA's tissue once specks are dropped; ~90 % of the demo slide's blue ink
# over glass passes (tests/test_tissue.py), and with the dark-blue rule below its ink over tissue.
_PEN_MIN_SAT = 60
_PEN_OD_RATIO = 1.3  # red optical density at least this times the green one ...
_PEN_OD_DIFF = 0.3  # ... and this much above it (faint pixels have noisy ratios)
# a deep blue ink that absorbs red and green alike: blue far above red, with a hue short of the
# purple of hematoxylin (OpenCV hue 0-179: blue is 120, H&E's purples and pinks lie above ~122)
_PEN_BLUE_HUE = (90, 122)
_PEN_BLUE_MINUS_RED = 110
# ink over tissue is darker (RGB 30, 44, 132 on the demo slide: blue only 102 above red, missed,
# and patches under it were kept): there, blue at least this many times red and this far above
# it (0.03 % of the LC25000 dev patches' pixels pass; dense hematoxylin is purple, hue > 122)
_PEN_DARK_BLUE_RATIO = 3.0
_PEN_DARK_BLUE_MINUS_RED = 70
# black ink is dark and neutral; dark hematoxylin (e.g. RGB 55, 21, 56) is dark but saturated
_BLACK_MAX_VALUE = 60
_BLACK_MAX_SAT = 100
# marker strokes are far larger than this; stray pixels of a stain's extreme colour are not ink
PEN_MIN_AREA_UM2 = 10000.0
# ink is removed with this margin: a stroke's blurred edge is fainter than the colour rules
PEN_MARGIN_UM = 16.0
# Near-black pixels have a high HSV saturation ((V - min) / V) from a few levels of noise: an
# opaque black fill outside the scanned area, debris or a coverslip edge would pass as tissue.
_DARK_MAX_VALUE = 40
# Dim pixels take the same ratio from a grey cast: a dark-grey coverslip edge or shadow (RGB 50,
# 45, 45 with noise) passed as tissue. Below this V they need a real colour difference too:
# H&E is dim only where stain is dense, and dense stain is coloured (hematoxylin 55, 21, 56:
# max - min = 35)
_DIM_MAX_VALUE = 100
_DIM_MIN_CHROMA = 20
# The glass's own saturation, from the brightest pixels (the top _GLASS_SHARE by V), plus a
# margin floors the threshold where Otsu has split the glass: on a slide without tissue, Otsu
# splits tinted glass's noise (RGB 232, 218, 236: saturation ~20) and it was 93 % tissue.
# Capped so that a picture of pale tissue alone cannot set it high; clear glass measures 0-8 on
# real slides (Otsu 45-63)
_GLASS_SHARE = 0.02
_GLASS_SPLIT = 0.1  # ... when more of those brightest pixels than this pass the threshold
_GLASS_MARGIN = 15
_GLASS_FLOOR_CAP = 40
# optical density -ln(I / 255) of each 8-bit level (level 0 clipped to 1)
_OD_LUT = (-np.log(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (H, W) uint8 of an RGB uint8 (H, W, 3) image."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def pen_mask(rgb: np.ndarray, mpp: float | None = None) -> np.ndarray:
    """Pixels of blue, green or black marker ink: bool (H, W).

    With ``mpp`` (um/px of ``rgb``), ink components smaller than :data:`PEN_MIN_AREA_UM2` are
    dropped.
    """
    rgb = np.ascontiguousarray(rgb)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    r, b = rgb[..., 0].astype(np.int16), rgb[..., 2].astype(np.int16)
    od_r, od_g = _OD_LUT[rgb[..., 0]], _OD_LUT[rgb[..., 1]]
    red_absorbing = (od_r >= _PEN_OD_RATIO * od_g) & (od_r - od_g >= _PEN_OD_DIFF)
    deep_blue = (h >= _PEN_BLUE_HUE[0]) & (h < _PEN_BLUE_HUE[1]) & (
        (b - r >= _PEN_BLUE_MINUS_RED)
        | ((b >= _PEN_DARK_BLUE_RATIO * r) & (b - r >= _PEN_DARK_BLUE_MINUS_RED)))
    coloured = (s >= _PEN_MIN_SAT) & (red_absorbing | deep_blue)
    black = (v < _BLACK_MAX_VALUE) & (s < _BLACK_MAX_SAT)
    ink = coloured | black
    if mpp is not None and ink.any():
        ink = _drop_small(ink, PEN_MIN_AREA_UM2 / (mpp * mpp))
    return ink


def ink_mask(rgb: np.ndarray, mpp: float, pen: np.ndarray | None = None) -> np.ndarray:
    """Pen ink of an RGB uint8 (H, W, 3) slide image at ``mpp`` um/px with its margin: bool (H, W).

    :func:`pen_mask` without specks (``pen``, where already computed), dilated by
    :data:`PEN_MARGIN_UM`: what ``remove_pen`` takes out of the tissue mask, and what a patch
    may overlap by at most ``max_pen``.
    """
    pen = pen_mask(rgb, mpp) if pen is None else pen
    return cv2.dilate(pen.astype(np.uint8), _disk(PEN_MARGIN_UM / mpp)) > 0


def _disk(radius_px: float) -> np.ndarray:
    r = max(0, round(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def tissue_mask(rgb: np.ndarray, mpp: float, cfg: TileConfig | None = None,
                ink: np.ndarray | None = None) -> np.ndarray:
    """Boolean tissue mask (H, W) of an RGB uint8 (H, W, 3) slide image at ``mpp`` um/px.

    Steps: saturation -> median blur (``cfg.median_blur``) -> threshold max(Otsu,
    ``cfg.saturation_floor``; Otsu of the pixels without pen ink), near-black pixels excluded ->
    [pen suppression] -> closing (``cfg.closing_um``) -> remove
    objects smaller than ``cfg.min_object_um2`` and fill holes smaller than ``cfg.min_hole_um2``.
    ``ink`` is :func:`ink_mask` of the same image if already computed.
    """
    cfg = cfg or TileConfig()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"expected an RGB image (H, W, 3), got {rgb.shape}")
    sat = saturation(rgb)
    k = min(cfg.median_blur, 2 * (min(sat.shape) // 2) - 1) if min(sat.shape) > 2 else 1
    if k >= 3:
        sat = cv2.medianBlur(sat, k)
    pen = ink if ink is not None else ink_mask(rgb, mpp)
    if pen.shape != sat.shape:
        raise ValueError(f"ink mask {pen.shape} does not match the image {sat.shape}")
    # Otsu on the pixels that are not ink, with or without remove_pen: ink is far more saturated
    # than H&E, so a marker ring of 1-3 % of the image set the threshold between ink and tissue,
    # and the tissue was lost
    values = sat if pen.all() else np.ascontiguousarray(sat[~pen]).reshape(-1, 1)
    otsu, _ = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    rgb = np.ascontiguousarray(rgb)
    value = rgb.max(axis=2)  # V of HSV
    threshold = max(float(otsu), float(cfg.saturation_floor))
    glass = sat[(value >= np.quantile(value, 1 - _GLASS_SHARE)) & ~pen]
    if glass.size and (glass > threshold).mean() > _GLASS_SPLIT:
        # Otsu split the glass itself (no tissue to separate it from): floor at its saturation.
        # Only then: pale tissue that Otsu told from yellowish glass must not be lost to it
        threshold = max(threshold, min(float(np.median(glass)) + _GLASS_MARGIN, _GLASS_FLOOR_CAP))
    mask = sat > threshold
    chroma = value - rgb.min(axis=2)
    if k >= 3:  # as the saturation: the colour of a neighbourhood, not of one noisy pixel
        value, chroma = cv2.medianBlur(value, k), cv2.medianBlur(chroma, k)
    mask &= value >= _DARK_MAX_VALUE
    mask &= (value >= _DIM_MAX_VALUE) | (chroma >= _DIM_MIN_CHROMA)
    if cfg.remove_pen:
        mask &= ~pen
    else:
        pen = None  # ink is tissue here: closing may bridge it
    if cfg.closing_um > 0:
        # padded with glass: OpenCV's default border counts the outside as tissue when
        # eroding, so closing would fill the glass between tissue and the image edge
        r = max(0, round(cfg.closing_um / mpp))
        h, w = mask.shape
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disk(cfg.closing_um / mpp))[r:r + h, r:r + w] > 0
    px_area = mpp * mpp
    if cfg.min_hole_um2 > 0:
        mask = ~_drop_small(~mask, cfg.min_hole_um2 / px_area, keep_border=True)
    if pen is not None:  # closing and hole filling must not bridge a pen stroke again
        mask &= ~pen
    if cfg.min_object_um2 > 0:
        mask = _drop_small(mask, cfg.min_object_um2 / px_area)
    return mask


def _drop_small(mask: np.ndarray, min_area_px: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_area_px``.

    With ``keep_border`` components touching the image border stay (the background around the
    tissue is not a hole).
    """
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    small = stats[:, cv2.CC_STAT_AREA] < min_area_px
    small[0] = False  # label 0 is the other phase
    if keep_border:
        h, w = mask.shape
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        border = (x == 0) | (y == 0) | (x + stats[:, cv2.CC_STAT_WIDTH] >= w) | (
            y + stats[:, cv2.CC_STAT_HEIGHT] >= h)
        small &= ~border
    if not small.any():
        return mask
    return mask & ~small[labels]


def tissue_fractions(mask: np.ndarray, mask_mpp: float, xs: np.ndarray, ys: np.ndarray,
                     size: float, level0_mpp: float,
                     level0_size: tuple[int, int] | None = None) -> np.ndarray:
    """Tissue fraction of square boxes from a mask, via an integral image.

    Args:
        mask: bool (h, w) tissue mask at ``mask_mpp`` um/px.
        xs, ys: (N,) level-0 top-left corners of the boxes.
        size: box side in level-0 pixels.
        level0_mpp: level-0 um/px.
        level0_size: (width, height) of level 0 when the mask covers the whole slide: each axis
            is then scaled by its own mask/slide ratio (a mask's side is rounded to whole pixels
            per axis, so one mpp is exact for one axis only).

    Returns:
        (N,) float64 fractions in [0, 1].
    """
    if len(xs) == 0:
        return np.zeros(0)
    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)  # (h + 1, w + 1)
    fx = fy = level0_mpp / mask_mpp  # mask pixels per level-0 pixel
    if level0_size is not None:
        fx, fy = w / level0_size[0], h / level0_size[1]
    x0 = np.clip(np.round(np.asarray(xs) * fx).astype(np.int64), 0, w)
    y0 = np.clip(np.round(np.asarray(ys) * fy).astype(np.int64), 0, h)
    x1 = np.clip(np.round((np.asarray(xs) + size) * fx).astype(np.int64), 0, w)
    y1 = np.clip(np.round((np.asarray(ys) + size) * fy).astype(np.int64), 0, h)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return s / area


def white_fraction(patches: np.ndarray, threshold: int = 220) -> np.ndarray:
    """(N,) fraction of near-white pixels (every channel > ``threshold``) of (N, S, S, 3) uint8."""
    return (patches > threshold).all(axis=-1).mean(axis=(1, 2))


def black_fraction(patches: np.ndarray, threshold: int = 40) -> np.ndarray:
    """(N,) fraction of near-black pixels (every channel < ``threshold``) of (N, S, S, 3) uint8."""
    return (patches < threshold).all(axis=-1).mean(axis=(1, 2))


def blur_variance(patches: np.ndarray) -> np.ndarray:
    """(N,) variance of the Laplacian of the grey image (Pech-Pacheco et al. 2000): low = blurred."""
    out = np.empty(len(patches))
    for i, p in enumerate(patches):
        grey = cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)
        out[i] = cv2.Laplacian(grey, cv2.CV_64F).var()
    return out


def patch_keep(patches: np.ndarray, cfg: TileConfig) -> np.ndarray:
    """(N,) bool: patches that pass the optional white / black / blur filters of ``cfg``."""
    keep = np.ones(len(patches), dtype=bool)
    if len(patches) == 0:
        return keep
    if cfg.drop_white is not None:
        keep &= white_fraction(patches) <= cfg.drop_white
    if cfg.drop_black is not None:
        keep &= black_fraction(patches) <= cfg.drop_black
    if cfg.drop_blur is not None:
        keep &= blur_variance(patches) >= cfg.drop_blur
    return keep


def any_patch_filter(cfg: TileConfig) -> bool:
    return cfg.drop_white is not None or cfg.drop_black is not None or cfg.drop_blur is not None
