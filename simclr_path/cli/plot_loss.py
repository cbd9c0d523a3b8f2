"""``simclr-path plot-loss``: loss curve of a pretraining run."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name

HELP = "Plot the loss and learning-rate curve of a pretraining run (metrics.csv) as a PNG."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    p.add_argument("run", type=Path, help="pretraining run directory (or its metrics.csv)")
    p.add_argument("--out", type=Path, required=True, help="output figure (PNG; PDF or SVG by its suffix)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.figures import plot_loss_curve

    plot_loss_curve(args.run, args.out, title=args.title, force=args.force,
                    run_name=args.run_name)
    return 0
