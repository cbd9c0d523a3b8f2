"""Tissue mask and patch filters on small synthetic images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from simclr_path.config import TileConfig
from simclr_path.tissue import (
    black_fraction,
    blur_variance,
    patch_keep,
    pen_mask,
    tissue_fractions,
    tissue_mask,
    white_fraction,
)

MPP = 8.0  # um per pixel of the test images


def glass(h=200, w=200, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(238, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def with_disc(img, centre=(100, 100), r=60, colour=(200, 120, 190), hole=0):
    img = img.copy()
    cv2.circle(img, centre, r, colour, -1)
    if hole:
        cv2.circle(img, centre, hole, (238, 238, 238), -1)
    return img


def test_blank_slide_has_no_tissue():
    assert not tissue_mask(glass(), MPP).any()
    assert not tissue_mask(np.full((50, 50, 3), 240, np.uint8), MPP).any()


def test_disc_found_speck_removed_hole_filled():
    img = with_disc(glass(), hole=5)
    cv2.circle(img, (20, 20), 3, (150, 60, 160), -1)  # 28 px ~ 1800 um^2: dust-sized
    mask = tissue_mask(img, MPP)
    truth = np.zeros(mask.shape, np.uint8)
    cv2.circle(truth, (100, 100), 60, 1, -1)
    truth = truth > 0
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert not mask[15:26, 15:26].any()  # speck removed
    assert mask[100, 100]  # small hole filled
    cfg = TileConfig(min_hole_um2=0, closing_um=0)
    assert not tissue_mask(img, MPP, cfg)[100, 100]  # kept when hole filling is off


def test_closing_does_not_fill_the_glass_between_tissue_and_the_edge():
    img = glass(60, 100)
    img[6:41, 30:71] = (200, 120, 190)  # a block 6 px (48 um) below the top edge
    cfg = TileConfig(min_object_um2=0, min_hole_um2=0)  # closing only (64 um)
    mask = tissue_mask(img, MPP, cfg)
    assert mask[6:41, 30:71].mean() > 0.95
    assert mask[0:5, 30:71].mean() == 0.0  # glass above it, as glass below it is
    assert mask[46:60, 30:71].mean() == 0.0


def test_near_black_is_not_tissue():
    rng = np.random.default_rng(0)
    img = with_disc(glass())
    img[:, 180:] = np.clip(rng.normal(3, 1.5, (200, 20, 3)), 0, 255).astype(np.uint8)  # black fill
    mask = tissue_mask(img, MPP)
    assert not mask[:, 185:].any()
    assert mask[100, 100]


def test_pen_suppression():
    img = with_disc(glass())
    cv2.line(img, (10, 190), (190, 180), (40, 110, 170), 8)  # blue marker outside the tissue
    plain = tissue_mask(img, MPP)
    assert plain[185, 100]
    cleaned = tissue_mask(img, MPP, TileConfig(remove_pen=True))
    assert not cleaned[185, 100] and cleaned[100, 100]
    assert pen_mask(img)[185, 100] and not pen_mask(img)[100, 100]
    across = with_disc(glass())
    cv2.line(across, (20, 100), (180, 100), (40, 110, 170), 4)  # ink over the tissue
    assert tissue_mask(across, MPP)[100, 100]  # closing keeps it without pen removal
    assert not tissue_mask(across, MPP, TileConfig(remove_pen=True))[100, 100]


def test_tissue_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 60)) > 0.5
    level0_mpp, size = 0.5, 64.0  # 64 level-0 px = 4 mask px at 8 um/px
    xs = np.array([0, 64, 320, 900])
    ys = np.array([0, 128, 256, 576])
    got = tissue_fractions(mask, MPP, xs, ys, size, level0_mpp)
    for k, (x, y) in enumerate(zip(xs, ys)):
        f = level0_mpp / MPP
        sub = mask[int(y * f):int((y + size) * f), int(x * f):int((x + size) * f)]
        assert got[k] == pytest.approx(sub.mean())
    assert tissue_fractions(mask, MPP, np.zeros(0), np.zeros(0), size, level0_mpp).size == 0


def test_tissue_fractions_scale_each_axis_by_the_mask_shape():
    # a 1000 x 1100 level 0 whose mask came out 100 x 100 (per-axis rounding, here exaggerated):
    # its top half is tissue, so the level-0 box at y 450-550 is tissue above y 550 only
    mask = np.zeros((100, 100), bool)
    mask[:50] = True
    args = (mask, 5.0, np.array([0]), np.array([450]), 100.0, 0.5)  # 5 um/px = 0.5 um/px / 0.1
    assert tissue_fractions(*args)[0] == pytest.approx(0.5)  # the horizontal scale on both axes
    assert tissue_fractions(*args, level0_size=(1000, 1100))[0] == pytest.approx(1.0)


def test_patch_filters():
    rng = np.random.default_rng(0)
    tissue = rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)
    white = np.full((32, 32, 3), 250, np.uint8)
    black = np.full((32, 32, 3), 5, np.uint8)
    blurred = cv2.GaussianBlur(tissue, (0, 0), 6)
    p = np.stack([tissue, white, black, blurred])
    assert white_fraction(p).round(2).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert black_fraction(p).round(2).tolist() == [0.0, 0.0, 1.0, 0.0]
    v = blur_variance(p)
    assert v[0] > 100 * v[3]
    assert patch_keep(p, TileConfig()).all()
    keep = patch_keep(p, TileConfig(drop_white=0.5, drop_black=0.5, drop_blur=float(v[3]) * 2))
    assert keep.tolist() == [True, False, False, False]
