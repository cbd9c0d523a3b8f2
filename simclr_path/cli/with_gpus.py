"""``simclr-path with-gpus``: run a command on GPUs that no other job holds (the workflow's GPU
jobs run under it; :mod:`simclr_path.gpus`)."""

from __future__ import annotations

import argparse

HELP = ("Run COMMAND with CUDA_VISIBLE_DEVICES set to N GPUs no other job holds, waiting for them "
        "if needed (the workflow runs its GPU jobs so; without GPUs the command runs unchanged).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("count", type=int, help="GPUs the command needs (0: run it unchanged)")
    # not dest "command": the top-level parser keeps the subcommand's name there
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS ...]",
                   help="the command, optionally after NAME=VALUE environment settings")


def run(args: argparse.Namespace) -> int:
    from simclr_path.gpus import exec_with_gpus

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    exec_with_gpus(args.count, command)  # replaces this process; returns only by raising
    return 0
