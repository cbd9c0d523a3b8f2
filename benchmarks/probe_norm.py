"""The linear probe on normalised features, on ``bench_quality.py``'s folds (quality study 22).

The k-NN probe (``probe_knn.py``, study 21) compares features by cosine similarity and beat the
linear probe on some encoders. This asks whether the linear probe gains from the same geometry:
for every embedding file of a ``bench_quality.py --work WORK`` folder that the benchmark probed,
it transforms the features, with statistics of the training folds only, and refits the
project's probe (:func:`simclr_path.classify.fit_probe`: StandardScaler, logistic regression, C by
inner grouped CV, the same seeds) on exactly the benchmark's outer folds. Transforms:

- ``none``: the features as stored (reproduces the benchmark's own probe: a check);
- ``l2``: each patch's feature vector scaled to unit length (the geometry of SimCLR's loss);
- ``centre-l2``: centred on the training folds' mean, then unit length;
- ``std-l2``: standardised on the training folds, then unit length (the k-NN probe's input);
- ``pca-whiten``: PCA whitening fitted on the training folds, keeping 99 % of the variance.

It prints SCC-vs-rest AUROC and three-class balanced accuracy per transform, paired by split
with the stored linear probe, and the source images each one misses.

    python benchmarks/probe_norm.py WORK [--transforms l2,centre-l2] [--sets simclr-168]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # the benchmark's summaries and paired comparison
import probe_knn as pk  # reading a work folder's splits; scoring one split


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pca_whiten(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=0.99, whiten=True, svd_solver="full").fit(train)
    return pca.transform(train), pca.transform(test)


def _centre_l2(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = train.mean(axis=0)
    return _unit(train - mu), _unit(test - mu)


def _std_l2(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(axis=0), train.std(axis=0) + 1e-8
    return _unit((train - mu) / sd), _unit((test - mu) / sd)


# (training rows (n, D), test rows (m, D)) -> both transformed; statistics from training rows only
TRANSFORMS: dict[str, Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "none": lambda a, b: (a, b),
    "l2": lambda a, b: (_unit(a), _unit(b)),
    "centre-l2": _centre_l2,
    "std-l2": _std_l2,
    "pca-whiten": _pca_whiten,
}


def probe_split(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: np.ndarray,
                classes: list[str], cfg, transform: str) -> np.ndarray:
    """Out-of-fold class probabilities (N, n_classes) of the project's probe on transformed
    features, one fit per outer fold; ``cfg.seed`` must be the split's fold seed."""
    from simclr_path.classify import fit_probe

    proba = np.zeros((len(y), len(classes)))
    for f in np.unique(folds):
        te, tr = folds == f, folds != f
        # the probe's own input type: a float64 refit of the untransformed features chose
        # another C in some folds than the stored float32 probe (no longer a check of it)
        a, b = (np.asarray(v, dtype=np.float32) for v in TRANSFORMS[transform](x[tr], x[te]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="classify.c_grid")
            pipe, _, _ = fit_probe(a, y[tr], groups[tr], classes, cfg)
        proba[te] = pipe.predict_proba(b)
    return proba


def stored_settings(work: Path, name: str, seed: int):
    """The probe settings (``ClassifyConfig``) the benchmark used for one split, from its
    ``metrics.json``: a refit with other settings (another C grid) would not be paired."""
    import json

    from simclr_path.config import ClassifyConfig
    from simclr_path.errors import SimclrPathError

    path = work / "probe" / name / f"split{seed}" / "metrics.json"
    try:
        return ClassifyConfig(**json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SimclrPathError(f"{path}: no probe settings to refit with ({exc}); rerun "
                              "bench_quality.py into this work folder") from None


def evaluate(work: Path, name: str, transforms: list[str]) -> list[dict[str, Any]]:
    """The stored linear probe's row, then one row per transform, for one feature set."""
    emb, classes, pos, splits = pk.read_splits(work, name)
    groups = np.asarray(emb.groups)
    x = np.asarray(emb.features, dtype=np.float64)
    per: dict[str, list[dict[str, Any]]] = {"linear": [], **{t: [] for t in transforms}}
    for seed, folds, lin in splits:
        per["linear"].append(pk._scores(emb.labels, lin, pos, groups))
        cfg = stored_settings(work, name, seed)
        for t in transforms:
            proba = probe_split(x, emb.labels, groups, folds, classes,
                                dataclasses.replace(cfg, seed=seed), t)
            per[t].append(pk._scores(emb.labels, proba, pos, groups))
    return pk.rows(name, per)


def run(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    from simclr_path.errors import SimclrPathError

    transforms = args.transforms.split(",")
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise SimclrPathError(f"--transforms: unknown {', '.join(unknown)}; choose from "
                              f"{', '.join(TRANSFORMS)}")
    names = (args.sets.split(",") if args.sets else
             sorted(p.name for p in (args.work / "probe").glob("*") if p.is_dir()))
    if not names:
        raise SimclrPathError(f"{args.work}: no probe outputs; give a bench_quality.py work folder")
    # each split is refitted with the settings the benchmark stored for it
    return [evaluate(args.work, n, transforms) for n in names]


def print_rows(sets: list[list[dict[str, Any]]]) -> None:
    print(f"{'features':24s} {'input':11s} {'SCC AUROC':>16s} {'bal. acc':>16s}  "
          "vs stored probe (splits better)  groups missed")
    for rows in sets:
        ref = rows[0]
        for r in rows:
            vs = ""
            if r is not ref:
                c = bq.compare(r, ref)
                vs = (f"{c['auroc_scc_diff']:+.4f} ({c['auroc_scc_wins']}/{c['repeats']}) / "
                      f"{c['balanced_accuracy_diff']:+.4f} ({c['balanced_accuracy_wins']}/"
                      f"{c['repeats']})")
            label = "stored" if r is ref else r["probe"]
            print(f"{r['name'][:24]:24s} {label:11s} {r['auroc_scc']:.4f} ± "
                  f"{bq._fmt(r['auroc_scc_sd'], 3)} {r['balanced_accuracy']:.4f} ± "
                  f"{bq._fmt(r['balanced_accuracy_sd'], 3)}  {vs or '-':31s}  "
                  f"{len(r['missed_groups'])}: {', '.join(r['missed_groups'])}")


def main(argv: list[str] | None = None) -> list[list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a bench_quality.py --work folder")
    ap.add_argument("--transforms", default="l2,centre-l2,std-l2,pca-whiten",
                    help=f"comma-separated, from {', '.join(TRANSFORMS)} [all but none]")
    ap.add_argument("--sets", default=None,
                    help="comma-separated feature sets (embedding stems) [every probed set]")
    args = ap.parse_args(argv)
    sets = run(args)
    print_rows(sets)
    return sets


if __name__ == "__main__":
    bq.cli(main)
