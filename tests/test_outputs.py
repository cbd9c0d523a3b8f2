"""Outputs: never overwritten without --force, never replacing a folder that is not ours, and
one clear error where a path cannot be written."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_path.errors import SimclrPathError
from simclr_path.outputs import atomic_dir, atomic_output, check_can_write


def test_existing_output_needs_force(tmp_path):
    f = tmp_path / "a.h5"
    f.write_text("mine")
    with pytest.raises(SimclrPathError, match="already exists; pass --force"):
        check_can_write(f, force=False)
    assert check_can_write(f, force=True) == f and f.read_text() == "mine"


def test_file_output_that_is_a_folder_and_folder_output_that_is_a_file(tmp_path):
    with pytest.raises(SimclrPathError, match="is a folder, but this output is a file"):
        check_can_write(tmp_path, force=True)
    f = tmp_path / "x"
    f.write_text("")
    with pytest.raises(SimclrPathError, match="is a file, but this output is a folder"):
        check_can_write(f, force=True, kind="dir")
    # without --force too: "pass --force" would only lead to this error
    with pytest.raises(SimclrPathError, match="is a folder, but this output is a file"):
        check_can_write(tmp_path, force=False)
    with pytest.raises(SimclrPathError, match="is a file, but this output is a folder"):
        check_can_write(f, force=False, kind="dir")


def test_a_device_or_pipe_at_a_file_output_is_never_replaced(tmp_path, capsys):
    """--force renamed the new file over a pipe or a device node (--out /dev/null as root
    replaced the system's /dev/null); without --force the advice was to pass it (review)."""
    import os
    import stat

    from simclr_path.cli import main

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for force in (False, True):
        with pytest.raises(SimclrPathError, match="is not a regular file"):
            check_can_write(fifo, force=force)
    assert main(["schema", "--out", str(fifo), "--force"]) != 0
    err = capsys.readouterr().err
    assert "is not a regular file" in err and len(err.strip().splitlines()) == 1, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "to_null"  # a link to a device: the same
    link.symlink_to("/dev/null")
    with pytest.raises(SimclrPathError, match="is not a regular file"):
        check_can_write(link, force=True)


def test_output_under_a_file_names_the_file(tmp_path):
    f = tmp_path / "slide.tiff"
    f.write_text("")
    with pytest.raises(SimclrPathError, match="slide.tiff is a file, not a folder"):
        check_can_write(f / "deeper" / "x.h5", force=False)
    assert not (f.parent / "deeper").exists()


def test_parents_are_made_only_when_something_is_written(tmp_path):
    out = tmp_path / "a" / "b" / "c.png"
    # the check makes nothing: a command refused later must leave no empty folders
    assert check_can_write(out, force=False) == out and not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), atomic_output(out):
        raise RuntimeError("failed before the result")
    assert not out.exists()
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"x")
    assert out.read_bytes() == b"x"
    with atomic_dir(tmp_path / "d" / "e") as tmp:
        (tmp / "f.txt").write_text("y")
    assert (tmp_path / "d" / "e" / "f.txt").read_text() == "y"


def test_force_never_replaces_a_folder_that_is_not_a_results_folder(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    (victim / "data").mkdir(parents=True)
    (victim / "data" / "important.txt").write_text("keep")
    with (pytest.raises(SimclrPathError, match="not a results folder of this command"),
          atomic_dir(victim, force=True, markers=("metrics.json", "model.npz")) as tmp):
        (tmp / "metrics.json").write_text("{}")
    assert (victim / "data" / "important.txt").read_text() == "keep"
    # earlier results (with the marker) and an empty folder are replaced
    (victim / "data" / "important.txt").unlink()
    (victim / "data").rmdir()
    (victim / "metrics.json").write_text("old")
    with atomic_dir(victim, force=True, markers=("metrics.json", "model.npz")) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (victim / "metrics.json").read_text() == "new"
    # a rerun by Snakemake, which deleted the declared outputs (metrics.json) but not the others
    (victim / "metrics.json").unlink()
    (victim / "model.npz").write_text("old")
    with atomic_dir(victim, force=True, markers=("metrics.json", "model.npz")) as tmp:
        (tmp / "metrics.json").write_text("newer")
    assert sorted(p.name for p in victim.iterdir()) == ["metrics.json"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SimclrPathError, match="cannot write results over the current folder"):
        check_can_write(".", force=True, kind="dir")


def test_force_never_replaces_a_results_folder_that_also_holds_a_users_files(tmp_path):
    """A folder with a metrics.json counted as results, and --force deleted everything else in
    it (a project folder given as classify --out lost its README and data)."""
    res = tmp_path / "proj"
    (res / "important").mkdir(parents=True)
    (res / "important" / "cohort.tsv").write_text("keep")
    (res / "metrics.json").write_text("{}")
    (res / "README.md").write_text("mine")
    with (pytest.raises(SimclrPathError, match=r"also holds 2 file\(s\) or folder\(s\) this "
                                               r"command did not write \(first: README.md\)"),
          atomic_dir(res, force=True, markers=("metrics.json",)) as tmp):
        (tmp / "metrics.json").write_text("new")
    assert sorted(p.name for p in res.iterdir()) == ["README.md", "important", "metrics.json"]
    assert (res / "important" / "cohort.tsv").read_text() == "keep"
    # names the command writes besides its markers (tracking folders) are its own
    (res / "important" / "cohort.tsv").unlink()
    (res / "important").rmdir()
    (res / "README.md").unlink()
    (res / "tensorboard").mkdir()
    with atomic_dir(res, force=True, markers=("metrics.json",), owned=("tensorboard",)) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert sorted(p.name for p in res.iterdir()) == ["metrics.json"]
    # what an operating system leaves in any folder is not a user's file
    (res / ".DS_Store").write_bytes(b"x")
    with atomic_dir(res, force=True, markers=("metrics.json",)) as tmp:
        (tmp / "metrics.json").write_text("newer")
    # a link to a folder is replaced, never emptied: the target's other files are not at risk
    target = tmp_path / "target"
    target.mkdir()
    (target / "metrics.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    with atomic_dir(tmp_path / "link", force=True, markers=("metrics.json",)) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (target / "notes.txt").read_text() == "mine"


def test_failed_block_leaves_no_output(tmp_path):
    out = tmp_path / "x.csv"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_permissions_not_the_temporary_ones(tmp_path, umask):
    import os
    import stat

    from simclr_path.outputs import current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_output(tmp_path / "a.csv") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "run") as tmp:
            (tmp / "metrics.json").write_text("{}")
        with atomic_dir(tmp_path / "run", force=True) as tmp:  # replacing an existing folder
            (tmp / "metrics.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask


def test_logged_to_keeps_prints_and_the_traceback_of_a_failure(tmp_path):
    from simclr_path.outputs import logged_to

    log = tmp_path / "rule.log"
    with pytest.raises(ValueError), logged_to(log):
        print("step one")
        raise ValueError("bad table")
    text = log.read_text()
    assert "step one" in text and "Traceback" in text and "ValueError: bad table" in text


def test_check_apart_refuses_outputs_over_inputs(tmp_path):
    from simclr_path.outputs import check_apart

    store, run = tmp_path / "s.h5", tmp_path / "run"
    store.write_text("patches")
    run.mkdir()
    (run / "encoder.pt").write_text("weights")
    with pytest.raises(SimclrPathError, match=r"s.h5: is an input of this command \(store_path\) "
                                              r"and its out output"):
        check_apart({"out": store}, {"store_path": store})
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(stores\)"):
        check_apart({"out": store}, {"stores": [tmp_path / "other.h5", str(store)]})
    with pytest.raises(SimclrPathError, match="is inside the input folder"):
        check_apart({"out": run / "encoder.pt"}, {"encoder_path": run})
    with pytest.raises(SimclrPathError, match="given for both out_label and out_slide"):
        check_apart({"out_label": tmp_path / "a.png", "out_slide": tmp_path / "a.png"}, {})
    # a figure may go inside a folder input; a folder that force replaces may not hold an input
    check_apart({"out": run / "loss.png"}, {"metrics_csv": run}, figures_only=True)
    with pytest.raises(SimclrPathError, match="inside its out_dir folder"):
        check_apart({"out_dir": run}, {"encoder": run / "encoder.pt"}, replaces_dir=True)
    check_apart({"out_dir": run}, {"encoder": run / "encoder.pt"}, replaces_dir=False)
    (tmp_path / "link").symlink_to(run)  # one file through a link: one output
    with pytest.raises(SimclrPathError, match="given for both a and b"):
        check_apart({"a": run / "x.png", "b": tmp_path / "link" / "x.png"}, {})
    # text that is not a path, and missing inputs, are not compared
    check_apart({"out": tmp_path / "new.h5", "qc": None}, {"samples": None, "n": 3,
                                                           "store_path": tmp_path / "gone.h5"})


def test_as_paths_takes_one_path_whole(tmp_path):
    from simclr_path.outputs import as_paths

    assert as_paths("a/b.h5", "stores") == [Path("a/b.h5")]
    assert as_paths(tmp_path, "stores") == [tmp_path]
    assert as_paths(("x.h5", Path("y.h5")), "stores") == [Path("x.h5"), Path("y.h5")]
    with pytest.raises(SimclrPathError, match="stores: expected a path or a list of paths, got int"):
        as_paths(3, "stores")
    with pytest.raises(SimclrPathError, match="stores: expected paths, got int 3"):
        as_paths(["a.h5", 3], "stores")


def test_force_keeps_a_users_dot_old_folder_and_replaces_a_link_not_its_target(tmp_path):
    """The old results went aside under the fixed name '.NAME.old', deleting a user's folder of
    that name; a results folder reached through a link was left as '.NAME.old'."""
    res = tmp_path / "res"
    res.mkdir()
    (res / "metrics.json").write_text("{}")
    mine = tmp_path / ".res.old"
    mine.mkdir()
    (mine / "my_backup.txt").write_text("precious")
    with atomic_dir(res, force=True, markers=("metrics.json",)) as tmp:
        (tmp / "metrics.json").write_text('{"new": 1}')
    assert (mine / "my_backup.txt").read_text() == "precious"
    assert (res / "metrics.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".res.old", "res"]
    target = tmp_path / "target"
    target.mkdir()
    (target / "metrics.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_dir(link, force=True, markers=("metrics.json",)) as tmp:
        (tmp / "metrics.json").write_text('{"new": 2}')
    assert not link.is_symlink() and (link / "metrics.json").read_text() == '{"new": 2}'
    assert (target / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".res.old", "link", "res", "target"]


@pytest.mark.parametrize("command", ["tile", "embed", "import-patches"])
def test_an_hdf5_output_named_as_another_kind_of_file_is_refused(command, tmp_path, capsys):
    """tile --out x.png wrote a patch store called x.png (the help says .h5)."""
    from simclr_path.cli import main

    out = tmp_path / "x.png"
    argv = {"tile": ["tile", str(tmp_path / "s.svs"), "--out", str(out)],
            "embed": ["embed", str(tmp_path / "s.h5"), "--encoder", str(tmp_path / "e.pt"),
                      "--out", str(out)],
            "import-patches": ["import-patches", str(tmp_path / "tiles"), "--out", str(out)]}[
        command]
    (tmp_path / "tiles").mkdir()
    (tmp_path / "s.svs").write_bytes(b"")
    (tmp_path / "s.h5").write_bytes(b"")
    (tmp_path / "e.pt").write_bytes(b"")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an HDF5 file; name it with .h5" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "e.pt", "s.h5", "s.svs", "tiles"]


@pytest.mark.parametrize("command", ["tile", "embed", "import-patches"])
def test_force_never_replaces_an_hdf5_file_of_another_kind(command, tmp_path, capsys):
    """embed --force (and import-patches --force) turned a tiled slide's patch store at a
    mistyped --out into an embedding file: --force replaces only the command's own outputs."""
    import h5py

    from simclr_path.cli import main

    own = {"tile": "slide", "embed": "embeddings", "import-patches": "patches"}[command]
    (tmp_path / "tiles").mkdir()
    (tmp_path / "s.svs").write_bytes(b"")
    (tmp_path / "s.h5").write_bytes(b"")
    (tmp_path / "e.pt").write_bytes(b"")
    for name, kind, why in [("store.h5", "slide", "is a patch store of a tiled slide"),
                            ("set.h5", "patches", "is a patch store of imported tiles"),
                            ("emb.h5", "embeddings", "is an embedding file"),
                            ("mine.h5", None, "is an HDF5 file that simclr-path did not write"),
                            ("text.h5", "text", "is not an HDF5 file")]:
        out = tmp_path / name
        if kind == "text":
            out.write_text("a user's notes")
        else:
            with h5py.File(out, "w") as f:
                if kind:
                    f.attrs["kind"] = kind
        before = out.read_bytes()
        argv = {"tile": ["tile", str(tmp_path / "s.svs"), "--out", str(out)],
                "embed": ["embed", str(tmp_path / "s.h5"), "--encoder", str(tmp_path / "e.pt"),
                          "--out", str(out)],
                "import-patches": ["import-patches", str(tmp_path / "tiles"), "--out", str(out)]}[
            command]
        code = main([*argv, "--force"])
        err = capsys.readouterr().err.strip()
        assert out.read_bytes() == before, name
        if kind == own:  # its own kind passes this check (and fails later on the empty inputs)
            assert "--force only replaces" not in err, err
        else:
            assert code == 2 and len(err.splitlines()) == 1, err
            assert f"error: {out}: {why}, not a" in err and "--force only replaces" in err, err


def test_hdf5_names():
    from simclr_path.outputs import check_hdf5_name

    for ok in ("a.h5", "a.store.H5", "b.hdf5", "c.hdf"):
        check_hdf5_name(ok, "a patch store")
    with pytest.raises(SimclrPathError, match="x: an embedding file is an HDF5 file; name it "
                                              r"with .h5 \(or .hdf5\), not no suffix"):
        check_hdf5_name("x", "an embedding file")


def test_a_failed_block_leaves_the_old_results_and_no_temporary_folder(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    (d / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError, match="stage failed"), atomic_dir(d, force=True) as tmp:
        (tmp / "metrics.json").write_text("half")
        raise RuntimeError("stage failed")
    assert (d / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:  # nothing before
        (tmp / "metrics.json").write_text("half")
        raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_a_dangling_link_at_the_output_needs_force_and_is_replaced_not_followed(tmp_path):
    """A link whose target is gone 'did not exist' and was replaced without --force."""
    link = tmp_path / "p.csv"
    link.symlink_to(tmp_path / "gone.csv")
    with pytest.raises(SimclrPathError, match=r"p.csv: a link \(to .*gone.csv, which does not "
                                              r"exist\) is in the way; pass --force"):
        check_can_write(link, force=False)
    with atomic_output(link, force=True) as tmp:
        tmp.write_text("x")
    assert not link.is_symlink() and link.read_text() == "x"
    assert not (tmp_path / "gone.csv").exists()


def test_temporary_outputs_a_killed_run_left_are_named_once(tmp_path, monkeypatch):
    """SIGKILL (the out-of-memory killer) runs no cleanup: a hidden 20 MB '.x.h5.abc.tmp' stayed
    beside the output for good, unseen by ls, and later runs said nothing."""
    import os
    import time
    import warnings

    from simclr_path import outputs

    monkeypatch.setattr(outputs, "_LEFTOVERS_WARNED", set())
    out = tmp_path / "x[1].h5"  # glob characters in the name are matched literally
    left = tmp_path / ".x[1].h5.k9.tmp"
    left.write_bytes(b"\0" * 2_000_000)
    (tmp_path / ".other.h5.k9.tmp").write_bytes(b"")  # another output's
    folder = tmp_path / ".res.q1.tmp"  # a results folder's (atomic_dir)
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f").write_bytes(b"\0" * 500_000)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with atomic_output(out) as tmp:  # a fresh leftover: maybe another command's, now
            tmp.write_text("a")
        assert not w
        hour_ago = time.time() - 3600
        for p in (left, folder):
            os.utime(p, (hour_ago, hour_ago))
        with atomic_output(out, force=True) as tmp:
            tmp.write_text("b")
        with atomic_output(out, force=True) as tmp:  # once per output
            tmp.write_text("c")
        with atomic_dir(tmp_path / "res") as tmp:
            (tmp / "m").write_text("d")
    msgs = [str(x.message) for x in w]
    said = (f"{tmp_path}: 1 temporary output(s) of {{}} left by a run that was killed ({{}}); "
            "delete them unless another command is writing it now")
    assert msgs == [said.format("x[1].h5", ".x[1].h5.k9.tmp; 2.0 MB"),
                    said.format("res", ".res.q1.tmp; 0.5 MB")]
    assert left.exists() and folder.exists()  # never deleted: only named
