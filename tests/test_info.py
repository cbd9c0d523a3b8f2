"""simclr-path info: summaries of slide stores, imported stores and embedding files; bad files."""

from __future__ import annotations

import numpy as np
from conftest import damage_chunk, striped_store

from simclr_path.cli import main
from simclr_path.store import PatchStoreWriter, write_embeddings


def test_slide_store(tmp_path, capsys):
    path = tmp_path / "S1.h5"
    attrs = {"kind": "slide", "slide_id": "S1", "source_path": "/data/S1.svs", "mpp": 0.5,
             "level0_mpp": 0.25, "mpp_source": "aperio.MPP", "stride": 224, "level": 1,
             "level_mpp": 0.5, "tissue.min_tissue": 0.5}
    with PatchStoreWriter(path, 16, attrs=attrs) as w:
        w.append(np.zeros((3, 16, 16, 3), np.uint8), np.zeros((3, 2)))
        w.set_thumbnail(np.zeros((30, 40, 3), np.uint8))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("patch store", "slide id     S1", "/data/S1.svs", "3 x 16x16 px", "0.5 um/px",
                 "0.25 um/px (from aperio.MPP)", "224 px", "min_tissue=0.5", "40x30 px",
                 "file size"):
        assert text in out, text
    assert "exactly" not in out and "bounds" not in out  # a store from before them
    attrs.update(mpp_effective=0.499, level0_mpp=0.499, bounds_x=300, bounds_y=120)
    with PatchStoreWriter(tmp_path / "S2.h5", 16, attrs=attrs) as w:
        w.append(np.zeros((3, 16, 16, 3), np.uint8), np.zeros((3, 2)))
    assert main(["info", str(tmp_path / "S2.h5")]) == 0
    out = capsys.readouterr().out
    assert "0.5 um/px (exactly 0.499: a level that close is read without resampling)" in out
    assert "scanned region from (300, 120) px" in out


def test_imported_store(make_store, capsys):
    path = make_store(n=6, size=8, label_names=["a", "b"], labels=[0, 1, 1, 1, 0, 1],
                      groups=["g1", "g1", "g2", "g2", "g3", "g3"])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a: 2, b: 4" in out and "groups" in out and " 3\n" in out


def test_a_store_with_a_negative_label_is_one_line(make_store, capsys):
    path = make_store(n=4, size=8, label_names=["a", "b"], labels=[0, -1, 1, 0],
                      groups=["g1", "g1", "g2", "g2"])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "negative class index (-1)" in err[0]


def test_embedding_file(tmp_path, capsys):
    path = write_embeddings(tmp_path / "e.h5", np.zeros((5, 7)), np.zeros((5, 2)),
                            {"slide_id": "S2", "arch": "resnet18", "layer": "pooled",
                             "image_size": 64})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "embedding file" in out and "5 x 7" in out and "resnet18" in out


def test_bad_files(tmp_path, make_store, capsys):
    assert main(["info", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    good = make_store(n=20, size=32)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 3])
    assert main(["info", str(trunc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trunc.h5" in err[0] and "Traceback" not in err[0]
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    assert main(["info", str(tmp_path / "other.h5")]) == 2
    assert "not a simclr-path" in capsys.readouterr().err


def test_a_folder_or_a_slide_given_to_info(tmp_path, make_store, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "is a folder; give a patch store or embedding file" in capsys.readouterr().err
    slide = tmp_path / "s.tiff"
    slide.write_bytes(b"II*\x00" + b"\x00" * 64)
    assert main(["info", str(slide)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by simclr-path" in err[0] and "--force" not in err[0]
    good = make_store(n=20, size=32)
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(good.read_bytes()[:3000])
    assert main(["info", str(trunc)]) == 2
    assert "truncated or corrupt; recreate it with --force" in capsys.readouterr().err


def test_a_locked_or_unreadable_file(tmp_path, make_store, capsys, monkeypatch):
    import os

    import h5py

    good = make_store(n=2, size=8)

    def locked(*a, **k):
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 11)")

    monkeypatch.setattr(h5py, "File", locked)
    assert main(["info", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot lock the HDF5 file" in err[0] and "--force" not in err[0]

    def denied(*a, **k):  # what chmod 000 does for a user who is not root
        raise PermissionError(13, "Unable to synchronously open file (Permission denied)")

    monkeypatch.setattr(h5py, "File", denied)
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(good))
    assert main(["info", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the HDF5 file (permission denied)" in err[0]
    import pytest

    from simclr_path.errors import SimclrPathError
    from simclr_path.store import PatchStore

    with pytest.raises(SimclrPathError, match="cannot read the patch store .permission denied"):
        PatchStore(good)  # every command's reader says the same


def _edit(path, fn):
    import h5py

    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def test_crafted_files_are_one_line_not_a_traceback(make_store, capsys):
    """Attributes and datasets of types simclr-path never writes crashed info (and every
    reader): non-UTF-8 text, a group for /labels, a class index of 10**12 (bincount tried to
    allocate terabytes), text where a number belongs."""
    import h5py

    cases = [
        (lambda f: (f.__delitem__("labels"), f.create_group("labels")), "damaged HDF5 file"),
        (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.array([0, 10**12, 0, 1]))),
         "/labels holds class index 1000000000000 but label_names has 2 classes"),
        (lambda f: f.attrs.__setitem__("kind", "slide") or f.attrs.__setitem__("mpp", "abc"),
         "attribute mpp is 'abc', not a positive number of microns per pixel"),
        # shapes other code may write, checked before a read: a /coords of 1e11 rows was
        # allocated; /patches of another shape failed deep inside torch (security review)
        (lambda f: (f.__delitem__("coords"), f.create_dataset("coords", shape=(10**11, 2),
                                                               dtype="i8")),
         "/coords has shape (100000000000, 2), expected (4, 2)"),
        (lambda f: f.attrs.__setitem__("patch_size", -5), "attribute patch_size is -5"),
        (lambda f: (f.__delitem__("patches"), f.create_dataset("patches", data=np.zeros((4, 7)))),
         "/patches holds float64 of shape (4, 7), expected (N, 8, 8, 3) uint8"),
    ]
    for i, (edit, match) in enumerate(cases):
        path = make_store(n=4, size=8, name=f"c{i}.h5", label_names=["a", "b"], labels=[0, 1, 1, 0],
                          groups=["g1", "g1", "g2", "g2"])
        assert main(["info", str(_edit(path, edit))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
    # non-UTF-8 bytes in text are shown with replacement characters, not a crash
    path = _edit(make_store(n=4, size=8, name="u.h5"),
                 lambda f: f.attrs.__setitem__("slide_id", np.bytes_(b"S\xff\xfe")))
    assert main(["info", str(path)]) == 0 and "S\ufffd\ufffd" in capsys.readouterr().out
    assert h5py.is_hdf5(path)


def test_info_refuses_what_the_other_commands_refuse(tmp_path, make_store, capsys):
    """A store of a newer format and an embedding file with fewer coordinates than features were
    described as valid, while embed, classify and predict refuse them."""
    newer = _edit(make_store(n=4, size=8, name="v.h5"),
                  lambda f: f.attrs.__setitem__("format_version", 99))
    assert main(["info", str(newer)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "store format 99 is newer than this simclr-path" in err[0], err
    emb = write_embeddings(tmp_path / "e.h5", np.zeros((5, 7)), np.zeros((5, 2)),
                           {"slide_id": "S2", "arch": "resnet18"})

    def shorter(f):
        del f["coords"]
        f.create_dataset("coords", data=np.zeros((3, 2)))

    assert main(["info", str(_edit(emb, shorter))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/coords has shape (3, 2), expected (5, 2)" in err[0], err


def test_control_characters_of_a_foreign_store_are_shown_not_obeyed(tmp_path, capsys):
    """Attributes were printed raw: escape sequences cleared the terminal and a carriage
    return and newline printed a line of the file's own (security review)."""
    path = tmp_path / "S1.h5"
    attrs = {"kind": "slide", "slide_id": "S1\x1b[2J", "source_path": "/x\r\nverdict  all good",
             "mpp": 0.5, "level0_mpp": 0.25, "simclr_path_version": "0.1\x1b]0;t\x07"}
    with PatchStoreWriter(path, 16, attrs=attrs) as w:
        w.append(np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 2)))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\nverdict" not in out and "\x07" not in out
    assert "'S1\\x1b[2J'" in out and "'/x\\r\\nverdict  all good'" in out


def test_check_reads_every_chunk_and_names_the_damaged_rows(tmp_path, capsys):
    """info read only metadata: a store with a damaged chunk was described as fine, and the
    damage surfaced hours later inside pretrain or embed (review)."""
    path = tmp_path / "s.h5"
    striped_store(path)
    rng = np.random.default_rng(0)
    assert main(["info", str(path), "--check", "--no-progress"]) == 0
    assert "every patch and feature read: no damage found" in capsys.readouterr().out
    damage_chunk(path, "patches", 3)
    damage_chunk(path, "patches", 4)
    damage_chunk(path, "patches", 30)
    assert main(["info", str(path)]) == 0  # without --check: as before, metadata only
    capsys.readouterr()
    assert main(["info", str(path), "--check", "--no-progress"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and (f"{path}: damaged: patches rows 3-4, 30 cannot "
                                               "be read or hold values no writer gives") in err[0], err
    assert cap.out == ""  # no summary that reads as a clean bill of health
    emb = write_embeddings(tmp_path / "e.h5", rng.normal(size=(3000, 8)), np.zeros((3000, 2)),
                           {"slide_id": "s"})
    damage_chunk(emb, "features", 1)  # rows 1024-2047
    assert main(["info", str(emb), "--check", "--no-progress"]) == 2
    assert "damaged: features rows 1024-2047 cannot be read or hold values no writer gives" \
        in capsys.readouterr().err
    import h5py

    # one value changed to another plausible one (no NaN, nothing large): each chunk of features
    # carries a checksum, so the read fails (before them such damage went unnoticed)
    emb2 = write_embeddings(tmp_path / "e2.h5", rng.normal(size=(300, 64)), np.zeros((300, 2)),
                            {"slide_id": "s"})
    with h5py.File(emb2, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(emb2, "r+b") as fh:
        fh.seek(offset + 10 * 64 * 4)
        fh.write(np.float32(0.5).tobytes())
    assert main(["info", str(emb2), "--check", "--no-progress"]) == 2
    assert "damaged: features rows 0-299 cannot be read" in capsys.readouterr().err
    # a file without checksums (written before them): random bytes (a copy error) read as
    # floats NaN or inf about once in 256 values, but nearly always beyond 1e12 somewhere in a
    # row, as classify refuses them (review)
    with h5py.File(emb2, "a") as f:
        del f["features"]
        f.create_dataset("features", data=rng.normal(size=(300, 64)).astype(np.float32),
                         chunks=(300, 64))
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(emb2, "r+b") as fh:
        fh.seek(offset + 10 * 64 * 4)  # rows 10-13
        fh.write(np.random.default_rng(1).integers(0, 256, 4 * 64 * 4, dtype=np.uint8).tobytes())
    assert main(["info", str(emb2), "--check", "--no-progress"]) == 2
    assert "damaged: features rows 10-13 cannot be read" in capsys.readouterr().err
