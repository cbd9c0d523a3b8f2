"""k-nearest-neighbour probe on ``bench_quality.py``'s folds: is the linear probe the limit?

For every embedding file of a ``bench_quality.py --work WORK`` folder that the benchmark probed,
this fits a k-NN classifier (features standardised on the training folds, then L2-normalised,
so the neighbours are the most cosine-similar training patches; class probability = the share
of the k votes, as in the k-NN evaluation of Wu et al. 2018 and DINO, Caron et al. 2021) on
exactly the linear probe's outer folds, read from its out-of-fold predictions
(``WORK/probe/<set>/split<seed>/predictions_patches.csv``). It prints SCC-vs-rest AUROC and
three-class balanced accuracy of both probes per feature set, paired by split, with the source
images each one misses (quality study 21). The issue's target is stated for the linear probe;
this is a diagnostic: where k-NN is better, the features hold the classes apart locally but not
linearly.

    python benchmarks/probe_knn.py WORK [--k 20] [--sets simclr-168,colour-hist-sqrt-32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # the benchmark's positive class, summaries and paired comparison


def knn_split(x: np.ndarray, y: np.ndarray, folds: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Out-of-fold class probabilities (N, n_classes) of a k-NN vote, one fit per outer fold.

    ``x``: (N, D) features; ``y``: (N,) class indices; ``folds``: (N,) outer fold of each patch.
    """
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    proba = np.zeros((len(y), n_classes))
    for f in np.unique(folds):
        te, tr = folds == f, folds != f
        knn = make_pipeline(StandardScaler(), Normalizer(),
                            KNeighborsClassifier(n_neighbors=min(k, int(tr.sum()))))
        knn.fit(x[tr], y[tr])
        proba[np.ix_(te, knn[-1].classes_)] = knn.predict_proba(x[te])
    return proba


def _scores(y: np.ndarray, proba: np.ndarray, pos: int, groups: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = proba.argmax(axis=1)
    right = pred == y
    return {"auroc_scc": float(roc_auc_score(y == pos, proba[:, pos])),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "group_accuracy": {g: float(right[groups == g].mean()) for g in np.unique(groups)}}


def read_splits(work: Path, name: str):
    """The embedding file of feature set ``name`` and its linear probe's out-of-fold results.

    Returns ``(emb, classes, pos, splits)``: the :class:`EmbeddingStore`, its class names, the
    index of the positive class, and one ``(fold_seed, folds, proba)`` per grouped split, with
    ``folds`` (N,) the outer fold of each patch and ``proba`` (N, n_classes) the linear probe's
    out-of-fold class probabilities, in the store's patch order."""
    import pandas as pd

    from simclr_path.errors import SimclrPathError
    from simclr_path.store import EmbeddingStore

    emb = EmbeddingStore(work / "embeddings" / f"{name}.h5")
    if emb.labels is None or emb.groups is None or not emb.label_names:
        raise SimclrPathError(f"{emb.path}: no labels or groups; give a bench_quality.py work folder")
    classes = list(emb.label_names)
    if bq.POSITIVE not in classes:
        raise SimclrPathError(f"{emb.path}: no class {bq.POSITIVE!r} (classes: {classes})")
    csvs = sorted((work / "probe" / name).glob("split*/predictions_patches.csv"))
    if not csvs:
        raise SimclrPathError(f"{work / 'probe' / name}: no linear-probe predictions; run "
                              f"bench_quality.py --work {work} first")
    splits = []
    for csv in csvs:
        pred = pd.read_csv(csv, dtype={"patient_id": str}, keep_default_na=False)
        pred = pred.set_index("patch_index").sort_index()
        if len(pred) != len(emb.labels) or (pred.index.to_numpy() != np.arange(len(pred))).any():
            raise SimclrPathError(f"{csv}: not the out-of-fold predictions of {emb.path}'s patches")
        seed = csv.parent.name.removeprefix("split")
        if not seed.isdigit():  # the fold seed: a refit on other folds would not be paired
            raise SimclrPathError(f"{csv.parent}: not a split<fold seed> folder of "
                                  "bench_quality.py")
        splits.append((int(seed), pred["fold"].to_numpy(),
                       pred[[f"prob_{c}" for c in classes]].to_numpy()))
    return emb, classes, classes.index(bq.POSITIVE), splits


def rows(name: str, per_probe: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result row per probe (``probe``, ``per_repeat``, means and missed source images)."""
    return [{"name": name, "probe": kind, "per_repeat": per_repeat,
             **bq.summarise_repeats(per_repeat), "missed_groups": bq.missed_groups(per_repeat)}
            for kind, per_repeat in per_probe.items()]


def evaluate(work: Path, name: str, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(linear probe row, k-NN row) of one feature set, each with ``per_repeat`` and summaries."""
    emb, classes, pos, splits = read_splits(work, name)
    groups = np.asarray(emb.groups)
    per: dict[str, list[dict[str, Any]]] = {"linear": [], "knn": []}
    for _, folds, lin in splits:
        per["linear"].append(_scores(emb.labels, lin, pos, groups))
        per["knn"].append(_scores(emb.labels, knn_split(emb.features, emb.labels, folds, k,
                                                        len(classes)), pos, groups))
    lin_row, knn_row = rows(name, per)
    return lin_row, knn_row


def run(args: argparse.Namespace) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    from simclr_path.errors import SimclrPathError

    if args.k < 1:
        raise SimclrPathError(f"--k must be >= 1, got {args.k}")
    names = (args.sets.split(",") if args.sets else
             sorted(p.name for p in (args.work / "probe").glob("*") if p.is_dir()))
    if not names:
        raise SimclrPathError(f"{args.work}: no probe outputs; give a bench_quality.py work folder")
    return [evaluate(args.work, n, args.k) for n in names]


def print_rows(pairs: list[tuple[dict[str, Any], dict[str, Any]]], k: int) -> None:
    print(f"{'features':24s} {'probe':8s} {'SCC AUROC':>16s} {'bal. acc':>16s}  groups missed")
    for lin, knn in pairs:
        for r, label in ((lin, "linear"), (knn, f"{k}-NN")):
            print(f"{r['name'][:24]:24s} {label:8s} {r['auroc_scc']:.4f} ± "
                  f"{bq._fmt(r['auroc_scc_sd'], 3)} {r['balanced_accuracy']:.4f} ± "
                  f"{bq._fmt(r['balanced_accuracy_sd'], 3)}  {len(r['missed_groups'])}: "
                  f"{', '.join(r['missed_groups'])}")
        c = bq.compare(knn, lin)
        print(f"  {k}-NN - linear: AUROC {c['auroc_scc_diff']:+.4f} ({c['auroc_scc_wins']}/"
              f"{c['repeats']} splits better), bal. acc {c['balanced_accuracy_diff']:+.4f} "
              f"({c['balanced_accuracy_wins']}/{c['repeats']})")


def main(argv: list[str] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a bench_quality.py --work folder")
    ap.add_argument("--k", type=int, default=20, help="neighbours [20, as DINO's k-NN evaluation]")
    ap.add_argument("--sets", default=None,
                    help="comma-separated feature sets (embedding stems) [every probed set]")
    args = ap.parse_args(argv)
    pairs = run(args)
    print_rows(pairs, args.k)
    return pairs


if __name__ == "__main__":
    bq.cli(main)
