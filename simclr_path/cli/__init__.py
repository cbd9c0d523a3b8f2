"""The ``simclr-path`` command line: one subcommand per stage.

Each subcommand lives in its own module ``simclr_path/cli/<name>.py`` that defines ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. Those modules import only argparse and
:mod:`simclr_path.config` at top level; the heavy stage code (torch, OpenSlide ...) is imported
inside ``run``, so ``simclr-path info`` or ``--help`` starts in a fraction of a second.

User errors (:class:`~simclr_path.errors.SimclrPathError`) become one line on stderr and a
non-zero exit code, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from simclr_path import __version__
from simclr_path.errors import SimclrPathError

# subcommand -> module under simclr_path.cli (pipeline order, which is also the --help order)
COMMANDS: dict[str, str] = {
    "demo-slide": "demo_slide",
    "tile": "tile",
    "import-patches": "import_patches",
    "info": "info",
    "preview": "preview",
    "pretrain": "pretrain",
    "embed": "embed",
    "classify": "classify",
    "predict": "predict",
    "plot-tsne": "plot_tsne",
    "plot-curves": "plot_curves",
    "plot-confusion": "plot_confusion",
    "plot-heatmap": "plot_heatmap",
    "plot-loss": "plot_loss",
    "finetune": "finetune",
    "schema": "schema",
}


def _load(module: str):
    try:
        return importlib.import_module(f"simclr_path.cli.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"simclr_path.cli.{module}":
            return None  # stage not built into this version
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simclr-path",
        description="Self-supervised SimCLR pipeline for histopathology whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"simclr-path {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SimclrPathError as exc:
        print(f"simclr-path {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"simclr-path {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
