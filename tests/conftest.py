"""Shared test fixtures. Real data lives in ../shared/data and tests using it skip without it."""

from __future__ import annotations

import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SLIDES = SHARED_DATA / "slides"
LC25000 = SHARED_DATA / "lc25000-dev"

# A shell starts a background job (`pytest ... &`, some CI runners) with SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler: the interrupt tests (Ctrl-C saves the
# finished steps ...) would test the shell, not the code. Ctrl-C works as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def load_benchmark(name: str):
    """Import ``benchmarks/{name}.py`` as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _close_figures():
    """Tests that capture figures (save_figure patched) leave them open: close them after each."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip a test cleanly when a piece of ../shared/data is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")


@pytest.fixture
def make_store(tmp_path):
    """Build a small patch store of random-ish patches: ``make_store(n=32, size=32, labels=None)``."""
    from simclr_path.store import PatchStoreWriter

    def _make(n: int = 32, size: int = 32, name: str = "store.h5", slide_id: str = "S1",
              label_names=None, labels=None, groups=None, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        patches = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        coords = np.stack([np.arange(n) * size, np.zeros(n, dtype=np.int64)], axis=1)
        path = tmp_path / name
        with PatchStoreWriter(path, patch_size=size, attrs={"slide_id": slide_id, "kind": "slide", "mpp": 0.5},
                              label_names=label_names) as w:
            w.append(patches, coords, labels=labels, groups=groups)
        return path

    return _make


PROBE_CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def toy_labels(groups_per_class: int, per_group: int) -> tuple[np.ndarray, list[str]]:
    """Class indices (N,) and source-image groups of a three-class toy set in bench_quality's
    class names, ``per_group`` patches per group."""
    y = np.repeat(np.arange(3), groups_per_class * per_group)
    groups = [f"{PROBE_CLASSES[c]}-{i // per_group}" for c in range(3)
              for i in range(groups_per_class * per_group)]
    return y, groups


def probed_work(work: Path, x: np.ndarray, y: np.ndarray, groups: list[str],
                classify: dict | None = None) -> Path:
    """A ``bench_quality.py --work`` folder: features ``x`` (N, D) as embedding set "toy", probed
    by the benchmark's linear probe on 2 grouped splits (fold seeds 0, 1); ``classify``: probe
    settings that differ from the preset's."""
    from simclr_path.config import load_config
    from simclr_path.store import write_embeddings

    coords = np.stack([np.arange(len(y)), np.zeros(len(y), dtype=np.int64)], axis=1)
    emb = write_embeddings(work / "embeddings" / "toy.h5", x, coords,
                           {"slide_id": "toy", "layer": "pooled"}, labels=y, groups=groups,
                           label_names=PROBE_CLASSES)
    load_benchmark("bench_quality").probe_splits(
        emb, work / "probe" / "toy",
        load_config(preset="cpu-fast", overrides={"classify": classify or {}}).classify, [0, 1],
        {}, "toy")
    return work


def fake_mlflow(monkeypatch, fail: str | None = None):
    """An ``mlflow`` module whose MlflowClient records every call as (name, args, kwargs);
    ``fail``: the name of a call that raises, as a store or server that fails does."""
    import collections
    import sys
    import types

    calls: list = []

    class MlflowClient:
        def __init__(self, tracking_uri=None):
            calls.append(("MlflowClient", (), {"tracking_uri": tracking_uri}))

        def __getattr__(self, name):
            def call(*a, **k):
                calls.append((name, a, k))
                if name == fail:
                    raise RuntimeError("HTTP 503: service unavailable\nretry later")
                if name == "get_experiment_by_name":
                    return None
                if name == "create_experiment":
                    return "7"
                if name == "create_run":
                    return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
            return call

    entities = types.SimpleNamespace(
        Param=collections.namedtuple("Param", "key value"),
        Metric=collections.namedtuple("Metric", "key value timestamp step"))
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(MlflowClient=MlflowClient,
                                                                     entities=entities))
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    return calls


def damage_chunk(path, name, index):
    """Overwrite the middle of one compressed chunk of dataset ``name`` (a disk or copy error)."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(index)
    assert info.filter_mask == 0  # compressed: the filter must notice
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        fh.write(b"\xff" * (info.size - 10))


def striped_store(path: Path, n: int = 40, thumbnail: bool = True) -> np.ndarray:
    """A slide store of ``n`` 32 px patches of vertical stripes, which LZF compresses (so its
    decoder notices a damaged chunk; noise is stored raw); returns the patches."""
    from simclr_path.store import PatchStoreWriter

    rng = np.random.default_rng(0)
    stripes = np.repeat(rng.integers(0, 256, (n, 1, 32, 3), dtype=np.uint8), 32, axis=1)
    with PatchStoreWriter(path, 32, attrs={"slide_id": "s", "kind": "slide", "mpp": 1.0}) as w:
        w.append(stripes, np.arange(2 * n).reshape(n, 2) * 32)
        if thumbnail:
            w.set_thumbnail(np.repeat(stripes[0], 8, axis=0))
    return stripes
