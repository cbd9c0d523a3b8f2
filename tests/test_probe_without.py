"""benchmarks/probe_without.py: the linear probe's stored predictions scored without some images."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import PROBE_CLASSES, ROOT, load_benchmark, probed_work, toy_labels

from simclr_path.errors import SimclrPathError


@pytest.fixture(scope="module")
def pw():
    return load_benchmark("probe_without")


@pytest.fixture(scope="module")
def work(tmp_path_factory, groups_per_class=6, per_group=4):
    """Three well separated classes, but one SCC source image lies in the benign cluster (an
    image whose tiles do not show its label), probed on 2 grouped splits."""
    rng = np.random.default_rng(0)
    y, groups = toy_labels(groups_per_class, per_group)
    centres = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    x = centres[y] + rng.normal(scale=0.5, size=(len(y), 2))
    odd = f"{PROBE_CLASSES[2]}-0"
    x[np.asarray(groups) == odd] = centres[1] + rng.normal(scale=0.5, size=(per_group, 2))
    return probed_work(tmp_path_factory.mktemp("without") / "work", x, y, groups), odd


def test_leaving_the_odd_image_out_of_the_scoring_recovers_the_figures(pw, work):
    folder, odd = work
    [(every, without)] = pw.main([str(folder), "--groups", odd])
    assert len(every["per_repeat"]) == len(without["per_repeat"]) == 2
    assert odd in every["missed_groups"] and odd not in without["missed_groups"]
    assert without["balanced_accuracy"] == 1.0 > every["balanced_accuracy"]
    assert without["auroc_scc"] == 1.0 > every["auroc_scc"]
    # the same stored predictions: nothing refitted, so every other image scores as before
    for a, b in zip(every["per_repeat"], without["per_repeat"]):
        assert {g: v for g, v in a["group_accuracy"].items() if g != odd} == b["group_accuracy"]


def test_bad_input(pw, work, tmp_path):
    folder, odd = work
    with pytest.raises(SimclrPathError, match="no source image \\(group\\) 'nope'"):
        pw.main([str(folder), "--groups", "nope"])
    every_scc = ",".join(f"{PROBE_CLASSES[2]}-{i}" for i in range(6))
    with pytest.raises(SimclrPathError, match="leaves a class of .* without patches"):
        pw.main([str(folder), "--groups", every_scc])
    with pytest.raises(SimclrPathError, match="no probe outputs"):
        pw.main([str(tmp_path), "--groups", odd])
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_without.py"),
                        str(folder), "--groups", ","], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "names no source image" in r.stderr
