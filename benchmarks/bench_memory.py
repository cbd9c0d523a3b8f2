"""Sizing: GPU memory a pretraining recipe needs per process, estimated on any machine.

Counts the bytes autograd saves for the backward pass in one training forward (the activations,
the bulk of training memory) of the preset's model at its view sizes under the chosen autocast
dtype, for a batch of n and of 2n images; the difference over n is the cost of one image. Adds the
weights, gradients and optimiser state. An estimate for eager mode: cuDNN workspaces, the
allocator's slack, the input batch and the augmentation buffers come on top, while
``torch.compile`` may recompute some activations and keep less. CPU autocast keeps the dtypes
CUDA's does for ResNets; CUDA runs LayerNorm and softmax in float32, so ConvNeXt or ViT models
are undercounted.

    python benchmarks/bench_memory.py [--preset gpu] [--arch resnet50] [--image-size 224]
                                      [--amp bf16|fp16|fp32] [--batch-sizes 128,256,512]
"""

from __future__ import annotations

import argparse

import torch

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# optimiser state per parameter, in float32 copies: LARS and SGD keep momentum, AdamW two moments
OPT_STATES = {"lars": 1, "sgd": 1, "adamw": 2}


def saved_bytes(model: torch.nn.Module, n: int, size: int, dtype: torch.dtype | None) -> int:
    """Bytes of the distinct storages autograd saves in one forward of n images of ``size`` px."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x)
    return sum(seen.values())


def estimate(cfg, amp: str = "bf16", n: int = 2) -> dict[str, float]:
    """Bytes per training pair (its two views and its local crops) and for the model's state."""
    from simclr_path.model import create_simclr_model

    model = create_simclr_model(cfg.model).to(memory_format=torch.channels_last).train()
    per_image = {}
    sizes = [cfg.augment.image_size] + ([cfg.augment.local_view_size] if cfg.augment.local_crops else [])
    for size in sizes:
        per_image[size] = (saved_bytes(model, 2 * n, size, AMP[amp])
                           - saved_bytes(model, n, size, AMP[amp])) / n
    per_pair = 2 * per_image[sizes[0]] + (
        cfg.augment.local_crops * per_image[sizes[1]] if cfg.augment.local_crops else 0.0)
    params = sum(p.numel() for p in model.parameters())
    state = params * 4 * (2 + OPT_STATES[cfg.train.optimizer])  # weights, gradients, optimiser
    return {"per_image_global": per_image[sizes[0]], "per_pair": per_pair, "model_state": state,
            "params": float(params)}


def main() -> None:
    from simclr_path.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--amp", choices=sorted(AMP), default="bf16")
    ap.add_argument("--batch-sizes", default="128,256,512", help="pairs per process")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    over: dict = {}
    if args.arch:
        over["model"] = {"arch": args.arch}
    if args.image_size:
        over["augment"] = {"image_size": args.image_size}
    cfg = load_config(preset=args.preset, overrides=over)
    est = estimate(cfg, args.amp)
    gib = 2**30
    a = cfg.augment
    views = f"2 x {a.image_size} px" + (f" + {a.local_crops} x {a.local_view_size} px" if a.local_crops else "")
    precision = "float32 (no autocast)" if args.amp == "fp32" else f"{args.amp} autocast"
    print(f"{cfg.model.arch}, {views} per pair, {precision}, {cfg.train.optimizer}: "
          f"{est['per_image_global'] / 2**20:.1f} MiB saved per {a.image_size} px image, "
          f"{est['per_pair'] / 2**20:.1f} MiB per pair; {est['params'] / 1e6:.1f} M parameters, "
          f"{est['model_state'] / gib:.2f} GiB of weights, gradients and optimiser state")
    print(f"{'pairs per process':>18} {'activations GiB':>16} {'+ model state GiB':>18}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        act = b * est["per_pair"] / gib
        print(f"{b:>18} {act:>16.1f} {act + est['model_state'] / gib:>18.1f}"
              + ("  <- the preset" if b == cfg.train.batch_size else ""))
    print("eager mode; cuDNN workspaces, the allocator's slack and the input batch come on top")


if __name__ == "__main__":
    main()
