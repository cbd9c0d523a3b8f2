"""``simclr-path classify``: linear SCC classifier with patient-grouped evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import ClassifyConfig, load_config

HELP = (
    "Train and evaluate a logistic-regression SCC classifier on embeddings (patient-grouped folds)."
)

REPLACES_OUT_DIR = True  # --force replaces the whole --out folder (outputs.atomic_dir)
OUT_IS_FOLDER = True  # --out names a folder (a file output ending in "/" is refused)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ClassifyConfig()
    p.add_argument(
        "--embeddings", type=Path, nargs="+", required=True, help="embedding files (one per slide)"
    )
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="samples sheet (TSV: slide_id, path, label, patient_id[, mpp, split]); omit for "
        "imported patch sets whose embeddings carry labels and groups",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="results folder: metrics.json, predictions_patches.csv, predictions_slides.csv, "
        "model.npz, model.json",
    )
    p.add_argument(
        "--folds", type=int, default=None, help=f"outer patient-grouped folds [config: {d.folds}]"
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        default=None,
        help="train on this share of each class's patients per fold, e.g. 0.1 or 0.01 (at least "
        "one per class; the patients 'finetune' keeps at that fraction) "
        f"[config: {d.label_fraction}]",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (section 'classify')")
    p.add_argument("--force", action="store_true", help="replace an existing results folder")


def run(args: argparse.Namespace) -> int:
    from simclr_path.classify import classify

    over = {
        k: v
        for k, v in (("folds", args.folds), ("label_fraction", args.label_fraction))
        if v is not None
    }
    cfg = load_config(args.config, overrides={"classify": over}, overrides_from="command line").classify
    m = classify(args.embeddings, args.out, samples=args.samples, cfg=cfg, force=args.force)
    s = m["slide"]
    auc = s.get("auroc")
    ci = s.get("auroc_ci95")
    txt = f"slide AUROC {auc:.3f}" if auc is not None else "slide AUROC n/a"
    if ci:
        txt += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    elif s.get("auroc_ci95_note"):
        txt += f" ({s['auroc_ci95_note']})"
    frac = f" at label fraction {cfg.label_fraction}" if cfg.label_fraction < 1.0 else ""
    bacc = s.get("balanced_accuracy")
    print(
        f"{args.out}{frac}: {txt}, slide balanced accuracy "
        f"{'n/a' if bacc is None else f'{bacc:.3f}'}"
    )
    return 0
