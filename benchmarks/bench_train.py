"""Benchmark: SimCLR training pairs/s, split into waiting for data and computing.

Runs :func:`simclr_path.train.pretrain` (the real loop: DataLoader workers, batched colour
augmentation, forward, NT-Xent, backward, optimiser step) for a few steps per configuration on a
synthetic 224 px store, and reports the steady-state figures from ``metrics.csv`` (the first
``--warmup`` steps, which include worker start-up and ``torch.compile``, are dropped):
pairs/s, its ratio to the first configuration's (the baseline, measured in the same run), the
share of each step spent waiting for the loader, and the share computing. The loop
logs every ``--warmup`` steps as the real runs do (``train.log_every``): each log reads the loss
back, a device sync, so logging every step would understate a GPU's pairs/s.

On CPU (default: 96 px views, batch 32) it compares float32 with bf16 autocast; on a GPU
(default: 224 px, batch 256) bf16, channels_last and torch.compile on/off, unchanged otherwise:

    python benchmarks/bench_train.py                                   # CPU here
    python benchmarks/bench_train.py --device cuda --compile both      # one GPU
    python benchmarks/bench_train.py --archs resnet50 --amp on --channels-last both
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _choices(v: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[v]


def run_one(store: Path, arch: str, image_size: int, batch: int, steps: int, workers: int, device: str,
            amp: bool, channels_last: bool, compile_: bool, warmup: int) -> dict:
    # metrics.csv rows average their log window: windows of ``warmup`` steps drop it exactly
    from simclr_path.config import load_config
    from simclr_path.train import amp_mode, pretrain, resolve_device

    cfg = load_config(overrides={
        "augment": {"image_size": image_size},
        "model": {"arch": arch},
        "train": {"batch_size": batch, "max_steps": steps, "workers": workers, "device": device,
                  "amp": amp, "channels_last": channels_last, "compile": compile_,
                  "log_every": max(warmup, 1),
                  "checkpoint_every": 10**9, "tensorboard": False, "optimizer": "lars",
                  "warmup_epochs": 0.0},
    })
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = pretrain([store], Path(tmp) / "run", cfg, progress=False)
        wall = time.perf_counter() - t0
        m = pd.read_csv(Path(tmp) / "run" / "metrics.csv").iloc[warmup:]
    dtype = amp_mode(dataclasses.replace(cfg.train), resolve_device(device))
    step_t = (m["data_time_s"] + m["compute_time_s"]).mean()
    return {
        "arch": arch, "amp": str(dtype).replace("torch.", "") if dtype else "float32",
        "channels_last": channels_last, "compile": compile_,
        "pairs/s": batch / step_t, "data wait %": 100 * m["data_time_s"].mean() / step_t,
        "compute %": 100 * m["compute_time_s"].mean() / step_t,
        "step s": step_t, "run wall s": wall, "final loss": summary["final_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--image-size", type=int, default=None, help="[CPU 96, GPU 224]")
    ap.add_argument("--batch-size", type=int, default=None, help="[CPU 32, GPU 256]")
    ap.add_argument("--steps", type=int, default=None, help="[CPU 6, GPU 40]")
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped [CPU 2, GPU 10]")
    ap.add_argument("--workers", type=int, default=None, help="[CPU 1, GPU 8]")
    ap.add_argument("--amp", default="both", choices=["on", "off", "both"])
    ap.add_argument("--channels-last", default="on", choices=["on", "off", "both"])
    ap.add_argument("--compile", default="off", choices=["on", "off", "both"])
    ap.add_argument("--store", type=Path, default=None, help="an existing store (>= 224 px)")
    args = ap.parse_args()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    size = args.image_size or (224 if gpu else 96)
    batch = args.batch_size or (256 if gpu else 32)
    steps = args.steps or (40 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    workers = args.workers if args.workers is not None else (8 if gpu else 1)
    from bench_loader import make_store

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp) / "bench.h5", max(2 * batch, 256))
        for arch, amp, cl, comp in itertools.product(args.archs.split(","), _choices(args.amp),
                                                     _choices(args.channels_last), _choices(args.compile)):
            r = run_one(store, arch, size, batch, steps, workers, args.device, amp, cl, comp, warmup)
            # the first configuration (float32, channels_last and compile as asked: the first of
            # each "both") is the baseline every other one is measured against, in this run
            r["x baseline"] = r["pairs/s"] / rows[0]["pairs/s"] if rows else 1.0
            rows.append(r)
            print(f"{r['arch']:10s} {r['amp']:8s} channels_last={cl!s:5s} compile={comp!s:5s} "
                  f"{r['pairs/s']:8.1f} pairs/s ({r['x baseline']:.2f}x the first)  data wait "
                  f"{r['data wait %']:5.1f}%  compute {r['compute %']:5.1f}%", flush=True)
    dev = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{dev}, {size} px views, batch {batch} pairs, {steps} steps ({warmup} dropped), "
          f"{workers} loader workers")
    print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
