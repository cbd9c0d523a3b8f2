"""What given source images cost ``bench_quality.py``'s figures: the linear probe's stored
out-of-fold predictions scored on every patch and again with those images' patches left out.

Nothing is refitted: the probe was trained, and its C chosen, with every image, so this only
asks how much of the gap to a target a few images account for (quality study 24: the two
stroma images every linear probe misses). It is a diagnostic, not the benchmark's figure,
which counts every image.

    python benchmarks/probe_without.py WORK --groups lung_aca-120,lung_scc-230 [--sets simclr-168]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # the benchmark's summaries and paired comparison
import probe_knn as pk  # reading a work folder's probe outputs, scoring one split


def evaluate(work: Path, name: str, left_out: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(row over every patch, row without ``left_out``'s patches) of one feature set."""
    from simclr_path.errors import SimclrPathError

    emb, classes, pos, splits = pk.read_splits(work, name)
    groups = np.asarray(emb.groups)
    unknown = sorted(set(left_out) - set(groups))
    if unknown:
        raise SimclrPathError(f"{emb.path}: no source image (group) {unknown[0]!r}; --groups "
                              "takes names of its groups, e.g. lung_scc-230")
    keep = ~np.isin(groups, left_out)
    if len(set(emb.labels[keep])) < len(classes):
        raise SimclrPathError(f"--groups leaves a class of {emb.path} without patches")
    per: dict[str, list[dict[str, Any]]] = {"all": [], "without": []}
    for _, _, proba in splits:
        per["all"].append(pk._scores(emb.labels, proba, pos, groups))
        per["without"].append(pk._scores(emb.labels[keep], proba[keep], pos, groups[keep]))
    every, without = pk.rows(name, per)
    return every, without


def main(argv: list[str] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    from simclr_path.errors import SimclrPathError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a bench_quality.py --work folder")
    ap.add_argument("--groups", required=True, help="comma-separated source images to leave out")
    ap.add_argument("--sets", default=None,
                    help="comma-separated feature sets (embedding stems) [every probed set]")
    args = ap.parse_args(argv)
    left_out = [g for g in args.groups.split(",") if g]
    if not left_out:
        raise SimclrPathError("--groups names no source image")
    names = (args.sets.split(",") if args.sets else
             sorted(p.name for p in (args.work / "probe").glob("*") if p.is_dir()))
    if not names:
        raise SimclrPathError(f"{args.work}: no probe outputs; give a bench_quality.py work folder")
    pairs = [evaluate(args.work, n, left_out) for n in names]
    print(f"left out of the scoring: {', '.join(left_out)}")
    print(f"{'features':24s} {'patches':8s} {'SCC AUROC':>16s} {'bal. acc':>16s}  targets met "
          f"(AUROC >= {bq.TARGET_AUROC}, bal. acc >= {bq.TARGET_BALACC}) in splits")
    for every, without in pairs:
        for r, label in ((every, "all"), (without, "without")):
            met = [sum(x["auroc_scc"] >= bq.TARGET_AUROC for x in r["per_repeat"]),
                   sum(x["balanced_accuracy"] >= bq.TARGET_BALACC for x in r["per_repeat"])]
            print(f"{r['name'][:24]:24s} {label:8s} {r['auroc_scc']:.4f} ± "
                  f"{bq._fmt(r['auroc_scc_sd'], 3)} {r['balanced_accuracy']:.4f} ± "
                  f"{bq._fmt(r['balanced_accuracy_sd'], 3)}  {met[0]}/{len(r['per_repeat'])}, "
                  f"{met[1]}/{len(r['per_repeat'])}")
    return pairs


if __name__ == "__main__":
    bq.cli(main)
