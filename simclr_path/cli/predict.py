"""``simclr-path predict``: score new slides with a saved classifier."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Score embedding files with a classifier from 'classify' (CSV of patch and slide rows)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "--classify", dest="model", type=Path, required=True,
        help="results folder of 'simclr-path classify' (--classify, as the plot commands name it)"
    )
    p.add_argument(
        "--embeddings", type=Path, nargs="+", required=True,
        help="embedding files to score (one per slide; a slide given twice is refused)"
    )
    p.add_argument("--out", type=Path, required=True, help="output CSV")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    from simclr_path.classify import predict

    print(predict(args.model, args.embeddings, args.out, force=args.force))
    return 0
