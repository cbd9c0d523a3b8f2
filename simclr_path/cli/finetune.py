"""``simclr-path finetune``: fine-tune the pretrained encoder plus a linear head, evaluated with
the same patient-grouped folds as ``classify``."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import ClassifyConfig, FinetuneConfig, load_config

HELP = (
    "Fine-tune the pretrained encoder with a linear head end to end on labelled patches "
    "(classify's patient-grouped folds; early stopping; label fractions)."
)

REPLACES_OUT_DIR = True  # --force replaces the whole --out folder (outputs.atomic_dir)
OUT_IS_FOLDER = True  # --out names a folder (a file output ending in "/" is refused)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("stores", type=Path, nargs="+", metavar="STORE",
                   help="patch stores (one per slide from 'tile', or imported patch stores)")
    p.add_argument("--encoder", type=Path, required=True,
                   help="encoder.pt of a pretraining run (or the run directory)")
    p.add_argument("--samples", type=Path, default=None,
                   help="samples sheet (TSV: slide_id, path, label, patient_id[, mpp, split]); omit "
                   "for imported patch stores, which carry labels and groups")
    p.add_argument("--out", type=Path, required=True,
                   help="results folder: metrics.json, predictions_patches.csv, "
                   "predictions_slides.csv, history.csv, encoder.pt, classifier.pt (classify's "
                   "layout, so plot-curves and plot-confusion read it)")
    p.add_argument("--label-fraction", type=float, default=None,
                   help=f"keep this share of each class's labelled training patients, e.g. 0.1 or "
                   f"0.01 (at least one per class) [config: {d.label_fraction}]")
    p.add_argument("--epochs", type=int, default=None, help=f"most epochs per fold [config: {d.epochs}]")
    p.add_argument("--folds", type=int, default=None,
                   help=f"outer patient-grouped folds, classify's [config: classify.folds, "
                   f"{ClassifyConfig().folds}]")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help=f"[config: {d.device}]")
    p.add_argument("--workers", type=int, default=None,
                   help=f"DataLoader workers [config: {d.workers}]")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (sections 'finetune', 'classify'; 'train' for tracking)")
    p.add_argument("--force", action="store_true", help="replace an existing results folder")
    p.add_argument("--resume", action="store_true",
                   help="keep the outer folds that an interrupted run of the same inputs finished "
                   "(kept in .NAME.folds/ beside --out until a run ends)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from simclr_path.finetune import finetune

    over = {k: v for k, v in (("label_fraction", args.label_fraction), ("epochs", args.epochs),
                              ("device", args.device), ("workers", args.workers)) if v is not None}
    sections = {"finetune": over}
    if args.folds is not None:  # classify's folds: fold i tests the same slides in both
        sections["classify"] = {"folds": args.folds}
    cfg = load_config(args.config, overrides=sections, overrides_from="command line")
    m = finetune(args.stores, args.encoder, args.out, samples=args.samples, cfg=cfg,
                 force=args.force, progress=not args.no_progress, resume=args.resume)
    s = m["slide"]
    auc = s.get("auroc")
    txt = f"slide AUROC {auc:.3f}" if auc is not None else "slide AUROC n/a"
    ci = s.get("auroc_ci95")
    if ci:
        txt += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    elif s.get("auroc_ci95_note"):
        txt += f" ({s['auroc_ci95_note']})"
    bacc = s.get("balanced_accuracy")
    print(f"{args.out}: fine-tuned at label fraction {cfg.finetune.label_fraction}: {txt}, "
          f"slide balanced accuracy {'n/a' if bacc is None else f'{bacc:.3f}'}")
    return 0
