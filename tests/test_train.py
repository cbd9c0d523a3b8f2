"""SimCLR pretraining: learning, resume == uninterrupted, run directory, bad input, DDP on gloo."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import fake_mlflow

import simclr_path.train as T
from simclr_path.cli import Terminated, main
from simclr_path.config import load_config
from simclr_path.errors import SimclrPathError
from simclr_path.model import encoder_info, load_encoder, load_projection_head
from simclr_path.store import PatchStoreWriter

COMPLETE = ["summary.json", "encoder.pt"]


def _easy_store(path, n=32, size=32, seed=0, slide_id="E", mpp=0.5):
    """Patches of a few distinct coloured shapes: easy to tell apart, hard to confuse views."""
    rng = np.random.default_rng(seed)
    patches = np.full((n, size, size, 3), 235, dtype=np.uint8)
    for i in range(n):
        colour = rng.integers(20, 200, 3)
        y, x = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        patches[i, y:y + h, x:x + w] = colour
        patches[i] = np.clip(patches[i] + rng.normal(0, 8, patches[i].shape), 0, 255)
    with PatchStoreWriter(path, patch_size=size, attrs={"slide_id": slide_id, "kind": "slide", "mpp": mpp}) as w:
        w.append(patches, np.zeros((n, 2), dtype=np.int64))
    return path


# timm's tiny test model: these tests check the training loop, not what it learns, and
# ResNet-18 made them 2x slower (float16 on a CPU, which has no fast kernels for it, 5x)
ARCH = "test_resnet"


def _cfg(**train):
    # device cpu: the bitwise resume checks hold on CPU (on a GPU cuDNN's autotuning may pick
    # other kernels in the resumed process)
    base = {"batch_size": 8, "max_steps": 4, "workers": 0, "optimizer": "adamw", "lr": 1e-3,
            "lr_scaling": "none", "warmup_epochs": 0.0, "checkpoint_every": 2, "log_every": 2,
            "tensorboard": False, "device": "cpu"}
    base.update(train)
    return load_config(overrides={"augment": {"image_size": 32}, "model": {"arch": ARCH},
                                  "train": base})


@pytest.fixture
def stores(tmp_path):
    return [_easy_store(tmp_path / "a.h5", seed=0, slide_id="A"),
            _easy_store(tmp_path / "b.h5", n=24, seed=1, slide_id="B")]


# NT-Xent of identical embeddings (a collapsed encoder) for batch 16: log(2N - 1). A random
# ResNet-18 starts near it on 32 px views and collapses onto it within a few dozen steps, so
# learning is shown with timm's tiny test_resnet, whose loss falls well below it (2.0-2.3 after
# 40 steps for training seeds 0-4).
COLLAPSED_16 = math.log(2 * 16 - 1)


def _learns(stores, run, cfg):
    summary = T.pretrain(stores, run, cfg, progress=False)
    loss = pd.read_csv(run / "metrics.csv")["loss"]
    assert len(loss) == summary["steps"] == cfg.train.max_steps and np.isfinite(loss).all()
    assert loss.tail(8).mean() < loss.head(4).mean() - 0.3
    assert loss.tail(8).mean() < COLLAPSED_16 - 0.5  # positives closer than negatives


def test_a_few_steps_learn_more_than_a_collapsed_encoder(stores, tmp_path):
    cfg = _cfg(max_steps=40, batch_size=16, log_every=4)
    cfg.model.arch = "test_resnet"
    _learns(stores, tmp_path / "run", cfg)


def test_multi_crop_learns(stores, tmp_path):
    # local views as large as the global ones (the least a ResNet takes) but cropped tighter
    cfg = _cfg(max_steps=40, batch_size=16, log_every=4)
    cfg.model.arch = "test_resnet"
    cfg.augment.local_crops, cfg.augment.local_size = 2, 32
    _learns(stores, tmp_path / "run", cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["local_crops"] == 2 and summary["local_view_size"] == 32
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["augment"]["local_crops"] == 2


def _same_run(full, cut):
    """Two run directories trained the same weights and logged the same losses."""
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = pd.read_csv(full / "metrics.csv"), pd.read_csv(cut / "metrics.csv")
    assert ma["step"].tolist() == mb["step"].tolist() == list(range(1, a["step"] + 1))
    assert np.allclose(ma["loss"], mb["loss"], rtol=0, atol=0)


def _with_dropout(monkeypatch):
    """Models built by pretrain drop 20 % of the head's input: training draws from the global
    torch RNG, as timm's dropout and drop-path do."""
    import torch.nn.functional as F

    import simclr_path.model as M

    real = M.create_simclr_model

    def create(cfg):
        m = real(cfg)
        head = m.head.forward
        m.head.forward = lambda h: head(F.dropout(h, 0.2, training=m.training))
        return m

    monkeypatch.setattr(M, "create_simclr_model", create)


@pytest.mark.parametrize(("stop", "dropout"), [
    (KeyboardInterrupt, False),  # Ctrl-C
    (lambda: SystemExit(143), False),  # SIGTERM
    (KeyboardInterrupt, True),  # the global RNG in use: resuming must not shift its draws
])
def test_interrupted_then_resumed_equals_uninterrupted(stop, dropout, stores, tmp_path,
                                                       monkeypatch):
    # no periodic checkpoint and rows still pending at the interrupt: the interrupt saves both
    cfg = _cfg(max_steps=5, checkpoint_every=500, log_every=4)
    if dropout:
        _with_dropout(monkeypatch)
    T.pretrain(stores, tmp_path / "full", cfg, progress=False)

    def crash(step):
        if step == 3:
            raise stop()

    monkeypatch.setattr(T, "_on_step_end", crash)
    with pytest.raises((KeyboardInterrupt, SystemExit)), \
            pytest.warns(UserWarning, match="interrupted after step 3; saved it"):
        T.pretrain(stores, tmp_path / "cut", cfg, progress=False)
    assert not any((tmp_path / "cut" / f).exists() for f in COMPLETE)  # not complete
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"].tolist() == [1, 2, 3]
    monkeypatch.setattr(T, "_on_step_end", lambda step: None)
    summary = T.pretrain(stores, tmp_path / "cut", cfg, resume=True, progress=False)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 5
    _same_run(tmp_path / "full", tmp_path / "cut")


def test_a_resumed_run_shows_each_step_once_in_tensorboard(stores, tmp_path, monkeypatch):
    """A crash after step 3 with the checkpoint at step 2: metrics.csv went back to step 2, but
    TensorBoard kept the lost step 3 and showed it twice (1, 2, 3, 3, 4, 5)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(max_steps=5, checkpoint_every=2, log_every=1, tensorboard=True)
    run = tmp_path / "run"

    def crash(step):
        if step == 3:
            raise RuntimeError("node lost")

    monkeypatch.setattr(T, "_on_step_end", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        T.pretrain(stores, run, cfg, progress=False)
    monkeypatch.setattr(T, "_on_step_end", lambda step: None)
    # TensorBoard reads event files in name order, whose first part is the second they were
    # made in: a resume comes later (within one second and one process, the order of the
    # names' last part, a per-process counter, is not numeric once it passes 9)
    time.sleep(1.1)
    assert T.pretrain(stores, run, cfg, resume=True, progress=False)["resumed_from_step"] == 2
    steps = [e.step for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5] == pd.read_csv(run / "metrics.csv")["step"].tolist()


@pytest.mark.parametrize("when", ["files", "tracker"])
def test_resume_interrupted_finishes_a_run_killed_while_writing_its_final_files(
        stores, tmp_path, monkeypatch, when):
    """The checkpoint is saved as finished before encoder.pt and summary.json: a kill between
    them made the workflow's --resume-interrupted --force train the whole run again. So did a
    kill while the trackers uploaded, after summary.json (review)."""
    cfg = _cfg(max_steps=3)
    run = tmp_path / "run"

    def killed(*a, **k):
        raise KeyboardInterrupt

    if when == "files":
        monkeypatch.setattr("simclr_path.model.save_projection_head", killed)  # after the checkpoint
    else:
        real = T._Tracker.close
        monkeypatch.setattr(T._Tracker, "close", lambda self, summary=None, *a, **k: (
            killed() if summary else real(self, summary, *a, **k)))
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(stores, run, cfg, progress=False)
    monkeypatch.undo()
    for name in [*T.COMPLETE_FILES, "metrics.csv", "config.yaml"]:  # as a workflow deletes them
        (run / name).unlink(missing_ok=True)
    before = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    s = T.pretrain(stores, run, cfg, resume="interrupted", force=True, progress=False)
    assert s["resumed_from_step"] == 3 and s["steps"] == 3 and (run / "summary.json").is_file()
    after = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained again


def _cut_at_3(stores, run, cfg, monkeypatch):
    """A run of ``cfg`` interrupted (Ctrl-C) after step 3, its checkpoint saved."""
    def crash(step):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_on_step_end", crash)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="interrupted after"):
        T.pretrain(stores, run, cfg, progress=False)
    monkeypatch.setattr(T, "_on_step_end", lambda step: None)


def test_resume_interrupted_continues_a_killed_job_even_without_its_metrics(
        stores, tmp_path, monkeypatch, capsys):
    """The workflow's rule: --resume-interrupted --force. Snakemake deletes a failed job's
    outputs (metrics.csv among them) before the rerun; the checkpoint keeps the history."""
    cfg = _cfg(max_steps=5, checkpoint_every=500, log_every=4)
    T.pretrain(stores, tmp_path / "full", cfg, progress=False)
    _cut_at_3(stores, tmp_path / "cut", cfg, monkeypatch)
    (tmp_path / "cut" / "metrics.csv").unlink()
    capsys.readouterr()
    summary = T.pretrain(stores, tmp_path / "cut", cfg, resume="interrupted", force=True,
                         progress=False)
    assert "resuming the interrupted run at step 3" in capsys.readouterr().err
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 5
    _same_run(tmp_path / "full", tmp_path / "cut")
    # other workers: the same run, continued
    _cut_at_3(stores, tmp_path / "w", cfg, monkeypatch)
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=1))
    assert T.pretrain(stores, tmp_path / "w", more, resume="interrupted", force=True,
                      progress=False)["resumed_from_step"] == 3


@pytest.mark.parametrize("case", ["finished", "rerun", "config", "stores", "rewritten", "processes",
                                  "weights"])
def test_resume_interrupted_starts_over_for_anything_but_the_same_unfinished_run(
        case, stores, tmp_path, monkeypatch):
    """"rerun": a workflow deletes a job's declared outputs before it reruns it (--forcerun),
    so a finished run looked killed while writing its final files and gave its old encoder
    back; "weights": new initial weights at the same path were not trained from (review)."""
    cfg = _cfg(max_steps=5, checkpoint_every=500, log_every=4)
    run = tmp_path / "run"
    if case == "weights":
        import timm

        weights = tmp_path / "w.pt"
        torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), weights)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(weights)))
    if case in ("finished", "rerun"):
        T.pretrain(stores, run, cfg, progress=False)
    else:
        _cut_at_3(stores, run, cfg, monkeypatch)
    if case == "rerun":
        for name in [*T.COMPLETE_FILES, "metrics.csv", "config.yaml"]:
            (run / name).unlink()
    if case == "weights":  # new weights moved into place, with an older file time (cp -p, mv)
        t = (run / "checkpoint.pt").stat().st_mtime
        torch.manual_seed(1)
        torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), weights)
        os.utime(weights, (t - 3600, t - 3600))
    why = {"finished": "of a finished run", "rerun": "of a finished run",
           "weights": "of other initial weights (the model.weights file has changed since)",
           "config": "of another configuration: train.lr (0.001, now 0.002)",
           "stores": "of other patch stores",
           "rewritten": "older than its patch stores (written again since)",
           "processes": "of 2 processes, not 1"}[case]
    given = stores[:1] if case == "stores" else stores
    if case == "config":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=2e-3))
    if case == "rewritten":  # the same slide and patch count, tiled again after the checkpoint
        t = (run / "checkpoint.pt").stat().st_mtime
        os.utime(stores[1], (t + 5, t + 5))
    if case == "processes":  # a job killed under torchrun with 2 processes, rerun with one
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        ck["world_size"] = 2
        torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(SimclrPathError, match=re.escape(f"checkpoint {why}, so it is not "
                                                        "continued; pass --force")):
        T.pretrain(given, run, cfg, resume="interrupted", progress=False)
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {why}; starting over")):
        summary = T.pretrain(given, run, cfg, resume="interrupted", force=True, progress=False)
    assert "resumed_from_step" not in summary or summary["resumed_from_step"] in (None, 0)
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="resume must be True, False or 'interrupted'"):
        T.pretrain(given, run, cfg, resume="yes", force=True, progress=False)


def test_without_a_terminal_progress_is_a_line_a_minute(stores, tmp_path, monkeypatch, capsys):
    """A workflow's log file got no progress at all (tqdm draws nothing off a terminal)."""
    monkeypatch.setattr(T, "LOG_LINE_S", 0.0)  # every log window
    T.pretrain(stores, tmp_path / "a", _cfg(max_steps=4, log_every=2), progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("pretrain: step")]
    assert [x.split()[2] for x in lines] == ["2/4", "4/4"] and " loss " in lines[0]
    T.pretrain(stores, tmp_path / "b", _cfg(max_steps=4, log_every=2), progress=False)
    assert "pretrain: step" not in capsys.readouterr().err


def test_an_interrupt_whose_save_fails_names_the_older_checkpoint(stores, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=5, checkpoint_every=2, log_every=1)
    real = T.save_checkpoint

    def disk_full(path, state):
        if state["step"] == 3:
            raise OSError(28, "No space left on device")
        real(path, state)

    monkeypatch.setattr(T, "save_checkpoint", disk_full)
    monkeypatch.setattr(T, "_on_step_end", lambda step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 3 else None)
    with pytest.raises(KeyboardInterrupt), pytest.warns(
            UserWarning, match=r"interrupted after step 3, could not save it \(OSError: .*No space "
            r"left on device\); --resume continues from step 2"):
        T.pretrain(stores, tmp_path / "cut", cfg, progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_interrupt_during_a_step_saves_only_finished_steps(stores, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a step's update waits for the step to finish, which is saved;
    an interruption the loop cannot defer leaves the last checkpoint, never a half-updated one."""
    import signal

    from simclr_path import loss as L

    cfg = _cfg(max_steps=6, checkpoint_every=2, log_every=4)
    T.pretrain(stores, tmp_path / "full", cfg, progress=False)
    orig = L.NTXentLoss.forward

    def interrupt_in_step(n, how):
        calls = itertools.count(1)

        def forward(self, *z):
            if next(calls) == n:
                how()
            return orig(self, *z)
        return forward

    # SIGINT during step 3's loss: step 3 completes, then the interrupt is raised and step 3 saved
    monkeypatch.setattr(L.NTXentLoss, "forward", interrupt_in_step(3, lambda: signal.raise_signal(signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="after step 3"):
        T.pretrain(stores, tmp_path / "sig", cfg, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    # and the loader workers' death reports (off while the run stopped on the signal)
    from simclr_path import outputs

    assert signal.getsignal(signal.SIGCHLD) is not outputs._no_op
    assert torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["step"] == 3
    # raised inside step 3 itself: its state is half-made, so step 2's checkpoint stays
    monkeypatch.setattr(L.NTXentLoss, "forward", interrupt_in_step(3, lambda: (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(stores, tmp_path / "raw", cfg, progress=False)
    assert torch.load(tmp_path / "raw" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(L.NTXentLoss, "forward", orig)
    for run in ("sig", "raw"):
        assert T.pretrain(stores, tmp_path / run, cfg, resume=True, progress=False)["steps"] == 6
        _same_run(tmp_path / "full", tmp_path / run)


def test_defer_signals_holds_one_interrupt_and_lets_a_second_through():
    import signal

    guard = T._DeferSignals(enabled=True)
    try:
        guard.hold()
        signal.raise_signal(signal.SIGINT)  # waits
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second one does not
        guard.hold()
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            guard.release()
        guard.release()  # nothing left waiting
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    off = T._DeferSignals(enabled=False)  # DDP: nothing is wrapped
    assert not off.previous and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# two CPU processes (gloo) under torchrun, as the README's multi-GPU command; the arguments of
# `pretrain` after the stores and --out
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun_pretrain(stores, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "simclr_path",
            "pretrain", *map(str, stores), "--out", str(out), *BASE, "--batch-size", "4",
            "--arch", "test_resnet", "--no-progress", *extra]


def test_defer_signals_under_ddp_wait_for_the_ranks_to_agree(monkeypatch):
    import signal

    guard = T._DeferSignals(enabled=True, agree=True)
    try:
        assert not guard.requested
        signal.raise_signal(signal.SIGTERM if callable(signal.getsignal(signal.SIGTERM)) else signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # not held, a repeat: recorded once, nothing raised
        assert guard.requested
        guard.release()  # the end of a step does not act alone: the ranks decide
        assert guard.requested
        monkeypatch.setattr(T.time, "monotonic", lambda: guard.since + guard.REPEAT_S + 1)
        with pytest.raises(KeyboardInterrupt):  # a signal long after the first acts at once
            signal.raise_signal(signal.SIGINT)
        guard.pending = None
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            guard.fire()  # the agreed stop: the waiting signal's own handler
        with pytest.raises(KeyboardInterrupt):
            guard.fire()  # another rank was signalled, this one was not
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_torchrun_interrupt_saves_the_step_every_rank_finished(tmp_path):
    """Ctrl-C on torchrun (forwarded to each rank): the ranks stop after one step and save it,
    where before an interrupt under DDP fell back to the last periodic checkpoint."""
    import signal

    a = _easy_store(tmp_path / "a.h5")
    out = tmp_path / "run"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"train": {"log_every": 1, "checkpoint_every": 100000}}))
    cmd = _torchrun_pretrain([a], out, "--max-steps", "100000", "--config", str(conf))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=TORCHRUN_ENV)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (out / "metrics.csv").read_text().splitlines() if (out / "metrics.csv").is_file() else []
            if len(rows) > 3:  # header + 3 steps
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ck = T.load_checkpoint(out / "checkpoint.pt")
    steps = pd.read_csv(out / "metrics.csv")["step"].tolist()
    assert ck["step"] >= 3 and steps[-1] == ck["step"] and ck["world_size"] == 2, err[-2000:]
    assert f"interrupted after step {ck['step']}; --resume continues from step {ck['step']}" in err
    assert not (out / "summary.json").exists()


def test_stores_at_several_resolutions_are_warned_about(tmp_path):
    mixed = [_easy_store(tmp_path / "a.h5", slide_id="A"),
             _easy_store(tmp_path / "b.h5", slide_id="B", mpp=1.0)]
    with pytest.warns(UserWarning, match=r"at 2 resolutions \(0.5, 1 um/px\).*tile every slide at one --mpp"):
        s = T.pretrain(mixed, tmp_path / "run", _cfg(max_steps=1), progress=False)
    assert s["mpp"] is None


def test_stores_of_several_patch_sizes_are_warned_about(tmp_path):
    """Mixed mpp had a warning; mixed patch sizes (the encoder then records none) were silent
    (review)."""
    mixed = [_easy_store(tmp_path / "a.h5", slide_id="A"),
             _easy_store(tmp_path / "b.h5", slide_id="B", size=40)]
    with pytest.warns(UserWarning, match=r"have 2 patch sizes \(32, 40 px\).*one --patch-size"):
        T.pretrain(mixed, tmp_path / "run", _cfg(max_steps=1), progress=False)
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["patch_size"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one size: no warning
        T.pretrain(mixed[:1], tmp_path / "one", _cfg(max_steps=1), progress=False)


def test_stores_with_and_without_an_mpp_are_warned_about(tmp_path):
    """Imported tiles (no mpp) beside slides at 1 um/px: the encoder records 1 um/px."""
    mixed = [_easy_store(tmp_path / "a.h5", slide_id="A", mpp=1.0),
             _easy_store(tmp_path / "b.h5", slide_id="B", mpp=None)]
    with pytest.warns(UserWarning, match=r"b.h5: no mpp recorded \(imported tiles\?\) while other "
                                         r"stores are at 1 um/px, which the encoder records"):
        s = T.pretrain(mixed, tmp_path / "run", _cfg(max_steps=1), progress=False)
    assert s["mpp"] == 1.0


def test_resume_without_a_checkpoint(stores, tmp_path, capsys):
    cfg = _cfg(max_steps=2)
    with pytest.warns(UserWarning, match="no checkpoint in .*new; starting from step 0"):
        assert T.pretrain(stores, tmp_path / "new", cfg, resume=True, progress=False)["steps"] == 2
    # a finished run whose checkpoint was deleted is not thrown away by --resume
    run = tmp_path / "run"
    T.pretrain(stores, run, cfg, progress=False)
    (run / "checkpoint.pt").unlink()
    before = (run / "encoder.pt").read_bytes()
    rc, err = _cli([*stores, *BASE, "--out", run, "--resume"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "holds a finished run (summary.json, encoder.pt" in err and "--force" in err
    assert (run / "encoder.pt").read_bytes() == before and (run / "summary.json").is_file()
    with pytest.warns(UserWarning, match="starting from step 0"):
        s = T.pretrain(stores, run, cfg, resume=True, force=True, progress=False)
    assert s["resumed_from_step"] is None and s["steps"] == 2


def test_resume_refuses_other_stores(stores, tmp_path, capsys):
    a, b = stores
    c = _easy_store(tmp_path / "c.h5", n=40, seed=2, slide_id="C")
    run = tmp_path / "run"
    T.pretrain(stores, run, _cfg(max_steps=2), progress=False)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["stores"] == [{"path": str(a.resolve()), "slide_id": "A", "patches": 32},
                            {"path": str(b.resolve()), "slide_id": "B", "patches": 24}]
    for given, what in [([c], (r"2 stores, now 1; not given: .*a.h5 \(slide A, 32 patches\) and "
                               r"1 more; new: .*c.h5 \(slide C, 40 patches\)")),
                        ([b, a], "the same stores in another order, which changes every batch"),
                        ([a, c], r"store 2 was .*b.h5 \(slide B, 24 patches\), now .*c.h5"),
                        ([a, _easy_store(tmp_path / "b2.h5", n=24, seed=3, slide_id="B")],
                         r"store 2 was .*b.h5, now .*b2.h5")]:  # same id and size, b.h5 still there
        with pytest.raises(SimclrPathError, match=f"was trained on other patch stores \\({what}.*\\); "
                                                  "resume with the stores it was trained on.*--force"):
            T.pretrain(given, run, _cfg(max_steps=4), resume=True, progress=False)
    # through the CLI: one line, nothing of the run touched
    rc, err = _cli([c, *BASE, "--max-steps", "4", "--out", run, "--resume"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1 and "other patch stores" in err, err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (run / "summary.json").is_file()
    # moved stores (old paths gone) resume with a warning
    moved = tmp_path / "moved"
    moved.mkdir()
    a.rename(moved / "a.h5")
    b.rename(moved / "b.h5")
    with pytest.warns(UserWarning, match=r"a.h5 is now .*moved.a.h5 \(and 1 more\)"):
        s = T.pretrain([moved / "a.h5", moved / "b.h5"], run, _cfg(max_steps=3), resume=True,
                       progress=False)
    assert s["steps"] == 3
    # a checkpoint from before stores were recorded: not checked, said once
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    del ck["stores"]
    torch.save(ck, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match="did not record its stores"):
        assert T.pretrain([moved / "a.h5", moved / "b.h5"], run, _cfg(max_steps=4), resume=True,
                          progress=False)["steps"] == 4


def test_run_directory_and_reloaded_encoder(stores, tmp_path):
    cfg = _cfg(max_steps=3, tensorboard=True)
    run = tmp_path / "run"
    summary = T.pretrain(stores, run, cfg, progress=False)
    for name in ["encoder.pt", "encoder.json", "head.pt", "checkpoint.pt", "metrics.csv", "loss.png",
                 "config.yaml", "summary.json"]:
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("steps", "epochs", "wall_time_s", "pairs_per_s", "final_loss"):
        assert key in on_disk
    assert np.isfinite(on_disk["final_loss"]) and on_disk["pairs_per_s"] > 0
    assert list(pd.read_csv(run / "metrics.csv").columns) == T.METRIC_COLUMNS
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["augment"]["image_size"] == 32
    info = encoder_info(run / "encoder.pt")
    assert info["arch"] == ARCH and info["image_size"] == 32 and info["mpp"] == 0.5
    assert info["crop_scale"] == resolved["augment"]["crop_scale"]  # embed's default size uses it
    assert info["patch_size"] == 32  # the training patches' side, for stores of another side
    assert info["head"]["layers"] == 2 and info["head"]["out_dim"] == 128

    # the encoder is the trained backbone: same features as the checkpoint's weights
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    from simclr_path.model import create_simclr_model

    model = create_simclr_model(load_config(overrides={"model": {"arch": ARCH}}).model)
    model.load_state_dict(ck["model"])
    model.eval()
    enc = load_encoder(run)
    head = load_projection_head(run)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h, z = model(x)
        assert torch.equal(enc(x), h)
        assert torch.equal(head(enc(x)), z)
        assert torch.equal(load_encoder(run / "encoder.pt")(x), enc(x))


def test_existing_run_dir_needs_force_or_resume(stores, tmp_path):
    cfg = _cfg(max_steps=2)
    run = tmp_path / "run"
    T.pretrain(stores, run, cfg, progress=False)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SimclrPathError, match="--resume .* or --force"):
        T.pretrain(stores, run, cfg, progress=False)
    s = T.pretrain(stores, run, cfg, force=True, progress=False)
    assert s["resumed_from_step"] is None
    assert (run / "notes.txt").read_text() == "mine"  # --force removes only run files
    with pytest.warns(UserWarning, match="already finished its 2 steps"):  # nothing left to do
        again = T.pretrain(stores, run, cfg, resume=True, progress=False)
    assert again == s and (run / "summary.json").is_file()


def test_force_and_resume_leave_a_folder_that_is_not_a_run_alone(stores, tmp_path, capsys):
    """A project folder given as --out lost its mlruns/ and wandb/ and had its own config.yaml
    replaced, with --force or with a --resume that found no checkpoint; its mlflow.db (MLflow's
    default store in the working folder) made it count as a run and lost it to --force."""
    proj = tmp_path / "proj"
    for d in ("mlruns/0/run1", "wandb/offline-run-1"):
        (proj / d).mkdir(parents=True)
    (proj / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    (proj / "config.yaml").write_text("train: {max_steps: 1}\n")
    # names any project may hold: they too made it a run (a reviewer lost mlruns/ to --force
    # in a folder where plot-loss had written loss.png)
    (proj / "metrics.csv").write_text("a,b\n1,2\n")
    (proj / "loss.png").write_bytes(b"\x89PNG")
    before = sorted(p.relative_to(proj) for p in proj.rglob("*"))
    for flag in ("--force", "--resume", "--resume-interrupted"):
        extra = ["--force"] if flag != "--force" else []
        rc, err = _cli([*stores, *BASE, "--out", proj, flag, *extra], capsys)
        assert rc != 0 and len(err.splitlines()) == 1, err
        assert "is not a pretraining run directory" in err and "choose another --out" in err
        assert "mlflow.db" not in err  # it is there: the folder does not lack it
    assert sorted(p.relative_to(proj) for p in proj.rglob("*")) == before
    assert (proj / "config.yaml").read_text() == "train: {max_steps: 1}\n"
    assert (proj / "metrics.csv").read_text() == "a,b\n1,2\n"
    # a run's own folder is one, even when only its config.yaml is left, or only its tracking
    # folder (a crash before the first log; the workflow deletes a failed job's outputs)
    run = tmp_path / "run"
    cfg = _cfg(max_steps=1, tensorboard=True)
    T.pretrain(stores, run, cfg, progress=False)
    for name in T.RUN_FILES:
        if name != "config.yaml":
            (run / name).unlink(missing_ok=True)
    assert T.pretrain(stores, run, cfg, force=True, progress=False)["steps"] == 1
    for name in T.RUN_FILES:
        (run / name).unlink(missing_ok=True)
    assert sorted(p.name for p in run.iterdir()) == [T.RUN_MARKER, "tensorboard"]
    assert T.pretrain(stores, run, cfg, force=True, progress=False)["steps"] == 1
    # a run of a version before the marker: its checkpoint says it is one
    T.pretrain(stores, run, cfg, force=True, progress=False)
    (run / T.RUN_MARKER).unlink()
    assert (run / "checkpoint.pt").is_file()
    assert T.pretrain(stores, run, cfg, force=True, progress=False)["steps"] == 1
    # a folder where the marker goes (a run by its checkpoint): one line, not an OS traceback
    (run / T.RUN_MARKER).unlink()
    (run / T.RUN_MARKER).mkdir()
    rc, err = _cli([*stores, *BASE, "--out", run, "--force"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1 and "is not a file" in err, err
    (run / T.RUN_MARKER).rmdir()
    # a project folder with a run's encoder and config.yaml copied in, and a fine-tuning
    # results folder (an encoder of its own): not runs, --force deleted mlruns/ and the encoder
    copied, ft = tmp_path / "copied", tmp_path / "ft"
    for d in (copied, ft):
        (d / "mlruns" / "0").mkdir(parents=True)
        for name in ("encoder.pt", "encoder.json", "config.yaml"):
            (d / name).write_bytes((run / name).read_bytes())
    (ft / ".simclr-path-finetune").write_text("simclr-path finetune results\n")
    (ft / T.RUN_MARKER).write_text("")  # even beside a pretraining marker
    (ft / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    for d in (copied, ft):
        before = sorted(p.relative_to(d) for p in d.rglob("*"))
        rc, err = _cli([*stores, *BASE, "--out", d, "--force"], capsys)
        assert rc != 0 and "is not a pretraining run directory" in err, err
        assert sorted(p.relative_to(d) for p in d.rglob("*")) == before
    # a file as --out with --resume: one line, no "starting from step 0" warning before it
    (tmp_path / "afile").write_text("x")
    rc, err = _cli([*stores, *BASE, "--out", tmp_path / "afile", "--resume"], capsys)
    assert rc != 0 and len(err.splitlines()) == 1 and "is not a directory" in err, err


def test_pretrain_takes_one_path_or_opened_stores_and_never_its_input_as_out(stores, tmp_path):
    from simclr_path.store import PatchStore

    cfg = _cfg(max_steps=1)
    assert T.pretrain(str(stores[0]), tmp_path / "one", cfg, progress=False)["n_stores"] == 1
    opened = [PatchStore(p) for p in stores]
    assert T.pretrain(opened, tmp_path / "two", cfg, progress=False)["n_stores"] == len(stores)
    with pytest.raises(SimclrPathError, match=r"is an input of this command \(stores\)"):
        T.pretrain(opened, stores[0], cfg, force=True, progress=False)
    assert PatchStore(stores[0]).patch_size == opened[0].patch_size  # still a store


def test_nan_loss_stops_with_clear_error(stores, tmp_path, monkeypatch):
    from simclr_path import loss as L

    orig = L.NTXentLoss.forward
    monkeypatch.setattr(L.NTXentLoss, "forward", lambda self, *z: orig(self, *z) * float("nan"))
    # no checkpoint before it: none is named as "the last good" one (review)
    # (the run already uses adamw: that advice is left out)
    with pytest.raises(SimclrPathError, match="loss became nan at step 1; lower train.lr or set "
                                              "train.amp false; no checkpoint was written before"):
        T.pretrain(stores, tmp_path / "run", _cfg(max_steps=3), progress=False)
    assert not any((tmp_path / "run" / f).exists() for f in COMPLETE)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # and a rerun is not sent to --resume, which has nothing to continue
    with pytest.raises(SimclrPathError, match="it has no checkpoint to resume, so pass --force"):
        T.pretrain(stores, tmp_path / "run", _cfg(max_steps=3), progress=False)
    # after a checkpoint (step 2), that one is named
    calls = {"n": 0}

    def nan_from_step_3(self, *z):
        calls["n"] += 1
        return orig(self, *z) * (float("nan") if calls["n"] > 2 else 1.0)

    monkeypatch.setattr(L.NTXentLoss, "forward", nan_from_step_3)
    with pytest.raises(SimclrPathError, match=r"loss became nan at step 3; .*the last good "
                                              r"checkpoint is .*checkpoint.pt \(step 2;"):
        T.pretrain(stores, tmp_path / "run2", _cfg(max_steps=6, checkpoint_every=2, log_every=1),
                   progress=False)


def test_weights_made_nan_by_an_update_are_never_saved(stores, tmp_path, monkeypatch):
    """An update comes after the loss logged for its step: weights it made NaN were saved as a
    'completed' run's encoder (embed failed on them later), or as "the last good checkpoint"
    named after the next step's NaN loss (review)."""
    orig = torch.optim.AdamW.step

    def nan_at(n):
        calls = {"n": 0}

        def step(self, *a, **k):
            out = orig(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == n:  # its loss (before the update) was finite
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("nan"))
            return out
        return step

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_at(3))  # the last of 3 steps
    with pytest.raises(SimclrPathError, match=r"the weights became NaN or infinite by step 3 .*"
                                              r"the last good checkpoint is .*checkpoint.pt "
                                              r"\(step 2; .*; no encoder was written"):
        T.pretrain(stores, tmp_path / "run", _cfg(max_steps=3), progress=False)
    assert not any((tmp_path / "run" / f).exists() for f in COMPLETE)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values()
                                   if v.is_floating_point())
    # NaN made by update 4, a checkpoint step: not saved over the good one of step 2
    monkeypatch.setattr(torch.optim.AdamW, "step", nan_at(4))
    with pytest.raises(SimclrPathError, match=r"by step 4 .*checkpoint.pt \(step 2;"):
        T.pretrain(stores, tmp_path / "run2", _cfg(max_steps=6), progress=False)
    ck = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2


def test_time_budget_stops_cleanly(stores, tmp_path):
    s = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=50, time_budget_s=1e-6), progress=False)
    assert s["stopped"] == "time_budget" and s["steps"] == 1
    assert (tmp_path / "run" / "encoder.pt").is_file()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1


def test_replan_scheduler_equals_a_fresh_schedule():
    lr = 0.5
    def lrs(sched, opt, n):
        out = []
        for s in range(1, n + 1):
            sched.step_update(s)
            out.append(opt.param_groups[0]["lr"])
        return out

    def new_opt():
        return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)

    for total, warm in [(40, 10), (12, 10), (30, 0)]:
        o1, o2 = new_opt(), new_opt()
        replanned = T.build_scheduler(o1, total_steps=1000, warmup_steps=10)
        T.replan_scheduler(replanned, total, warm)
        fresh = T.build_scheduler(o2, total, min(warm, total // 2))
        used = lrs(replanned, o1, total)
        assert used == pytest.approx(lrs(fresh, o2, total))
        # every step trains (the last one too, at a few percent of the peak at most); zero after it
        assert all(v > 0 for v in used) and used[-1] < 0.1 * lr
        replanned.step_update(total + 1)
        assert o1.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_budget_steps_from_the_measured_rate():
    assert T.budget_steps(4, 2.0, (2, 1.0), 10.0, 1000) is None  # too few steps measured
    # 10 steps in 5 s since the reference: 2 steps/s, 10 s left -> 20 more steps
    assert T.budget_steps(12, 10.0, (2, 5.0), 20.0, 1000) == 32
    assert T.budget_steps(12, 10.0, (2, 5.0), 20.0, 25) == 25  # capped by epochs / max_steps
    assert T.budget_steps(12, 25.0, (2, 5.0), 20.0, 1000) == 12  # over budget: stop now


def test_time_budget_plans_the_schedule_to_end_at_the_budget(stores, tmp_path, monkeypatch):
    class Clock:  # every reading advances 50 ms: a steady, machine-independent step rate
        t = 0.0

        @classmethod
        def perf_counter(cls):
            cls.t += 0.05
            return cls.t

    monkeypatch.setattr(T, "time", Clock)
    cfg = _cfg(max_steps=100_000, time_budget_s=2.0, log_every=1, checkpoint_every=10**6,
               warmup_epochs=0.5)  # 4 warm-up steps
    s = T.pretrain(stores, tmp_path / "run", cfg, progress=False)
    assert s["stopped"] == "time_budget" and 6 < s["steps"] < s["total_steps"] == 100_000
    # the re-planned warm-up + cosine ran to its end at the budget, not its first percent
    assert s["steps"] == s["planned_steps"] and s["wall_time_s"] <= 2.0 + 0.1
    lr = pd.read_csv(tmp_path / "run" / "metrics.csv")["lr"].to_numpy()
    assert lr.max() == pytest.approx(1e-3) and 0 < lr[-1] < 1e-4, lr
    assert (tmp_path / "run" / "encoder.pt").is_file()


def test_lr_schedule_and_lars_groups():
    cfg = load_config(overrides={"train": {"lr": 0.3, "batch_size": 512}}).train
    assert T.scaled_lr(cfg, 512) == pytest.approx(0.6)
    sqrt = load_config(overrides={"train": {"lr": 0.3, "lr_scaling": "sqrt"}}).train
    assert T.scaled_lr(sqrt, 1024) == pytest.approx(0.6)  # sqrt(1024 / 256) = 2
    assert T.scaled_lr(sqrt, 64) == pytest.approx(0.15)
    none = load_config(overrides={"train": {"lr": 0.3, "lr_scaling": "none"}}).train
    assert T.scaled_lr(none, 1024) == 0.3
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = T.build_optimizer(model, cfg, 0.6)
    assert type(opt).__name__ == "Lars"
    decay, no_decay = opt.param_groups
    assert decay["always_adapt"] and decay["weight_decay"] == cfg.weight_decay
    assert not no_decay["always_adapt"] and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3  # linear bias, bn weight, bn bias
    sched = T.build_scheduler(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for s in range(1, 101):
        sched.step_update(s)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.06) and lrs[9] == pytest.approx(0.6)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and 0 < lrs[-1] < 1e-3


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_tracking_package_missing_does_not_break(package, stores, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == package:
            raise ImportError(f"no {package}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.warns(UserWarning, match=f"{package} is not installed") as record:
        T.pretrain(stores, tmp_path / "run", _cfg(max_steps=1, **{package: True}), progress=False)
    assert len([w for w in record if "is not installed" in str(w.message)]) == 1
    assert (tmp_path / "run" / "summary.json").is_file()
    assert not (tmp_path / "run" / ("mlruns" if package == "mlflow" else "wandb")).exists()


def _fake_wandb(monkeypatch):
    """A ``wandb`` module that records init / log / summary / finish calls."""
    import types

    calls: dict = {"init": [], "log": [], "summary": {}, "finish": []}

    class Run:
        summary = calls["summary"]

        def log(self, data, step=None):
            calls["log"].append((dict(data), step))

        def finish(self, exit_code=None):
            calls["finish"].append(exit_code)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_wandb_logs_offline_run_under_run_dir(stores, tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    run = tmp_path / "run"
    cfg = _cfg(max_steps=2, wandb=True, wandb_project="proj")
    T.pretrain(stores, run, cfg, progress=False)
    (init,) = calls["init"]
    assert init["dir"] == str(run) and init["mode"] == "offline" and init["project"] == "proj"
    assert init["name"] == "run"
    assert init["config"]["train"]["batch_size"] == 8 and init["config"]["train"]["wandb"] is True
    assert init["config"]["model"]["arch"] == ARCH
    df = pd.read_csv(run / "metrics.csv")
    assert [step for _, step in calls["log"]] == df["step"].tolist() == [1, 2]
    for (data, _), (_, row) in zip(calls["log"], df.iterrows()):
        assert data["train/loss"] == pytest.approx(row["loss"])
        assert data["train/lr"] == pytest.approx(row["lr"])
    assert calls["summary"]["steps"] == 2 and "final_loss" in calls["summary"]
    assert calls["finish"] == [0]


def test_mlflow_logs_to_a_store_under_run_dir(stores, tmp_path, monkeypatch):
    calls = fake_mlflow(monkeypatch)
    run = tmp_path / "run"
    T.pretrain(stores, run, _cfg(max_steps=2, mlflow=True), progress=False)
    by = {}
    for name, a, k in calls:
        by.setdefault(name, []).append((a, k))
    assert by["MlflowClient"] == [((), {"tracking_uri": f"sqlite:///{(run / 'mlflow.db').resolve()}"})]
    assert by["create_experiment"] == [(("simclr-path",), {
        "artifact_location": (run / "mlruns").resolve().as_uri()})]
    assert by["create_run"] == [(("7",), {"run_name": "run"})]
    (params,) = [k["params"] for _, k in by["log_batch"] if "params" in k]
    params = {p.key: p.value for p in params}
    assert params["train.batch_size"] == "8" and params["model.arch"] == ARCH
    df = pd.read_csv(run / "metrics.csv")
    per_step = [k["metrics"] for _, k in by["log_batch"] if "metrics" in k]
    steps = [m[0].step for m in per_step]
    assert steps[:-1] == df["step"].tolist() == [1, 2] and steps[-1] == 0  # then the summary
    for ms, (_, row) in zip(per_step, df.iterrows()):
        m = {x.key: x.value for x in ms}
        assert m["train/loss"] == pytest.approx(row["loss"]) and m["train/lr"] == pytest.approx(row["lr"])
    assert {x.key: x.value for x in per_step[-1]}["steps"] == 2.0
    assert (("r1", str(run / "summary.json")), {}) in by["log_artifact"]
    assert calls[-1] == ("set_terminated", ("r1", "FINISHED"), {})


@pytest.mark.parametrize("fail", ["create_experiment", "log_batch", "set_terminated"])
def test_an_mlflow_store_that_fails_gives_one_warning_and_training_goes_on(
        stores, tmp_path, monkeypatch, fail):
    """Any MLflow error (a retired file store, a server down, one failed upload) stopped the
    run with a traceback, losing the steps since the last checkpoint."""
    calls = fake_mlflow(monkeypatch, fail=fail)
    with pytest.warns(UserWarning, match=r"train.mlflow: .*\(RuntimeError: HTTP 503: service "
                                         r"unavailable\); not logging to MLflow") as record:
        summary = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=3, mlflow=True),
                             progress=False)
    assert summary["steps"] == 3 and (tmp_path / "run" / "encoder.pt").is_file()
    assert len([w for w in record if "train.mlflow" in str(w.message)]) == 1
    assert [c[0] for c in calls].count(fail) == 1  # dropped after its first failure


def test_a_moved_local_mlflow_store_points_at_its_new_folder(tmp_path):
    """Fine-tuning logs into a temporary folder that is then renamed: MLflow keeps absolute
    artifact URIs, so the store listed no artifacts (they pointed at the removed temporary
    name). The rows under the folder move with it; others (a sibling of a longer name,
    another store) stay."""
    import sqlite3

    tmp = tmp_path / "o ut" / ".res.x1.tmp"
    tmp.mkdir(parents=True)
    db = tmp / "mlflow.db"
    base = tmp.resolve().as_uri()
    with sqlite3.connect(db) as con:  # the two columns of MLflow's tracking schema
        con.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_location TEXT)")
        con.execute("CREATE TABLE runs (run_uuid TEXT, artifact_uri TEXT)")
        con.executemany("INSERT INTO experiments VALUES (?, ?)", [
            (1, base + "/mlruns"), (2, base + "-other/mlruns"), (3, "s3://bucket/x")])
        con.executemany("INSERT INTO runs VALUES (?, ?)", [
            ("a", base + "/mlruns/a/artifacts"), ("b", base + "-other/mlruns/b/artifacts")])
    con.close()
    T._move_mlflow_artifacts(db, tmp_path / "o ut" / "res")
    new = (tmp_path / "o ut" / "res").resolve().as_uri()
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT artifact_location FROM experiments")] == [
            new + "/mlruns", base + "-other/mlruns", "s3://bucket/x"]
        assert [r[0] for r in con.execute("SELECT artifact_uri FROM runs")] == [
            new + "/mlruns/a/artifacts", base + "-other/mlruns/b/artifacts"]
    con.close()


@pytest.mark.parametrize("uri", [None, "http://server:5000"])
def test_a_tracker_that_moves_rewrites_only_its_local_mlflow_store(tmp_path, monkeypatch, uri):
    fake_mlflow(monkeypatch)
    moved = []
    monkeypatch.setattr(T, "_move_mlflow_artifacts", lambda db, to: moved.append((db, to)))
    tr = T._Tracker(tmp_path / ".o.tmp", _cfg(mlflow=True, tensorboard=False, mlflow_uri=uri),
                    enabled=True, moves_to=tmp_path / "o")
    tr.close({"x": 1.0}, tmp_path / ".o.tmp")
    assert moved == ([] if uri else [(tmp_path / ".o.tmp" / "mlflow.db", tmp_path / "o")])


@pytest.mark.parametrize(("error", "status", "code"), [
    (RuntimeError, "FAILED", 1), (KeyboardInterrupt, "KILLED", 130), (Terminated, "KILLED", 143)])
def test_tracking_ends_failed_on_error_and_killed_on_interrupt(stores, tmp_path, monkeypatch,
                                                                error, status, code):
    """An interrupted run was marked FAILED, like one that crashed."""
    wb, ml = _fake_wandb(monkeypatch), fake_mlflow(monkeypatch)

    def crash(step):
        raise error

    monkeypatch.setattr(T, "_on_step_end", crash)
    with pytest.raises(error):
        T.pretrain(stores, tmp_path / "run", _cfg(max_steps=2, mlflow=True, wandb=True),
                   progress=False)
    assert wb["finish"] == [code] and not wb["summary"]
    assert ml[-1] == ("set_terminated", ("r1", status), {})


def test_tracker_scalars_with_restarting_steps(tmp_path, monkeypatch):
    """Fine-tuning epochs restart per fold: W&B gets them as a metric, never as its step."""
    calls = _fake_wandb(monkeypatch)
    tr = T._Tracker(tmp_path / ".tmp-x", _cfg(wandb=True, wandb_mode="disabled"), enabled=True,
                    name="out")
    assert calls["init"][0]["mode"] == "disabled" and calls["init"][0]["name"] == "out"
    tr.scalars({"fold0/val_loss": 0.5, "fold0/val_auroc": float("nan")}, 3, step_key="fold0/epoch")
    tr.close({"slide_auroc": 0.9, "note": "x"})
    tr.close(None)  # a second close does nothing
    assert calls["log"] == [({"fold0/val_loss": 0.5, "fold0/epoch": 3}, None)]
    assert calls["summary"] == {"slide_auroc": 0.9} and calls["finish"] == [0]


def test_wandb_mode_is_validated():
    with pytest.raises(SimclrPathError, match="train.wandb_mode must be online, offline or disabled"):
        load_config(overrides={"train": {"wandb_mode": "offlne"}})


# ---- bad input through the CLI: one line, exit != 0, nothing that looks complete ----
def _cli(args, capsys):
    rc = main(["pretrain", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err


BASE = ["--image-size", "32", "--batch-size", "8", "--max-steps", "1", "--workers", "0"]


@pytest.mark.parametrize("case, expect", [
    ("no_stores", "no patch stores given"),
    ("empty", "no patches"),
    ("image_size", "image_size 64 is larger than the stored 32 px"),
    ("batch", "batch size 64 is larger than the 32 training patches"),
    ("arch", "unknown timm model 'resnet181'; did you mean resnet18"),
    ("cuda", "--device cuda: no CUDA GPU"),
    ("small_view", "augment.image_size is 16 px, smaller than resnet18's output stride (32 px)"),
    ("small_local", "augment.local_size is 16 px, smaller than resnet18's output stride (32 px)"),
])
def test_bad_input_cli(case, expect, tmp_path, capsys, make_store):
    store = _easy_store(tmp_path / "s.h5")
    args = {
        "no_stores": [],
        "empty": [make_store(n=0, size=32, name="e.h5")],
        "image_size": [store, "--image-size", "64"],
        "batch": [store, "--batch-size", "64"],
        "arch": [store, "--arch", "resnet181"],
        "cuda": [store, "--device", "cuda"],
        "small_view": [store, "--image-size", "16"],
        "small_local": [store, "--local-crops", "2", "--config", tmp_path / "c.yaml"],
    }[case]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"augment": {"local_size": 16}}))
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    out = tmp_path / "run"
    rc, err = _cli([*args[:1], *BASE, *args[1:], "--out", out] if args else [*BASE, "--out", out], capsys)
    assert rc != 0
    assert expect in err and len(err.splitlines()) == 1, err
    assert not any((out / f).exists() for f in COMPLETE)


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    store = _easy_store(tmp_path / "s.h5")
    out = tmp_path / "run"
    out.mkdir()
    (out / T.RUN_MARKER).write_text("")  # a run's folder (every run writes it first)
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    rc, err = _cli([store, *BASE, "--out", out, "--resume"], capsys)
    assert rc != 0 and "cannot read checkpoint" in err and len(err.splitlines()) == 1
    assert not any((out / f).exists() for f in COMPLETE)


def test_cli_options_override_config(tmp_path, capsys):
    store = _easy_store(tmp_path / "s.h5")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"optimizer": "sgd", "lr": 0.05, "max_steps": 7},
                                        "model": {"head_layers": 1}}))
    rc, _ = _cli([store, *BASE, "--config", cfg_file, "--out", tmp_path / "run", "--seed", "3"], capsys)
    assert rc == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["train"]["optimizer"] == "sgd" and resolved["train"]["max_steps"] == 1
    assert resolved["train"]["seed"] == 3 and resolved["model"]["head_layers"] == 1


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    """The multi-GPU command of the README, on two CPU processes (gloo)."""
    a = _easy_store(tmp_path / "a.h5")
    b = _easy_store(tmp_path / "b.h5", seed=1)
    out = tmp_path / "run"
    cmd = _torchrun_pretrain([a, b], out, "--max-steps", "2")
    res = subprocess.run(cmd, capture_output=True, text=True, env=TORCHRUN_ENV, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["steps"] == 2
    assert load_encoder(out).num_features == encoder_info(out / "encoder.pt")["num_features"]


def test_torchrun_run_dir_error_stops_every_rank(tmp_path):
    """A user error in the run directory stops all ranks with the one line (checked by every
    rank before the process group: rank 0 alone left rank 1 waiting in a barrier)."""
    a = _easy_store(tmp_path / "a.h5")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = subprocess.run(_torchrun_pretrain([a], out, "--max-steps", "2"), capture_output=True,
                         text=True, env=TORCHRUN_ENV, timeout=120, check=False)
    assert res.returncode != 0
    assert res.stderr.count("run directory exists and is not empty") == 2, res.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and sorted(out.iterdir()) == [out / "notes.txt"]


DDP_DROPOUT = """
import os, sys
import torch.nn.functional as F
import simclr_path.model as M
import simclr_path.train as T

real = M.create_simclr_model


def create(cfg):  # as tests' _with_dropout: the head draws from the global torch RNG
    m = real(cfg)
    head = m.head.forward
    m.head.forward = lambda h: head(F.dropout(h, 0.2, training=m.training))
    return m


M.create_simclr_model = create
crash = int(os.environ.get("CRASH_AT", "0"))


def on_end(step):
    if step == crash:
        raise RuntimeError("simulated node loss")


T._on_step_end = on_end
from simclr_path.cli import Terminated, main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_resumed_run_equals_uninterrupted_with_dropout(tmp_path):
    """Only rank 0's RNG state was saved: rank 1 was reseeded on resume, so with dropout (or
    drop-path) a resumed two-process run drew other masks than an uninterrupted one (review)."""
    script = tmp_path / "ddp_dropout.py"
    script.write_text(DDP_DROPOUT)
    a = _easy_store(tmp_path / "a.h5")

    def launch(out, *extra, crash=0):
        cmd = _torchrun_pretrain([a], out, "--max-steps", "4", "--checkpoint-every", "2", *extra)
        cmd[cmd.index("-m", 3):cmd.index("-m", 3) + 2] = [str(script)]  # the script, not -m
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              env={**TORCHRUN_ENV, "CRASH_AT": str(crash)})

    full = launch(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    assert launch(tmp_path / "cut", crash=3).returncode != 0  # after the checkpoint of step 2
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and len(ck["rng_ranks"]) == 2
    resumed = launch(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_run(tmp_path / "full", tmp_path / "cut")
    # a finished run resumed: one warning and one summary, not one per process
    again = launch(tmp_path / "cut", "--resume")
    assert again.returncode == 0 and again.stderr.count("already finished its 4 steps") == 1
    assert len([x for x in again.stdout.splitlines() if x.startswith("{")]) == 1, again.stdout


RANK1_FAILS = """
import os, sys
import simclr_path.train as T
from simclr_path.errors import SimclrPathError


def on_end(step):  # as a damaged patch only rank 1 reads
    if os.environ["RANK"] == "1":
        raise SimclrPathError("a.h5: patch 7 cannot be read: the file is damaged")


T._on_step_end = on_end
from simclr_path.cli import Terminated, main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_a_process_that_fails_leaves_the_others_one_line_not_a_traceback(tmp_path):
    """The process that failed said why in one line; the others printed gloo's "Connection
    closed by peer" traceback, which read as the cause (review)."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS)
    cmd = _torchrun_pretrain([_easy_store(tmp_path / "a.h5")], tmp_path / "run", "--max-steps", "3")
    cmd[cmd.index("-m", 3):cmd.index("-m", 3) + 2] = [str(script)]  # the script, not -m
    res = subprocess.run(cmd, capture_output=True, text=True, env=TORCHRUN_ENV, timeout=120,
                         check=False)
    assert res.returncode != 0
    ours = [x for x in res.stderr.splitlines() if x.startswith("simclr-path pretrain: error:")]
    assert len(ours) == 2 and any("patch 7 cannot be read" in x for x in ours), res.stderr[-3000:]
    assert any("process 0 stopped at step 2 because another process of this run did (its own "
               "error is above)" in x for x in ours), ours
    assert "[rank0]: Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_two_gloo_processes_with_multi_crop(tmp_path):
    """Local views of another size go through the same DDP forward as the global ones."""
    a = _easy_store(tmp_path / "a.h5")
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"augment": {"local_crops": 1, "local_size": 32}}))
    cmd = _torchrun_pretrain([a], out, "--max-steps", "2", "--config", str(cfg_file),
                             "--local-crops", "2")
    res = subprocess.run(cmd, capture_output=True, text=True, env=TORCHRUN_ENV, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert yaml.safe_load((out / "config.yaml").read_text())["augment"]["local_crops"] == 2


def test_resume_with_more_steps_continues(stores, tmp_path):
    run = tmp_path / "run"
    T.pretrain(stores, run, _cfg(max_steps=2), progress=False)
    with pytest.warns(UserWarning, match="re-planned"):
        s = T.pretrain(stores, run, _cfg(max_steps=4), resume=True, progress=False)
    assert s["resumed_from_step"] == 2 and s["steps"] == 4
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    lr = pd.read_csv(run / "metrics.csv")["lr"].tolist()
    assert lr[2] > 0  # a live schedule, not the old one's end


def test_resuming_a_run_that_trained_all_its_steps_leaves_it_as_it_was(stores, tmp_path):
    run = tmp_path / "run"
    first = T.pretrain(stores, run, _cfg(max_steps=2), progress=False)
    before = {n: (run / n).read_bytes() for n in T.COMPLETE_FILES + ["checkpoint.pt"]}
    with pytest.warns(UserWarning, match="already finished its 2 steps; nothing to train"):
        again = T.pretrain(stores, run, _cfg(max_steps=2), resume=True, progress=False)
    assert again == first and again["pairs_per_s"] > 0  # not rewritten with 0 pairs/s
    assert {n: (run / n).read_bytes() for n in before} == before


def test_resume_with_other_augmentations_is_refused(stores, tmp_path):
    run = tmp_path / "run"
    T.pretrain(stores, run, _cfg(max_steps=2), progress=False)
    cfg = _cfg(max_steps=4)
    cfg.augment.local_crops = 2
    with pytest.raises(SimclrPathError, match=r"was trained with other augment.local_crops "
                                              r"\(0, now 2\); resume with the run's own settings "
                                              r"\(--config .*config.yaml\) or use --force"):
        T.pretrain(stores, run, cfg, resume=True, progress=False)
    # --force given with --resume: the way to start over is leaving out --resume
    with pytest.raises(SimclrPathError, match=r"or leave out --resume to start over \(--force "
                                              r"is given\)"):
        T.pretrain(stores, run, cfg, resume=True, force=True, progress=False)
    arch = dataclasses.replace(_cfg(max_steps=4), model=dataclasses.replace(
        _cfg().model, arch="resnet34"))
    with pytest.raises(SimclrPathError, match=rf"other model.arch \('{ARCH}', now 'resnet34'\)"):
        T.pretrain(stores, run, arch, resume=True, progress=False)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    # an older checkpoint without the multi-crop keys resumes under the defaults it had
    old = json.loads(ck["config"])
    for key in ("local_crops", "local_size", "local_crop_scale"):
        old["augment"].pop(key)
    ck["config"] = json.dumps(old)
    torch.save(ck, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match="re-planned"):
        assert T.pretrain(stores, run, _cfg(max_steps=4), resume=True, progress=False)["steps"] == 4


def test_resume_refuses_local_views_of_another_size(stores, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(max_steps=2)
    cfg.augment.local_crops = 1  # local_size null: 32 px at image_size 32
    T.pretrain(stores, run, cfg, progress=False)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["local_view_size"] == 32
    # a checkpoint from before the size was recorded: null then meant half of 32 px, i.e. 16 px
    del ck["local_view_size"]
    torch.save(ck, run / "checkpoint.pt")
    cfg = _cfg(max_steps=4)
    cfg.augment.local_crops = 1
    with pytest.raises(SimclrPathError, match="local views of 16 px, this configuration makes them 32 px"):
        T.pretrain(stores, run, cfg, resume=True, progress=False)


def test_check_view_sizes():
    T.check_view_sizes([("augment.image_size", 16, "set it")], "m", None)  # stride unknown: no check
    T.check_view_sizes([("augment.image_size", 32, "set it")], "m", 32)
    with pytest.raises(SimclrPathError, match=r"augment.image_size is 31 px, smaller than m's output "
                                              r"stride \(32 px\).*set it to at least 32"):
        T.check_view_sizes([("augment.image_size", 32, "x"), ("augment.image_size", 31, "set it")], "m", 32)


def test_two_view_training_ignores_the_local_size(stores, tmp_path):
    cfg = _cfg(max_steps=1)
    cfg.augment.local_size = 16  # below the stride, but unused without local crops
    assert T.pretrain(stores, tmp_path / "run", cfg, progress=False)["steps"] == 1


def test_resume_after_a_budget_stop_trains_at_a_live_lr(stores, tmp_path, monkeypatch):
    # a time budget re-plans the saved LR schedule to end early; a resume without it runs on to
    # max_steps and must not train those steps at the old plan's final LR of 0 (the last step
    # trains at a few percent of the peak: the cosine reaches 0 one step after the run)
    run = tmp_path / "run"
    monkeypatch.setattr(T, "budget_steps", lambda *a: 4)  # the budget buys 4 of the 8 steps
    assert T.pretrain(stores, run, _cfg(max_steps=8, time_budget_s=3600.0, log_every=1),
                      progress=False)["steps"] == 4
    monkeypatch.undo()
    s = T.pretrain(stores, run, _cfg(max_steps=8, log_every=1), resume=True, progress=False)
    assert s["steps"] == 8
    lr = pd.read_csv(run / "metrics.csv").set_index("step")["lr"]
    assert (lr.loc[5:8] > 0).all() and lr.loc[8] < 0.1 * lr.max()


def test_resume_refuses_other_optimisation_settings(stores, tmp_path):
    run = tmp_path / "run"
    T.pretrain(stores, run, _cfg(max_steps=2), progress=False)
    with pytest.raises(SimclrPathError, match=r"train.lr \(0.001, now 0.01\).*--force"):
        T.pretrain(stores, run, _cfg(max_steps=4, lr=1e-2), resume=True, progress=False)
    with pytest.raises(SimclrPathError, match=r"train.temperature"):
        T.pretrain(stores, run, _cfg(max_steps=4, temperature=0.5), resume=True, progress=False)


def test_ddp_on_cuda_pins_each_rank_to_its_gpu(monkeypatch):
    # NCCL's first collective uses the current device: without set_device every rank would
    # build its communicator on cuda:0 (not runnable without GPUs; the calls are recorded)
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(T.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(T.dist, "init_process_group",
                        lambda **kw: calls.append(("init", kw["backend"], kw.get("device_id"))))
    world = T.Dist()
    world.init(torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)),
                     ("init", "nccl", torch.device("cuda", 1))]
    calls.clear()
    T.Dist().init(torch.device("cpu"))
    assert calls == [("init", "gloo", None)]
    # a process group the caller made: the rank is still pinned to its GPU
    calls.clear()
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    T.Dist().init(torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1))]


def test_more_ranks_than_gpus_on_a_node_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(SimclrPathError, match="4 processes on this node but it has 2 GPU"):
        T.resolve_device("auto", local_rank=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert T.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


def test_a_loader_out_of_shared_memory_is_one_clear_error(stores, tmp_path, monkeypatch):
    import simclr_path.data as data_mod

    class Dead:
        def __iter__(self):
            return self

        def __next__(self):
            raise RuntimeError("DataLoader worker (pid 42) is killed by signal: Bus error. It is "
                               "possible that dataloader's workers are out of shared memory.")

    monkeypatch.setattr(data_mod, "make_loader", lambda *a, **k: Dead())
    with pytest.raises(SimclrPathError, match=r"out of shared memory \(/dev/shm\).*--shm-size"):
        T.pretrain(stores, tmp_path / "run", _cfg(), progress=False)


@pytest.mark.parametrize(("capability", "dtype"), [((7, 0), "float16"), ((7, 5), "float16"),
                                                   ((8, 0), "bfloat16"), ((9, 0), "bfloat16")])
def test_cuda_mixed_precision_is_bf16_only_with_bf16_tensor_cores(capability, dtype, monkeypatch):
    # V100 (7.0) and T4 (7.5) report bf16 "supported" through emulation, slower than float32
    import torch

    from simclr_path.config import EmbedConfig
    from simclr_path.embed import _use_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    cuda = torch.device("cuda", 0)
    assert T.amp_mode(_cfg().train, cuda) == getattr(torch, dtype)
    assert _use_bf16(EmbedConfig(), cuda) == (dtype == "bfloat16")


def test_weight_average_is_the_saved_encoder(stores, tmp_path, monkeypatch):
    """train.ema_decay: step 1 copies the weights, each later step averages them in; training
    itself is unchanged, and encoder.pt holds the average."""
    saved = []
    real = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda path, state: (
        saved.append({k: {n: v.clone() for n, v in state[k].items()} for k in ("model", "ema")}),
        real(path, state)))
    d = 0.9
    T.pretrain(stores, tmp_path / "ema", _cfg(max_steps=3, checkpoint_every=1, ema_decay=d), progress=False)
    (w1, e1), (w2, e2), (w3, e3) = [(s["model"], s["ema"]) for s in saved]  # steps 1, 2 and the end
    floats = [k for k in w1 if w1[k].is_floating_point()]
    assert floats and all(torch.equal(e1[k], w1[k]) for k in floats)
    assert all(torch.allclose(e2[k], d * w1[k] + (1 - d) * w2[k], rtol=1e-5, atol=1e-6) for k in floats)
    expect = {k: d * (d * w1[k] + (1 - d) * w2[k]) + (1 - d) * w3[k] for k in floats}
    assert all(torch.allclose(e3[k], expect[k], rtol=1e-5, atol=1e-6) for k in floats)
    assert not all(torch.equal(e3[k], w3[k]) for k in floats)  # an average, not the last weights
    enc = torch.load(tmp_path / "ema" / "encoder.pt", weights_only=True)
    assert all(torch.equal(v, e3["backbone." + k]) for k, v in enc.items())
    assert encoder_info(tmp_path / "ema" / "encoder.pt")["ema_decay"] == d
    # the online weights are those of a run without the average
    T.pretrain(stores, tmp_path / "plain", _cfg(max_steps=3), progress=False)
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(plain["model"][k], w3[k]) for k in w3) and plain["ema"] == {}


def test_weight_average_resumes_exactly_and_must_be_kept(stores, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=5, ema_decay=0.8)
    T.pretrain(stores, tmp_path / "full", cfg, progress=False)
    monkeypatch.setattr(T, "_on_step_end", lambda step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 3 else None)
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(stores, tmp_path / "cut", cfg, progress=False)
    monkeypatch.setattr(T, "_on_step_end", lambda step: None)
    for other in (_cfg(max_steps=5), _cfg(max_steps=5, ema_decay=0.9)):
        with pytest.raises(SimclrPathError, match=r"train.ema_decay \(0.8, now (None|0.9)\).*--force"):
            T.pretrain(stores, tmp_path / "cut", other, resume=True, progress=False)
    T.pretrain(stores, tmp_path / "cut", cfg, resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cpu_fast_preset_trains_as_shipped(stores, tmp_path):
    """RegNetX-400MF with 4 local crops (quality study 18) at AdamW 4e-3 (study 19): its views
    fit its output stride."""
    cfg = load_config(preset="cpu-fast", overrides={
        "augment": {"image_size": 32, "local_size": 32},
        "train": {"max_steps": 2, "batch_size": 4, "workers": 0, "tensorboard": False}})
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.lr_scaling) == ("adamw", 4e-3, "none")
    summary = T.pretrain(stores, tmp_path / "run", cfg, progress=False)
    assert summary["arch"] == "regnetx_004" and summary["local_crops"] == 4 and summary["steps"] == 2
    assert load_encoder(tmp_path / "run").num_features == 384


def test_seed_rank_gives_other_ranks_their_own_reproducible_stream():
    def draw(rank, step):
        torch.manual_seed(5)
        T.seed_rank(5, rank, step)
        return torch.rand(4)

    torch.manual_seed(5)
    plain = torch.rand(4)
    assert torch.equal(draw(0, 0), plain)  # rank 0 (and a single process) unchanged
    assert not torch.equal(draw(1, 0), draw(0, 0)) and not torch.equal(draw(1, 0), draw(2, 0))
    assert torch.equal(draw(1, 7), draw(1, 7)) and not torch.equal(draw(1, 7), draw(1, 0))


def test_pretrain_leaves_the_callers_random_generators_alone(stores, tmp_path):
    """pretrain seeded Python's, NumPy's and torch's global generators with train.seed and
    left them so: a caller's draws after it were the same whatever it had seeded before."""
    import random

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = draws()
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    T.pretrain(stores, tmp_path / "run", _cfg(max_steps=1), progress=False)
    assert draws() == expected


def test_the_cuda_math_flags_a_gpu_run_sets_are_put_back():
    """On a GPU pretrain turns on cuDNN benchmark and TF32 for its run; the caller's float32
    matmuls ran in TF32 afterwards. (The flags are plain attributes, settable without a GPU.)"""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        saved = T.caller_state()
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True
        T.restore_caller_state(saved)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = flags


def test_cuda_started_by_a_stage_gets_the_callers_seed_back(monkeypatch):
    """CUDA's generators, when the stage itself started CUDA (nothing to save before): seeded
    as the caller's torch.manual_seed would have seeded them, not left at train.seed's."""
    torch.manual_seed(77)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    saved = T.caller_state()
    assert saved["cuda"] is None
    torch.manual_seed(0)  # the stage's seed
    seeded = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the stage started CUDA
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    T.restore_caller_state(saved)
    assert seeded == [77] and torch.initial_seed() == 77


def test_a_sigterm_to_the_process_group_saves_the_checkpoint(tmp_path):
    """timeout, `kill -- -PGID` and a scheduler's time limit signal every process of the job:
    the DataLoader workers died first and the run lost its checkpoint (exit 1, a traceback)."""
    import os
    import signal

    a = _easy_store(tmp_path / "a.h5")
    out = tmp_path / "run"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"train": {"log_every": 1, "checkpoint_every": 100000}}))
    cmd = [sys.executable, "-m", "simclr_path", "pretrain", str(a), "--out", str(out),
           "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "2",
           "--max-steps", "100000", "--config", str(conf), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (out / "metrics.csv").read_text().splitlines() if (out / "metrics.csv").is_file() else []
            if len(rows) > 3:  # header + 3 steps: the workers are running
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    ck = T.load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] >= 3, err[-2000:]
    assert f"interrupted after step {ck['step']}; saved it (--resume continues from there)" in err
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


def test_a_resumed_budgeted_run_keeps_its_learning_rate(stores, tmp_path, monkeypatch):
    """The resume planned the schedule over total_steps until the budget's re-plan, 5 steps
    later: a long warm-up's LR (a drop to a fraction), then a jump back to the budget's plan."""
    import signal

    import simclr_path.loss as L

    orig = L.NTXentLoss.forward
    calls = itertools.count(1)

    def forward(self, *z):
        if next(calls) == 8:
            signal.raise_signal(signal.SIGINT)  # step 8 completes, is saved, then stops
        return orig(self, *z)

    # warm-up wanted far beyond what the budget buys: the budget's plan warms up over half itself
    cfg = _cfg(max_steps=None, log_every=1, checkpoint_every=1000)
    cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.time_budget_s = 100000, 1000.0, 60.0
    monkeypatch.setattr(L.NTXentLoss, "forward", forward)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="after step 8"):
        T.pretrain(stores, tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(L.NTXentLoss, "forward", orig)
    cfg.train.time_budget_s = 3.0
    T.pretrain(stores, tmp_path / "run", cfg, resume=True, progress=False)
    lr = pd.read_csv(tmp_path / "run" / "metrics.csv").set_index("step")["lr"]
    assert lr.index[-1] > 9 and lr[8] > 0
    # the step rate behind each plan is measured, so the ratio varies with the machine's load
    # (1.43 once, on a loaded CPU); the defect it guards against dropped the LR to a fraction
    # of a percent (a 1000-epoch warm-up's), and jumped back when the budget re-planned
    assert 0.5 <= lr[9] / lr[8] <= 2.0, lr.head(12).tolist()


def test_budget_seconds_in_messages_keep_their_decimals():
    """A 0.2 s budget read "0 s of the 0 s budget" in the view-fitting warning."""
    assert [T._seconds(s) for s in (0.2, 0.04, 3.14159, 10.4, 600.0)] == [
        "0.2", "0.04", "3.1", "10", "600"]


def test_a_resumed_budgeted_run_whose_saved_schedule_ends_next_step_uses_its_new_budget(
        stores, tmp_path, monkeypatch):
    """The resumed loop ran to the saved schedule's end, 1 step on, before the new budget's
    step rate was measured, and stopped there with most of the budget unused."""
    import signal

    import simclr_path.loss as L

    orig = L.NTXentLoss.forward
    calls = itertools.count(1)

    def forward(self, *z):
        if next(calls) == 6:
            signal.raise_signal(signal.SIGINT)
        return orig(self, *z)

    cfg = _cfg(max_steps=None, log_every=1, checkpoint_every=1000)
    cfg.train.epochs, cfg.train.time_budget_s = 100000, 60.0
    monkeypatch.setattr(L.NTXentLoss, "forward", forward)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="after step 6"):
        T.pretrain(stores, tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(L.NTXentLoss, "forward", orig)
    path = tmp_path / "run" / "checkpoint.pt"
    ck = T.load_checkpoint(path)
    warm = ck["scheduler"]["warmup_t"]
    ck["scheduler"]["t_initial"] = 7 - warm + 1  # the saved schedule ends after step 7
    torch.save(ck, path)
    cfg.train.time_budget_s = 8.0
    s = T.pretrain(stores, tmp_path / "run", cfg, resume=True, progress=False)
    assert s["steps"] >= 6 + T.BUDGET_SKIP_STEPS + T.BUDGET_MIN_STEPS, s
    assert s["wall_time_s"] - ck["wall_time_s"] > 4.0, s  # most of the new budget was used


def test_float16_steps_the_scaler_skipped_are_counted(stores, tmp_path, monkeypatch):
    """On a GPU without bf16 the first steps' gradients overflow at the scaler's initial scale
    and update nothing; they counted as trained steps without a word (forced here on CPU)."""
    monkeypatch.setattr(T, "amp_mode", lambda cfg, device: torch.float16)
    s = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=3), progress=False)
    assert s["amp"] == "float16" and 1 <= s["fp16_skipped_steps"] <= 3
    # a resumed run counts the steps skipped before it too (they come first, as the scale
    # backs off from 65536)
    more = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=5), resume=True, progress=False)
    assert more["steps"] == 5 and more["fp16_skipped_steps"] >= s["fp16_skipped_steps"]
    monkeypatch.undo()
    plain = T.pretrain(stores, tmp_path / "plain", _cfg(max_steps=1), progress=False)
    assert plain["fp16_skipped_steps"] is None


def test_float16_steps_do_not_wait_for_the_scale(stores, tmp_path, monkeypatch):
    """The skipped-step count read GradScaler.get_scale() (a GPU sync) twice a step; it compares
    the scale tensor on the device now, and only a checkpoint (state_dict) reads the scale."""
    calls = []
    real = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale",
                        lambda self: (calls.append(1), real(self))[1])
    monkeypatch.setattr(T, "amp_mode", lambda cfg, device: torch.float16)
    s = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=8, checkpoint_every=100),
                   progress=False)
    assert s["steps"] == 8 and s["fp16_skipped_steps"] >= 1
    assert len(calls) <= 2, len(calls)  # the final checkpoint's state_dict, not 2 per step

def test_float16_steps_the_scaler_skipped_stay_out_of_the_weight_average(stores, tmp_path, monkeypatch):
    """A skipped float16 step changed no weight, so averaging it in would weight the last
    weights twice: the average is updated once per step that was taken."""
    from timm.utils import ModelEmaV3
    monkeypatch.setattr(T, "amp_mode", lambda cfg, device: torch.float16)
    calls = []
    update = ModelEmaV3.update
    monkeypatch.setattr(ModelEmaV3, "update", lambda self, model, step=None: (calls.append(step),
                                                                            update(self, model, step)))
    s = T.pretrain(stores, tmp_path / "run", _cfg(max_steps=4, ema_decay=0.9), progress=False)
    assert s["fp16_skipped_steps"] >= 1
    assert len(calls) == 4 - s["fp16_skipped_steps"], (calls, s["fp16_skipped_steps"])


def test_links_planted_in_a_run_folder_are_not_written_through(stores, tmp_path):
    """A link at the fixed temporary name of metrics.csv (or at the run marker) in a shared
    run folder made the run write over the link's target (security review)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / T.RUN_MARKER).write_text("a run\n")
    (run / ".metrics.csv.tmp").symlink_to(victim)
    (run / "metrics.csv").symlink_to(victim)
    T.pretrain(stores, run, _cfg(max_steps=2), progress=False, force=True)
    assert victim.read_text() == "precious"
    assert not (run / "metrics.csv").is_symlink()
    assert (run / "metrics.csv").read_text().startswith("step")
    old = os.umask(0o077)  # the file is made as open() makes it: the umask applies
    try:
        T.pretrain(stores, tmp_path / "private", _cfg(max_steps=1), progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "private" / "metrics.csv").stat().st_mode & 0o777 == 0o600
