"""Linear probe on joined feature sets: a ceiling check for ``bench_quality.py`` (quality study 14).

Joins embedding files of the same patch store column-wise and runs ``bench_quality.py``'s probe
(the project's ``classify``: StandardScaler + logistic regression, C by inner grouped CV) on the
same grouped splits, for each input alone and for the join. The probe standardises every column,
so a set's total weight under its L2 penalty grows with its width (512 SimCLR features against
96 histogram bins); scaling a set's columns before the join would be undone. So each set's
columns are repeated round(widest / its width) times: a column repeated r times weighs as one
scaled by sqrt(r), and the sets weigh about the same. (Before 2026-12-05 the script scaled the
sets by 1 / sqrt(width), which the probe undid: study 14's joins weighed each column the same.)
If the join misses the same source images as its parts, those images are missing from every
feature set, not from one.

    python benchmarks/probe_join.py WORK/embeddings/simclr-168.h5 \\
        WORK/embeddings/colour-hist-sqrt-32.h5 --work join [--repeats 5]

The probe's settings are the preset's ``classify`` section (fold seeds 0-4, the default C grid):
the same splits as ``bench_quality.py`` run without ``--seed`` or ``--set classify.*``.

The inputs are ``bench_quality.py --work WORK`` outputs (or ``simclr-path embed`` files of one
imported patch store): same patches in the same order, with labels and groups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # the benchmark's probe, splits and summaries

_ONE_ENCODER = {"format_version", "simclr_path_version", "label_names", "encoder", "encoder_sha256",
                "arch", "image_size", "feature_dim", "layer", "tta"}


def join_features(stores: list[Any]) -> np.ndarray:
    """(N, r_1 D_1 + ... + r_k D_k) float32: each store's (N, D_i) features, columns repeated
    r_i = round(max_j D_j / D_i) times, so that under the probe's per-column standardisation and
    L2 penalty every set has about the same total weight."""
    widest = max(s.features.shape[1] for s in stores)
    parts = [np.tile(s.features, (1, max(1, round(widest / s.features.shape[1]))))
             for s in stores]
    return np.concatenate(parts, axis=1).astype(np.float32)


def check_same_patches(stores: list[Any]) -> None:
    """Refuse inputs that are not the same patches in the same order (a join would mix tiles)."""
    from simclr_path.errors import SimclrPathError

    first = stores[0]
    if first.labels is None or first.groups is None:
        raise SimclrPathError(f"{first.path}: no labels or groups; embed an imported patch store "
                              "(simclr-path import-patches, then simclr-path embed)")
    for s in stores[1:]:
        same = (len(s) == len(first) and s.labels is not None and s.groups is not None
                and np.array_equal(s.coords, first.coords) and np.array_equal(s.labels, first.labels)
                and s.groups == first.groups)
        if not same:
            raise SimclrPathError(f"{s.path}: not the same patches in the same order as "
                                  f"{first.path}; join embeddings of one patch store")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from simclr_path.config import load_config
    from simclr_path.errors import SimclrPathError
    from simclr_path.store import EmbeddingStore, write_embeddings

    if len(args.embeddings) < 2:
        raise SimclrPathError("give two or more embedding files to join")
    if args.repeats < 1:
        raise SimclrPathError(f"--repeats must be >= 1, got {args.repeats}")
    stores = [EmbeddingStore(p) for p in args.embeddings]
    check_same_patches(stores)
    first = stores[0]
    args.work.mkdir(parents=True, exist_ok=True)
    # the first file's provenance (store, slide id, patch size), less what names one encoder
    attrs = {k: v for k, v in first.attrs.items() if k not in _ONE_ENCODER}
    attrs.update(layer="joined", joined_from=[str(p) for p in args.embeddings])
    joined = write_embeddings(args.work / "joined.h5", join_features(stores), first.coords, attrs,
                              labels=first.labels, groups=first.groups,
                              label_names=first.label_names, force=True)
    cfg = load_config(preset=args.preset).classify
    fold_seeds = [cfg.seed + r for r in range(args.repeats)]
    inputs = [*args.embeddings, joined]
    ref_folds: dict[int, np.ndarray] = {}
    rows = []
    with tqdm(total=len(inputs) * len(fold_seeds), desc="linear probes", unit="probe",
              leave=False, disable=None) as bar:
        for i, emb in enumerate(inputs):
            name = "joined" if emb == joined else f"{i}:{Path(emb).stem}"
            per_repeat = bq.probe_splits(emb, args.work / "probe" / name.replace(":", "-"), cfg,
                                         fold_seeds, ref_folds, name, bar)
            rows.append({"name": name, "per_repeat": per_repeat,
                         **bq.summarise_repeats(per_repeat),
                         "missed_groups": bq.missed_groups(per_repeat)})
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'features':40s} {'SCC AUROC':>16s} {'bal. acc':>16s}  groups missed")
    for r in rows:
        print(f"{r['name'][:40]:40s} {r['auroc_scc']:.4f} ± {bq._fmt(r['auroc_scc_sd'], 3)} "
              f"{r['balanced_accuracy']:.4f} ± {bq._fmt(r['balanced_accuracy_sd'], 3)}  "
              f"{len(r['missed_groups'])}: {', '.join(r['missed_groups'])}")
    for r in rows[:-1]:
        c = bq.compare(rows[-1], r)
        print(f"  joined vs {r['name']}: AUROC {c['auroc_scc_diff']:+.4f} ({c['auroc_scc_wins']}/"
              f"{c['repeats']} splits better), bal. acc {c['balanced_accuracy_diff']:+.4f} "
              f"({c['balanced_accuracy_wins']}/{c['repeats']})")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embeddings", nargs="+", type=Path, help="embedding files of one patch store")
    ap.add_argument("--work", type=Path, required=True,
                    help="folder for the joined file and the probe outputs")
    ap.add_argument("--repeats", type=int, default=5, help="grouped splits, fold seeds 0.. [5]")
    ap.add_argument("--preset", default="cpu-fast", help="whose classify settings [cpu-fast]")
    rows = run(ap.parse_args(argv))
    print_rows(rows)
    return rows


if __name__ == "__main__":
    bq.cli(main)
