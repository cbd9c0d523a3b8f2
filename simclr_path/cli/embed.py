"""``simclr-path embed``: patch embeddings of one store with a trained encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from simclr_path.config import EmbedConfig, load_config

HELP = "Embed every patch of a patch store with a trained encoder (HDF5 /features, /coords)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EmbedConfig()
    p.add_argument("store", type=Path, help="patch store (from 'tile' or 'import-patches')")
    p.add_argument(
        "--encoder", type=Path, required=True, help="encoder.pt (or a pretraining run directory)"
    )
    p.add_argument("--out", type=Path, required=True, help="embedding file to write (.h5)")
    p.add_argument(
        "--layer",
        default=None,
        help=f"pooled (backbone output), stageN (pooled feature stage N), head (projection head) "
        f"[config: {d.layer}]",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"patches per batch [config: {d.batch_size}]"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize patches to this side [config: the encoder's training size scaled for its "
        "crop scale and for the patches' physical side against the training patches', capped "
        "at the patch size]",
    )
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help=f"[config: {d.device}]")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each patch's features over its 8 rotations and flips (8x the compute) "
        f"[config: {d.tta}]",
    )
    p.add_argument(
        "--workers", type=int, default=None, help=f"DataLoader workers [config: {d.workers}]"
    )
    p.add_argument(
        "--cpu-chunk",
        type=int,
        default=None,
        help=f"on CPU, run the model on at most this many patches at a time [config: {d.cpu_chunk}]",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config (section 'embed')")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from simclr_path.embed import embed_store

    over = {
        k: v
        for k, v in {
            "layer": args.layer,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "device": args.device,
            "workers": args.workers,
            "cpu_chunk": args.cpu_chunk,
            "tta": args.tta,
        }.items()
        if v is not None
    }
    cfg = load_config(args.config, overrides={"embed": over}, overrides_from="command line").embed
    out = embed_store(args.encoder, args.store, args.out, cfg=cfg, force=args.force,
                      progress=not args.no_progress)
    print(out)
    return 0
