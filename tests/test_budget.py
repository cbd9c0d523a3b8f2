"""Fitting the training views to a time budget: the ladder, the timed trial, the choice, and
pretraining with ``train.budget_min_steps`` (config, encoder, summary, checkpoint, resume)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import simclr_path.budget as B
import simclr_path.train as T
from simclr_path.config import AugmentConfig, load_config
from simclr_path.model import create_simclr_model, encoder_info


def _sizes(rungs):
    return [(r.image_size, r.local_crops, r.local_view_size if r.local_crops else None) for r in rungs]


def test_view_ladder():
    cpu_fast = load_config(preset="cpu-fast").augment
    assert _sizes(B.view_ladder(cpu_fast, 32)) == [(128, 4, 64), (128, 0, None), (96, 0, None),
                                                    (64, 0, None)]
    two_view = AugmentConfig(image_size=96)
    assert _sizes(B.view_ladder(two_view, 32)) == [(96, 0, None), (72, 0, None), (48, 0, None)]
    # never below the output stride: 40 * 3/4 = 30 -> 32 px is kept, 40 / 2 = 20 -> 24 px is not
    assert _sizes(B.view_ladder(AugmentConfig(image_size=40), 32)) == [(40, 0, None), (32, 0, None)]
    assert _sizes(B.view_ladder(AugmentConfig(image_size=32), 32)) == [(32, 0, None)]
    # a configured local_size without local crops is no reason to time the same views twice
    assert _sizes(B.view_ladder(AugmentConfig(image_size=8, local_size=8), None)) == [(8, 0, None)]
    rung = B.view_ladder(cpu_fast, 32)[2]
    assert rung.crop_scale == cpu_fast.crop_scale and rung.stain_p == cpu_fast.stain_p
    assert B.describe(cpu_fast) == "128 px views + 4 x 64 px local views"
    assert B.describe(rung) == "96 px views"


def test_trial_pass_leaves_the_model_as_it_was():
    cfg = load_config(overrides={"model": {"arch": "resnet18"}})
    torch.manual_seed(0)
    model = create_simclr_model(cfg.model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = AugmentConfig(image_size=32, local_crops=2, local_size=32)
    s = B.time_train_pass(model, a, torch.device("cpu"), None, torch.channels_last, pairs=2)
    assert s > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(rng, torch.get_rng_state())


def _fake_cost(per_pixel):
    """A stand-in for the timed pass: seconds per pair proportional to the pixels of a pair."""
    def cost(model, a, device, dtype, memory_format, pairs):
        px = 2 * a.image_size ** 2 + (a.local_crops * a.local_view_size ** 2 if a.local_crops else 0)
        return px * per_pixel
    return cost


@pytest.mark.parametrize("min_steps, max_steps, chosen", [
    (1000, 10**6, 0),    # 64 + 2 x 32: 100 s / (10240 px * 1e-6 s * 8 pairs) = 1220 steps
    (1500, 10**6, 1),    # 64 px two views: 1525 steps
    (2000, 10**6, 2),    # 48 px: 2712 steps
    (5000, 10**6, 3),    # 32 px: 6103 steps
    (10**6, 10**6, 3),   # nothing fits: the cheapest rung
    (10**6, 50, 0),      # a run capped at 50 steps needs only 50
])
def test_fit_picks_the_first_rung_the_budget_affords(monkeypatch, min_steps, max_steps, chosen):
    monkeypatch.setattr(B, "time_train_pass", _fake_cost(1e-6))
    a = AugmentConfig(image_size=64, local_crops=2, local_size=32)
    got, rec = B.fit_views_to_budget(None, a, 8, 100.0, min_steps, max_steps, 32,
                                     torch.device("cpu"), None, torch.channels_last)
    assert rec["chosen"] == chosen and got == B.view_ladder(a, 32)[chosen]
    assert len(rec["rungs"]) == chosen + 1  # stops timing at the first rung that fits
    assert [r["image_size"] for r in rec["rungs"]] == [64, 64, 48, 32][:chosen + 1]
    assert rec["rungs"][0]["predicted_steps"] == int(100.0 / (10240 * 1e-6 * 8))
    assert rec["requested"] == "64 px views + 2 x 32 px local views"
    assert rec["trained"] == B.describe(got) and rec["min_steps"] == min_steps


def test_fit_skips_a_rung_the_model_cannot_run(monkeypatch):
    cost = _fake_cost(1e-6)

    def picky(model, a, *args):
        if a.image_size == 48:
            raise RuntimeError("Input height (48) doesn't match model (64).\nmore")
        return cost(model, a, *args)

    monkeypatch.setattr(B, "time_train_pass", picky)
    a = AugmentConfig(image_size=64, local_crops=2, local_size=32)
    got, rec = B.fit_views_to_budget(None, a, 8, 100.0, 5000, 10**6, 32, torch.device("cpu"),
                                     None, torch.channels_last)
    assert got.image_size == 32 and rec["chosen"] == 3
    assert rec["rungs"][2]["predicted_steps"] is None
    assert rec["rungs"][2]["error"] == "Input height (48) doesn't match model (64)."
    # all but the 48 px rung fail the need: the cheapest that runs is the 32 px one (chosen above);
    # when the configured views themselves cannot run, that is the error training would give
    monkeypatch.setattr(B, "time_train_pass", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="x"):
        B.fit_views_to_budget(None, a, 8, 100.0, 5000, 10**6, 32, torch.device("cpu"), None,
                              torch.channels_last)


class _Clock:
    """A stand-in for ``time`` in simclr_path.budget: it moves only when a trial runs."""
    t = 0.0

    @classmethod
    def perf_counter(cls):
        return cls.t


def _slow_trials(seconds, per_pixel=1e-6):
    """Each timed trial takes ``seconds`` of (fake) wall time; the cost is as :func:`_fake_cost`."""
    cost = _fake_cost(per_pixel)

    def trial(*args):
        _Clock.t += seconds
        return cost(*args)
    return trial


@pytest.mark.parametrize("trial_s, budget, timed, cut", [
    (30.0, 20.0, 1, "the budget was spent"),      # the first trial took it all: stop there
    (15.0, 20.0, 1, "would not fit"),             # 5 s left, a 15 s trial cannot fit in it
    (6.0, 20.0, 3, "would not fit"),              # 3 trials (18 s) then 2 s left
    (1.0, 100.0, 4, None),                        # cheap trials: the whole ladder, as before
])
def test_fit_stops_timing_when_the_budget_is_gone(monkeypatch, trial_s, budget, timed, cut):
    monkeypatch.setattr(B, "time", _Clock)
    monkeypatch.setattr(B, "time_train_pass", _slow_trials(trial_s))
    a = AugmentConfig(image_size=64, local_crops=2, local_size=32)
    got, rec = B.fit_views_to_budget(None, a, 8, budget, 10**6, 10**6, 32, torch.device("cpu"),
                                     None, torch.channels_last)
    assert len(rec["rungs"]) == timed and rec["trial_s"] == pytest.approx(timed * trial_s)
    # the cheapest rung timed (each rung ran here)
    assert rec["chosen"] == timed - 1 and got == B.view_ladder(a, 32)[timed - 1]
    assert (rec["cut_short"] is None) if cut is None else cut in rec["cut_short"]


def test_pretrain_says_when_timing_used_up_the_budget(make_store, tmp_path, monkeypatch):
    store = make_store(n=24, size=64)
    monkeypatch.setattr(B, "time", _Clock)
    monkeypatch.setattr(B, "time_train_pass", _slow_trials(30.0))
    with pytest.warns(UserWarning, match=r"timing the views took 30 s of the 10 s budget \(the "
                                         r"budget was spent, so cheaper views were not timed\); "
                                         r"training 64 px views \+ 2 x 32 px local views with "
                                         r"what is left"):
        s = T.pretrain([store], tmp_path / "run", _cfg(budget_min_steps=300, max_steps=50),
                       progress=False)
    # what little is left after the trial: a step, not the 50 (nor a 50-step-long detour)
    assert s["steps"] == 1 and s["stopped"] == "time_budget"
    assert s["budget_fit"]["cut_short"] == "the budget was spent" and len(s["budget_fit"]["rungs"]) == 1


def test_progress_bar_starts_at_the_fitted_estimate(make_store, tmp_path, monkeypatch):
    import tqdm.auto

    totals = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(B, "time_train_pass", _fake_cost(1e-5))  # 12 steps of 32 px views in 2 s
    with pytest.warns(UserWarning, match="budget buys"):
        T.pretrain([make_store(n=24, size=64)], tmp_path / "run",
                   _cfg(budget_min_steps=300, max_steps=1000, time_budget_s=2.0,
                        checkpoint_every=500), progress=False)  # a dozen steps, not 1000
    assert 12 in totals and 1000 not in totals


def _cfg(**train):
    base = {"batch_size": 8, "max_steps": 3, "workers": 0, "optimizer": "adamw", "lr": 1e-3,
            "lr_scaling": "none", "warmup_epochs": 0.0, "checkpoint_every": 2, "log_every": 1,
            "tensorboard": False, "time_budget_s": 10.0}
    base.update(train)
    return load_config(overrides={"augment": {"image_size": 64, "local_crops": 2},
                                  "model": {"arch": "resnet18"}, "train": base})


def test_pretrain_trains_the_views_the_budget_affords(make_store, tmp_path, monkeypatch):
    store = make_store(n=24, size=64)
    # 1e-4 s per pixel: the 64 + 2 x 32 px views (1 s a pair, 8 s a step) get 1 step in 10 s,
    # 64 px two views 1, 48 px 2, 32 px (0.2 s a pair) 6 >= the 3 the run is capped at
    monkeypatch.setattr(B, "time_train_pass", _fake_cost(1e-4))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"the 10 s budget buys about 1 steps of 64 px views \+ 2 x "
                                         r"32 px local views.*training 32 px views instead"):
        s = T.pretrain([store], run, _cfg(budget_min_steps=300), progress=False)
    assert s["steps"] == 3 and s["image_size"] == 32 and s["local_crops"] == 0
    fit = s["budget_fit"]
    assert fit["chosen"] == 3 and fit["trained"] == "32 px views" and fit["min_steps"] == 300
    assert [r["predicted_steps"] for r in fit["rungs"]] == [1, 1, 2, 6]
    assert json.loads((run / "summary.json").read_text())["budget_fit"] == fit
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["augment"]["image_size"] == 32 and saved["augment"]["local_crops"] == 0
    assert encoder_info(run / "encoder.pt")["image_size"] == 32
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["augment_requested"]["image_size"] == 64 and ck["augment_requested"]["local_crops"] == 2
    # resume with the configuration asked for: the fitted views go on, nothing is timed again
    monkeypatch.setattr(B, "time_train_pass", lambda *a, **k: pytest.fail("timed on resume"))
    with pytest.warns(UserWarning, match="re-planned"):
        s2 = T.pretrain([store], run, _cfg(budget_min_steps=300, max_steps=5), resume=True,
                        progress=False)
    assert s2["steps"] == 5 and s2["image_size"] == 32 and s2["budget_fit"]["chosen"] == 3
    # resumed with the run's own config.yaml (the fitted views): the record is kept, so a later
    # resume with the configuration asked for (here without budget_min_steps) still works
    with pytest.warns(UserWarning, match="re-planned"):
        s3 = T.pretrain([store], run, load_config(run / "config.yaml",
                                                  overrides={"train": {"max_steps": 6}}),
                        resume=True, progress=False)
    assert s3["steps"] == 6 and s3["budget_fit"]["chosen"] == 3
    with pytest.warns(UserWarning, match="re-planned"):
        s4 = T.pretrain([store], run, _cfg(max_steps=7), resume=True, progress=False)
    assert s4["steps"] == 7 and s4["image_size"] == 32 and s4["budget_fit"]["chosen"] == 3
    # another budget on resume: the fitted views go on (they cannot change mid-run), said once
    with pytest.warns(UserWarning) as got:
        s5 = T.pretrain([store], run, _cfg(budget_min_steps=300, max_steps=8, time_budget_s=20.0),
                        resume=True, progress=False)
    said = [str(w.message) for w in got if "fitted to a 10 s budget" in str(w.message)]
    assert len(said) == 1 and "(32 px views)" in said[0] and "with the 20 s budget" in said[0]
    assert s5["steps"] == 8 and s5["image_size"] == 32 and s5["budget_fit"]["chosen"] == 3


def test_pretrain_keeps_the_configured_views_when_the_budget_affords_them(make_store, tmp_path,
                                                                          recwarn):
    store = make_store(n=24, size=64)
    s = T.pretrain([store], tmp_path / "run", _cfg(budget_min_steps=2, time_budget_s=600.0),
                   progress=False)  # really timed: a tiny ResNet-18 step takes well under a second
    assert s["budget_fit"]["chosen"] == 0 and len(s["budget_fit"]["rungs"]) == 1
    assert s["image_size"] == 64 and s["local_crops"] == 2 and s["local_view_size"] == 32
    assert not [w for w in recwarn if "budget buys" in str(w.message)]
    # without budget_min_steps (or without a time budget) nothing is timed or recorded
    s = T.pretrain([store], tmp_path / "plain", _cfg(), progress=False)
    assert s["budget_fit"] is None and s["image_size"] == 64


@pytest.mark.slow
def test_torchrun_processes_train_the_same_fitted_views(make_store, tmp_path):
    """Under torchrun every process times the ladder and all train rank 0's rung."""
    import os
    import subprocess
    import sys

    store = make_store(n=24, size=64)
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "augment": {"image_size": 64, "local_crops": 1, "local_size": 32},
        "train": {"budget_min_steps": 10**6, "optimizer": "adamw", "lr_scaling": "none",
                  "warmup_epochs": 0.0, "tensorboard": False, "log_every": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "simclr_path",
           "pretrain", str(store), "--out", str(out), "--config", str(cfg_file), "--device", "cpu",
           "--workers", "0", "--batch-size", "4", "--max-steps", "100000", "--time-budget", "3",
           "--arch", "test_resnet", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("budget buys about") == 1  # one warning line, from rank 0
    summary = json.loads((out / "summary.json").read_text())
    fit = summary["budget_fit"]
    assert summary["world_size"] == 2 and summary["steps"] >= 1
    assert fit["chosen"] == len(fit["rungs"]) - 1  # nothing affords 10**6 steps: the cheapest
    assert summary["image_size"] == fit["rungs"][-1]["image_size"] < 64
    assert yaml.safe_load((out / "config.yaml").read_text())["augment"]["local_crops"] == 0
