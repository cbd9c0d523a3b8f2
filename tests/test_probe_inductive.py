"""benchmarks/probe_inductive.py: pretraining per outer fold on its training images alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import LC25000, load_benchmark, needs

from simclr_path.errors import SimclrPathError
from simclr_path.store import PatchStore

pytestmark = needs(LC25000)


@pytest.fixture(scope="module")
def pi():
    return load_benchmark("probe_inductive")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny finished bench_quality run on 30 real tiles (one split)."""
    bq = load_benchmark("bench_quality")
    w = tmp_path_factory.mktemp("inductive") / "work"
    bq.main(["--work", str(w), "--limit", "30", "--budget-s", "3", "--seed", "0",
             "--set", "model.arch=resnet18", "--set", "augment.image_size=32",
             "--set", "train.batch_size=8", "--set", "train.workers=0",
             "--set", "train.tensorboard=false", "--set", "embed.workers=0",
             "--set", "train.budget_min_steps=null",
             "--set", "classify.bootstrap=0", "--set", "classify.c_grid=[0.1,1.0]",
             "--repeats", "1", "--no-progress"])
    return w


def test_subset_store_holds_exactly_the_training_rows(pi, work, tmp_path):
    store = next(work.glob("lc25000-dev*.h5"))
    rows = np.array([0, 3, 4, 17, 29])
    sub = pi.write_subset(store, rows, tmp_path / "sub.h5")
    with PatchStore(store) as s, PatchStore(sub) as t:
        assert len(t) == 5 and t.label_names == s.label_names and t.mpp == s.mpp
        assert [t.groups[i] for i in range(5)] == [s.groups[i] for i in rows]
        np.testing.assert_array_equal(t[np.arange(5)], s[rows])
        np.testing.assert_array_equal(np.asarray(t.labels), np.asarray(s.labels)[rows])


def test_inductive_check_pretrains_per_fold_and_reuses_finished_folds(pi, work, tmp_path, capsys):
    out = tmp_path / "ind.json"
    res = pi.main([str(work), "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "inductive - transductive" in printed and json.loads(out.read_text())["split"] == 0
    bench = json.loads((work / "probe" / res["set"] / "split0" / "metrics.json").read_text())
    # the transductive row is the benchmark's own probe on that split, refitted identically
    assert res["rows"]["transductive"]["auroc_scc"] == pytest.approx(bench["patch"]["auroc"])
    folds = res["folds"]
    assert len(folds) >= 2 and sum(30 - f["n_train_tiles"] for f in folds) == 30
    run_steps = json.loads((work / "simclr-run" / "summary.json").read_text())["steps"]
    for f in folds:  # each encoder saw its training folds' tiles only, as many steps as the run
        assert f["steps"] == run_steps == res["run_steps"] and f["n_train_tiles"] < 30
        d = work / "inductive" / "split0" / f"fold{f['fold']}"
        assert not (d / "train.h5").exists() and (d / f"{res['set']}.h5").is_file()
        # the run's warm-up steps, though a fold's epoch has fewer batches
        fs = json.loads((d / "run" / "summary.json").read_text())
        # what the encoder was trained on, not what the script counts (a fold trained on every
        # tile, its test tiles too, passed)
        assert fs["patches_per_epoch"] == f["n_train_tiles"]
        fc = yaml.safe_load((d / "run" / "config.yaml").read_text())
        assert round(fc["train"]["warmup_epochs"] * fs["steps_per_epoch"]) == f["warmup_steps"]
    for name in ("inductive", "random-init"):
        r = res["rows"][name]
        assert 0.0 <= r["auroc_scc"] <= 1.0 and 0.0 <= r["balanced_accuracy"] <= 1.0
    summary = work / "inductive" / "split0" / "fold0" / "run" / "summary.json"
    before = summary.stat().st_mtime_ns
    again = pi.main([str(work), "--no-progress"])  # finished folds reused
    assert summary.stat().st_mtime_ns == before and again["rows"] == res["rows"]


def test_bad_requests_are_one_line(pi, work, tmp_path):
    with pytest.raises(SimclrPathError, match="no split7; splits there: 0"):
        pi.main([str(work), "--split", "7"])
    with pytest.raises(SimclrPathError, match="not found; give a bench_quality.py --work"):
        pi.main([str(tmp_path)])
    with pytest.raises(SimclrPathError, match="--budget-s must be > 0"):
        pi.main([str(work), "--budget-s", "0"])
