"""Tiling: grid, block reads equal per-patch reads, determinism, store metadata, CLI, bad input."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import openslide
import pytest
import tifffile
import yaml
from conftest import SLIDES, needs

from simclr_path.cli import main
from simclr_path.config import TileConfig
from simclr_path.demo import make_demo_slide
from simclr_path.errors import SimclrPathError
from simclr_path.slide import Slide
from simclr_path.store import PatchStore
from simclr_path.tiling import NoTissueWarning, block_cells, make_grid, tile_slide

CFG = TileConfig(mpp=1.0, patch_size=64, workers=2, block_patches=4)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_demo_slide(tmp_path_factory.mktemp("tiling") / "S1.tiff", kind="scc", seed=1,
                           width=1536, height=1024, mpp=0.5)


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """A pyramidal TIFF of empty glass (with noise) at 0.5 um/px."""
    path = tmp_path_factory.mktemp("blank") / "blank.tiff"
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(236, 3, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for i in range(3):
            tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(2e4 / 2**i, 2e4 / 2**i), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1)
            img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                             interpolation=cv2.INTER_AREA)
    return path


@pytest.fixture(scope="module")
def tiled(slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled") / "S1.h5"
    res = tile_slide(slide, out, CFG, progress=False)
    return res, PatchStore(out)


def test_grid():
    g = make_grid(1000, 600, 0.25, 0.5, 100, 100)
    assert g.f == 2 and g.xs.tolist() == [0, 200, 400, 600, 800] and g.ys.tolist() == [0, 200, 400]
    g = make_grid(1000, 600, 0.25, 0.5, 100, 50)  # overlapping
    assert g.xs.size == 9 and g.ys.size == 5
    with pytest.raises(SimclrPathError, match="larger than the slide"):
        make_grid(1000, 600, 0.25, 0.5, 400, 400)


def test_store_content_and_metadata(tiled, slide):
    res, store = tiled
    assert res.n_patches == len(store) > 20 and res.level == 1 and res.level_mpp == 1.0
    assert store.patch_size == 64 and store.slide_id == "S1" and store.mpp == 1.0
    a = store.attrs
    assert a["kind"] == "slide" and a["level0_mpp"] == 0.5 and a["stride"] == 64
    assert a["source_path"] == str(slide.resolve()) and a["mpp_source"] == "openslide.mpp-x"
    assert a["tissue.min_tissue"] == 0.5 and a["tissue.saturation_floor"] == 20
    assert a["tissue.drop_white"] is None and a["tissue.remove_pen"] is False
    c = store.coords
    assert (c % 128 == 0).all()  # level-0 grid of 64 px at 1 um/px on a 0.5 um/px slide
    assert (c[:, 0] + 128 <= 1536).all() and (c[:, 1] + 128 <= 1024).all()
    order = np.lexsort((c[:, 0], c[:, 1]))
    assert (order == np.arange(len(c))).all()  # row-major, deterministic
    assert len(np.unique(c, axis=0)) == len(c)


def test_block_reads_equal_per_patch_reads(tiled, slide):
    _, store = tiled
    osr = openslide.OpenSlide(str(slide))
    for i in np.linspace(0, len(store) - 1, 5).astype(int):
        x, y = store.coords[i]
        direct = np.asarray(osr.read_region((int(x), int(y)), 1, (64, 64)))[..., :3]
        np.testing.assert_array_equal(store[int(i)], direct)


def test_resized_block_reads_near_per_patch_reads(slide, tmp_path):
    """At 0.75 um/px (level 0 shrunk by 1.5) a block resize matches per-patch resizes."""
    cfg = TileConfig(mpp=0.75, patch_size=48, workers=1, block_patches=5)
    tile_slide(slide, tmp_path / "a.h5", cfg, progress=False)
    store = PatchStore(tmp_path / "a.h5")
    osr = openslide.OpenSlide(str(slide))
    diffs = []
    for i in np.linspace(0, len(store) - 1, 6).astype(int):
        x, y = store.coords[i]
        direct = np.asarray(osr.read_region((int(x), int(y)), 0, (72, 72)))[..., :3]
        direct = cv2.resize(direct, (48, 48), interpolation=cv2.INTER_AREA)
        diffs.append(np.abs(store[int(i)].astype(int) - direct.astype(int)).mean())
    assert max(diffs) < 6.0


def test_workers_and_block_size_do_not_change_output(slide, tiled, tmp_path):
    _, ref = tiled
    for workers, bp in ((1, 1), (2, 3)):
        cfg = TileConfig(mpp=1.0, patch_size=64, workers=workers, block_patches=bp)
        out = tmp_path / f"w{workers}_{bp}.h5"
        tile_slide(slide, out, cfg, progress=False)
        s = PatchStore(out)
        np.testing.assert_array_equal(s.coords, ref.coords)
        np.testing.assert_array_equal(s[:], ref[:])


def test_block_cells_bound_the_pixels_read_per_block():
    for bp in range(1, 11):
        for size in (8, 16, 64, 224):
            for stride in (1, size // 2, size, size + 1, 2 * size, 3 * size + 5, 1000, 10**6):
                b = block_cells(bp, size, stride)
                assert 1 <= b <= bp
                side = (b - 1) * stride + size  # target pixels per block side, gaps included
                assert side <= bp * size  # as many pixels as bp x bp abutting patches, at most
                if b < bp:  # and no smaller than that budget needs
                    assert b * stride + size > bp * size
                if stride <= size:
                    assert b == bp
    assert block_cells(8, 16, 1000) == 1  # the reviewer's case: patch by patch


def test_sparse_grid_reads_the_same_patches_in_small_blocks(slide, tmp_path, monkeypatch):
    from simclr_path import tiling

    cfg = TileConfig(mpp=1.0, patch_size=16, stride=100, min_tissue=0.0, workers=2,
                     block_patches=8)
    reads = []
    read_block = tiling._Reader.read_block

    def counted(self, rows, cols):
        reads.append(((rows[-1] - rows[0]) * 100 + 16) * ((cols[-1] - cols[0]) * 100 + 16))
        return read_block(self, rows, cols)

    monkeypatch.setattr(tiling._Reader, "read_block", counted)
    new = tile_slide(slide, tmp_path / "new.h5", cfg, progress=False)
    assert new.n_patches == 8 * 5 and max(reads) <= (8 * 16) ** 2
    monkeypatch.setattr(tiling, "block_cells", lambda bp, size, stride: bp)  # one block, as before
    reads.clear()
    tile_slide(slide, tmp_path / "old.h5", cfg, progress=False)
    assert max(reads) == (7 * 100 + 16) * (4 * 100 + 16)
    a, b = PatchStore(tmp_path / "new.h5"), PatchStore(tmp_path / "old.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a[:], b[:])


def test_openslide_reader_gives_the_same_store(slide, tiled, tmp_path):
    _, ref = tiled
    assert ref.attrs["reader"] == "tifffile"
    cfg = TileConfig(mpp=1.0, patch_size=64, workers=2, block_patches=4, tiff_direct=False)
    tile_slide(slide, tmp_path / "os.h5", cfg, progress=False)
    s = PatchStore(tmp_path / "os.h5")
    assert s.attrs["reader"] == "openslide"
    np.testing.assert_array_equal(s.coords, ref.coords)
    np.testing.assert_array_equal(s[:], ref[:])


def test_stride_min_tissue_and_filters(slide, tiled, tmp_path):
    _, ref = tiled
    over = tile_slide(slide, tmp_path / "o.h5", TileConfig(mpp=1.0, patch_size=64, stride=32),
                      progress=False)
    assert over.n_patches > 3 * len(ref) and over.stride == 32
    every = tile_slide(slide, tmp_path / "all.h5", TileConfig(mpp=1.0, patch_size=64,
                                                               min_tissue=0.0), progress=False)
    assert every.n_patches == every.n_grid == 12 * 8
    strict = tile_slide(slide, tmp_path / "s.h5", TileConfig(mpp=1.0, patch_size=64,
                                                              min_tissue=1.0), progress=False)
    assert 0 < strict.n_patches < len(ref)
    white = tile_slide(slide, tmp_path / "w.h5", TileConfig(mpp=1.0, patch_size=64,
                                                             min_tissue=0.0, drop_white=0.5),
                       progress=False)
    assert white.n_tissue == every.n_patches and white.n_patches < every.n_patches


def test_cli_line_counts_the_patches_the_filters_dropped(slide, tmp_path, capsys):
    args = ["tile", str(slide), "--mpp", "1", "--patch-size", "64", "--min-tissue", "0",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a.h5")]) == 0
    assert "filters" not in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "w.h5"), "--drop-white", "0.5"]) == 0
    out = capsys.readouterr().out
    kept = len(PatchStore(tmp_path / "w.h5"))
    assert f": {kept} patches of 64 px" in out
    assert f"96/96 grid cells with tissue; {96 - kept} dropped by the white/black/blur filters;" in out


@pytest.fixture(scope="module")
def inked(tmp_path_factory):
    """The demo workflow's pen slide: a normal slide at 0.5 um/px with a marker stroke."""
    return make_demo_slide(tmp_path_factory.mktemp("pen") / "D02.tiff", kind="normal", seed=1,
                           width=2048, height=2048, mpp=0.5, artefacts=["pen"])


def _ink_share(store):
    """(N,) fraction of each stored patch's pixels that the colour rules call ink."""
    from simclr_path.tissue import pen_mask

    return np.array([pen_mask(p).mean() for p in store[:]])


def test_remove_pen_drops_patches_that_touch_the_ink(inked, tmp_path, capsys):
    base = TileConfig(mpp=1.0, patch_size=64)
    with pytest.warns(UserWarning, match=r"inked.tiff|D02.tiff") as caught:
        plain = tile_slide(inked, tmp_path / "plain.h5", base, progress=False)
    shares = _ink_share(PatchStore(plain.path))
    assert (shares > 0.05).sum() >= 3  # ink is tiled as tissue, and the user is told
    (msg,) = [str(w.message) for w in caught]
    n = int(msg.split(": ")[1].split()[0])
    # counted by the ink itself (its 16 um margin made it 16 here, not the 13 over 25 % ink)
    assert abs(n - (shares > 0.25).sum()) <= 1 and "pen ink; --remove-pen (tile.remove_pen" in msg
    # the tissue mask loses the ink, but patches beside the stroke keep enough tissue
    beside = tile_slide(inked, tmp_path / "beside.h5", TileConfig(mpp=1.0, patch_size=64,
                                                                   remove_pen=True, max_pen=1.0),
                        progress=False)
    assert beside.n_pen == 0 and (_ink_share(PatchStore(beside.path)) > 0.01).any()
    clean = tile_slide(inked, tmp_path / "clean.h5", TileConfig(mpp=1.0, patch_size=64,
                                                                 remove_pen=True),
                       qc=tmp_path / "qc.png", progress=False)
    assert clean.n_pen >= 1 and clean.n_patches == beside.n_patches - clean.n_pen
    assert _ink_share(PatchStore(clean.path)).max() < 0.002
    store = PatchStore(clean.path)
    assert store.attrs["tissue.max_pen"] == 0.0 and store.attrs["tissue.remove_pen"] is True
    # the CLI counts them; a bad --max-pen is one line
    assert main(["tile", str(inked), "--out", str(tmp_path / "cli.h5"), "--mpp", "1",
                 "--patch-size", "64", "--remove-pen", "--no-progress"]) == 0
    assert f", {clean.n_pen} more dropped for pen ink;" in capsys.readouterr().out
    assert main(["tile", str(inked), "--out", str(tmp_path / "bad.h5"), "--remove-pen",
                 "--max-pen", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tile.max_pen" in err[0] and "[0, 1]" in err[0]
    assert not (tmp_path / "bad.h5").exists()
    # --max-pen without --remove-pen found no ink and dropped nothing, in silence
    with pytest.warns(UserWarning, match="tile.max_pen 0.5 has no effect without tile.remove_pen"), \
            pytest.warns(UserWarning, match="pen ink; --remove-pen"):
        unused = tile_slide(inked, tmp_path / "unused.h5", TileConfig(mpp=1.0, patch_size=64,
                                                                      max_pen=0.5),
                            progress=False)
    assert unused.n_pen == 0 and unused.n_patches == plain.n_patches


def test_all_patches_inked_says_so(tmp_path):
    """A slide whose only tissue lies under a stroke: the warning names the ink, not the mask."""
    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[32:480, 32:480] = (200, 120, 190)  # eosin-pink tissue in all four 256 px cells
    rgb[230:282, 16:496] = (30, 60, 150)  # a blue stroke across them, 52 px = 104 um at 2 um/px
    path = tmp_path / "ink.tiff"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", resolution=(5e3, 5e3),
                     resolutionunit="CENTIMETER")
    cfg = TileConfig(mpp=2.0, patch_size=256, remove_pen=True)
    with pytest.warns(NoTissueWarning) as caught:
        res = tile_slide(path, tmp_path / "i.h5", cfg, progress=False)
    (msg,) = [str(w.message) for w in caught]
    assert res.n_patches == 0 and res.n_pen >= 1
    assert "touch pen ink (--max-pen 0)" in msg and "raise --max-pen" in msg
    assert "tile.max_pen in the workflow" in msg  # the key a workflow user edits


def test_no_tissue_gives_empty_store_and_warning(blank, tmp_path):
    with pytest.warns(NoTissueWarning, match="no tissue"):
        res = tile_slide(blank, tmp_path / "b.h5", CFG, qc=tmp_path / "b.png", progress=False)
    assert res.n_patches == 0 and (tmp_path / "b.png").is_file()
    s = PatchStore(tmp_path / "b.h5")
    assert len(s) == 0 and s[:].shape == (0, 64, 64, 3) and s.coords.shape == (0, 2)


def test_tissue_without_a_patch_reaching_min_tissue_says_so(slide, blank, tmp_path):
    cfg = TileConfig(mpp=2.0, patch_size=128, min_tissue=1.0)  # 256 um patches: none all tissue
    with pytest.warns(NoTissueWarning) as caught:
        res = tile_slide(slide, tmp_path / "s.h5", cfg, progress=False)
    (msg,) = [str(w.message) for w in caught]
    assert res.n_patches == 0 and "no tissue found" not in msg
    assert "tissue found (0.1" in msg and "mm²) but no patch reached --min-tissue 1;" in msg
    assert "lower it or use a smaller --patch-size/--mpp" in msg
    assert "(in the workflow: tile.min_tissue, tile.patch_size, tile.mpp)" in msg
    assert "--stride" not in msg
    # a stride far above the patch size: one grid cell, in a corner; the stride is named (review)
    with pytest.warns(NoTissueWarning) as caught:
        tile_slide(slide, tmp_path / "t.h5", TileConfig(mpp=2.0, patch_size=64, stride=100000),
                   progress=False)
    (msg,) = [str(w.message) for w in caught]
    assert "--stride 100000 leaves 1 grid cell(s), lower it (tile.stride)" in msg, msg
    with pytest.warns(NoTissueWarning) as caught:  # a blank slide: no tissue at all
        tile_slide(blank, tmp_path / "b.h5", cfg, progress=False)
    (msg,) = [str(w.message) for w in caught]
    assert "no tissue found" in msg and "--min-tissue" not in msg


def test_cli_no_tissue_exit_0_with_warning_line(blank, tmp_path, capsys):
    out = tmp_path / "b.h5"
    assert main(["tile", str(blank), "--out", str(out), "--mpp", "1", "--patch-size", "64"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("simclr-path tile: warning:") and "no tissue" in err[0]
    assert out.is_file()


def test_cli_config_and_overrides(slide, tmp_path, capsys):
    conf = tmp_path / "tile.yaml"
    conf.write_text(yaml.safe_dump({"tile": {"mpp": 1.0, "patch_size": 32, "min_tissue": 0.9}}))
    out = tmp_path / "c.h5"
    qc = tmp_path / "c.png"
    rc = main(["tile", str(slide), "--out", str(out), "--config", str(conf), "--patch-size", "64",
               "--slide-id", "case-7", "--qc", str(qc), "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    s = PatchStore(out)
    assert s.patch_size == 64 and s.mpp == 1.0 and s.attrs["tissue.min_tissue"] == 0.9
    assert s.slide_id == "case-7" and qc.is_file()
    assert "patches of 64 px" in capsys.readouterr().out


def _one_error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_cli_bad_input(slide, tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["tile", str(tmp_path / "missing.svs"), "--out", str(out)]) == 2
    assert "not found" in _one_error(capsys)
    fake = tmp_path / "fake.tiff"
    fake.write_bytes(b"II*\x00garbage")
    assert main(["tile", str(fake), "--out", str(out)]) == 2
    assert "fake.tiff" in _one_error(capsys)
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "0.25"]) == 2
    err = _one_error(capsys)
    assert "finer than the scan" in err and "(in the workflow: tile.mpp)" in err
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "1", "--patch-size", "600"]) == 2
    assert "larger than the slide" in _one_error(capsys)
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "inf"]) == 2
    assert "tile.mpp must be a finite number, got inf" in _one_error(capsys)
    assert main(["tile", str(slide), "--out", str(out), "--slide-mpp", "72"]) == 2
    assert "--slide-mpp must be a positive number of level-0 microns per pixel between 0.01 " \
           "and 50" in _one_error(capsys)
    assert main(["tile", str(slide), "--out", str(out), "--slide-id", "../evil"]) == 2
    assert "safe file name" in _one_error(capsys)
    # an id from an unsafe file name: said to come from the name, with a safe one to pass
    spaced = tmp_path / "my slide (1).tiff"
    spaced.symlink_to(slide)
    assert main(["tile", str(spaced), "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "my slide (1).tiff: the slide id taken from its file name, 'my slide (1)', is not a " \
           "safe file name" in err and err.endswith("pass an id, e.g. --slide-id my_slide_1")
    assert not out.exists()
    assert main(["tile", str(tmp_path / ".hidden.tiff"), "--slide-id", "h", "--out", str(out)]) == 2
    assert "not found" in _one_error(capsys)  # an explicit id is not checked against the name
    # a QC format matplotlib cannot write fails before the slide is tiled
    assert main(["tile", str(slide), "--out", str(out), "--qc", str(tmp_path / "qc.bmp")]) == 2
    assert "cannot write .bmp figures" in _one_error(capsys)
    assert not out.exists()
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "1", "--patch-size", "64"]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "1", "--patch-size", "64"]) == 2
    assert "--force" in _one_error(capsys)
    assert out.read_bytes() == before
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "1", "--patch-size", "32",
                 "--force"]) == 0
    assert PatchStore(out).patch_size == 32
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


@needs(SLIDES)
def test_real_slides(tmp_path, capsys):
    tcga = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
    out = tmp_path / "tcga.h5"
    assert main(["tile", str(tcga), "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "tcga-cr-7395-01a-01-ts1.svs" in err and "--slide-mpp" in err and not out.exists()
    assert main(["tile", str(tcga), "--out", str(out), "--slide-mpp", "0.5", "--mpp", "1.0",
                 "--qc", str(tmp_path / "tcga.png")]) == 0
    s = PatchStore(out)
    assert len(s) > 20 and s.attrs["level0_mpp"] == 0.5 and s.attrs["mpp_source"] == "--slide-mpp"
    # tissue patches: mostly stained, not glass
    assert np.mean([(s[i].astype(int).min(axis=-1) < 200).mean() for i in range(len(s))]) > 0.5
    cmu = SLIDES / "cmu-1-small-region.svs"
    assert main(["tile", str(cmu), "--out", str(tmp_path / "cmu.h5")]) == 0
    s = PatchStore(tmp_path / "cmu.h5")
    assert len(s) > 10 and s.patch_size == 224 and s.mpp == 0.5
    assert s.attrs["level0_mpp"] == pytest.approx(0.499)
    capsys.readouterr()
    assert main(["tile", str(SLIDES / "broken.svs"), "--out", str(tmp_path / "b.h5")]) == 2
    assert "broken.svs" in _one_error(capsys) and not (tmp_path / "b.h5").exists()


def test_truncated_output_never_appears(slide, tmp_path, monkeypatch):
    """A failure while writing leaves no store under the final name."""
    from simclr_path import tiling

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiling._Reader, "read_block", boom)
    with pytest.raises(RuntimeError):
        tile_slide(slide, tmp_path / "t.h5", CFG, progress=False)
    assert not (tmp_path / "t.h5").exists() and not list(tmp_path.iterdir())


def test_h5_layout(tiled):
    _, store = tiled
    with h5py.File(store.path) as f:
        assert f["patches"].chunks == (1, 64, 64, 3) and f["coords"].dtype == np.int64


def test_store_keeps_a_thumbnail_of_the_whole_slide(tiled, slide):
    _, store = tiled
    thumb = store.thumbnail
    assert thumb.shape == (683, 1024, 3) and thumb.dtype == np.uint8  # 1536 x 1024 px, shrunk
    with Slide(slide) as sl:
        full, _ = sl.read_at_mpp(0.5)
    want = cv2.resize(full, (1024, 683), interpolation=cv2.INTER_AREA).astype(np.int16)
    assert np.abs(thumb.astype(np.int16) - want).mean() < 1.0


def test_without_qc_the_thumbnail_is_read_at_its_own_size(slide, tmp_path, monkeypatch):
    """The store's thumbnail (1024 px) may come from a coarser level than the QC picture's
    (1600 px): read at the QC size for every slide, it doubled the time to tile a 20,480 px one
    (benchmarks/README.md, Tiling)."""
    asked = []
    read = Slide.read_at_mpp
    monkeypatch.setattr(Slide, "read_at_mpp", lambda self, mpp, **kw: asked.append(mpp) or read(self, mpp, **kw))
    tile_slide(slide, tmp_path / "a.h5", CFG, progress=False)
    assert asked == [CFG.tissue_mpp, 1536 * 0.5 / 1024]  # the mask's picture, then the thumbnail's
    asked.clear()
    tile_slide(slide, tmp_path / "b.h5", CFG, progress=False, qc=tmp_path / "qc.png")
    assert asked == [CFG.tissue_mpp, 1536 * 0.5 / 1600]  # the QC picture, shrunk for the store


def test_a_slide_without_a_pyramid_is_read_once_without_qc(tmp_path):
    """Without --qc the thumbnail of a one-level slide is the tissue mask's picture (8 um/px),
    not a second pass over level 0; with --qc it is the sharper QC picture, shrunk."""
    img = np.full((1024, 1536, 3), 235, np.uint8)
    img[200:800, 300:1200] = (150, 60, 140)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, img, photometric="rgb", tile=(256, 256), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    cfg = TileConfig(mpp=1.0, patch_size=64)
    tile_slide(flat, tmp_path / "a.h5", cfg, progress=False)
    tile_slide(flat, tmp_path / "b.h5", cfg, progress=False, qc=tmp_path / "qc.png")
    assert PatchStore(tmp_path / "a.h5").thumbnail.shape == (64, 96, 3)  # 1536 px * 0.5 / 8
    sharp = PatchStore(tmp_path / "b.h5").thumbnail
    assert sharp.shape == (683, 1024, 3)
    assert (np.abs(sharp[300, 400].astype(int) - (150, 60, 140)) <= 2).all()


def test_encoded_append_roundtrip(tmp_path):
    """Patches compressed in worker threads read back exactly, compressible or not."""
    from simclr_path.store import PatchStoreWriter, encode_patch

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # LZF cannot shrink it
    flat = np.full((16, 16, 3), 200, np.uint8)
    chunks = [encode_patch(noise), encode_patch(flat)]
    assert chunks[0][1] == 1 and chunks[1][1] == 0 and len(chunks[1][0]) < flat.nbytes
    with PatchStoreWriter(tmp_path / "e.h5", 16) as w:
        w.append_encoded(chunks, [[0, 0], [16, 0]])
        w.append(flat[None], [[32, 0]])
    s = PatchStore(tmp_path / "e.h5")
    np.testing.assert_array_equal(s[:], np.stack([noise, flat, flat]))
    assert s.coords.tolist() == [[0, 0], [16, 0], [32, 0]]


def test_corrupt_tiles_fail_clearly(slide, tmp_path, capsys):
    """A slide whose header is fine but whose level-1 JPEG tiles are garbage: one clear line."""
    import shutil

    bad = tmp_path / "corrupt.tiff"
    shutil.copy(slide, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[1]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(bad, "r+b") as fh:
        for off, n in spans:
            fh.seek(off + 2)
            fh.write(b"\x13" * (n - 2))
    from simclr_path.slide import TiffTiles

    with tifffile.TiffFile(bad) as tf:
        tiles = TiffTiles(bad, {1: tf.pages[1]}, tifffile.TiffFile(bad))
        with pytest.raises(SimclrPathError, match="cannot be decoded"):
            tiles.read(1, 0, 0, 300, 300)
        tiles.close()
    out = tmp_path / "c.h5"
    rc = main(["tile", str(bad), "--out", str(out), "--mpp", "1", "--patch-size", "64"])
    assert rc == 2 and "corrupt.tiff" in _one_error(capsys) and not out.exists()


def test_slide_without_mpp(slide, tmp_path, capsys):
    """No resolution metadata: one line naming the file and --slide-mpp; works with it."""
    img = np.asarray(openslide.OpenSlide(str(slide)).read_region((0, 0), 1, (768, 512)))[..., :3]
    nompp = tmp_path / "nompp.tiff"
    with tifffile.TiffWriter(nompp) as tw:
        tw.write(np.ascontiguousarray(img), tile=(256, 256), compression="jpeg",
                 photometric="rgb")
    out = tmp_path / "n.h5"
    assert main(["tile", str(nompp), "--out", str(out), "--mpp", "1", "--patch-size", "64"]) == 2
    err = _one_error(capsys)
    assert "nompp.tiff" in err and "microns per pixel unknown" in err and "--slide-mpp" in err
    assert not out.exists()
    assert main(["tile", str(nompp), "--out", str(out), "--mpp", "2", "--patch-size", "64",
                 "--slide-mpp", "1.0"]) == 0
    s = PatchStore(out)
    assert len(s) > 0 and s.attrs["mpp_source"] == "--slide-mpp" and s.attrs["level0_mpp"] == 1.0


def test_the_python_api_never_writes_over_the_slide(slide, tmp_path):
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(slide_path\) and "
                                              "its out output"):
        tile_slide(slide, slide, CFG, force=True, progress=False)
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(slide_path\) and "
                                              "its qc output"):
        tile_slide(slide, tmp_path / "s.h5", CFG, qc=slide, force=True, progress=False)
    assert openslide.OpenSlide(str(slide)).dimensions == (1536, 1024)  # still the slide


def test_a_slide_mpp_that_is_not_a_number_is_one_error(slide, tmp_path):
    with pytest.raises(SimclrPathError, match="tile_slide: slide_mpp must be a number of level-0 "
                                              "microns per pixel, got '0.5'"):
        tile_slide(slide, tmp_path / "s.h5", CFG, slide_mpp="0.5", progress=False)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize(("level0_mpp", "mpp", "level_factor", "level", "factor"), [
    (0.499, 0.5, 2, 0, 1),    # a scanner's rounding: read natively, not resampled by 1.002
    (0.2502, 1.0, 2, 2, 1),   # a pyramid level 0.08 % off the target
    (0.2502, 0.5, 4, 0, 2),   # no level near 0.5: level 0 shrunk by exactly 2 (not 1.998)
])
def test_a_level_near_the_target_scale_is_read_without_resampling(tmp_path, level0_mpp, mpp,
                                                                   level_factor, level, factor):
    """Resampling 1796 level pixels to 1792 blended neighbours in a drifting phase: real
    patches kept half their sharpness, and it depended on the scanner's rounded mpp."""
    path = make_demo_slide(tmp_path / "s.tiff", seed=3, width=1024, height=768, mpp=level0_mpp,
                           level_factor=level_factor)
    cfg = TileConfig(mpp=mpp, patch_size=32, workers=1, block_patches=3)
    res = tile_slide(path, tmp_path / "s.h5", cfg, progress=False)
    assert res.level == level
    store = PatchStore(tmp_path / "s.h5")
    eff = store.attrs["mpp_effective"]
    assert eff == pytest.approx(level0_mpp * level_factor ** level * factor) and store.mpp == mpp
    osr = openslide.OpenSlide(str(path))
    ds = osr.level_downsamples[level]
    assert len(store) > 10
    for i in np.linspace(0, len(store) - 1, 5).astype(int):
        x, y = (int(v) for v in store.coords[i])
        assert x % round(ds * factor) == 0 and y % round(ds * factor) == 0  # on the level's pixels
        native = np.asarray(osr.read_region((x, y), level, (32 * factor,) * 2))[..., :3]
        if factor > 1:
            native = cv2.resize(native, (32, 32), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(store[int(i)], native)


def test_the_store_records_openslides_bounds_and_the_patch_footprint(slide, tmp_path, monkeypatch):
    """Viewers that crop a MIRAX or Leica slide to its scanned region (QuPath) place patches
    by level-0 coordinates less that offset: the store keeps it where the slide states it; and
    heatmaps draw a patch as wide as the tissue it holds (mpp_effective, not the target)."""
    from simclr_path import tiling
    from simclr_path.figures import patch_footprint

    class Bounded(Slide):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.properties = {**self.properties, "openslide.bounds-x": "300",
                               "openslide.bounds-y": "120"}

    monkeypatch.setattr(tiling, "Slide", Bounded)
    tile_slide(slide, tmp_path / "b.h5", CFG, progress=False)
    store = PatchStore(tmp_path / "b.h5")
    assert (store.attrs["bounds_x"], store.attrs["bounds_y"]) == (300, 120)
    monkeypatch.undo()
    tile_slide(slide, tmp_path / "plain.h5", CFG, progress=False)
    assert "bounds_x" not in PatchStore(tmp_path / "plain.h5").attrs

    class Attrs:
        patch_size, attrs = 100, {"mpp": 0.5, "mpp_effective": 0.499, "level0_mpp": 0.2495}

    assert patch_footprint(Attrs()) == pytest.approx(200.0)


def test_the_qc_title_says_a_level0_mpp_was_guessed_from_the_objective(slide, tmp_path,
                                                                         monkeypatch):
    """An mpp from the objective power (--mpp-from-objective) is a guess, as --slide-mpp is;
    the QC title gave it as if the slide stated it (review)."""
    from simclr_path import qc
    from simclr_path import slide as slide_mod

    drawn = []
    monkeypatch.setattr(qc, "save_figure",
                        lambda fig, out, force=False: (drawn.append(fig), out)[1])
    monkeypatch.setattr(slide_mod, "resolve_mpp", lambda *a, **k: (0.5, "openslide.objective-power"))
    tile_slide(slide, tmp_path / "o.h5", CFG, qc=tmp_path / "o.png", progress=False)
    title = drawn[0].axes[0].get_title()
    assert "(level-0 0.5 um/px, guessed from the objective power)" in title, title


def test_the_qc_picture_draws_the_cells_the_filters_and_the_ink_left_out(inked, tmp_path,
                                                                       monkeypatch):
    """Cells dropped by --drop-blur or for pen ink looked exactly like glass ("not enough
    tissue") on the QC picture; a user's own --slide-mpp is named in its title."""
    from simclr_path import qc

    drawn = []
    monkeypatch.setattr(qc, "save_figure",
                        lambda fig, out, force=False: (drawn.append(fig), out)[1])
    cfg = TileConfig(mpp=1.0, patch_size=64, remove_pen=True, drop_blur=1e9)  # drops every one
    with pytest.warns(NoTissueWarning):
        res = tile_slide(inked, tmp_path / "q.h5", cfg, slide_mpp=0.5, qc=tmp_path / "q.png",
                         progress=False)
    fig = drawn[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    tissue = res.n_tissue
    assert f"dropped by --drop-white/black/blur ({tissue})" in labels
    assert f"dropped for pen ink ({res.n_pen})" in labels and res.n_pen >= 1
    assert not any(lab.startswith("kept patches") for lab in labels)
    assert "from --slide-mpp" in fig.axes[0].get_title()
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = fig.legends[0].get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # the legend fits the figure
