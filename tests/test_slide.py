"""Slide access: safe ids, mpp resolution order, level choice, region reads, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SLIDES, needs

from simclr_path.demo import make_demo_slide
from simclr_path.errors import SimclrPathError
from simclr_path.slide import Slide, resolve_mpp, validate_slide_id


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_slide(tmp_path_factory.mktemp("slide") / "s.tiff", kind="scc", seed=0,
                           width=1024, height=768, mpp=0.5)


@pytest.mark.parametrize("good", ["S1", "TCGA-CR-7395.01A", "a_b-c.d", "_x"])
def test_valid_slide_ids(good):
    assert validate_slide_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "x\\y", "é", "S1\n",
                                 "a..b"])  # the samples sheet's rule too (one rule)
def test_unsafe_slide_ids(bad):
    with pytest.raises(SimclrPathError, match="not a safe file name"):
        validate_slide_id(bad)


def test_slide_mpp_far_from_the_metadata_is_warned_about():
    import warnings

    props = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}
    # a 20x value for a 40x scan: a patch spans half the pixels it needs (0.5 / 0.2527 um)
    with pytest.warns(UserWarning) as caught:
        assert resolve_mpp(props, "s.svs", slide_mpp=0.5) == (0.5, "--slide-mpp")
    (msg,) = [str(w.message) for w in caught]
    assert msg.startswith("s.svs: --slide-mpp 0.5 overrides the slide's own 0.2527 um/px "
                          "(openslide.mpp-x)") and "cover 0.51x the intended width" in msg
    # and a 40x value for a 20x scan: twice the width (the warning said 0.5x)
    with pytest.warns(UserWarning, match="cover 2x the intended width"):
        resolve_mpp({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"}, "s.svs",
                    slide_mpp=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scanner's rounding, or no metadata: nothing to say
        assert resolve_mpp(props, "s.svs", slide_mpp=0.25)[0] == 0.25
        assert resolve_mpp({}, "s.svs", slide_mpp=0.5)[0] == 0.5


@pytest.mark.parametrize("power", [10, 20, 40, 100])  # 100: beyond the range, named all the same
def test_a_magnification_given_as_slide_mpp_is_named(power):
    """--slide-mpp 40 (the objective) was taken as 40 um/px, and the error then asked for a
    target of --mpp 40 or coarser."""
    with pytest.raises(SimclrPathError, match=rf"s.svs: --slide-mpp {power} looks like an "
                                              rf"objective power \({power}x\).*the slide itself "
                                              "says 0.499 um/px"):
        resolve_mpp({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"}, "s.svs",
                    slide_mpp=float(power))
    assert resolve_mpp({}, "s.svs", slide_mpp=16.0)[0] == 16.0  # not a power: a (coarse) scan


def test_mpp_resolution_order():
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "aperio.MPP": "0.5",
             "tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter",
             "openslide.objective-power": "20"}
    with pytest.warns(UserWarning, match="overrides the slide's own 0.25 um/px"):
        assert resolve_mpp(props, "s", slide_mpp=0.3) == (0.3, "--slide-mpp")
    assert resolve_mpp(props, "s") == (0.25, "openslide.mpp-x")
    del props["openslide.mpp-x"], props["openslide.mpp-y"]
    assert resolve_mpp(props, "s") == (0.5, "aperio.MPP")
    del props["aperio.MPP"]
    assert resolve_mpp(props, "s") == (pytest.approx(0.5), "tiff.XResolution")
    props.update({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"})
    assert resolve_mpp(props, "s")[0] == pytest.approx(0.5)
    props["tiff.XResolution"] = "72"  # a default 72 dpi is no microscope resolution
    with pytest.raises(SimclrPathError) as exc:
        resolve_mpp(props, "s.svs")
    msg = str(exc.value)
    assert "s.svs" in msg and "openslide.mpp-x" in msg and "aperio.MPP" in msg
    assert "--slide-mpp" in msg and "--mpp-from-objective would use 0.5" in msg
    assert "\n" not in msg
    assert resolve_mpp(props, "s", mpp_from_objective=True) == (0.5, "openslide.objective-power")
    # Philips writes "dy dx" in millimetres, each value in double quotes
    philips = {"philips.DICOM_PIXEL_SPACING": '"0.000227" "0.000227"'}
    assert resolve_mpp(philips, "s.tiff") == (pytest.approx(0.227), "philips.DICOM_PIXEL_SPACING")
    mirax = {"mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.24",
             "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y": "0.26"}
    assert resolve_mpp(mirax, "s")[0] == pytest.approx(0.25)
    with pytest.raises(SimclrPathError, match="positive"):
        resolve_mpp({}, "s", slide_mpp=-1)


@pytest.mark.parametrize("bad", [72.0, 0.001, 0.0, float("inf"), float("nan")])
def test_slide_mpp_gets_the_plausibility_range_of_metadata(bad):
    # 72 is a screen's dpi, not a microscope's um/px: the range the metadata must be in
    with pytest.raises(SimclrPathError, match=r"--slide-mpp must be .* between 0.01 and 50 "):
        resolve_mpp({"openslide.mpp-x": "0.25"}, "s", slide_mpp=bad)
    assert resolve_mpp({}, "s", slide_mpp=0.01) == (0.01, "--slide-mpp")
    assert resolve_mpp({}, "s", slide_mpp=50) == (50.0, "--slide-mpp")


def test_level_choice_and_reads(demo):
    with Slide(demo) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "openslide.mpp-x"
        assert s.dimensions == (1024, 768) and s.level_count >= 3
        c = s.level_for(1.0)
        assert (c.level, c.level_mpp, c.scale) == (1, 1.0, 1.0)
        c = s.level_for(1.5)  # level 1 (1.0) is the coarsest still at least as fine
        assert c.level == 1 and c.scale == pytest.approx(1.5)
        c = s.level_for(0.75)
        assert c.level == 0 and c.scale == pytest.approx(1.5)
        assert s.level_for(100).level == s.level_count - 1
        with pytest.raises(SimclrPathError, match="finer than the scan"):
            s.level_for(0.25)
        img = s.read_region(100, 50, 0, 64, 32)
        assert img.shape == (32, 64, 3) and img.dtype == np.uint8
        # beyond the slide: transparent pixels become white
        out = s.read_region(1000, 740, 0, 64, 64)
        assert (out[40:, 40:] == 255).all()
        thumb, mpp = s.read_at_mpp(8.0)
        assert thumb.shape == (48, 64, 3) and mpp == pytest.approx(8.0)
        banded, _ = s.read_at_mpp(4.0, max_pixels=40 * 1024)  # band-wise equals one read
        whole, _ = s.read_at_mpp(4.0)
        assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(SimclrPathError, match="not found"):
        Slide(tmp_path / "nope.svs")
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    with pytest.raises(SimclrPathError, match="not a slide OpenSlide can read"):
        Slide(fake)


@needs(SLIDES)
def test_real_slides():
    with pytest.raises(SimclrPathError, match="--slide-mpp"):
        Slide(SLIDES / "tcga-cr-7395-01a-01-ts1.svs")
    with Slide(SLIDES / "tcga-cr-7395-01a-01-ts1.svs", slide_mpp=0.5) as s:
        assert s.mpp == 0.5 and s.level_for(1.0).level == 1
    with Slide(SLIDES / "cmu-1-small-region.svs") as s:
        assert s.mpp == pytest.approx(0.499) and s.level_for(0.5).level == 0
    with pytest.raises(SimclrPathError, match="broken.svs"):
        Slide(SLIDES / "broken.svs")


def test_direct_tiff_tiles_equal_openslide(demo):
    import openslide

    from simclr_path.slide import TiffTiles, read_rgb

    osr = openslide.OpenSlide(str(demo))
    tiles = TiffTiles.open(demo, osr, [0, 1, 2])
    assert tiles is not None
    for level in (0, 1, 2):
        ds = round(osr.level_downsamples[level])
        for x, y, w, h in ((0, 0, 100, 70), (250, 130, 300, 200), (200, 150, 200, 100)):
            ref = read_rgb(osr, x * ds, y * ds, level, w, h)  # includes area outside the image
            np.testing.assert_array_equal(tiles.read(level, x, y, w, h), ref)
    tiles.close()


@needs(SLIDES)
def test_direct_tiff_tiles_on_real_svs():
    import openslide

    from simclr_path.slide import TiffTiles, read_rgb

    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):  # JPEG, JPEG 2000
        osr = openslide.OpenSlide(str(SLIDES / name))
        tiles = TiffTiles.open(SLIDES / name, osr, [0])
        assert tiles is not None, name
        np.testing.assert_array_equal(tiles.read(0, 900, 700, 300, 260),
                                      read_rgb(osr, 900, 700, 0, 300, 260))
        tiles.close()


def test_pixels_far_from_square_stop_with_both_sizes_and_slide_mpp_overrides():
    near = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2528"}  # a scanner's rounding
    assert resolve_mpp(near, "s.svs")[0] == pytest.approx(0.25275)
    far = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "2.5"}
    with pytest.raises(SimclrPathError, match=r"s.svs: its metadata \(openslide.mpp-x .*\) gives "
                                              r"pixels of 0.25 x 2.5 um, not square.*--slide-mpp"):
        resolve_mpp(far, "s.svs")
    tiff = {"tiff.XResolution": "40000", "tiff.YResolution": "20000",
            "tiff.ResolutionUnit": "centimeter"}
    with pytest.raises(SimclrPathError, match="pixels of 0.25 x 0.5 um, not square"):
        resolve_mpp(tiff, "s.svs")
    with pytest.warns(UserWarning, match="overrides the slide's own"):
        assert resolve_mpp(far, "s.svs", slide_mpp=0.25) == (0.25, "--slide-mpp")


def test_pixels_a_few_percent_from_square_are_tiled_with_a_warning():
    """0.25 x 0.27 um pixels were averaged to 0.26 in silence: a 4 % scale error on each axis."""
    import warnings

    some = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}
    with pytest.warns(UserWarning, match=r"s.svs: its pixels are 0.25 x 0.27 um \(7.4% apart\); "
                                         r"patches use their mean, 0.26 um, so each axis is up to "
                                         r"3.8% off.*--slide-mpp"):
        assert resolve_mpp(some, "s.svs")[0] == pytest.approx(0.26)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scanner's rounding says nothing
        resolve_mpp({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2528"}, "s.svs")


def test_bands_are_bounded_by_pixels_and_alpha_is_composited_exactly(tmp_path, monkeypatch):
    """Bands of 4096 rows of a 100,000 px wide level without a pyramid were 1.6 GB of RGBA
    (5 GB as float32 while compositing): a band now holds at most max_pixels level pixels (a
    direct read adds one tile row), and compositing on white runs in 16-bit integers with float
    rounding's result."""
    from simclr_path.demo import make_demo_slide
    from simclr_path.slide import TiffTiles, read_rgb

    path = make_demo_slide(tmp_path / "w.tiff", seed=1, width=2048, height=512, mpp=0.5)
    sizes = []
    real, real_direct = Slide.read_region, TiffTiles.read
    monkeypatch.setattr(Slide, "read_region",
                        lambda self, x, y, lv, w, h: (sizes.append((lv, w, h)), real(self, x, y, lv, w, h))[1])
    monkeypatch.setattr(TiffTiles, "read", lambda self, lv, x, y, w, h: (
        sizes.append(("direct", w, h)), real_direct(self, lv, x, y, w, h))[1])
    with Slide(path) as s:
        whole, _ = s.read_at_mpp(0.7, direct=False)  # level 0, shrunk: banded
        sizes.clear()
        banded, _ = s.read_at_mpp(0.7, max_pixels=2048 * 50, direct=False)
        assert len(sizes) > 5 and all(w * h <= 2048 * 50 + 2048 for _, w, h in sizes)
        assert all(lv == 0 for lv, _, _ in sizes)  # through OpenSlide
        assert np.abs(banded.astype(int) - whole.astype(int)).mean() < 2
        # decoded from the TIFF's tiles (5x faster, the same pixels), in the same bands;
        # the whole level too (the picture at the level's own scale)
        sizes.clear()
        direct, _ = s.read_at_mpp(0.7, max_pixels=2048 * 50)
        # whole tile rows, each decoded once: the bands (~50 rows) end inside tile rows, whose
        # shared row was decoded again for the next band (1.5x the decode for ~300-row bands)
        th = s._tiles[0].tile_height(0)
        assert sizes[0] == ("direct", 96, 96)  # the reader's check against OpenSlide
        assert sizes[1:] == [("direct", 2048, min(th, 512 - top)) for top in range(0, 512, th)]
        np.testing.assert_array_equal(direct, banded)
        assert s._strip is None  # a wide level's tile row is not kept after the read
        sizes.clear()
        level1, _ = s.read_at_mpp(1.0)
        assert sizes[-1] == ("direct", 1024, 256)  # after the reader's check against OpenSlide
        assert all(kind == "direct" for kind, _, _ in sizes)
        np.testing.assert_array_equal(level1, s.read_region(0, 0, 1, 1024, 256))

    class Fake:
        def __init__(self, rgba):
            self.rgba = rgba

        def read_region(self, xy, level, wh):
            return self.rgba

    rgba = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.floor(rgba[..., :3] * a + 255 * (1 - a) + 0.5)
    np.testing.assert_array_equal(read_rgb(Fake(rgba), 0, 0, 0, 64, 64), expected)
