"""``simclr-path tile``: cut a slide into tissue patches at a chosen mpp (HDF5 patch store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import TileConfig, load_config

HELP = "Tile a whole-slide image into an HDF5 store of tissue patches (plus a QC picture)."

# CLI option -> TileConfig field (CLI values override the --config file, which overrides defaults)
_FIELDS = ("mpp", "patch_size", "stride", "min_tissue", "workers", "remove_pen", "max_pen",
           "drop_white", "drop_black", "drop_blur", "mpp_from_objective", "tiff_direct")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TileConfig()
    p.add_argument("slide", type=Path, help="slide file (.svs, .ndpi, .mrxs, .tiff, ...)")
    p.add_argument("--out", type=Path, required=True, help="patch store to write (.h5)")
    p.add_argument("--slide-id", default=None, help="id stored in the file [slide file name stem]")
    p.add_argument("--mpp", type=float, default=None,
                   help=f"patch resolution in microns per pixel [config: {d.mpp}]")
    p.add_argument("--patch-size", type=int, default=None,
                   help=f"patch side in pixels [config: {d.patch_size}]")
    p.add_argument("--stride", type=int, default=None,
                   help="grid step in pixels at --mpp; smaller than --patch-size overlaps "
                        "[config: the patch size]")
    p.add_argument("--min-tissue", type=float, default=None,
                   help=f"keep patches with at least this tissue fraction [config: {d.min_tissue}]")
    p.add_argument("--slide-mpp", type=float, default=None,
                   help="level-0 microns per pixel of the slide, overriding its metadata")
    p.add_argument("--mpp-from-objective", action=argparse.BooleanOptionalAction, default=None,
                   help="when the slide has no mpp, use 10 / objective power [config: "
                        f"{d.mpp_from_objective}]")
    p.add_argument("--workers", type=int, default=None,
                   help=f"parallel block readers [config: {d.workers}]")
    p.add_argument("--tiff-direct", action=argparse.BooleanOptionalAction, default=None,
                   help="decode tiled-TIFF tiles with tifffile, checked against OpenSlide's pixels "
                        f"(faster) [config: {d.tiff_direct}]")
    p.add_argument("--qc", type=Path, default=None, help="write a QC picture (PNG) here")
    p.add_argument("--remove-pen", action=argparse.BooleanOptionalAction, default=None,
                   help=f"suppress blue/green/black pen ink in the tissue mask [config: "
                        f"{d.remove_pen}]")
    p.add_argument("--max-pen", type=float, default=None, metavar="F",
                   help="with --remove-pen, drop patches more than F of which is ink (with a "
                        f"16 um margin); 0 drops every patch touching a stroke [config: {d.max_pen}]")
    p.add_argument("--drop-white", type=float, default=None, metavar="F",
                   help="drop patches whose near-white pixel fraction exceeds F [config: off]")
    p.add_argument("--drop-black", type=float, default=None, metavar="F",
                   help="drop patches whose near-black pixel fraction exceeds F [config: off]")
    p.add_argument("--drop-blur", type=float, default=None, metavar="V",
                   help="drop patches whose Laplacian variance is below V [config: off]")
    p.add_argument("--config", type=Path, default=None, help="YAML config (section 'tile')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from simclr_path.tiling import NoTissueWarning, tile_slide

    over = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    cfg = load_config(args.config, overrides={"tile": over}, overrides_from="command line").tile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoTissueWarning)
        res = tile_slide(args.slide, args.out, cfg, slide_id=args.slide_id,
                         slide_mpp=args.slide_mpp, qc=args.qc, force=args.force,
                         progress=not args.no_progress)
    for w in caught:
        if issubclass(w.category, NoTissueWarning):
            print(f"simclr-path tile: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    filtered = res.n_tissue - res.n_patches
    print(f"{res.path}: {res.n_patches} patches of {res.patch_size} px at {res.mpp:g} um/px "
          f"(level {res.level} at {res.level_mpp:.4g} um/px; level-0 {res.level0_mpp:.4g} um/px "
          f"from {res.mpp_source}; {res.n_tissue}/{res.n_grid} grid cells with tissue"
          f"{f', {res.n_pen} more dropped for pen ink' if res.n_pen else ''}"
          f"{f'; {filtered} dropped by the white/black/blur filters' if filtered else ''}; "
          f"{res.seconds:.1f} s)")
    return 0
