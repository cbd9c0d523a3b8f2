"""benchmarks/probe_knn.py: a k-NN probe on bench_quality's outer folds, against its linear probe."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_benchmark, probed_work, toy_labels

from simclr_path.errors import SimclrPathError


@pytest.fixture(scope="module")
def pk():
    return load_benchmark("probe_knn")


@pytest.fixture(scope="module")
def work(tmp_path_factory, groups_per_class=6, per_group=4, seed=0):
    """A bench_quality work folder with one feature set whose SCC patches lie in two clusters on
    either side of the adenocarcinoma cluster (the SCC region is not convex, so no linear
    classifier finds both; neighbours do), probed by the benchmark's linear probe on 2 grouped
    splits."""
    rng = np.random.default_rng(seed)
    y, groups = toy_labels(groups_per_class, per_group)
    centre = {0: (0.0, 0.0), 1: (0.0, 8.0)}
    x = rng.normal(scale=0.5, size=(len(y), 2))
    for i, (c, g) in enumerate(zip(y, groups)):
        side = 1.0 if int(g.rsplit("-", 1)[1]) % 2 else -1.0
        x[i] += centre[c] if c < 2 else (8.0 * side, 0.0)
    return probed_work(tmp_path_factory.mktemp("knn") / "work", x, y, groups)


def test_knn_finds_what_no_line_separates(pk, work):
    [(lin, knn)] = pk.main([str(work), "--k", "5"])
    assert len(lin["per_repeat"]) == len(knn["per_repeat"]) == 2
    assert knn["balanced_accuracy"] > 0.95 and knn["missed_groups"] == []
    assert knn["auroc_scc"] > lin["auroc_scc"] + 0.1  # SCC-vs-rest is not linear here
    assert lin["auroc_scc"] < 0.9


def test_knn_uses_the_linear_probes_folds(pk, work):
    """A neighbour is never a patch of the test fold: with k as large as the training folds,
    the vote is the training folds' class shares, identical for every test patch of a fold."""
    import pandas as pd

    pred = pd.read_csv(work / "probe" / "toy" / "split0" / "predictions_patches.csv")
    folds = pred.sort_values("patch_index")["fold"].to_numpy()
    from simclr_path.store import EmbeddingStore

    e = EmbeddingStore(work / "embeddings" / "toy.h5")
    proba = pk.knn_split(e.features, e.labels, folds, 10_000, 3)
    for f in np.unique(folds):
        te = folds == f
        want = np.bincount(e.labels[~te], minlength=3) / (~te).sum()
        np.testing.assert_allclose(proba[te], np.tile(want, (te.sum(), 1)))


def test_bad_input(pk, work, tmp_path):
    with pytest.raises(SimclrPathError, match="no probe outputs"):
        pk.main([str(tmp_path)])
    with pytest.raises(SimclrPathError, match="--k must be >= 1"):
        pk.main([str(work), "--k", "0"])
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_knn.py"), str(work),
                        "--sets", "missing"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.h5" in r.stderr
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(work, odd)
    (odd / "probe" / "toy" / "split1").rename(odd / "probe" / "toy" / "splitB")
    with pytest.raises(SimclrPathError, match="splitB: not a split<fold seed> folder"):
        pk.main([str(odd)])
