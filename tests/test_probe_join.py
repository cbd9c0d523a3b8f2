"""benchmarks/probe_join.py: joined feature sets through bench_quality's probe."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_benchmark

from simclr_path.errors import SimclrPathError
from simclr_path.store import EmbeddingStore, write_embeddings

CLASSES = ["lung_aca", "lung_n", "lung_scc"]


@pytest.fixture(scope="module")
def pj():
    return load_benchmark("probe_join")


def _cohort(tmp_path, groups_per_class=6, per_group=4, seed=0):
    """Two feature sets of one patch store: ``a`` separates SCC from the rest, ``b`` separates
    adenocarcinoma from benign; neither alone separates all three classes."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), groups_per_class * per_group)
    groups = [f"{CLASSES[c]}-{i // per_group}" for c in range(3)
              for i in range(groups_per_class * per_group)]
    coords = np.stack([np.arange(len(y)), np.zeros(len(y), dtype=np.int64)], axis=1)
    a = rng.normal(size=(len(y), 6))
    a[:, 0] += 6.0 * (y == 2)
    b = rng.normal(size=(len(y), 3)) * 100.0  # another scale: the join must not let it dominate
    b[:, 0] += 600.0 * (y == 0)
    paths = []
    for name, x in (("a", a), ("b", b)):
        paths.append(write_embeddings(
            tmp_path / f"{name}.h5", x, coords,
            {"slide_id": "toy", "store_kind": "patches", "layer": "pooled", "encoder_sha256": name},
            labels=y, groups=groups, label_names=CLASSES))
    return paths


def test_join_repeats_narrow_sets_to_weigh_like_wide_ones(pj, tmp_path):
    stores = [EmbeddingStore(p) for p in _cohort(tmp_path)]
    x = pj.join_features(stores)
    # a (6 columns) once, b (3 columns) twice: under the probe's per-column standardisation a
    # column repeated r times weighs as one scaled by sqrt(r), so both sets weigh about the same
    assert x.shape == (72, 12) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, :6], stores[0].features, rtol=1e-6)
    np.testing.assert_allclose(x[:, 6:9], stores[1].features, rtol=1e-6)
    np.testing.assert_array_equal(x[:, 6:9], x[:, 9:12])


def test_joined_complementary_sets_beat_each_part(pj, tmp_path):
    a, b = _cohort(tmp_path)
    rows = pj.main([str(a), str(b), "--work", str(tmp_path / "w"), "--repeats", "2"])
    assert [r["name"] for r in rows] == ["0:a", "1:b", "joined"]
    single_best = max(r["balanced_accuracy"] for r in rows[:2])
    assert single_best < 0.8  # each part confuses two of the three classes
    assert rows[2]["balanced_accuracy"] > 0.95 and rows[2]["missed_groups"] == []
    assert rows[0]["auroc_scc"] > 0.95  # a alone already finds SCC
    joined = EmbeddingStore(tmp_path / "w" / "joined.h5")
    assert joined.attrs["layer"] == "joined" and "encoder_sha256" not in joined.attrs
    assert joined.groups == EmbeddingStore(a).groups


def test_refuses_different_patches(pj, tmp_path):
    a, _ = _cohort(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, b = _cohort(other, groups_per_class=5)
    with pytest.raises(SimclrPathError, match="not the same patches"):
        pj.main([str(a), str(b), "--work", str(tmp_path / "w")])
    with pytest.raises(SimclrPathError, match="two or more"):
        pj.main([str(a), "--work", str(tmp_path / "w")])


def test_cli_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_join.py"), str(bad),
                        str(bad), "--work", str(tmp_path / "w")],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and str(bad) in r.stderr
