"""``simclr-path plot-curves``: ROC and precision-recall curves of a classifier run."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name

HELP = "ROC and precision-recall curves (patch and slide level) from a 'classify' results folder."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    p.add_argument(
        "--classify", type=Path, required=True, help="results folder of 'simclr-path classify'"
    )
    p.add_argument("--out-roc", type=Path, required=True, help="ROC PNG")
    p.add_argument("--out-pr", type=Path, required=True, help="precision-recall PNG")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def run(args: argparse.Namespace) -> int:
    from simclr_path.figures import plot_curves

    plot_curves(args.classify, args.out_roc, args.out_pr, force=args.force, run_name=args.run_name)
    return 0
