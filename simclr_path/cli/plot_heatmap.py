"""``simclr-path plot-heatmap``: SCC probability of every patch over the slide thumbnail."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name

HELP = "Per-patch SCC probability over the slide thumbnail (from 'classify' or a 'predict' CSV)."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    p.add_argument(
        "--classify",
        type=Path,
        required=True,
        help="results folder of 'simclr-path classify' (or a CSV written by 'simclr-path predict')",
    )
    p.add_argument(
        "--store",
        type=Path,
        required=True,
        help="the slide's patch store: the one its predictions' embeddings were made from",
    )
    p.add_argument("--out", type=Path, required=True, help="output figure (PNG; PDF or SVG by its suffix)")
    p.add_argument("--slide-id", default=None, help="slide to draw [default: the store's slide id]")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.figures import plot_heatmap

    plot_heatmap(args.classify, args.store, args.out, slide_id=args.slide_id, force=args.force,
                 run_name=args.run_name)
    return 0
