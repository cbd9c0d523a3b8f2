"""Tissue mask and patch filters on small synthetic images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import LC25000, SLIDES, needs

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



@pytest.mark.parametrize("border", [(50, 45, 45), (70, 66, 64), (90, 88, 84)])
def test_a_dim_grey_border_is_not_tissue_but_dense_hematoxylin_is(border):
    """A coverslip edge or shadow of dark grey has a high saturation ratio from a few levels of
    noise ((V - min) / V) and was 97 % tissue; dense hematoxylin is as dim but coloured."""
    rng = np.random.default_rng(1)
    img = with_disc(glass(), centre=(90, 100), r=50, colour=(55, 21, 56))  # dense nuclei
    noise = rng.normal(0, 6, (200, 25, 3))
    img[:, 175:] = np.clip(np.array(border) + noise, 0, 255).astype(np.uint8)
    mask = tissue_mask(img, MPP)
    assert mask[:, 180:].mean() < 0.02, mask[:, 180:].mean()
    assert mask[70:110, 70:110].all()


@pytest.mark.parametrize("tint", [(232, 218, 236), (225, 210, 232), (236, 226, 214)])
def test_tinted_glass_alone_is_not_tissue_and_tissue_on_it_is(tint):
    """On a slide without tissue, Otsu split the noise of tinted glass (saturation ~20, at the
    floor) and 93 % of it was tissue; the glass's own saturation now floors the threshold."""
    rng = np.random.default_rng(2)
    img = np.clip(np.array(tint) + rng.normal(0, 3, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(img, MPP).mean() < 0.01
    with_tissue = with_disc(img, colour=(205, 150, 200), r=50)  # pale eosin on the same glass
    mask = tissue_mask(with_tissue, MPP)
    assert mask[70:130, 70:130].all() and mask[:, :30].mean() < 0.01


@pytest.mark.parametrize(("glass_rgb", "tissue_rgb"), [((235, 232, 222), (228, 203, 213)),
                                                       ((238, 236, 229), (230, 210, 218))])
def test_pale_tissue_on_yellowish_glass_is_kept(glass_rgb, tissue_rgb):
    """The glass floor applied whatever Otsu found: pale tissue (saturation 28) on glass of
    saturation 15 was lost entirely, where Otsu had told them apart."""
    rng = np.random.default_rng(3)
    img = np.clip(np.array(glass_rgb) + rng.normal(0, 2, (200, 200, 3)), 0, 255).astype(np.uint8)
    img = with_disc(img, colour=tissue_rgb, r=50)
    mask = tissue_mask(img, MPP)
    assert mask[70:130, 70:130].mean() > 0.95 and mask[:, :30].mean() < 0.01


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


def test_pen_mask_tells_ink_from_hematoxylin():
    def ink(*colours):
        return pen_mask(np.array([colours], np.uint8))[0].tolist()

    # dark hematoxylin, bluish hematoxylin, lavender and purple nuclei, eosin, glass
    assert ink((55, 21, 56), (74, 95, 119), (150, 110, 210), (90, 40, 160), (220, 120, 190),
               (238, 238, 238)) == [False] * 6
    # cyan-blue, dark blue, deep blue and green markers, black ink
    assert ink((40, 110, 170), (20, 40, 120), (30, 30, 150), (50, 120, 80), (30, 30, 35)) == [True] * 5
    # blue ink over tissue is darker: the demo slide's stroke there (missed, and the patches
    # under it kept); dim blue-purple nuclei are not ink
    assert ink((30, 44, 132), (33, 55, 143), (41, 89, 166)) == [True] * 3
    assert ink((40, 40, 100), (60, 50, 120), (45, 30, 110)) == [False] * 3


def test_pen_mask_drops_specks_below_the_minimum_area():
    img = glass()
    img[10:14, 10:14] = (40, 110, 170)  # 16 px * 64 um2: a stray speck, not a marker stroke
    img[100:110, 20:180] = (40, 110, 170)
    assert pen_mask(img)[12, 12]
    ink = pen_mask(img, MPP)
    assert not ink[12, 12] and ink[105, 100]


@pytest.fixture(scope="module")
def demo_thumbnails(tmp_path_factory):
    """8 um/px pictures of the same synthetic SCC slide without and with a blue pen stroke."""
    from simclr_path.demo import make_demo_slide
    from simclr_path.slide import Slide

    out = []
    for arts in ([], ["pen"]):
        path = make_demo_slide(tmp_path_factory.mktemp("pen") / "demo.tiff", kind="scc", seed=0,
                               width=2048, height=2048, mpp=1.0, artefacts=arts)
        with Slide(path) as slide:
            out.append(slide.read_at_mpp(MPP))
    return out


def test_remove_pen_keeps_hematoxylin_of_the_demo_slide(demo_thumbnails):
    (thumb, mpp), _ = demo_thumbnails
    plain = tissue_mask(thumb, mpp)
    cleaned = tissue_mask(thumb, mpp, TileConfig(remove_pen=True))
    assert plain.sum() > 10000
    assert (plain & ~cleaned).sum() <= 0.002 * plain.sum()  # was 5 % of the tumour


def test_remove_pen_removes_the_demo_slides_ink(demo_thumbnails):
    (clean, _), (inked, mpp) = demo_thumbnails
    ink = np.abs(inked.astype(int) - clean.astype(int)).sum(axis=-1) > 60
    assert ink.sum() > 500
    assert tissue_mask(inked, mpp)[ink].mean() > 0.9  # without removal the ink is "tissue"
    cleaned = tissue_mask(inked, mpp, TileConfig(remove_pen=True))
    assert not cleaned[ink].any()
    near = cv2.dilate(ink.astype(np.uint8), _ink_margin(mpp)) > 0  # ink + the removal margin
    assert (tissue_mask(clean, mpp) & ~cleaned & ~near).sum() <= 20


def _ink_margin(mpp):
    r = round(24.0 / mpp)  # the 16 um dilation of the ink plus a pixel of blending
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def test_ink_mask_is_the_pen_mask_with_its_margin_and_can_be_passed_in():
    from simclr_path.tissue import PEN_MARGIN_UM, ink_mask

    img = np.full((200, 200, 3), 235, np.uint8)
    img[40:160, 40:160] = (200, 120, 190)  # tissue
    img[95:105, 20:180] = (30, 60, 150)  # a 10 px (80 um) blue stroke
    ink = ink_mask(img, MPP)
    pen = pen_mask(img, MPP)
    margin = round(PEN_MARGIN_UM / MPP)
    assert pen[100, 100] and ink[100, 100]
    assert ink.sum() > pen.sum() and ink[95 - margin, 100] and not ink[95 - margin - 1, 100]
    cfg = TileConfig(remove_pen=True)
    assert np.array_equal(tissue_mask(img, MPP, cfg, ink=ink), tissue_mask(img, MPP, cfg))
    # a precomputed mask is what is removed: none at all keeps the stroke's pixels as tissue
    assert tissue_mask(img, MPP, cfg, ink=np.zeros_like(ink))[100, 100]
    with pytest.raises(ValueError, match="does not match"):
        tissue_mask(img, MPP, cfg, ink=ink[:100])


@needs(LC25000)
def test_pen_mask_leaves_real_he_patches_alone():
    paths = sorted(LC25000.glob("*/*.jp*g"))
    assert paths
    fractions = []
    for path in paths[::2]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        fractions.append(pen_mask(rgb).mean())  # per pixel, no minimum area: the colour rule alone
    assert np.mean(fractions) < 0.002  # the hue rule flagged 20 % of these patches' pixels
    assert max(fractions) < 0.05  # and 98 % of the bluest patch


@needs(SLIDES)
@pytest.mark.parametrize("name, slide_mpp", [("cmu-1-small-region.svs", None),
                                             ("tcga-cr-7395-01a-01-ts1.svs", 0.5)])
def test_remove_pen_keeps_the_tissue_of_real_slides(name, slide_mpp):
    from simclr_path.slide import Slide

    with Slide(SLIDES / name, slide_mpp=slide_mpp) as slide:
        thumb, mpp = slide.read_at_mpp(8.0)
    plain = tissue_mask(thumb, mpp)
    cleaned = tissue_mask(thumb, mpp, TileConfig(remove_pen=True))
    assert plain.sum() > 1000
    assert (plain & ~cleaned).sum() <= 0.01 * plain.sum()  # CMU-1 lost 8 % to the hue rule


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


def test_a_marker_ring_does_not_set_the_tissue_threshold():
    """Pale H&E inside a blue marker ring of 3 % of the image: Otsu split ink from tissue (ink is
    far more saturated), so the tissue was lost, with --remove-pen as well (the ink was taken
    out only after thresholding)."""
    rng = np.random.default_rng(0)
    img = np.full((1000, 1000, 3), 235, np.uint8)
    yy, xx = np.mgrid[:1000, :1000]
    tissue = np.hypot(yy - 500, xx - 500) < 150
    img[tissue] = np.clip(np.array([205, 150, 190]) + rng.normal(0, 10, (tissue.sum(), 3)), 0,
                          255)
    ring = np.abs(np.hypot(yy - 500, (xx - 500) / 1.3) - 330) < 6
    img[ring] = (25, 55, 190)
    for remove_pen in (False, True):
        mask = tissue_mask(img, 8.0, TileConfig(remove_pen=remove_pen))
        assert (mask & tissue).sum() > 0.99 * tissue.sum(), remove_pen
        # the ink stays tissue unless it is removed
        assert (mask & ring).sum() == (0 if remove_pen else ring.sum())
