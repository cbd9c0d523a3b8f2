"""``simclr-path preview``: a PNG grid of augmented SimCLR view pairs from patch stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name
from simclr_path.config import PRESETS, PREVIEW_PAIRS, AugmentConfig, load_config

MAX_PAIRS = 64
HELP = "Write a PNG grid of augmented view pairs (the SimCLR training views) from patch stores."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    p.add_argument("stores", type=Path, nargs="*", metavar="STORE.h5", help="patch stores")
    p.add_argument("--out", type=Path, required=True, help="figure to write (PNG; PDF or SVG by its suffix)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (section augment)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset [default]")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"side of the augmented views [config: {AugmentConfig().image_size}]")
    p.add_argument("--local-crops", type=int, default=None, metavar="K",
                   help=f"K extra small views per patch (multi-crop), as pretrain's option "
                        f"[config: {AugmentConfig().local_crops}]")
    p.add_argument("--pairs", type=int, default=PREVIEW_PAIRS, help=f"number of view pairs (rows, at most {MAX_PAIRS})")
    p.add_argument("--seed", type=int, default=0, help="which patches and augmentations")
    p.add_argument("--force", action="store_true", help="overwrite an existing PNG")


def run(args: argparse.Namespace) -> int:
    from simclr_path.errors import SimclrPathError
    from simclr_path.transforms import preview

    if not 1 <= args.pairs <= MAX_PAIRS:  # one row each: more would not make a readable figure
        raise SimclrPathError(f"--pairs must be between 1 and {MAX_PAIRS}, got {args.pairs}")
    from simclr_path.config import MAX_SEED

    if not 0 <= args.seed <= MAX_SEED:
        raise SimclrPathError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    # as in pretrain: the views previewed are the views it would train on
    given = {k: v for k, v in (("image_size", args.image_size), ("local_crops", args.local_crops))
             if v is not None}
    cfg = load_config(args.config, args.preset, {"augment": given} if given else None,
                      overrides_from="command line")
    print(preview(args.stores, args.out, cfg.augment, n_pairs=args.pairs, seed=args.seed,
                  force=args.force, run_name=args.run_name))
    return 0
