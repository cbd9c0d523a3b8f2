"""``simclr-path plot-tsne``: t-SNE maps of patch embeddings."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.cli import add_run_name
from simclr_path.config import ClassifyConfig

HELP = "t-SNE of a stratified patch sample coloured by label and by slide (or drawn with patches)."
# writes figures only (figures.figure_format): one inside an input folder cannot replace the
# data files it reads there (cli.check_output_paths)
FIGURES_ONLY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_name(p)
    d = ClassifyConfig()
    p.add_argument("--embeddings", type=Path, nargs="+", required=True, help="embedding files")
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="samples sheet (slide labels); omit for imported sets",
    )
    p.add_argument("--out-label", type=Path, required=True, help="PNG coloured by label")
    p.add_argument(
        "--out-slide", type=Path, required=True, help="PNG coloured by slide (or source group)"
    )
    p.add_argument(
        "--stores", type=Path, nargs="+", default=None,
        help="patch stores the embeddings were made from, for --out-thumbnails",
    )
    p.add_argument(
        "--out-thumbnails", type=Path, default=None, help="PNG of the map drawn with patches"
    )
    p.add_argument(
        "--out-umap",
        type=Path,
        default=None,
        help="PNG of a UMAP coloured by label (needs the optional umap-learn)",
    )
    p.add_argument(
        "--max-points",
        type=int,
        default=None,
        help=f"patches in the sample [config: classify.tsne_max_points = {d.tsne_max_points}]",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (section 'classify')")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def run(args: argparse.Namespace) -> int:
    from simclr_path.config import load_config
    from simclr_path.figures import plot_tsne

    over = {} if args.max_points is None else {"tsne_max_points": args.max_points}
    cfg = load_config(args.config, overrides={"classify": over}, overrides_from="command line").classify  # validates the value
    plot_tsne(
        args.embeddings,
        args.out_label,
        args.out_slide,
        samples=args.samples,
        max_points=cfg.tsne_max_points,
        perplexity=cfg.tsne_perplexity,
        stores=args.stores,
        out_thumbnails=args.out_thumbnails,
        out_umap=args.out_umap,
        seed=cfg.seed,
        force=args.force,
        run_name=args.run_name,
    )
    return 0
