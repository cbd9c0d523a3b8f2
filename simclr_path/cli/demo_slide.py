"""``simclr-path demo-slide``: write a synthetic H&E slide (pyramidal tiled JPEG TIFF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import DEMO_SLIDE_MPP, DEMO_SLIDE_SIDE

HELP = "Write a synthetic H&E whole-slide image (SCC or normal) as a pyramidal tiled TIFF."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output .tiff")
    p.add_argument("--kind", choices=("scc", "normal"), default="scc", help="tissue morphology")
    p.add_argument("--seed", type=int, default=0, help="layout seed (same seed, same file)")
    p.add_argument("--width", type=int, default=None,
                   help=f"level-0 width in pixels [make_demo_slide default: {DEMO_SLIDE_SIDE}]")
    p.add_argument("--height", type=int, default=None,
                   help=f"level-0 height in pixels [make_demo_slide default: {DEMO_SLIDE_SIDE}]")
    p.add_argument("--mpp", type=float, default=None,
                   help=f"level-0 microns per pixel [make_demo_slide default: {DEMO_SLIDE_MPP}]")
    p.add_argument("--artefacts", default="",
                   help="comma-separated artefacts to add: pen, glass, fold")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.demo import make_demo_slide

    arts = [a for a in args.artefacts.split(",") if a.strip()]
    size = {k: getattr(args, k) for k in ("width", "height", "mpp") if getattr(args, k) is not None}
    out = make_demo_slide(args.out, kind=args.kind, seed=args.seed, artefacts=arts,
                          force=args.force, **size)
    print(out)
    return 0
