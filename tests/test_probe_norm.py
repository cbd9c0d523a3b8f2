"""benchmarks/probe_norm.py: the linear probe on normalised features, on bench_quality's folds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_benchmark, probed_work, toy_labels


@pytest.fixture(scope="module")
def pn():
    return load_benchmark("probe_norm")


@pytest.fixture(scope="module")
def work(tmp_path_factory, groups_per_class=5, per_group=4, seed=0):
    """A bench_quality work folder with one 6-d feature set: three noisy class clusters whose
    patches have norms spread over more than two orders of magnitude, probed by the benchmark's linear
    probe on 2 grouped splits."""
    rng = np.random.default_rng(seed)
    y, groups = toy_labels(groups_per_class, per_group)
    x = (np.eye(6)[y] * 2 + rng.normal(scale=0.6, size=(len(y), 6))) * rng.uniform(
        0.05, 20, size=(len(y), 1))
    return probed_work(tmp_path_factory.mktemp("norm") / "work", x, y, groups)


def test_untransformed_reproduces_the_benchmarks_probe(pn, work):
    [[stored, none, l2]] = pn.main([str(work), "--transforms", "none,l2"])
    assert [r["probe"] for r in (stored, none, l2)] == ["linear", "none", "l2"]
    for a, b in zip(stored["per_repeat"], none["per_repeat"], strict=True):
        assert a["auroc_scc"] == pytest.approx(b["auroc_scc"], abs=1e-12)
        assert a["balanced_accuracy"] == pytest.approx(b["balanced_accuracy"], abs=1e-12)
    # the norm is noise here (patches near the origin overlap): unit length lifts the probe
    assert l2["balanced_accuracy"] > none["balanced_accuracy"] + 0.02


def test_each_split_is_refitted_with_the_settings_the_benchmark_stored(pn, tmp_path):
    rng = np.random.default_rng(1)
    y, groups = toy_labels(5, 4)
    x = np.eye(6)[y] * 2 + rng.normal(scale=1.5, size=(len(y), 6))
    work = probed_work(tmp_path / "work", x, y, groups, classify={"c_grid": [0.001]})
    [[stored, none]] = pn.main([str(work), "--transforms", "none"])
    for a, b in zip(stored["per_repeat"], none["per_repeat"], strict=True):
        assert a["auroc_scc"] == pytest.approx(b["auroc_scc"], abs=1e-12)


def test_transforms_use_training_rows_only(pn):
    rng = np.random.default_rng(1)
    train, test = rng.normal(2.0, 3.0, size=(200, 5)), rng.normal(size=(7, 5))
    for name, fn in pn.TRANSFORMS.items():
        a, b = fn(train, test)
        a2, b2 = fn(train, test * 5 + 1)  # other test rows: the training side is unchanged
        np.testing.assert_allclose(a, a2, err_msg=name)
        assert b.shape[0] == 7 and b2.shape[0] == 7, name
    for name in ("l2", "centre-l2", "std-l2"):
        a, b = pn.TRANSFORMS[name](train, test)
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, err_msg=name)
    a, b = pn.TRANSFORMS["centre-l2"](train, test)
    want = test - train.mean(axis=0)
    np.testing.assert_allclose(b, want / np.linalg.norm(want, axis=1, keepdims=True))
    a, _ = pn.TRANSFORMS["pca-whiten"](train, test)
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.eye(a.shape[1]), atol=1e-6)


def test_bad_input(pn, work, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_norm.py"), str(work),
                        "--transforms", "l2,l3"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown l3" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_norm.py"),
                        str(tmp_path)], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and "no probe outputs" in r.stderr


def test_the_refit_gives_the_probe_float32_features_as_the_benchmark_did(pn, monkeypatch):
    """A float64 refit of the untransformed features chose another C than the stored float32
    probe in some folds of a review's run: 'none' was no longer a check of it."""
    import simclr_path.classify as C

    seen = []
    real = C.fit_probe

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return real(x, *a, **k)

    monkeypatch.setattr(C, "fit_probe", spy)
    rng = np.random.default_rng(2)
    y, groups = toy_labels(5, 4)
    x = rng.normal(size=(len(y), 4))
    folds = np.array([int(g.rsplit("-", 1)[1]) % 2 for g in groups])
    from simclr_path.config import ClassifyConfig

    for t in ("none", "l2"):
        pn.probe_split(x, y, np.asarray(groups), folds, ["a", "b", "c"],
                       ClassifyConfig(c_grid=[0.1], bootstrap=0), t)
    assert seen and set(seen) == {np.dtype(np.float32)}
