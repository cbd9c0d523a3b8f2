"""The command line's checks that run before any command: outputs against inputs and each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from simclr_path.cli import main


def _err(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


def test_force_never_writes_an_output_over_an_input(tmp_path, capsys):
    slide = tmp_path / "s.tiff"
    slide.write_bytes(b"my slide")
    rc, err = _err(["tile", str(slide), "--out", str(slide), "--force"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1
    assert "is an input of this command (slide) and its --out output" in err
    assert slide.read_bytes() == b"my slide"
    run = tmp_path / "run"
    run.mkdir()
    rc, err = _err(["plot-loss", str(run), "--out", str(run), "--force"], capsys)
    assert rc != 0 and "is an input of this command" in err and run.is_dir()


def test_force_never_replaces_a_folder_that_holds_an_input(tmp_path, capsys):
    ft = tmp_path / "ft1"
    ft.mkdir()
    (ft / "metrics.json").write_text("{}")
    (ft / "encoder.pt").write_bytes(b"weights")
    (tmp_path / "s.h5").write_bytes(b"x")
    rc, err = _err(["finetune", str(tmp_path / "s.h5"), "--encoder", str(ft / "encoder.pt"),
                    "--out", str(ft), "--force"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1
    assert "is an input of this command (encoder) inside its --out folder" in err
    assert (ft / "encoder.pt").read_bytes() == b"weights"
    # pretrain --force removes only its run's own files: the run's saved config may be an input
    from simclr_path.cli import build_parser, check_output_paths

    (ft / "config.yaml").write_text("train: {}\n")
    check_output_paths(build_parser().parse_args(
        ["pretrain", str(tmp_path / "s.h5"), "--config", str(ft / "config.yaml"), "--out", str(ft),
         "--force"]))
    # without --force nothing is replaced, so the usual 'already exists' applies
    rc, err = _err(["finetune", str(tmp_path / "s.h5"), "--encoder", str(ft / "encoder.pt"),
                    "--out", str(ft)], capsys)
    assert rc != 0 and "already exists" in err


@pytest.mark.parametrize("argv, inside", [
    (["embed", "{d}/five.h5", "--encoder", "{d}/run", "--out", "{d}/run/encoder.pt", "--force"],
     "run/encoder.pt: is inside the input folder {d}/run of this command (encoder)"),
    (["predict", "--model", "{d}/clf", "--embeddings", "{d}/five.h5", "--out",
      "{d}/clf/model.json", "--force"], "inside the input folder {d}/clf of this command (model)"),
    # a new file inside the folder too: the same command rerun with --force would replace it
    (["embed", "{d}/five.h5", "--encoder", "{d}/run", "--out", "{d}/run/sub/new.h5"],
     "run/sub/new.h5: is inside the input folder"),
])
def test_an_output_inside_a_folder_input_is_refused(argv, inside, tmp_path, capsys):
    (tmp_path / "five.h5").write_bytes(b"x")
    for name in ("run/encoder.pt", "clf/model.json", "run/sub/a"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"input")
    rc, err = _err([a.format(d=tmp_path) for a in argv], capsys)
    assert rc != 0 and len(err.splitlines()) == 1
    assert inside.format(d=tmp_path) in err and "write the --out output elsewhere" in err
    assert (tmp_path / "run/encoder.pt").read_bytes() == b"input"
    assert (tmp_path / "clf/model.json").read_bytes() == b"input"
    assert not (tmp_path / "run/sub/new.h5").exists()


def test_outputs_beside_a_folder_input_are_allowed(tmp_path):
    from simclr_path.cli import build_parser, check_output_paths

    (tmp_path / "run").mkdir()
    (tmp_path / "five.h5").write_bytes(b"x")
    # "run2" shares the folder's name as a prefix but is not inside it
    for out in ("run2/five.h5", "five_emb.h5"):
        check_output_paths(build_parser().parse_args(
            ["embed", str(tmp_path / "five.h5"), "--encoder", str(tmp_path / "run"),
             "--out", str(tmp_path / out), "--force"]))


@pytest.mark.parametrize("argv", [
    ["plot-curves", "--classify", "C", "--out-roc", "{d}/same.png", "--out-pr", "{d}/same.png"],
    ["tile", "{d}/s.tiff", "--out", "{d}/q.h5", "--qc", "{d}/q.h5"],
])
def test_two_outputs_on_one_path_are_refused_before_anything_is_written(argv, tmp_path, capsys):
    (tmp_path / "s.tiff").write_bytes(b"x")
    rc, err = _err([a.format(d=tmp_path) for a in argv], capsys)
    assert rc != 0 and "give each output its own path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tiff"]


@pytest.mark.parametrize("extra, match", [
    (["--pairs", "100000"], "--pairs must be between 1 and 64"),
    (["--pairs", "0"], "--pairs must be between 1 and 64"),
    (["--seed", "-1"], "--seed must be between 0 and"),
])
def test_preview_bounds(tmp_path, capsys, extra, match):
    rc, err = _err(["preview", str(tmp_path / "s.h5"), "--out", str(tmp_path / "new" / "p.png"),
                    *extra], capsys)
    assert rc != 0 and match in err
    assert not (tmp_path / "new").exists()  # no empty folder left by a refused command


def test_text_options_are_not_taken_for_paths(tmp_path, capsys):
    import pandas as pd

    pd.DataFrame({"step": [1, 2], "loss": [3.0, 2.0], "lr": [0.1, 0.0]}).to_csv(
        tmp_path / "metrics.csv", index=False)
    out = tmp_path / "loss.png"
    out.write_bytes(b"old")
    # a --title that happens to name the output file is a title, not an input
    assert main(["plot-loss", str(tmp_path), "--out", str(out), "--title", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command, hint", [("pretrain", "lower train.batch_size"),
                                           ("embed", "lower embed.batch_size")])
def test_a_gpu_out_of_memory_is_one_line_with_what_to_lower(command, hint, tmp_path, capsys, monkeypatch):
    import torch

    import simclr_path.embed
    import simclr_path.train

    def oom(*args, **kwargs):  # as torch.compile's backend raises it: wrapped
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 ...")
        except RuntimeError as exc:
            raise ValueError("backend compiler failed") from exc

    monkeypatch.setattr(simclr_path.train, "pretrain", oom)
    monkeypatch.setattr(simclr_path.embed, "embed_store", oom)
    store = tmp_path / "s.h5"
    store.write_bytes(b"")
    argv = {"pretrain": ["pretrain", str(store), "--out", str(tmp_path / "run"), "--no-progress"],
            "embed": ["embed", str(store), "--encoder", str(tmp_path / "encoder.pt"), "--out", str(tmp_path / "e.h5")]}
    rc, err = _err(argv[command], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"simclr-path {command}: error: the GPU ran out of memory (CUDA out of memory.")
    assert hint in err
    with pytest.raises(RuntimeError, match="not memory"):  # any other error is not disguised as one
        monkeypatch.setattr(simclr_path.train, "pretrain", lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("not memory")))
        main(argv["pretrain"])


def test_sigterm_removes_the_unfinished_output_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # made in a child process: the demo's image code starts thread pools here, and a later test's
    # DataLoader forking this process with them would hang
    slide = tmp_path / "s.tiff"
    subprocess.run([sys.executable, "-m", "simclr_path", "demo-slide", "--out", str(slide), "--width",
                    "2048", "--height", "2048", "--mpp", "0.5"], check=True, capture_output=True)
    # a million 8 px patches: tens of seconds of tiling, so the signal lands mid-write
    cmd = [sys.executable, "-m", "simclr_path", "tile", str(slide), "--out", str(tmp_path / "s.h5"),
           "--patch-size", "8", "--stride", "2", "--min-tissue", "0", "--workers", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".s.h5.*.tmp")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the store's temporary file never appeared"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.3)  # well into the writing
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip() == "simclr-path tile: terminated (SIGTERM); unfinished outputs removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tiff"]


def test_sigterm_handler_is_restored_after_a_command(tmp_path, capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    main(["tile", str(tmp_path / "missing.tiff"), "--out", str(tmp_path / "x.h5")])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_python_discards_still_stops_the_command(tmp_path, monkeypatch, capsys, sig,
                                                           code):
    """A signal that lands while h5py writes a large block is raised inside a weakref callback,
    where Python discards the exception: import-patches went on to a complete store and exit 0.
    And Python printed "Exception ignored in ..." with a traceback above the command's line."""
    import os
    import signal
    import sys
    import weakref

    import cv2
    import numpy as np

    from simclr_path.store import PatchStoreWriter

    for cls in ("a", "b"):
        (tmp_path / "tiles" / cls).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "tiles" / cls / "t.png"), np.full((16, 16, 3), 100, np.uint8))
    append = PatchStoreWriter.append

    def append_then_signal(self, *args, **kwargs):
        append(self, *args, **kwargs)

        class Block:  # the signal's handler runs in this object's weakref callback
            pass

        block = Block()
        weakref.finalize(block, os.kill, os.getpid(), getattr(signal, sig))
        del block

    monkeypatch.setattr(PatchStoreWriter, "append", append_then_signal)
    # Python's own hook, which prints (pytest's turns it into a warning)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    out = tmp_path / "p.h5"
    chld = signal.getsignal(signal.SIGCHLD)
    rc = main(["import-patches", str(tmp_path / "tiles"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == code, err
    stop = "terminated (SIGTERM)" if sig == "SIGTERM" else "interrupted"
    assert err.startswith(f"simclr-path import-patches: {stop}") and len(err.splitlines()) == 1, err
    assert sys.unraisablehook is sys.__unraisablehook__  # given back after the command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]  # no store, no temporary file
    # the signal turned PyTorch's report of dead loader workers off for the command's end
    # (outputs.stopping_on_a_signal); a process that goes on gets it back
    assert signal.getsignal(signal.SIGCHLD) == chld


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_discarded_signal_stops_a_command_that_writes_no_hdf5(tmp_path, monkeypatch, capsys,
                                                                  sig, code):
    """Only the HDF5 writers raised a signal Python had discarded (in h5py's weakref callbacks,
    which reading runs too): classify, finetune ... finished and exited 0 after a SIGTERM."""
    import os
    import signal
    import sys
    import weakref

    from simclr_path.cli import info

    def run_with_a_discarded_signal(args):
        class Block:
            pass

        block = Block()
        weakref.finalize(block, os.kill, os.getpid(), getattr(signal, sig))
        del block
        return 0

    monkeypatch.setattr(info, "run", run_with_a_discarded_signal)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    (tmp_path / "x.h5").write_bytes(b"")
    assert main(["info", str(tmp_path / "x.h5")]) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_help_shows_real_defaults_only(capsys):
    def help_of(command):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere

    tile = help_of("tile")
    assert "[config: 0.5]" in tile and "[config: 224]" in tile
    assert "(default: None)" not in tile  # "not given, so the config decides" is no default
    assert "--no-progress no progress bar (default: False)" in tile  # a real default stays
    demo = help_of("demo-slide")
    assert "(default: scc)" in demo and "(default: 0)" in demo and "(default: )" not in demo


def test_the_packages_warnings_print_as_one_line(tmp_path):
    """``simclr-path <cmd>: warning: ...`` instead of Python's file, line and source line."""
    import subprocess
    import sys
    import warnings

    import cv2
    import numpy as np

    from simclr_path.cli import _warnings_as_lines

    folder = tmp_path / "tiles" / "SCC"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "a.png"), np.full((32, 32, 3), 200, np.uint8))
    (folder / "b.gif").write_bytes(b"GIF89a")  # an image format import-patches skips, with a warning
    res = subprocess.run([sys.executable, "-m", "simclr_path", "import-patches", str(tmp_path / "tiles"),
                          "--out", str(tmp_path / "p.h5"), "--patch-size", "32"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if "warning" in x.lower()]
    assert lines and all(x.startswith("simclr-path import-patches: warning: ") for x in lines), res.stderr
    assert "UserWarning" not in res.stderr and "warnings.warn(" not in res.stderr
    # other libraries' warnings keep Python's form (their location helps to report them)
    with _warnings_as_lines("embed"):
        ours = warnings.formatwarning("m", UserWarning, sys.modules["simclr_path.cli"].__file__, 1)
        theirs = warnings.formatwarning("m", UserWarning, "/elsewhere/lib.py", 1)
        deprecated = warnings.formatwarning("m", DeprecationWarning, sys.modules["simclr_path.cli"].__file__, 1)
    assert ours == "simclr-path embed: warning: m\n"
    assert "/elsewhere/lib.py:1: UserWarning: m" in theirs and "DeprecationWarning" in deprecated
    assert warnings.formatwarning("m", UserWarning, "/x.py", 1).startswith("/x.py:1")  # restored


def test_an_unwritable_output_folder_is_one_line_before_any_output(tmp_path, capsys, monkeypatch):
    """A read-only or immutable folder (root passes os.access on those) gave a traceback from the
    temporary file, and tile wrote its store before failing on the QC picture's folder."""
    import tempfile

    import simclr_path.outputs as O

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if Path(dir) == locked:
            raise PermissionError(1, "Operation not permitted")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(O.tempfile, "TemporaryFile", temporary_file)
    store = tmp_path / "s.h5"
    store.write_bytes(b"")
    rc, err = _err(["tile", str(store), "--out", str(tmp_path / "x.h5"), "--qc",
                    str(locked / "qc" / "x.png")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{locked / 'qc' / 'x.png'}: cannot write in {locked} (Operation not permitted)" in err
    assert not (tmp_path / "x.h5").exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import simclr_path.train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(simclr_path.train, "pretrain", full)
    store = tmp_path / "s.h5"
    store.write_bytes(b"")
    rc, err = _err(["pretrain", str(store), "--out", str(tmp_path / "run"), "--no-progress"],
                   capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err
    monkeypatch.setattr(simclr_path.train, "pretrain", lambda *a, **k: (_ for _ in ()).throw(
        FileNotFoundError(errno.ENOENT, "bug", "x")))
    with pytest.raises(FileNotFoundError):  # other OS errors are not disguised as the user's disk
        main(["pretrain", str(store), "--out", str(tmp_path / "run"), "--no-progress"])


@pytest.mark.parametrize("argv, message", [
    (["tile", "x.svs", "--out", "y.h5", "--slide-mpp", "abc"],
     ("simclr-path tile: error: argument --slide-mpp: invalid float value: 'abc' "
     "(see 'simclr-path tile --help')")),
    ([], "simclr-path: error: the following arguments are required: COMMAND"),
    # an option the command lacks: its own help (the top one lists none of its options)
    (["tile", "x.svs", "--out", "y.h5", "--mmp", "0.5"],
     ("simclr-path tile: error: unrecognized arguments: --mmp 0.5; did you mean --mpp? "
      "(see 'simclr-path tile --help')")),
    (["finetune", "a.h5", "--encoder", "e", "--out", "o", "--budget-s", "2"],
     ("simclr-path finetune: error: unrecognized arguments: --budget-s 2 "
      "(see 'simclr-path finetune --help')")),
    # an empty path (an unset variable) was "." : "y.h5 is inside the input folder ." (review)
    (["embed", "", "--encoder", "e", "--out", "y.h5"],
     "simclr-path embed: error: argument store: empty path (an unset shell variable?)"),
    (["tile", "x.svs", "--out", " "],
     "simclr-path tile: error: argument --out: empty path (an unset shell variable?)"),
    # a file output ending in "/" (a folder meant): the "/" was dropped and a PNG file called
    # qc written (review); folder outputs may end in "/"
    (["tile", "x.svs", "--out", "y.h5", "--qc", "qc/"],
     ("simclr-path tile: error: argument --qc: 'qc/' names a folder (it ends with '/'), but this "
      "output is a file; give a file name")),
    (["plot-tsne", "--embeddings", "e.h5", "--out-label", "a.png", "--out-slide", "figs/."],
     "simclr-path plot-tsne: error: argument --out-slide: 'figs/.' names a folder (it ends with '.')"),
])
def test_a_usage_error_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err


def test_folder_outputs_and_inputs_may_end_in_a_slash():
    from simclr_path.cli import build_parser

    parser = build_parser()
    for argv in (["pretrain", "s.h5", "--out", "run/"], ["classify", "--embeddings", "e/", "--out", "r/"],
                 ["finetune", "s.h5", "--encoder", "run/", "--out", "ft/"]):
        args = parser.parse_args(argv)
        assert args.out.name in ("run", "r", "ft"), argv


def test_an_output_under_a_file_and_an_unreadable_input_say_what_they_are(tmp_path, capsys,
                                                                         monkeypatch):
    import errno

    import simclr_path.train

    (tmp_path / "afile").write_text("x")
    rc, err = _err(["demo-slide", "--out", str(tmp_path / "afile" / "x.tiff")], capsys)
    assert rc == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err
    store = tmp_path / "s.h5"
    store.write_bytes(b"")
    monkeypatch.setattr(simclr_path.train, "pretrain", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", "cfg.yaml")))
    rc, err = _err(["pretrain", str(store), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and err.strip().endswith("cfg.yaml: Permission denied; check its permissions")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`simclr-path schema | head -1` printed a BrokenPipeError traceback."""
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m simclr_path schema | true; "
                          "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.strip() in ("0", "141")  # 141: stopped by the closed pipe, as `yes` is


def test_switches_every_long_running_command_shares(tmp_path):
    """embed and finetune had no --no-progress (tile, import-patches and pretrain do); a tile
    switch set true in a config could not be turned off on the command line."""
    from simclr_path.cli import build_parser, parse_args

    p = build_parser()
    for argv in (["embed", "s.h5", "--encoder", "e.pt", "--out", "o.h5", "--no-progress"],
                 ["finetune", "s.h5", "--encoder", "e.pt", "--out", "o", "--no-progress"]):
        assert parse_args(p, argv).no_progress is True
    args = parse_args(p, ["tile", "s.svs", "--out", "o.h5", "--no-remove-pen",
                          "--no-mpp-from-objective"])
    assert args.remove_pen is False and args.mpp_from_objective is False
    assert parse_args(p, ["tile", "s.svs", "--out", "o.h5"]).remove_pen is None  # the config's
    # one name for one thing: the classify folder is --classify in the plot commands too
    assert parse_args(p, ["predict", "--classify", "c", "--embeddings", "e.h5", "--out",
                          "p.csv"]).model.name == "c"
    assert parse_args(p, ["finetune", "s.h5", "--encoder", "e.pt", "--out", "o", "--folds",
                          "3"]).folds == 3


def test_every_speed_key_is_an_option_of_its_stage(monkeypatch):
    """The workflow passes config.SPEED_KEYS on the command line as --KEY (common.smk,
    speed_options), not in the stage's config file, so that changing one reruns nothing: each
    option must exist and reach the configuration the stage runs with."""
    import dataclasses

    from simclr_path import config, embed, finetune, tiling, train
    from simclr_path.cli import build_parser, parse_args

    class Captured(Exception):
        pass

    def capture(*args, **kwargs):
        raise Captured(kwargs.get("cfg", args[2] if len(args) > 2 else None))

    monkeypatch.setattr(tiling, "tile_slide", capture)
    monkeypatch.setattr(train, "pretrain", capture)
    monkeypatch.setattr(embed, "embed_store", capture)
    monkeypatch.setattr(finetune, "finetune", capture)
    stage = {
        "tile": ["tile", "s.svs", "--out", "o.h5"],
        "train": ["pretrain", "s.h5", "--out", "run"],
        "embed": ["embed", "s.h5", "--encoder", "e.pt", "--out", "o.h5"],
        "finetune": ["finetune", "s.h5", "--encoder", "e.pt", "--out", "o"],
    }
    assert set(config.SPEED_KEYS) == set(stage)
    defaults = config.defaults_dict()
    for section, keys in config.SPEED_KEYS.items():
        for key in keys:
            default, flag = defaults[section][key], key.replace("_", "-")
            value = (not default) if isinstance(default, bool) else default + 3
            option = ([f"--{flag}"] if value else [f"--no-{flag}"]) if isinstance(value, bool) \
                else [f"--{flag}", str(value)]
            args = parse_args(build_parser(), stage[section] + option)
            with pytest.raises(Captured) as got:
                args._run(args)
            cfg = got.value.args[0]
            if dataclasses.is_dataclass(cfg) and hasattr(cfg, section):
                cfg = getattr(cfg, section)  # the whole configuration (pretrain, finetune)
            assert getattr(cfg, key) == value, (section, key)


@pytest.mark.parametrize("command", ["finetune", "embed", "tile", "classify"])
def test_commands_other_than_pretrain_refuse_to_run_as_one_of_several_processes(
        command, tmp_path, capsys, monkeypatch):
    """finetune under torchrun ran the whole job in every process, each replacing the others'
    results folder (the work done twice, no speed-up, and no word of it) (review)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = {"finetune": ["finetune", "s.h5", "--encoder", "e.pt", "--out", "ft"],
            "embed": ["embed", "s.h5", "--encoder", "e.pt", "--out", "e.h5"],
            "tile": ["tile", "s.svs", "--out", "s.h5"],
            "classify": ["classify", "--embeddings", "e.h5", "--out", "c"]}[command]
    rc, err = _err([argv[0]] + [a if a.startswith("-") else str(tmp_path / a)
                                for a in argv[1:]], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{command} runs in one process (process 1 of 2 here: started by torchrun?)" in err
    assert not any(tmp_path.iterdir())


def test_pretrain_may_run_as_one_of_several_processes(monkeypatch):
    from simclr_path.cli import build_parser

    args = build_parser().parse_args(["pretrain", "s.h5", "--out", "r"])
    assert args._distributed
