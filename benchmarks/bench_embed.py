"""Benchmark: patches/s of ``embed_store`` against a naive one-patch-at-a-time loop.

Both use the same encoder (timm ResNet, random init), the same synthetic patch store and the same
preprocessing (:func:`simclr_path.embed.preprocess`); the naive loop reads one patch from HDF5,
preprocesses it and runs the model on a batch of one, as a first attempt would. Measured in the same
run, so the ratio is independent of the machine.

    python benchmarks/bench_embed.py [--n 512] [--image-size 224] [--arch resnet18] [--device auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_store(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """Synthetic H&E-like patches (smooth pink/purple blobs plus noise, so LZF compresses them as it
    would real tissue), on a grid of coordinates."""
    from simclr_path.store import PatchStoreWriter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    with PatchStoreWriter(
        path, size, attrs={"slide_id": "bench", "kind": "slide", "mpp": 0.5}
    ) as w:
        for lo in range(0, n, 64):
            m = min(64, n - lo)
            base = np.array([220, 160, 200], dtype=np.float32)
            blob = np.sin(6 * xx[None] + rng.uniform(0, 6, (m, 1, 1))) * np.cos(5 * yy[None])
            img = base - 60 * blob[..., None] + rng.normal(0, 8, (m, size, size, 3))
            coords = np.stack([np.arange(lo, lo + m) * size, np.zeros(m, dtype=np.int64)], axis=1)
            w.append(np.clip(img, 0, 255).astype(np.uint8), coords)
    return path


def naive(encoder: Path, store_path: Path, image_size: int, device: torch.device) -> float:
    """One patch at a time: read, preprocess, forward (no batching, no workers). Returns seconds."""
    from simclr_path.embed import preprocess
    from simclr_path.model import load_encoder
    from simclr_path.store import PatchStore

    model = load_encoder(encoder, device=device)
    store = PatchStore(store_path)
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(len(store)):
            x = preprocess(torch.from_numpy(store[i]), image_size, device)
            feats.append(model(x).cpu().numpy())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def model_ceiling(
    encoder: Path, image_size: int, device: torch.device, batch: int, n: int
) -> float:
    """Forward passes alone on ready tensors (no reading, no preprocessing): patches/s limit."""
    from simclr_path.model import load_encoder

    model = load_encoder(encoder, device=device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    steps = max(1, n // batch)
    with torch.inference_mode():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="patches in the store")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="embed batch size [EmbedConfig default]"
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="embed DataLoader workers [EmbedConfig default]"
    )
    args = ap.parse_args()

    from simclr_path.config import EmbedConfig
    from simclr_path.embed import embed_store, resolve_device
    from simclr_path.model import create_backbone, save_encoder
    from simclr_path.store import EmbeddingStore

    device = resolve_device(args.device)
    over = {
        k: v
        for k, v in {"batch_size": args.batch_size, "workers": args.workers}.items()
        if v is not None
    }
    cfg = EmbedConfig(device=args.device, **over)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = make_store(tmp / "store.h5", args.n, args.image_size)
        torch.manual_seed(0)
        enc = save_encoder(
            create_backbone(args.arch), tmp / "encoder.pt", args.arch, image_size=args.image_size
        )
        # warm-up (first-call kernel selection, page cache) on a small store, for both methods
        small = make_store(tmp / "small.h5", 8, args.image_size, seed=1)
        embed_store(enc, small, tmp / "warm.h5", cfg, progress=False)
        naive(enc, small, args.image_size, device)

        t_naive = naive(enc, store, args.image_size, device)
        t0 = time.perf_counter()
        out = embed_store(enc, store, tmp / "emb.h5", cfg, progress=False)
        t_embed = time.perf_counter() - t0
        assert EmbeddingStore(out).features.shape[0] == args.n
        chunk = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, cfg.cpu_chunk)
        ceiling = model_ceiling(enc, args.image_size, device, chunk, min(args.n, 256))

    threads = torch.get_num_threads()
    print(
        f"device {device} ({threads} torch threads), {args.arch}, {args.n} patches at "
        f"{args.image_size} px, batch {cfg.batch_size}, workers {cfg.workers}"
    )
    print(f"naive one-at-a-time : {args.n / t_naive:8.1f} patches/s ({t_naive:.1f} s)")
    print(
        f"embed_store         : {args.n / t_embed:8.1f} patches/s ({t_embed:.1f} s, "
        "incl. model load and write)"
    )
    print(f"ratio               : {t_naive / t_embed:8.2f}x")
    print(
        f"model-only ceiling  : {ceiling:8.1f} patches/s (forward passes alone, batch {chunk}); "
        f"embed_store reaches {100 * args.n / t_embed / ceiling:.0f}% of it"
    )


if __name__ == "__main__":
    main()
