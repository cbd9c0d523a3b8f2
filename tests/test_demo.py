"""Synthetic demo slides: readable pyramidal TIFFs, deterministic, same colour, different morphology."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from simclr_path.cli import main
from simclr_path.demo import make_demo_slide
from simclr_path.errors import SimclrPathError
from simclr_path.tissue import pen_mask, tissue_mask

SIZE = 1024


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    out = {}
    for kind in ("scc", "normal"):
        out[kind] = make_demo_slide(d / f"{kind}.tiff", kind=kind, seed=3, width=SIZE,
                                    height=SIZE, mpp=0.5)
    return out


def _level0(path):
    s = openslide.OpenSlide(str(path))
    img = np.asarray(s.read_region((0, 0), 0, s.dimensions))[..., :3]
    s.close()
    return img


def test_pyramidal_tiled_jpeg_with_mpp(slides):
    s = openslide.OpenSlide(str(slides["scc"]))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.level_count >= 3 and s.dimensions == (SIZE, SIZE)
    assert [round(d) for d in s.level_downsamples[:3]] == [1, 2, 4]
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    with tifffile.TiffFile(slides["scc"]) as tf:
        assert all(p.is_tiled and p.compression == tifffile.COMPRESSION.JPEG for p in tf.pages)


def test_deterministic(tmp_path, slides):
    again = make_demo_slide(tmp_path / "again.tiff", kind="scc", seed=3, width=SIZE, height=SIZE)
    other = make_demo_slide(tmp_path / "other.tiff", kind="scc", seed=4, width=SIZE, height=SIZE)

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(again) == sha(slides["scc"])
    assert sha(other) != sha(slides["scc"])


def test_same_mean_colour_different_morphology(slides):
    """Mean tissue colour cannot tell the kinds apart; nuclear size and density can."""
    means, nuc_area, nuc_cv = {}, {}, {}
    for kind, path in slides.items():
        img = _level0(path)
        small = cv2.resize(img, (SIZE // 16, SIZE // 16), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(tissue_mask(small, 8.0).astype(np.uint8), (SIZE, SIZE),
                          interpolation=cv2.INTER_NEAREST)
        mask = cv2.erode(mask, np.ones((33, 33), np.uint8)) > 0  # away from the outline
        assert mask.mean() > 0.2
        means[kind] = img[mask].mean(axis=0)
        # haematoxylin-dominated pixels: dark red channel, blue above red
        nuc = (img[..., 0] < 140) & (img[..., 2].astype(int) - img[..., 0] > 30) & mask
        _n, _, stats, _ = cv2.connectedComponentsWithStats(nuc.astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        areas = areas[areas >= 8]
        nuc_area[kind] = np.median(areas)
        nuc_cv[kind] = areas.std() / areas.mean()  # pleomorphism
    np.testing.assert_allclose(means["scc"], means["normal"], atol=6.0)
    assert nuc_area["scc"] > 2.0 * nuc_area["normal"]  # larger (and merging, crowded) nuclei
    assert nuc_cv["scc"] > nuc_cv["normal"]


def test_artefacts(tmp_path, slides):
    clean = _level0(slides["scc"])
    pen = _level0(make_demo_slide(tmp_path / "pen.tiff", kind="scc", seed=3, width=SIZE,
                                  height=SIZE, artefacts=["pen"]))
    glass = _level0(make_demo_slide(tmp_path / "glass.tiff", kind="scc", seed=3, width=SIZE,
                                    height=SIZE, artefacts="glass"))  # one text, as the CLI's
    assert pen_mask(pen).mean() > pen_mask(clean).mean() + 0.005
    sat = lambda im: (cv2.cvtColor(im, cv2.COLOR_RGB2HSV)[..., 1] > 30).mean()
    assert sat(glass) < sat(clean) - 0.02  # part of the tissue is missing


def test_bad_arguments(tmp_path):
    with pytest.raises(SimclrPathError, match="kind"):
        make_demo_slide(tmp_path / "x.tiff", kind="tumour")
    with pytest.raises(SimclrPathError, match="artefact"):
        make_demo_slide(tmp_path / "x.tiff", artefacts=["coffee"])
    with pytest.raises(SimclrPathError, match=r"100x100 \(--width x --height\) is out of range"):
        make_demo_slide(tmp_path / "x.tiff", width=100, height=100)
    # drawn in memory: a side of 1e11 px was a 1.5 TiB allocation error, not one line
    with pytest.raises(SimclrPathError, match=r"use 256 to 32768 px a side"):
        make_demo_slide(tmp_path / "x.tiff", width=99_999_999_999, height=256)
    with pytest.raises(SimclrPathError, match="seed must be an integer >= 0, got -1"):
        make_demo_slide(tmp_path / "new" / "x.tiff", seed=-1)
    # Python callers pass what the CLI never does: one clear error, not numpy's TypeError
    with pytest.raises(SimclrPathError, match="demo slide: width must be an integer >= 0, "
                                              "got 300.5"):
        make_demo_slide(tmp_path / "new" / "x.tiff", width=300.5)
    with pytest.raises(SimclrPathError, match="demo slide: mpp must be a finite number > 0, "
                                              "got '0.5'"):
        make_demo_slide(tmp_path / "new" / "x.tiff", mpp="0.5")
    assert not (tmp_path / "x.tiff").exists() and not (tmp_path / "new").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.tiff"
    args = ["demo-slide", "--out", str(out), "--kind", "normal", "--seed", "1", "--width", "512",
            "--height", "512", "--mpp", "1.0", "--artefacts", "fold"]
    assert main(args) == 0
    s = openslide.OpenSlide(str(out))
    assert s.dimensions == (512, 512) and float(s.properties["openslide.mpp-x"]) == 1.0
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert main(args + ["--force"]) == 0


@pytest.mark.parametrize("name", ["x.png", "x.svs", "x"])
def test_an_out_path_not_named_tiff_is_refused_in_one_line(tmp_path, capsys, name):
    # it used to write a TIFF under that name, which readers going by the suffix then misread
    out = tmp_path / name
    assert main(["demo-slide", "--out", str(out), "--width", "256", "--height", "256"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and ".tif or .tiff" in err[0], err
    assert not out.exists()


def test_upper_case_tif_suffix_is_accepted(tmp_path):
    out = make_demo_slide(tmp_path / "x.TIF", width=256, height=256)
    assert openslide.OpenSlide(str(out)).dimensions == (256, 256)
