"""``simclr-path import-patches``: a folder of labelled tiles (one subfolder per class) -> store."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import BIT_DEPTHS

HELP = "Import a folder of labelled tiles (one subfolder per class) as an HDF5 patch store."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="folder with one subfolder of PNG/JPEG/TIFF/BMP/WebP tiles per class")
    p.add_argument("--out", type=Path, required=True, help="patch store to write (.h5)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="resize tiles to this side (non-square tiles are centre-cropped first); "
                        "required when the tiles differ in size")
    p.add_argument("--groups", type=Path, default=None,
                   help="CSV with columns path,group (path relative to the folder): the patient "
                        "or source image of each tile, for grouped evaluation")
    p.add_argument("--bit-depth", type=int, default=None, metavar="BITS",
                   help="sample depth of 16-bit tiles (e.g. 12 for a 12-bit camera); default: "
                        f"the smallest of {'/'.join(map(str, BIT_DEPTHS))} that holds the largest "
                        "sample of the dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.import_patches import import_patches

    res = import_patches(args.folder, args.out, patch_size=args.patch_size,
                         groups_csv=args.groups, force=args.force, progress=not args.no_progress,
                         bit_depth=args.bit_depth)
    counts = ", ".join(f"{k}: {v}" for k, v in res.counts.items())
    print(f"{res.path}: {res.n_patches} tiles of {res.patch_size} px ({counts}); "
          f"{res.n_groups or 'no'} groups"
          + (f"; 16-bit samples scaled from {res.bit_depth} bits" if res.bit_depth else "")
          + (f" (the largest sample is in {res.depth_tile})" if res.depth_tile else ""))
    return 0
