"""import-patches: class folders -> labelled store with groups and names; bad folders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from conftest import LC25000, needs

from simclr_path.cli import main
from simclr_path.errors import SimclrPathError
from simclr_path.import_patches import folder_digest, import_patches
from simclr_path.store import PatchStore


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@pytest.fixture
def tiles(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "tiles"
    imgs = {}
    for name in ("SCC/b.png", "SCC/a.png", "SCC/sub/c.tif", "normal/x.jpg", "normal/y.png"):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        _write(root / name, img)
        imgs[name] = img
    (root / "SCC" / "notes.txt").write_text("ignored")
    (root / "groups.csv").write_text(
        "path,label,group\nSCC/a.png,SCC,p1\nSCC/b.png,SCC,p1\nSCC/sub/c.tif,SCC,p2\n"
        "normal/x.jpg,normal,p3\n./normal/y.png,normal,p3\n")
    return root, imgs


def test_import_with_groups(tiles, tmp_path):
    root, imgs = tiles
    res = import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv", progress=False)
    assert res.n_patches == 5 and res.counts == {"SCC": 3, "normal": 2} and res.n_groups == 3
    s = PatchStore(tmp_path / "p.h5")
    assert s.label_names == ["SCC", "normal"] and s.labels.tolist() == [0, 0, 0, 1, 1]
    assert s.names == ["SCC/a.png", "SCC/b.png", "SCC/sub/c.tif", "normal/x.jpg", "normal/y.png"]
    assert s.groups == ["p1", "p1", "p2", "p3", "p3"]
    assert s.attrs["kind"] == "patches" and (s.coords == -1).all() and s.patch_size == 32
    # resolved, as source_path is: the path as typed means nothing from another folder
    assert s.attrs["groups_csv"] == str((root / "groups.csv").resolve())
    np.testing.assert_array_equal(s[0], imgs["SCC/a.png"])  # lossless formats are exact
    np.testing.assert_array_equal(s[2], imgs["SCC/sub/c.tif"])
    jpg = cv2.cvtColor(cv2.imread(str(root / "normal/x.jpg")), cv2.COLOR_BGR2RGB)  # lossy
    np.testing.assert_array_equal(s[3], jpg)


def test_resize_and_size_mismatch(tiles, tmp_path):
    root, _ = tiles
    _write(root / "normal" / "big.png", np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(SimclrPathError, match="--patch-size"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()
    res = import_patches(root, tmp_path / "p.h5", patch_size=16, progress=False)
    s = PatchStore(tmp_path / "p.h5")
    assert res.n_patches == 6 and s[:].shape == (6, 16, 16, 3)
    assert s.groups == [""] * 6  # no CSV: no groups


def test_bad_folders(tiles, tmp_path):
    root, _ = tiles
    with pytest.raises(SimclrPathError, match="not found"):
        import_patches(tmp_path / "nope", tmp_path / "p.h5")
    empty = tmp_path / "flat"
    empty.mkdir()
    _write(empty / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SimclrPathError, match="no class subfolders"):
        import_patches(empty, tmp_path / "p.h5")
    (root / "groups.csv").write_text("path,group\nSCC/a.png,p1\n")
    with pytest.raises(SimclrPathError, match="no group for 4 tile"):
        import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv")
    (root / "SCC" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SimclrPathError, match="bad.png: not a readable image"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()


def test_cli(tiles, tmp_path, capsys):
    root, _ = tiles
    out = tmp_path / "p.h5"
    args = ["import-patches", str(root), "--out", str(out), "--groups", str(root / "groups.csv")]
    assert main(args) == 0
    assert "5 tiles" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main(["import-patches", str(root), "--out", str(out), "--groups",
                 str(tmp_path / "missing.csv"), "--force"]) == 2
    assert "groups CSV not found" in capsys.readouterr().err
    # a folder is not "not found": it was said so although the path exists
    assert main(["import-patches", str(root), "--out", str(out), "--groups", str(root),
                 "--force"]) == 2
    assert "is a folder; give the groups CSV file" in capsys.readouterr().err


@needs(LC25000)
def test_lc25000_dev(tmp_path):
    res = import_patches(LC25000, tmp_path / "lc.h5", patch_size=32,
                         groups_csv=LC25000 / "groups.csv", progress=False)
    s = PatchStore(tmp_path / "lc.h5")
    assert len(s) == res.n_patches == 1452 and s.label_names == ["lung_aca", "lung_n", "lung_scc"]
    assert len(set(s.groups)) == 75 and res.n_groups == 75
    assert sorted(res.counts) == s.label_names and sum(res.counts.values()) == 1452
    # every group is one class
    for g in set(s.groups):
        assert len({int(lab) for lab, gg in zip(s.labels, s.groups) if gg == g}) == 1


@pytest.mark.parametrize("size", [4, 100000, -1, 0])
def test_patch_size_out_of_range_is_refused(tiles, tmp_path, size):
    root, _ = tiles
    with pytest.raises(SimclrPathError, match="--patch-size must be between 8 and 4096"):
        import_patches(root, tmp_path / "p.h5", patch_size=size, progress=False)
    assert not (tmp_path / "p.h5").exists()


@pytest.mark.parametrize(("key", "value"), [("patch_size", 64.0), ("patch_size", "64"),
                                            ("bit_depth", 12.0), ("workers", "2")])
def test_python_arguments_of_the_wrong_type_are_one_error(tiles, tmp_path, key, value):
    """64.0 or "64" failed as a TypeError deep inside OpenCV or numpy."""
    root, _ = tiles
    if key != "workers":
        with pytest.raises(SimclrPathError) as err:
            import_patches(root, tmp_path / "p.h5", progress=False, **{key: value})
        assert str(err.value) == f"import_patches: {key} must be an integer, got {value!r}"
    # (no made-up least value in the message: patch_size's range is checked in its own words)
    with pytest.raises(SimclrPathError, match=f"import_patches: {key} must be an integer"):
        import_patches(root, tmp_path / "p.h5", progress=False, **{key: value})
    assert not (tmp_path / "p.h5").exists()


def test_empty_class_folder_a_file_for_the_folder_and_clashing_groups(tiles, tmp_path):
    root, _ = tiles
    with pytest.raises(SimclrPathError, match="groups.csv: is a file; give the folder"):
        import_patches(root / "groups.csv", tmp_path / "p.h5")
    (root / "groups.csv").write_text(
        "path,group\nSCC/a.png,p1\nSCC/b.png,p1\nSCC/sub/c.tif,p2\nnormal/x.jpg,p3\n"
        "normal/y.png,p3\nSCC/a.png,p9\n")
    with pytest.raises(SimclrPathError, match="'SCC/a.png' has rows with different groups"):
        import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv", progress=False)
    (root / "adeno").mkdir()
    with pytest.raises(SimclrPathError, match="adeno: class folder has no PNG/JPEG/TIFF/BMP/WebP tiles; add"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()


def test_bmp_and_webp_are_imported_and_other_image_formats_warned_about(tiles, tmp_path, recwarn):
    from PIL import Image

    root, _ = tiles
    rng = np.random.default_rng(1)
    bmp, webp = (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(bmp).save(root / "SCC" / "d.bmp")
    rgba = np.dstack([webp, np.full((32, 32), 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # transparent corner: white, like the background of a slide
    Image.fromarray(rgba).save(root / "normal" / "z.webp", lossless=True)
    res = import_patches(root, tmp_path / "p.h5", progress=False)
    assert res.counts == {"SCC": 4, "normal": 3}
    assert not [w for w in recwarn if "unsupported" in str(w.message)]  # notes.txt: not an image
    s = PatchStore(tmp_path / "p.h5")
    np.testing.assert_array_equal(s[s.names.index("SCC/d.bmp")], bmp)
    z = s[s.names.index("normal/z.webp")]
    np.testing.assert_array_equal(z[4:, 4:], webp[4:, 4:])
    assert (z[:4, :4] == 255).all()
    # a GIF is skipped, once, with a warning that names it
    Image.fromarray(bmp).save(root / "SCC" / "e.gif")
    Image.fromarray(bmp).save(root / "normal" / "f.gif")
    with pytest.warns(UserWarning, match=r"2 image file\(s\) of unsupported formats skipped "
                                         r"\(e.g. SCC/e.gif\); import reads PNG/JPEG/TIFF/BMP/WebP"):
        assert import_patches(root, tmp_path / "p.h5", force=True, progress=False).n_patches == 7
    # a class of GIFs only: the error says why the folder looks empty
    (root / "adeno").mkdir()
    Image.fromarray(bmp).save(root / "adeno" / "g.gif")
    with pytest.raises(SimclrPathError, match=r"adeno: class folder has no .* tiles \(only 1 "
                                              r"file\(s\) of unsupported formats, e.g. adeno/g.gif"):
        import_patches(root, tmp_path / "q.h5", progress=False)


def test_unicode_names_match_their_groups_in_either_form(tmp_path):
    import unicodedata

    rng = np.random.default_rng(1)
    root = tmp_path / "tiles"
    for name in ("SCC/tumo\u0301r.png", "normal/x.png"):  # 'ó' as o + combining accent (a Mac)
        _write(root / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    csv = tmp_path / "g.csv"
    composed = unicodedata.normalize("NFC", "SCC/tumo\u0301r.png")  # as typed in a CSV
    csv.write_text(f"path,group\n{composed},p1\nnormal/x.png,p2\n", encoding="utf-8")
    res = import_patches(root, tmp_path / "p.h5", groups_csv=csv, progress=False)
    assert res.n_groups == 2 and PatchStore(tmp_path / "p.h5").groups == ["p1", "p2"]


def test_a_file_name_that_is_not_utf8_is_one_clear_error(tiles, tmp_path):
    import os

    root, _ = tiles
    bad = os.fsencode(root / "SCC") + b"/tum\xf6r.png"  # Latin-1 bytes, as from an old zip
    with open(bad, "wb") as fh:
        fh.write(cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes())
    with pytest.raises(SimclrPathError, match="file name is not valid UTF-8.*rename it"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()


def test_tiles_larger_than_the_limit_need_patch_size(tmp_path):
    root = tmp_path / "tiles"
    for name in ("SCC/a.png", "normal/b.png"):
        _write(root / name, np.zeros((4100, 4100, 3), np.uint8))
    with pytest.raises(SimclrPathError, match="tile is 4100x4100 px, larger than 4096; pass --patch-size"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    res = import_patches(root, tmp_path / "p.h5", patch_size=64, progress=False)
    assert res.patch_size == 64 and res.n_patches == 2


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    from PIL import Image

    root = tmp_path / "tiles"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 40, 120)
    rgba[:4, :, 3] = 255  # opaque top, fully transparent (black underneath) bottom
    rgba[4:, :, :3] = 0
    rgba[7, :, 3] = 128  # and one half-transparent black row
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    Image.fromarray(rgba, "RGBA").save(root / "SCC" / "a.png")
    pal = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")  # index 0 is transparent
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.resize((8, 8), Image.NEAREST).save(root / "normal" / "b.png", transparency=0)
    g16 = Image.fromarray(np.full((8, 8), 30000, np.uint16))  # 16-bit grey with a transparent value
    assert g16.mode.startswith("I")
    g16.save(root / "normal" / "c.png", transparency=0)
    s = PatchStore(import_patches(root, tmp_path / "p.h5", progress=False).path)
    assert (s[0][:4] == (200, 40, 120)).all() and (s[0][4:7] == 255).all()
    assert (s[2] == 30000 >> 8).all()  # scaled to 8 bits as OpenCV does, not clipped to white
    assert (s[0][7] == 127).all()  # 0 * 128/255 + 255 * 127/255
    assert (s[1][:4, :4] == 255).all() and (s[1][4:, 4:] == (10, 20, 30)).all()


def test_high_bit_depth_tiles_are_scaled_by_their_depth(tmp_path):
    """12-bit camera samples in a 16-bit TIFF fill the 8-bit range, as do full 16-bit ones;
    float tiles are read as 0-1."""
    want = np.array([255, 128, 0], np.uint8)
    rgb = np.array([[[4095, 2048, 0]]], np.uint16).repeat(8, 0).repeat(8, 1)  # 12-bit samples
    for depth, tile in ((12, rgb), (16, rgb * 16 + 15)):  # the same colour at 16 bits
        root = tmp_path / f"tiles{depth}"
        (root / "SCC").mkdir(parents=True)
        (root / "normal").mkdir()
        assert cv2.imwrite(str(root / "SCC" / "a.tif"), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
        assert cv2.imwrite(str(root / "normal" / "b.png"), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
        f = np.array([[[1.0, 0.5, 0.0]]], np.float32).repeat(8, 0).repeat(8, 1)
        assert cv2.imwrite(str(root / "normal" / "c.tif"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        res = import_patches(root, tmp_path / f"p{depth}.h5", progress=False)
        assert res.bit_depth == depth
        s = PatchStore(res.path)
        assert s.attrs["bit_depth"] == depth
        for i in range(3):
            assert s[i].dtype == np.uint8 and (s[i] == want).all(), (s.names[i], s[i][0, 0])


def test_one_bit_depth_for_the_whole_dataset(tmp_path):
    """A dark 12-bit tile stays dark beside a bright one (a depth per tile would brighten it
    4-fold); --bit-depth states the depth and refuses samples that do not fit it."""
    root = tmp_path / "tiles"
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    bright = np.full((8, 8, 3), 4095, np.uint16)
    dark = np.full((8, 8, 3), 1000, np.uint16)  # under 1024: alone it would pass for 10 bits
    assert cv2.imwrite(str(root / "SCC" / "dark.png"), dark)
    assert cv2.imwrite(str(root / "normal" / "bright.tif"), bright)
    res = import_patches(root, tmp_path / "p.h5", progress=False)
    s = PatchStore(res.path)
    assert (s[0] == round(1000 * 255 / 4095)).all() and (s[1] == 255).all()
    assert res.bit_depth == 12 and res.depth_tile == "normal/bright.tif"

    res = import_patches(root, tmp_path / "p14.h5", progress=False, bit_depth=14)
    assert res.depth_tile is None  # stated, not read
    s = PatchStore(res.path)
    assert res.bit_depth == 14 and (s[1] == round(4095 * 255 / 16383)).all()
    with pytest.raises(SimclrPathError, match=r"bright.tif: sample 4095 does not fit 10 bits; "
                                              r"pass a larger --bit-depth \(at least 12\)"):
        import_patches(root, tmp_path / "p10.h5", progress=False, bit_depth=10)
    assert not (tmp_path / "p10.h5").exists()
    with pytest.raises(SimclrPathError, match="--bit-depth must be between 8 and 16, got 17"):
        import_patches(root, tmp_path / "p17.h5", progress=False, bit_depth=17)


def test_cli_bit_depth(tmp_path, capsys):
    root = tmp_path / "tiles"
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    assert cv2.imwrite(str(root / "SCC" / "a.png"), np.full((8, 8, 3), 4095, np.uint16))
    assert cv2.imwrite(str(root / "normal" / "b.png"), np.full((8, 8, 3), 9, np.uint8))
    args = ["import-patches", str(root), "--out", str(tmp_path / "p.h5")]
    assert main([*args, "--bit-depth", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.png: sample 4095 does not fit 10 bits" in err[0], err
    assert main(args) == 0
    assert "16-bit samples scaled from 12 bits (the largest sample is in SCC/a.png)" in \
        capsys.readouterr().out
    assert main(["info", str(tmp_path / "p.h5")]) == 0
    assert "bit depth  16-bit samples scaled from 12 bits" in capsys.readouterr().out
    # a stated depth where no tile is 16-bit is not recorded
    assert cv2.imwrite(str(root / "SCC" / "a.png"), np.full((8, 8, 3), 9, np.uint8))
    assert main([*args, "--bit-depth", "12", "--force"]) == 0
    assert "16-bit" not in capsys.readouterr().out
    assert PatchStore(tmp_path / "p.h5").attrs["bit_depth"] is None


def test_16_bit_tiles_are_found_from_their_headers(tmp_path):
    from simclr_path.import_patches import _sixteen_bit

    cases = {"a.png": np.zeros((8, 8, 3), np.uint16), "b.tif": np.zeros((8, 8), np.uint16),
             "c.png": np.zeros((8, 8, 3), np.uint8), "d.tif": np.zeros((8, 8, 3), np.uint8),
             "e.tif": np.zeros((8, 8, 3), np.float32), "f.jpg": np.zeros((8, 8, 3), np.uint8)}
    for name, img in cases.items():
        assert cv2.imwrite(str(tmp_path / name), img)
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((8, 8, 4), np.uint16), photometric="separated")
    (tmp_path / "h.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # truncated: the import reports it
    found = {name: _sixteen_bit(tmp_path / name) for name in [*cases, "g.tif", "h.png"]}
    assert found == {"a.png": "png", "b.tif": "tiff", "c.png": None, "d.tif": None,
                     "e.tif": None, "f.jpg": None, "g.tif": None, "h.png": None}


def test_16_bit_tiff_layouts(tmp_path):
    """Planar, grey + alpha (straight or premultiplied), RGBA, big-endian and MinIsWhite 16-bit
    TIFFs (OpenCV reads planar ones wrong and grey + alpha at 8 bits) and float16 samples
    (which OpenCV refuses) give the same colours as a plain RGB TIFF."""
    root = tmp_path / "tiles"
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[...] = (2000, 1000, 3000)
    rgb[0, 0] = 4000  # the dataset's largest sample: 12 bits
    grey, opaque = rgb[..., :1], np.full((8, 8, 1), 65535, np.uint16)
    half = np.full((8, 8, 1), 32768, np.uint16)
    w = {"photometric": "rgb"}
    tifffile.imwrite(root / "SCC" / "a.tif", rgb, **w)
    tifffile.imwrite(root / "SCC" / "b.tif", np.moveaxis(rgb, -1, 0), planarconfig="separate", **w)
    tifffile.imwrite(root / "SCC" / "c.tif", rgb, byteorder=">", **w)
    tifffile.imwrite(root / "SCC" / "d.tif", np.dstack([rgb, opaque]), extrasamples=[2], **w)
    tifffile.imwrite(root / "normal" / "e.tif", np.dstack([grey, opaque]),
                     photometric="minisblack", extrasamples=[2])
    tifffile.imwrite(root / "normal" / "f.tif", np.dstack([grey // 2, half]),
                     photometric="minisblack", extrasamples=[1])  # premultiplied, half covered
    tifffile.imwrite(root / "normal" / "g.tif", grey[..., 0], photometric="miniswhite")
    tifffile.imwrite(root / "normal" / "h.tif", (rgb / 4095).astype(np.float16), **w)
    s = PatchStore(import_patches(root, tmp_path / "p.h5", progress=False).path)
    assert s.attrs["bit_depth"] == 12
    want = np.rint(np.array([2000, 1000, 3000]) * 255 / 4095)
    for i in range(4):
        assert (s[i][1, 1] == want).all(), (s.names[i], s[i][1, 1])
    assert (s[4][1, 1] == want[0]).all()
    assert (np.abs(s[5][1, 1].astype(int) - round(want[0] / 2 + 127.5)) <= 1).all()
    assert (s[6][1, 1] == 255 - want[0]).all()  # MinIsWhite: 2000 is light
    assert (np.abs(s[7][1, 1].astype(int) - want) <= 1).all()


def test_unsupported_samples_fail_clearly(tmp_path):
    root = tmp_path / "tiles"
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    assert cv2.imwrite(str(root / "SCC" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    tifffile.imwrite(root / "normal" / "b.tif", np.zeros((8, 8, 3), np.int16), photometric="rgb")
    with pytest.raises(SimclrPathError, match="b.tif: int16 samples are not supported; save the "
                                              "tile with 8- or 16-bit unsigned"):
        import_patches(root, tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()


def test_16_bit_png_with_alpha_keeps_its_depth(tmp_path):
    """12-bit samples in a 16-bit RGBA PNG are scaled by their depth, transparent pixels white."""
    root = tmp_path / "tiles"
    (root / "SCC").mkdir(parents=True)
    (root / "normal").mkdir()
    bgra = np.zeros((8, 8, 4), np.uint16)
    bgra[..., 2], bgra[..., 1], bgra[..., 3] = 4095, 2048, 65535  # R 4095, G 2048, B 0, opaque
    bgra[2:, :, 3] = 0  # bottom half transparent
    assert cv2.imwrite(str(root / "SCC" / "a.png"), bgra)
    assert cv2.imwrite(str(root / "normal" / "b.png"), np.full((8, 8, 3), 255, np.uint8))
    s = PatchStore(import_patches(root, tmp_path / "p.h5", progress=False).path)
    assert (s[0][:2] == (255, 128, 0)).all() and (s[0][2:] == 255).all(), s[0][:, 0]


def test_enlarging_tiles_warns_and_keeping_their_size_does_not(tiles, tmp_path, recwarn):
    root, _ = tiles
    with pytest.warns(UserWarning, match=r"5 tile\(s\) smaller than --patch-size 64 were "
                                         r"enlarged \(the smallest, SCC/a.png, is 32x32 px: 2x\), "
                                         r"which adds no detail.*give --patch-size 32 or less"):
        import_patches(root, tmp_path / "big.h5", patch_size=64, progress=False)
    assert PatchStore(tmp_path / "big.h5")[:].shape[1:] == (64, 64, 3)
    recwarn.clear()
    import_patches(root, tmp_path / "same.h5", patch_size=32, progress=False)
    import_patches(root, tmp_path / "small.h5", patch_size=16, progress=False)
    assert not [w for w in recwarn if "enlarged" in str(w.message)]
    # any tile, not only the first: one narrow tile further down is named, once
    _write(root / "normal" / "z.png", np.zeros((32, 20, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"1 tile\(s\) smaller than --patch-size 24 were enlarged "
                                         r"\(the smallest, normal/z.png, is 20x32 px: 1.2x\)"):
        import_patches(root, tmp_path / "mixed.h5", patch_size=24, progress=False)
    # under the smallest --patch-size there is no size to advise: the tile itself is suspect
    _write(root / "normal" / "icon.png", np.zeros((1, 1, 3), np.uint8))
    with pytest.warns(UserWarning, match=r"is 1x1 px: 24x\), which adds no detail and makes every "
                                         r"step slower; a tile under 8 px is hardly tissue: check "
                                         r"normal/icon.png \(a damaged file or an icon\?\) and "
                                         r"remove it$"):
        import_patches(root, tmp_path / "icon.h5", patch_size=24, progress=False)


def test_the_python_api_never_writes_over_its_inputs(tiles, tmp_path):
    root, _ = tiles
    groups = tmp_path / "groups.csv"
    groups.write_text((root / "groups.csv").read_text())
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(groups_csv\)"):
        import_patches(root, groups, groups_csv=groups, force=True, progress=False)
    with pytest.raises(SimclrPathError, match="is inside the input folder"):
        import_patches(root, root / "SCC" / "a.png", force=True, progress=False)
    assert groups.read_text().startswith("path,label,group")
    assert cv2.imread(str(root / "SCC" / "a.png")) is not None


def test_pixel_identical_tiles_are_warned_about_by_kind(tiles, tmp_path, recwarn):
    root, imgs = tiles
    _write(root / "normal" / "copy.png", imgs["SCC/a.png"])  # one image, two labels
    _write(root / "SCC" / "again.png", imgs["SCC/sub/c.tif"])  # same class, group p2 -> p1
    (root / "groups.csv").write_text((root / "groups.csv").read_text()
                                     + "normal/copy.png,normal,p3\nSCC/again.png,SCC,p1\n")
    res = import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv", progress=False)
    msgs = [str(w.message) for w in recwarn]
    assert res.n_duplicates == 2
    assert any("1 tile(s) are pixel-identical to a tile of another class: one image cannot carry "
               "two labels; keep the right copy (first: SCC/a.png and normal/copy.png, SCC and "
               "normal)" in m for m in msgs), msgs
    assert any("1 tile(s) are pixel-identical to a tile of another group: a grouped split can "
               "put the copies on both sides" in m and "(first: SCC/again.png and SCC/sub/c.tif, "
               "groups 'p1' and 'p2')" in m for m in msgs), msgs
    assert not any("in the same class" in m for m in msgs)
    # without groups both same-class copies are one kind: the image weighs double
    recwarn.clear()
    (root / "normal" / "copy.png").unlink()
    res = import_patches(root, tmp_path / "q.h5", progress=False)
    msgs = [str(w.message) for w in recwarn]
    assert res.n_duplicates == 1 and not any("another" in m for m in msgs)
    assert any("1 tile(s) are pixel-identical to a tile in the same class: the image weighs "
               "double" in m and "(first: SCC/again.png and SCC/sub/c.tif, SCC)" in m
               for m in msgs), msgs


def test_a_copy_in_another_class_does_not_hide_one_in_another_group(tiles, tmp_path, recwarn):
    """Three copies of one image: the first (in file order) in SCC, two in 'normal' in groups
    p3 and p5. Each later copy is checked against every earlier one, not only the first."""
    root, imgs = tiles
    _write(root / "normal" / "c1.png", imgs["SCC/a.png"])
    _write(root / "normal" / "c2.png", imgs["SCC/a.png"])
    (root / "groups.csv").write_text((root / "groups.csv").read_text()
                                     + "normal/c1.png,normal,p3\nnormal/c2.png,normal,p5\n")
    res = import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv", progress=False)
    msgs = [str(w.message) for w in recwarn]
    assert res.n_duplicates == 2  # the two copies in 'normal'
    assert any("2 tile(s) are pixel-identical to a tile of another class" in m for m in msgs), msgs
    assert any("1 tile(s) are pixel-identical to a tile of another group" in m
               and "(first: normal/c1.png and normal/c2.png, groups 'p3' and 'p5')" in m
               for m in msgs), msgs


def test_distinct_tiles_give_no_duplicate_warning(tiles, tmp_path, recwarn):
    root, _ = tiles
    res = import_patches(root, tmp_path / "p.h5", groups_csv=root / "groups.csv", progress=False)
    assert res.n_duplicates == 0
    assert not [w for w in recwarn if "pixel-identical" in str(w.message)]


def test_linked_subfolders_are_followed_and_a_loop_ends(tiles, tmp_path):
    root, _ = tiles
    ext = tmp_path / "elsewhere"
    _write(ext / "d.png", np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (root / "normal" / "more").symlink_to(ext, target_is_directory=True)
    (root / "SCC" / "sub" / "up").symlink_to(root / "SCC", target_is_directory=True)  # a loop
    res = import_patches(root, tmp_path / "p.h5", progress=False)
    names = PatchStore(tmp_path / "p.h5").names
    assert "normal/more/d.png" in names and res.counts == {"SCC": 3, "normal": 3}


def test_a_link_to_a_folder_above_is_not_followed(tiles, tmp_path):
    """A link from a class folder to the dataset folder (or above) took every class's tiles in
    under that class's label; only a pixel-identical-across-classes warning showed it."""
    root, _ = tiles
    (root / "SCC" / "sub" / "all").symlink_to(root, target_is_directory=True)
    (root / "normal" / "parent").symlink_to(tmp_path, target_is_directory=True)
    (root / "all").symlink_to(".", target_is_directory=True)  # a class folder of every class
    with pytest.warns(UserWarning, match=r"3 link\(s\) to a folder above them not followed \(e.g. "
                                         r"SCC/sub/all\)"):
        res = import_patches(root, tmp_path / "p.h5", progress=False)
    assert res.counts == {"SCC": 3, "normal": 2}
    assert folder_digest(root) == folder_digest(_without_links(root, tmp_path / "copy"))


def _without_links(root, dest):
    """A copy of ``root`` without its links, with the same file times."""
    import shutil

    return Path(shutil.copytree(root, dest, symlinks=True, ignore=lambda d, names: [
        n for n in names if (Path(d) / n).is_symlink()], copy_function=shutil.copy2))


def test_links_whose_target_is_gone_are_warned_about(tiles, tmp_path):
    """They were skipped without a word; a class of them only said it had no tiles."""
    root, _ = tiles
    (root / "normal" / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.warns(UserWarning, match=r"1 link\(s\) whose target is gone skipped \(e.g. "
                                         r"normal/gone.png\); restore their targets"):
        res = import_patches(root, tmp_path / "p.h5", progress=False)
    assert res.counts == {"SCC": 3, "normal": 2}
    (root / "empty").mkdir()
    (root / "empty" / "a.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(SimclrPathError, match=r"class folder has no .* tiles \(only 1 link\(s\) "
                                              r"whose target is gone, e.g. empty/a.png\)"):
        import_patches(root, tmp_path / "q.h5", progress=False)


def test_16_bit_tiles_are_turned_upright_as_8_bit_ones(tmp_path):
    from PIL import Image

    from simclr_path.import_patches import _read_tile

    a = np.zeros((20, 40, 3), np.uint8)
    a[:10, :20], a[10:, 20:] = (255, 0, 0), (0, 0, 255)
    upright = np.rot90(a, -1)  # orientation 6: shown turned a quarter clockwise
    a16 = a.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "o.tif", a16, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(_read_tile(tmp_path / "o.tif", None), upright)
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(a16[..., 0]).save(tmp_path / "g.png", exif=exif.tobytes())
    np.testing.assert_array_equal(_read_tile(tmp_path / "g.png", None)[..., 0], upright[..., 0])
    Image.fromarray(a).save(tmp_path / "e.png", exif=exif.tobytes())  # 8 bits: the same turn
    np.testing.assert_array_equal(_read_tile(tmp_path / "e.png", None), upright)


def test_the_folder_digest_changes_with_any_tile_below_it(tiles):
    from simclr_path.import_patches import folder_digest

    root, _ = tiles
    first = folder_digest(root)
    assert folder_digest(root) == first  # stable while nothing changes
    extra = root / "SCC" / "sub" / "new.png"
    _write(extra, np.zeros((32, 32, 3), np.uint8))
    added = folder_digest(root)
    assert added != first
    extra.write_bytes(extra.read_bytes() + b"\0")  # replaced: another size
    assert folder_digest(root) not in (first, added)
    extra.unlink()
    assert folder_digest(root) == first


def test_the_folder_digest_follows_contents_not_file_times(tiles, tmp_path, monkeypatch):
    """A copied or unpacked dataset (new modification times, same tiles) changed the digest of
    times, and the workflow imported and pretrained again (review); a tile replaced by one of
    the same size must still change it. The cache reads only new or changed files."""
    import os
    import shutil

    from simclr_path import import_patches as ip

    root, _ = tiles
    cache = tmp_path / "cache" / "tiles.json"
    first = ip.folder_digest(root, cache=cache)
    assert first == ip.folder_digest(root)  # the cache changes nothing but the reading
    copy = Path(shutil.copytree(root, tmp_path / "copy"))  # new times (copytree keeps them)
    for p in copy.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(p.stat().st_mtime_ns + 10**10,) * 2)
    assert ip.folder_digest(copy) == first
    read = []
    real = ip._file_hash
    monkeypatch.setattr(ip, "_file_hash", lambda p: (read.append(p.name), real(p))[1])
    assert ip.folder_digest(root, cache=cache) == first and read == []  # all from the cache
    tile = root / "SCC" / "a.png"
    data = bytearray(tile.read_bytes())
    data[-20] ^= 0xFF  # another tile of the same size
    tile.write_bytes(bytes(data))
    changed = ip.folder_digest(root, cache=cache)
    assert changed != first and read == ["a.png"]
    cache.write_text("{not json")  # a damaged cache: every tile is read again
    read.clear()
    assert ip.folder_digest(root, cache=cache) == changed
    assert sorted(read) == ["a.png", "b.png", "c.tif", "x.jpg", "y.png"]  # the tiles only
    # files the import does not read change nothing and are not read (review)
    (root / ".DS_Store").write_bytes(b"x")
    (root / "SCC" / "notes.txt").write_text("another note")
    (root / "SCC" / ".hidden").mkdir()
    _write(root / "SCC" / ".hidden" / "t.png", np.zeros((32, 32, 3), np.uint8))
    read.clear()
    assert ip.folder_digest(root, cache=cache) == changed and read == []


def test_listing_a_tile_set_stats_no_tile(tmp_path, monkeypatch):
    """The workflow lists an imported tile set at every DAG build: os.walk plus isfile and
    exists per file made two stats a tile here (13 s for 200,000 tiles with the digest, more
    on a network file system); directory entries know their type without one."""
    import os

    from simclr_path.import_patches import list_tiles

    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    for c in ("SCC", "normal"):
        for g in range(3):
            (tmp_path / "set" / c / f"g{g}").mkdir(parents=True)
            for i in range(20):
                (tmp_path / "set" / c / f"g{g}" / f"t{i}.png").write_bytes(png)
    (tmp_path / "set" / "SCC" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    classes, tiles = list_tiles(tmp_path / "set")
    assert classes == ["SCC", "normal"] and len(tiles) == 120
    assert len(calls) < 20, len(calls)  # the folders and the broken link, not every tile


def test_a_folder_reached_directly_and_through_a_link_keeps_its_own_name(tmp_path):
    """Listed once, under the name without the link whatever the names' order (a link named
    before the folder took its tiles, and with them the groups CSV's paths)."""
    from simclr_path.import_patches import list_tiles

    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    real = tmp_path / "set" / "SCC" / "z" / "real"
    real.mkdir(parents=True)
    (real / "r.png").write_bytes(png)
    (tmp_path / "set" / "SCC" / "alink").symlink_to(real, target_is_directory=True)
    (tmp_path / "set" / "normal").mkdir()
    (tmp_path / "set" / "normal" / "n.png").write_bytes(png)
    _, tiles = list_tiles(tmp_path / "set")
    assert [t for t, _ in tiles] == ["SCC/z/real/r.png", "normal/n.png"]


@pytest.mark.parametrize("bad", ["class", "group"])
def test_class_and_group_names_a_spreadsheet_would_run_are_refused(tmp_path, capsys, bad):
    """Class names become CSV cells and prob_<class> columns, groups the patient column: a
    leading = + - @ is a formula when the predictions are opened in a spreadsheet."""
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    scc = "=HYPERLINK(1)" if bad == "class" else "SCC"
    for c in (scc, "normal"):
        (tmp_path / "set" / c).mkdir(parents=True)
        (tmp_path / "set" / c / "t.png").write_bytes(png)
    groups = tmp_path / "groups.csv"
    groups.write_text(f"path,group\n{scc}/t.png,@g1\nnormal/t.png,g2\n")
    argv = ["import-patches", str(tmp_path / "set"), "--out", str(tmp_path / "s.h5"),
            "--groups", str(groups)]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    want = "class folder '=HYPERLINK(1)' starts with '='" if bad == "class" else \
        "row 2: group '@g1' starts with '@'"
    assert len(err) == 1 and want in err[0] and "spreadsheet" in err[0], err
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("sixteen", [False, True])
def test_a_tile_too_large_to_be_one_is_refused_from_its_header(tmp_path, capsys, monkeypatch,
                                                               sixteen):
    """A 535 KB compressed 16000 x 16000 TIFF took 8.4 GB to decode (a decompression bomb):
    the size in its header is checked first, in the 16-bit depth scan too."""
    import simclr_path.import_patches as ip

    monkeypatch.setattr(ip, "MAX_TILE_PIXELS", 64 * 64)
    decoded = []
    real = ip._decode16
    monkeypatch.setattr(ip, "_decode16", lambda *a, **k: (decoded.append(a), real(*a, **k))[1])
    for c in ("SCC", "normal"):
        (tmp_path / "set" / c).mkdir(parents=True)
    small = np.zeros((32, 32, 3), np.uint16 if sixteen else np.uint8)
    big = np.zeros((100, 100, 3), np.uint16 if sixteen else np.uint8)
    tifffile.imwrite(tmp_path / "set" / "SCC" / "a.tif", small, photometric="rgb")
    tifffile.imwrite(tmp_path / "set" / "normal" / "big.tif", big, photometric="rgb",
                     compression="zlib")
    assert main(["import-patches", str(tmp_path / "set"), "--out", str(tmp_path / "s.h5"),
                 "--patch-size", "16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "big.tif: 100 x 100 pixels is no tile" in err[0], err
    assert not any(a[0].name == "big.tif" for a in decoded)
    assert not (tmp_path / "s.h5").exists()


def test_class_folders_differing_only_in_case_are_refused(tiles, tmp_path, capsys):
    """'scc' and 'SCC' were two classes: one counted as 'the rest' of the other (review)."""
    root, imgs = tiles
    _write(root / "scc" / "d.png", imgs["SCC/a.png"])
    rc = main(["import-patches", str(root), "--out", str(tmp_path / "p.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "class folders 'SCC' and 'scc' differ only in case" in err
    assert not (tmp_path / "p.h5").exists()


def test_tiles_under_8_px_are_refused_as_tile_refuses_such_patches(tmp_path):
    """2 px tiles made a store that pretrain then asked to embed at --image-size 2 or less,
    which it refuses (review)."""
    for name in ("SCC/a.png", "normal/b.png"):
        _write(tmp_path / "t" / name, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(SimclrPathError, match=r"a.png: tile is 2x2 px, smaller than 8; pass "
                                              r"--patch-size to enlarge every tile"):
        import_patches(tmp_path / "t", tmp_path / "p.h5", progress=False)
    assert not (tmp_path / "p.h5").exists()
    import_patches(tmp_path / "t", tmp_path / "p.h5", patch_size=8, progress=False)
