"""``simclr-path pretrain``: SimCLR pretraining of a timm encoder on patch stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import PRESETS, AugmentConfig, ModelConfig, TrainConfig, load_config
from simclr_path.errors import SimclrPathError

HELP = "Pretrain a timm encoder with SimCLR on patch stores; writes a run directory (encoder.pt ...)."
# runs under torchrun as one of several processes (DDP); other commands refuse that
DISTRIBUTED = True
OUT_IS_FOLDER = True  # --out names a folder (a file output ending in "/" is refused)


def add_arguments(p: argparse.ArgumentParser) -> None:
    t, m, a = TrainConfig(), ModelConfig(), AugmentConfig()
    p.add_argument("stores", type=Path, nargs="*", metavar="STORE.h5",
                   help="patch stores (from 'tile' or 'import-patches')")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (sections augment, model, train; optional 'preset:')")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset [default]")
    p.add_argument("--arch", default=None, help=f"any timm model name [config: {m.arch}]")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs [config: {t.epochs}]")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"stop after this many optimiser steps [config: {t.max_steps}]")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"pairs per process and step [config: {t.batch_size}]")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"side of the augmented views [config: {a.image_size}]")
    p.add_argument("--local-crops", type=int, default=None, metavar="K",
                   help=f"K extra small views per patch (multi-crop) [config: {a.local_crops}]")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate: at batch 256 (scaled to the global batch) with "
                        "train.lr_scaling linear or sqrt, the rate itself with none (as in "
                        f"cpu-fast) [config: {t.lr}, scaling {t.lr_scaling}]")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help=f"[config: {t.device}]")
    p.add_argument("--workers", type=int, default=None,
                   help=f"DataLoader workers per process [config: {t.workers}]")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help=f"write RUN_DIR/checkpoint.pt every STEPS steps [config: {t.checkpoint_every}]")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly after this wall time (checkpoint and encoder are written)")
    p.add_argument("--seed", type=int, default=None, help=f"[config: {t.seed}]")
    p.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt with the same stores (start fresh, with a "
                        "warning, when there is none; a finished run needs --force)")
    p.add_argument("--resume-interrupted", action="store_true",
                   help="continue RUN_DIR/checkpoint.pt only when it is an interrupted run of this "
                        "configuration and these stores, else start over (with --force); the "
                        "workflow's pretrain rule uses it")
    p.add_argument("--force", action="store_true", help="start over in a non-empty run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def overrides(args: argparse.Namespace) -> dict[str, dict]:
    """CLI options that were given, as config overrides by section."""
    sections = {
        "model": {"arch": args.arch},
        "augment": {"image_size": args.image_size, "local_crops": args.local_crops},
        "train": {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                  "lr": args.lr, "device": args.device, "workers": args.workers,
                  "checkpoint_every": args.checkpoint_every,
                  "time_budget_s": args.time_budget, "seed": args.seed},
    }
    return {s: {k: v for k, v in d.items() if v is not None} for s, d in sections.items()}


def run(args: argparse.Namespace) -> int:
    import json

    from simclr_path.train import pretrain

    cfg = load_config(args.config, args.preset, overrides(args), overrides_from="command line")
    if args.resume and args.resume_interrupted:
        raise SimclrPathError("--resume and --resume-interrupted: give one")
    resume = "interrupted" if args.resume_interrupted else args.resume
    summary = pretrain(args.stores, args.out, cfg, resume=resume, force=args.force,
                       progress=not args.no_progress)
    if summary:  # rank 0
        print(json.dumps(summary))
    return 0
