"""Smoke test of benchmarks/bench_quality.py on the real LC25000 dev tiles (tiny budget and subset).

It checks the code path (import, budgeted pretraining, embedding, probes, report, JSON), not the
quality targets of issue 6.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from conftest import LC25000, load_benchmark, needs

from simclr_path.errors import SimclrPathError

pytestmark = needs(LC25000)


@pytest.fixture(scope="module")
def bq():
    return load_benchmark("bench_quality")


def test_subset_is_stratified_over_classes_and_groups(bq):
    names, groups, full = bq.select_tiles(LC25000, 31, seed=0)
    assert not full and len(names) == 31 and names == sorted(names)
    per_class = Counter(n.split("/")[0] for n in names)
    assert sorted(per_class.values()) == [10, 10, 11]
    assert len(set(groups)) == 31  # 25 groups per class: one tile from each of 10-11 groups
    assert bq.select_tiles(LC25000, 31, seed=0)[0] == names  # seeded
    all_names, _, all_full = bq.select_tiles(LC25000, None, seed=0)
    assert all_full and len(all_names) == 1452


def test_import_is_reused_when_valid(bq, tmp_path):
    store, reused = bq.import_store(LC25000, tmp_path, 30, seed=1)
    assert not reused and store.is_file()
    assert bq.import_store(LC25000, tmp_path, 30, seed=1) == (store, True)
    store.write_bytes(b"not a store")  # damaged: imported again
    assert bq.import_store(LC25000, tmp_path, 30, seed=1) == (store, False)


def test_tiny_benchmark_writes_valid_results(bq, tmp_path, capsys):
    out = tmp_path / "results.json"
    res = bq.main([
        "--work", str(tmp_path / "work"), "--limit", "30", "--budget-s", "4", "--seed", "0",
        # a training seed of its own: the subset is drawn with it, so --run finds it below
        "--set", "train.seed=3",
        "--set", "model.arch=resnet18", "--set", "augment.image_size=32",
        "--set", "train.batch_size=8", "--set", "train.workers=0",
        "--set", "train.tensorboard=false", "--set", "embed.workers=0",
        "--set", "classify.bootstrap=0", "--set", "classify.c_grid=[1.0]",
        "--repeats", "2", "--out", str(out), "--no-progress",
    ])
    printed = capsys.readouterr().out
    for name in ("colour-hist", "colour-hist-sqrt", "simclr@40", "random-init@40", "SCC AUROC",
                 "bal. acc"):
        assert name in printed
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == [
        "colour-hist", "colour-hist-sqrt", "simclr@40", "random-init@40"]
    assert saved["n_patches"] == 30 and saved["pretrain"]["steps"] >= 1
    assert saved["pretrain"]["stopped"] in ("time_budget", "completed")
    # cpu-fast fits its views to the budget: 4 s buy far fewer than 250 steps of 32 px views plus
    # 4 local ones, so the cheaper rung (32 px two-view) is trained and embedded
    fit = saved["pretrain"]["budget_fit"]
    assert fit["min_steps"] == 250 and fit["rungs"][0]["image_size"] == 32
    assert saved["config"]["augment"]["local_crops"] == (4 if fit["chosen"] == 0 else 0)
    assert saved["pretrain"]["local_crops"] == saved["config"]["augment"]["local_crops"]
    assert "views fitted to the budget (train.budget_min_steps 250)" in printed
    assert saved["repeats"] == 2 and saved["fold_seeds"] == [0, 1]
    for r in saved["rows"]:
        for key in ("auroc_scc", "balanced_accuracy"):
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, (r["name"], key)
            per = [p[key] for p in r["per_repeat"]]
            assert len(per) == 2 and r[key] == pytest.approx(sum(per) / 2)
            assert r[f"{key}_sd"] == pytest.approx(abs(per[0] - per[1]) / math.sqrt(2))
        assert [p["fold_seed"] for p in r["per_repeat"]] == [0, 1]
        assert r["embed_s"] >= 0 and r["probe_s"] > 0
    assert [c["baseline"] for c in saved["comparisons"]] == [
        "colour-hist", "colour-hist-sqrt", "random-init@40"]
    for c in saved["comparisons"]:
        assert math.isfinite(c["auroc_scc_diff"]) and c["repeats"] == 2
        assert 0 <= c["auroc_scc_wins"] <= 2 and 0 <= c["balanced_accuracy_wins"] <= 2
    assert res["rows"][2]["auroc_scc"] == saved["rows"][2]["auroc_scc"]
    # per-group accuracy of every split: the 30 tiles come from 30 groups (one tile each)
    groups = set(saved["rows"][0]["per_repeat"][0]["group_accuracy"])
    assert len(groups) == 30 and all(g.startswith("lung_") for g in groups)
    for r in saved["rows"]:
        for p in r["per_repeat"]:
            assert set(p["group_accuracy"]) == groups
            assert set(p["group_accuracy"].values()) <= {0.0, 1.0}  # one tile per group here
        assert r["missed_groups"] == bq.missed_groups(r["per_repeat"])
    assert saved["missed_by_all"] == sorted(
        set.intersection(*(set(r["missed_groups"]) for r in saved["rows"])))
    assert "groups missed (under half of their patches right" in printed
    # one line per feature set with the probe's C over 5 outer folds x 2 splits (a grid of one)
    assert printed.count("C=1: 10/10") == 4 and "classify.c_grid" not in printed
    with pytest.raises(SimclrPathError):  # --out exists: no overwrite without --force
        bq.main(["--work", str(tmp_path / "work"), "--limit", "30", "--out", str(out)])
    # the finished run again, without training: same store (reused), same encoder and figures;
    # an older run's probe folders are cleared (the probe_* scripts would read them)
    stale = tmp_path / "work" / "probe" / "old-set" / "split7"
    stale.mkdir(parents=True)
    again = bq.main(["--work", str(tmp_path / "work"), "--limit", "30",
                     "--run", str(tmp_path / "work" / "simclr-run"), "--no-progress",
                     "--repeats", "2"])
    assert again["store_reused"] and again["pretrain"]["steps"] == saved["pretrain"]["steps"]
    assert "seed3" in saved["store"] and again["store"] == saved["store"]
    assert not stale.parent.exists() and again["preset"] is None  # the run's own config
    assert again["rows"][2]["auroc_scc"] == pytest.approx(saved["rows"][2]["auroc_scc"])
    # the same pretraining seconds (the call's, budget-fit trials included), not the loop's
    assert again["pretrain"]["call_s"] == pytest.approx(saved["pretrain"]["call_s"], abs=1e-3)
    assert again["rows"][2]["pretrain_s"] == pytest.approx(saved["rows"][2]["pretrain_s"],
                                                           abs=1e-3)

    # another backbone layer of both encoders, compared layer with layer
    staged = bq.main(["--work", str(tmp_path / "work"), "--limit", "30", "--layers", "stage3",
                      "--repeats", "1",
                      "--run", str(tmp_path / "work" / "simclr-run"), "--no-progress",
                      "--set", "embed.workers=0", "--set", "classify.bootstrap=0",
                      "--set", "classify.c_grid=[1.0]"])
    assert [r["name"] for r in staged["rows"]] == [
        "colour-hist", "colour-hist-sqrt", "simclr@40:stage3", "random-init@40:stage3"]
    assert [c["baseline"] for c in staged["comparisons"]] == [
        "colour-hist", "colour-hist-sqrt", "random-init@40:stage3"]
    with pytest.raises(SimclrPathError, match="embed.layer"):
        bq.main(["--work", str(tmp_path / "work"), "--limit", "30", "--layers", "block9",
                 "--run", str(tmp_path / "work" / "simclr-run"), "--no-progress"])


def test_colour_histograms_count_each_channel(bq):
    patches = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    patches[0, :, :, 0] = 255  # all red values in the last bin
    patches[1, 0, 0] = (8, 100, 200)  # one pixel off black
    h = bq.colour_histograms(patches, bins=4)
    assert h.shape == (2, 12) and np.allclose(h.reshape(2, 3, 4).sum(-1), 1.0)
    assert h[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    assert h[1].tolist() == [1, 0, 0, 0, 0.75, 0.25, 0, 0, 0.75, 0, 0, 0.25]


def test_sqrt_histograms_are_the_square_root(bq, tmp_path):
    from simclr_path.store import EmbeddingStore

    store, _ = bq.import_store(LC25000, tmp_path, 12, seed=0)
    written = bq.write_hist_embeddings(store, tmp_path, 8)
    assert sorted(written) == ["colour-hist", "colour-hist-sqrt"]
    (raw, _), (hell, _) = written["colour-hist"], written["colour-hist-sqrt"]
    assert raw.name == "colour-hist-8.h5" and hell.name == "colour-hist-sqrt-8.h5"
    a, b = EmbeddingStore(raw), EmbeddingStore(hell)
    assert a.features.shape == (12, 24) and np.allclose(a.features.reshape(12, 3, 8).sum(-1), 1)
    assert np.allclose(b.features, np.sqrt(a.features))
    assert (b.features > a.features).any()  # not the raw histogram under another name


def test_missed_groups_average_over_splits(bq):
    per_repeat = [{"group_accuracy": {"a": 0.0, "b": 1.0, "c": 0.4, "d": 0.5}},
                  {"group_accuracy": {"a": 0.2, "b": 0.0, "c": 0.4, "d": 0.5}},
                  {"group_accuracy": {"a": 0.9, "b": 0.0, "c": 0.8, "d": 0.5}}]
    # means: a 0.37, b 0.33, c 0.53, d 0.5 (exactly half right is not missed)
    assert bq.missed_groups(per_repeat) == ["a", "b"]
    assert bq.missed_groups(per_repeat[:1]) == ["a", "c"]


def test_paired_comparison_counts_splits(bq):
    a = {"auroc_scc": 0.9, "balanced_accuracy": 0.8,
         "per_repeat": [{"auroc_scc": 0.95, "balanced_accuracy": 0.8},
                        {"auroc_scc": 0.85, "balanced_accuracy": 0.8}]}
    b = {"auroc_scc": 0.875, "balanced_accuracy": 0.85,
         "per_repeat": [{"auroc_scc": 0.9, "balanced_accuracy": 0.9},
                        {"auroc_scc": 0.85, "balanced_accuracy": 0.8}]}
    c = bq.compare(a, b)
    assert c["auroc_scc_diff"] == pytest.approx(0.025) and c["auroc_scc_wins"] == 1  # a tie is no win
    assert c["balanced_accuracy_wins"] == 0 and c["repeats"] == 2
    assert c["auroc_scc_diff_sd"] == pytest.approx(0.05 / math.sqrt(2))
    assert c["auroc_scc_error_ratio"] == pytest.approx(0.1 / 0.125)
    s = bq.summarise_repeats(a["per_repeat"])
    assert s["auroc_scc"] == pytest.approx(0.9) and s["balanced_accuracy_sd"] == 0.0


def test_c_choices_summarise_every_fold_and_flag_the_grid_ends(bq):
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    per_repeat = [{"C_per_fold": [1e-3, 1e-3, 1e-2]}, {"C_per_fold": [1e-3, 1.0, 1e-3]}]
    text = bq.c_choices(per_repeat, grid)
    assert text.startswith("C=0.001: 4/6, C=0.01: 1/6, C=1: 1/6")
    assert "the grid's low end" in text and "high end" not in text
    assert "grid's" not in bq.c_choices([{"C_per_fold": [1e-2, 1e-1, 10.0]}], grid)  # 1 of 3
    assert "the grid's high end" in bq.c_choices([{"C_per_fold": [10.0, 10.0, 1.0]}], grid)
    assert "grid's" not in bq.c_choices([{"C_per_fold": [1.0, 1.0]}], [1.0])  # the user's one C
