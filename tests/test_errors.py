"""need_file: one clear line for each way an input path can fail to be a file."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from simclr_path.cli import main
from simclr_path.errors import SimclrPathError, need_file


def test_need_file_returns_a_regular_file(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("x: 1\n")
    assert need_file(str(f), "config file") == f


@pytest.mark.parametrize("case, expected", [
    ("missing", "config file not found; make one"),
    ("folder", "is a folder; give the config file"),
    ("dangling link", "config file is a link to"),
    ("pipe", "is not a regular file (a pipe or a device?)"),
])
def test_need_file_says_what_is_there(tmp_path, case, expected):
    p = tmp_path / "c.yaml"
    if case == "folder":
        p.mkdir()
    elif case == "dangling link":
        p.symlink_to(tmp_path / "gone.yaml")
    elif case == "pipe":
        os.mkfifo(p)  # never opened: the check must not block on it
    with pytest.raises(SimclrPathError) as e:
        need_file(p, "config file", "make one")
    assert str(e.value).startswith(f"{p}: ") and expected in str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
@pytest.mark.parametrize("args", [
    ["info", "/dev/null"],
    ["plot-loss", "/dev/null", "--out", "{tmp}/loss.png"],
    ["pretrain", "{tmp}/none.h5", "--config", "/dev/null", "--out", "{tmp}/run"],
    ["import-patches", "{tmp}/tiles", "--groups", "/dev/null", "--out", "{tmp}/x.h5"],
    ["embed", "{tmp}/none.h5", "--encoder", "/dev/null", "--out", "{tmp}/e.h5"],
    ["classify", "--embeddings", "/dev/null", "--out", "{tmp}/c"],
    ["plot-heatmap", "--classify", "/dev/null", "--store", "{tmp}/s.h5", "--out", "{tmp}/h"],
])
def test_cli_inputs_that_are_devices_are_not_called_missing(tmp_path, args, capsys):
    """/dev/null (or a pipe from <(...)) exists: "not found" sent users looking for a typo."""
    tile = tmp_path / "tiles" / "SCC" / "a.png"
    tile.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 100, 150)).save(tile)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert "/dev/null: is not a regular file" in err[0]
