"""``simclr-path plot-confusion``: confusion matrices of a classifier run."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name

HELP = "Confusion matrices (patch and slide level) from a 'classify' results folder."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    p.add_argument(
        "--classify", type=Path, required=True, help="results folder of 'simclr-path classify'"
    )
    p.add_argument("--out", type=Path, required=True, help="output figure (PNG; PDF or SVG by its suffix)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.figures import plot_confusion

    plot_confusion(args.classify, args.out, force=args.force, run_name=args.run_name)
    return 0
