from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
from conftest import damage_chunk, striped_store

from simclr_path.errors import SimclrPathError
from simclr_path.store import EmbeddingStore, PatchStore, PatchStoreWriter, write_embeddings


def test_roundtrip_index_slice_and_metadata(make_store):
    path = make_store(n=10, size=16)
    s = PatchStore(path)
    assert len(s) == 10 and s.patch_size == 16 and s.slide_id == "S1" and s.mpp == 0.5
    assert s[3].shape == (16, 16, 3) and s[3].dtype == np.uint8
    np.testing.assert_array_equal(s[2:5], np.stack([s[2], s[3], s[4]]))
    np.testing.assert_array_equal(s[np.array([4, 1, 4])], np.stack([s[4], s[1], s[4]]))
    np.testing.assert_array_equal(s[-1], s[9])
    mask = np.zeros(10, bool)
    mask[[2, 7, 8]] = True  # a mask reads its True rows (as int64 it read rows 0 and 1)
    np.testing.assert_array_equal(s[mask], np.stack([s[2], s[7], s[8]]))
    with pytest.raises(IndexError, match="mask of shape"):
        s[mask[:5]]
    with pytest.raises(IndexError, match="integers or a boolean mask"):
        s[np.array([1.5, 2.0])]
    assert s.coords.shape == (10, 2) and s.coords.dtype == np.int64
    assert s.labels is None and s.groups is None
    with h5py.File(path) as f:
        assert f["patches"].chunks == (1, 16, 16, 3)
        assert f["patches"].compression == "lzf"
    with pytest.raises(IndexError):
        s[10]


def test_labels_groups_and_names(make_store):
    path = make_store(n=4, size=8, label_names=["a", "b"], labels=[0, 1, 1, 0], groups=["g1", "g1", "g2", "g2"])
    s = PatchStore(path)
    assert s.label_names == ["a", "b"]
    assert s.labels.tolist() == [0, 1, 1, 0] and s.groups == ["g1", "g1", "g2", "g2"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError), PatchStoreWriter(out, patch_size=8) as w:
        w.append(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2)))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_finishing_leaves_no_temporary_file(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot store this attribute")

    with pytest.raises(RuntimeError, match="cannot store"), \
            PatchStoreWriter(tmp_path / "x.h5", patch_size=8, attrs={"bad": Unprintable()}) as w:
        w.append(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_numpy_bool_attributes_round_trip(tmp_path):
    with PatchStoreWriter(tmp_path / "x.h5", patch_size=8, attrs={"flag": np.bool_(False)}):
        pass
    assert PatchStore(tmp_path / "x.h5").attrs["flag"] is False


def test_none_and_the_string_none_are_told_apart(tmp_path):
    attrs = {"slide_id": "none", "mpp": None, "names": ["none", "b"]}
    with PatchStoreWriter(tmp_path / "x.h5", patch_size=8, attrs=attrs):
        pass
    write_embeddings(tmp_path / "e.h5", np.zeros((1, 2), np.float32), np.zeros((1, 2)), attrs=attrs)
    for got in (PatchStore(tmp_path / "x.h5").attrs, EmbeddingStore(tmp_path / "e.h5").attrs):
        assert got["slide_id"] == "none" and got["mpp"] is None and got["names"] == ["none", "b"]
    for name in ("x.h5", "e.h5"):  # a store of format 1 wrote None as "none"
        with h5py.File(tmp_path / name, "r+") as f:
            f.attrs["format_version"], f.attrs["mpp"] = 1, "none"
    assert PatchStore(tmp_path / "x.h5").attrs["mpp"] is None
    assert EmbeddingStore(tmp_path / "e.h5").attrs["mpp"] is None
    with h5py.File(tmp_path / "e.h5", "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(SimclrPathError, match="embedding format 3 is newer .* upgrade simclr-path"):
        EmbeddingStore(tmp_path / "e.h5")
    for value, match in ((3, "store format 3 is newer"), ("two", "format_version 'two' is not a version")):
        with h5py.File(tmp_path / "x.h5", "r+") as f:
            f.attrs["format_version"] = value
        with pytest.raises(SimclrPathError, match=match):
            PatchStore(tmp_path / "x.h5")


def test_existing_output_needs_force(make_store):
    path = make_store(n=2, size=8)
    with pytest.raises(SimclrPathError, match="--force"), PatchStoreWriter(path, patch_size=8):
        pass
    with PatchStoreWriter(path, patch_size=8, force=True) as w:
        w.append(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 2)))
    assert len(PatchStore(path)) == 1


def test_truncated_and_foreign_files_fail_clearly(make_store, tmp_path):
    path = make_store(n=8, size=16)
    bad = tmp_path / "trunc.h5"
    bad.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(SimclrPathError, match="trunc.h5.*may be truncated: recreate it"):
        PatchStore(bad)
    # a slide given where its store belongs: not "truncated", whose advice would not help
    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"II*\x00" + bytes(2000))
    with pytest.raises(SimclrPathError, match=r"slide.svs: not an HDF5 file; give the patch "
                                              r"store \(.h5\).*'simclr-path tile'") as e:
        PatchStore(slide)
    assert "may be truncated" not in str(e.value)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1]
    with pytest.raises(SimclrPathError, match="not a simclr-path patch store"):
        PatchStore(other)
    with pytest.raises(SimclrPathError, match="not found"):
        PatchStore(tmp_path / "missing.h5")
    with pytest.raises(SimclrPathError, match="is a folder; give the patch store file"):
        PatchStore(tmp_path)


def test_embedding_roundtrip(tmp_path):
    feats = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    p = write_embeddings(tmp_path / "e.h5", feats, np.zeros((5, 2)), {"slide_id": "A", "layer": "pooled"},
                         labels=np.array([0, 1, 0, 1, 1]), groups=list("abcde"), label_names=["x", "y"])
    e = EmbeddingStore(p)
    np.testing.assert_array_equal(e.features, feats)
    assert e.slide_id == "A" and e.label_names == ["x", "y"] and e.groups == list("abcde")
    assert e.labels.tolist() == [0, 1, 0, 1, 1]


def test_a_file_lock_failure_is_not_called_truncation(make_store, monkeypatch):
    path = make_store(n=2, size=8)

    def locked(*a, **k):
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 37)")

    monkeypatch.setattr(h5py, "File", locked)
    with pytest.raises(SimclrPathError, match="cannot lock the patch store.*HDF5_USE_FILE_LOCKING=FALSE"):
        PatchStore(path)


def test_embedding_rows_read_from_disk_in_any_order(tmp_path):
    feats = np.arange(20, dtype=np.float32).reshape(10, 2)
    write_embeddings(tmp_path / "e.h5", feats, np.zeros((10, 2)), attrs={"slide_id": "S"})
    s = EmbeddingStore(tmp_path / "e.h5", features=False)
    assert s.features is None and s.shape == (10, 2) and len(s) == 10
    rows = np.array([7, 2, 7, 0])
    np.testing.assert_array_equal(s.read_rows(rows), feats[rows])
    assert s.read_rows(np.array([], np.int64)).shape == (0, 2)
    np.testing.assert_array_equal(EmbeddingStore(tmp_path / "e.h5").features, feats)


@pytest.mark.parametrize("name, edit, match", [
    ("1-D features", lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.zeros(4, np.float32))),
     r"/features has shape \(4,\), expected \(patches, features >= 1\)"),
    ("no feature columns", lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.zeros((4, 0), np.float32))),
     r"/features has shape \(4, 0\)"),
    ("short coords", lambda f: (f.__delitem__("coords"), f.create_dataset("coords", data=np.zeros((3, 2)))),
     r"/coords has shape \(3, 2\), expected \(4, 2\)"),
    ("text labels", lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.array([b"a"] * 4))),
     r"/labels holds \|S1 of shape \(4,\), expected 4 integers"),
    ("short labels", lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.zeros(3, np.int64))),
     r"/labels holds int64 of shape \(3,\)"),
    ("short groups", lambda f: (f.__delitem__("groups"), f.create_dataset("groups", data=np.array([b"g"] * 2))),
     r"/groups holds 2 entries for 4 patches"),
    ("numeric label names", lambda f: f.attrs.__setitem__("label_names", np.array([0, 1])),
     r"attribute label_names is array\(\[0, 1\]\), expected a list of class names"),
])
def test_an_embedding_file_of_the_wrong_layout_is_one_clear_error(tmp_path, name, edit, match):
    """Files written by other code crashed classify and predict deep in numpy or sklearn."""
    path = write_embeddings(tmp_path / "e.h5", np.ones((4, 3), np.float32), np.zeros((4, 2)),
                            {"slide_id": "A"}, labels=np.array([0, 1, 0, 1]),
                            groups=["g1", "g1", "g2", "g2"], label_names=["a", "b"])
    EmbeddingStore(path)  # valid as written
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(SimclrPathError, match=rf"e\.h5: not a valid embedding file: {match}.*"
                                              r"recreate it with 'simclr-path embed --force'"):
        EmbeddingStore(path)


def test_a_non_hdf5_file_given_as_embeddings_points_to_embed_not_tile(tmp_path):
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(SimclrPathError, match=r"notes.h5: not an HDF5 file; give the embedding file "
                                              r"\(.h5\) that simclr-path wrote \('simclr-path embed' "
                                              r"writes one from a patch store\)"):
        EmbeddingStore(tmp_path / "notes.h5")
    with pytest.raises(SimclrPathError, match=r"tiled into one by 'simclr-path tile'"):
        PatchStore(tmp_path / "notes.h5")


def test_crafted_patch_stores_and_embedding_files_are_one_clear_error(tmp_path, make_store):
    """Groups where datasets belong, text where numbers belong, bytes that are not UTF-8: every
    reader crashed in numpy, h5py or str.decode."""
    path = make_store(n=4, size=8, label_names=["a", "b"], labels=[0, 1, 1, 0],
                      groups=["g1", "g1", "g2", "g2"])
    with h5py.File(path, "r+") as f:
        f.attrs["slide_id"] = np.bytes_(b"S\xff")
        del f["groups"]
        f.create_dataset("groups", data=np.array([b"g\xff"] * 4))
    store = PatchStore(path)
    assert store.slide_id == "S\ufffd" and store.groups == ["g\ufffd"] * 4
    for edit, match in (
            (lambda f: (f.__delitem__("labels"), f.create_group("labels")), "patch store is damaged"),
            (lambda f: f.attrs.__setitem__("patch_size", "abc"),
             "attribute patch_size is 'abc', not a whole number"),
            (lambda f: (f.__delitem__("labels"), f.create_dataset("labels", data=np.array([0, 5, 0, 1]))),
             "/labels holds class index 5 but label_names has 2 classes")):
        p = make_store(n=4, size=8, name=f"x{len(match)}.h5", label_names=["a", "b"],
                       labels=[0, 1, 1, 0])
        with h5py.File(p, "r+") as f:
            edit(f)
        with pytest.raises(SimclrPathError, match=match):
            PatchStore(p)
    e = write_embeddings(tmp_path / "e.h5", np.ones((2, 3), np.float32), np.zeros((2, 2)),
                         {"slide_id": "A", "tta": np.array([1, 0])})
    with pytest.raises(SimclrPathError, match=r"attribute tta is .*, not true or false"):
        EmbeddingStore(e)
    # an array where classify and predict compare text (review: "truth value ... ambiguous")
    e = write_embeddings(tmp_path / "l.h5", np.ones((2, 3), np.float32), np.zeros((2, 2)),
                         {"slide_id": "A", "layer": "pooled"})
    with h5py.File(e, "r+") as f:
        f.attrs["layer"] = np.array([1, 2])  # (the package's writer would store its text)
    with pytest.raises(SimclrPathError, match=r"l.h5: not a valid embedding file: attribute "
                                              r"layer is .*, expected text"):
        EmbeddingStore(e)


def test_a_process_keeps_a_bounded_number_of_store_files_open(make_store, monkeypatch):
    """1100 stores under the common open-file limit of 1024 stopped pretraining with "Too many
    open files": beyond the limit the least recently used store is closed, and reopened when
    read again, with the same patches."""
    from simclr_path import store as st

    monkeypatch.setattr(st, "_MAX_OPEN", [3])
    stores = [PatchStore(make_store(n=4, size=8, name=f"s{i}.h5", slide_id=f"S{i}", seed=i))
              for i in range(6)]
    first = [s[1].copy() for s in stores]
    for _ in range(2):
        for s, want in zip(stores, first):
            np.testing.assert_array_equal(s[1], want)
            assert sum(x._h5._f is not None for x in stores) <= 3
    assert stores[-1]._h5._f is not None and stores[0]._h5._f is None  # the oldest went first
    stores[-1].close()
    assert len([r for r in st._OPEN.values() if r() is not None]) <= 2
    st.close_open_files()  # before forking loader workers: none left open, all still readable
    assert all(s._h5._f is None for s in stores)
    np.testing.assert_array_equal(stores[0][1], first[0])


def _store_list(make_store, tmp_path, count: int, prefix: str, n: int):
    """``count`` small stores and a text file listing their paths (for a child process)."""
    paths = [str(make_store(n=n, size=8, name=f"{prefix.lower()}{i}.h5", slide_id=f"{prefix}{i}",
                            seed=i)) for i in range(count)]
    listed = tmp_path / f"{prefix}.txt"
    listed.write_text("\n".join(paths))
    return listed


def test_a_cohort_beyond_the_open_file_limit_is_read(make_store, tmp_path):
    """The same with the real limit: 300 stores read in a process allowed 128 open files."""
    import subprocess
    import sys

    listed = _store_list(make_store, tmp_path, 300, "C", n=2)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
            "from simclr_path.store import PatchStore\n"
            "stores = [PatchStore(p) for p in open(sys.argv[1]).read().split()]\n"
            "print(sum(int(s[0].sum() > 0) for s in stores + stores))\n")
    out = subprocess.run([sys.executable, "-c", code, str(listed)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "600"


def test_a_forked_worker_drops_the_store_files_it_inherited(make_store):
    """Fine-tuning's loader workers (forked each epoch) held the parent's open store files on
    top of their own: twice the limit's share on a large cohort ("Too many open files")."""
    import multiprocessing as mp

    from simclr_path import store as st

    stores = [PatchStore(make_store(n=2, size=8, name=f"f{i}.h5", slide_id=f"F{i}", seed=i))
              for i in range(5)]
    for s in stores:
        s[0]
    assert all(s._h5._f is not None for s in stores)

    def child(conn):
        stores[0][0]  # the first store the worker reads
        inherited = sum(s._h5._f is not None and s._h5._pid != os.getpid() for s in stores)
        conn.send((inherited, len(st._OPEN)))

    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=child, args=(b,))
    p.start()
    got = a.recv()
    p.join(30)
    assert got == (0, 1), got
    assert all(s._h5._f is not None for s in stores)  # the parent's are untouched


def test_running_out_of_open_files_is_one_line(make_store, tmp_path):
    import subprocess
    import sys

    listed = _store_list(make_store, tmp_path, 100, "E", n=1)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))\n"
            "from simclr_path import store\n"
            "store._MAX_OPEN.append(10**6)  # no cap: the limit itself is reached\n"
            "from simclr_path.cli import main\n"
            "sys.exit(main(['pretrain', *open(sys.argv[1]).read().split(), '--out', sys.argv[2],\n"
            "               '--max-steps', '1', '--device', 'cpu', '--no-progress']))\n")
    out = subprocess.run([sys.executable, "-c", code, str(listed), str(tmp_path / "run")],
                         check=False, capture_output=True, text=True, timeout=300)
    err = [x for x in out.stderr.strip().splitlines() if x.strip()]
    assert out.returncode != 0 and len(err) == 1, out.stderr[-2000:]
    assert "too many open files; raise the limit (ulimit -n" in err[0], err


@pytest.mark.parametrize(("attr", "value", "what"), [
    ("slide_id", "=2+3", "slide_id '=2+3'"), ("label_names", ["=cmd|x", "b"], "class name"),
])
def test_a_foreign_store_whose_text_a_spreadsheet_would_run_is_refused(make_store, attr, value,
                                                                       what):
    """The slide id, class names and groups of a store reach the predictions CSVs as cells."""
    import h5py

    path = make_store(n=3, size=8)
    with h5py.File(path, "a") as f:
        if attr == "label_names":
            f.attrs[attr] = np.array(value, dtype=h5py.string_dtype())
            f.create_dataset("labels", data=np.zeros(3, np.int64))
        else:
            f.attrs[attr] = value
    with pytest.raises(SimclrPathError, match=re.escape(what) + ".*spreadsheet"):
        PatchStore(path)


def test_a_damaged_chunk_is_one_clear_error_wherever_it_is_read(tmp_path, capsys):
    """A damaged chunk was a traceback from h5py or the LZF codec in embed, pretrain, preview,
    the heatmap and the t-SNE thumbnails (in pretrain, re-raised from a loader worker) (review)."""
    from simclr_path.cli import main
    from simclr_path.data import read_patch

    path = tmp_path / "s.h5"
    stripes = striped_store(path)
    damage_chunk(path, "patches", 3)
    damage_chunk(path, "thumbnail", 0)
    st = PatchStore(path)
    np.testing.assert_array_equal(st[2], stripes[2])  # the others still read
    for read, what in ((lambda: st[3], "patch 3 "), (lambda: st[0:40], "one or more of patches 0-39 "),
                       (lambda: st[np.array([5, 3])], "one or more of patches 3-5 "),
                       (lambda: read_patch(st, 3), "patch 3 "),
                       (lambda: st.thumbnail, "its slide thumbnail ")):
        with pytest.raises(SimclrPathError, match=rf"s.h5: {re.escape(what)}cannot be read \(.*\): the file "
                                                  r"is damaged \('simclr-path info .*s.h5 --check' "
                                                  r"names every damaged row\); make it again"):
            read()
    st.close()
    # from a loader worker process (5 steps: an epoch, every patch): PyTorch's wrapping (its
    # traceback as text) is taken off
    rc = main(["pretrain", str(path), "--out", str(tmp_path / "run"), "--arch", "resnet18",
               "--max-steps", "5", "--batch-size", "8", "--image-size", "32", "--local-crops", "0",
               "--device", "cpu", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "s.h5: patch 3 cannot be read" in err and "Traceback" not in err


def test_unusable_rows_of_float16_features_need_no_overflowing_cast():
    """1e12 does not fit float16: a foreign file's float16 features printed numpy's overflow
    warning inside classify (review)."""
    import warnings

    from simclr_path.store import unusable_rows

    f = np.array([[1.0, 2.0], [np.inf, 0.0], [60000.0, -3.0]], dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unusable_rows(f).tolist() == [False, True, False]
    assert unusable_rows(np.zeros((0, 4), np.float32)).tolist() == []
