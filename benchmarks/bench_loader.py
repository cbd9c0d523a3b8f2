"""Benchmark: augmented SimCLR view pairs/s per CPU core, ours against lightly's SimCLRTransform.

Both pipelines read the same patches from the same HDF5 store at 224 px and make two augmented,
normalised float views of each, in one process on one thread (so the figure is per CPU core):

* **ours** -- :class:`simclr_path.data.TwoViewBatches` (one HDF5 read per batch, albumentations
  random resized crop / flips / rot90 on uint8) then :class:`simclr_path.transforms.ColorAugment`
  on the batch (HED stain jitter, colour jitter, blur, grayscale, normalisation), i.e. exactly the
  training pipeline with the device = this CPU core. Stain jitter is included (stain_p = 0.8).
* **lightly** -- ``lightly.transforms.SimCLRTransform(input_size=224)`` on PIL images of the same
  patches (its defaults: random resized crop, flip, colour jitter, grayscale, blur, normalise; no
  stain jitter), one patch at a time as lightly's datasets do.

Also prints our pipeline without stain jitter and albumentations' per-image ``HEStain`` cost, to
show what the batched stain jitter saves. Ratio measured in the same run.

    python benchmarks/bench_loader.py [--n 512] [--batch-size 64] [--store STORE.h5]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LC25000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "lc25000-dev"


def make_store(path: Path, n: int, size: int = 224) -> Path:
    """A store of ``n`` real H&E tiles from ../shared/data/lc25000-dev when present (else synthetic
    H&E-like patches), so HDF5 decoding costs what it costs on tissue."""
    from PIL import Image

    from simclr_path.store import PatchStoreWriter

    files = sorted(LC25000.rglob("*.jpeg"))[:n] if LC25000.is_dir() else []
    rng = np.random.default_rng(0)
    with PatchStoreWriter(path, size, attrs={"slide_id": "bench", "kind": "patches", "mpp": 0.5}) as w:
        for i in range(n):
            if files:
                img = np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((size, size)))
            else:
                yy, xx = np.mgrid[0:size, 0:size] / size
                blob = np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(5 * yy)
                img = np.array([220, 160, 200]) - 60 * blob[..., None] + rng.normal(0, 8, (size, size, 3))
                img = np.clip(img, 0, 255).astype(np.uint8)
            w.append(img[None], np.zeros((1, 2), dtype=np.int64))
    return path


def run_ours(store_path: Path, n_batches: int, batch_size: int, stain: bool) -> float:
    from simclr_path.config import AugmentConfig
    from simclr_path.data import BatchPlan, TwoViewBatches, open_stores
    from simclr_path.transforms import ColorAugment

    cfg = AugmentConfig(image_size=224)
    if not stain:
        cfg = dataclasses.replace(cfg, stain_p=0.0)
    stores = open_stores([store_path], image_size=224)
    ds = TwoViewBatches(stores, cfg)
    colour = ColorAugment(cfg)
    plan = BatchPlan([len(stores[0])], batch_size, seed=0)
    out = torch.empty(2 * batch_size, 3, 224, 224)  # reused across steps, as the training loop does
    t0 = time.perf_counter()
    pairs = 0
    for step, batch in enumerate(plan.batches(0, n_batches)):
        v1, v2 = ds[batch]
        x = colour(torch.cat([v1, v2]), torch.Generator().manual_seed(step), out=out)
        assert x.shape == (2 * batch_size, 3, 224, 224)
        pairs += batch_size
    return pairs / (time.perf_counter() - t0)


def run_lightly(store_path: Path, n_batches: int, batch_size: int) -> float:
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    from simclr_path.data import BatchPlan
    from simclr_path.store import PatchStore

    store = PatchStore(store_path)
    tf = SimCLRTransform(input_size=224)
    plan = BatchPlan([len(store)], batch_size, seed=0)
    t0 = time.perf_counter()
    pairs = 0
    for batch in plan.batches(0, n_batches):
        v1, v2 = [], []
        for i in batch.keys[:, 1]:  # lightly's datasets load and transform one image at a time
            a, b = tf(Image.fromarray(store[int(i)]))
            v1.append(a)
            v2.append(b)
        x = torch.cat([torch.stack(v1), torch.stack(v2)])
        assert x.shape == (2 * batch_size, 3, 224, 224)
        pairs += batch_size
    return pairs / (time.perf_counter() - t0)


def hestain_ms(store_path: Path, n: int = 32) -> float:
    """Milliseconds per 224 px image of albumentations' own per-image HED stain augmentation."""
    import albumentations as A

    from simclr_path.store import PatchStore

    store = PatchStore(store_path)
    tf = A.HEStain(method="random_preset", p=1.0)
    imgs = [store[i % len(store)] for i in range(n)]
    tf(image=imgs[0])
    t0 = time.perf_counter()
    for im in imgs:
        tf(image=im)
    return 1000 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="view pairs per pipeline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--store", type=Path, default=None, help="an existing 224 px store")
    args = ap.parse_args()
    import cv2

    torch.set_num_threads(1)  # one core for everything: pairs/s per core
    cv2.setNumThreads(1)
    n_batches = max(1, args.n // args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp) / "bench.h5", max(args.n, args.batch_size))
        run_ours(store, 1, args.batch_size, True)  # warm-up (imports, allocator)
        run_lightly(store, 1, args.batch_size)
        ours = run_ours(store, n_batches, args.batch_size, True)
        lightly = run_lightly(store, n_batches, args.batch_size)
        ours_ns = run_ours(store, n_batches, args.batch_size, False)
        try:
            he = hestain_ms(store)
        except Exception as exc:  # noqa: BLE001 - optional context figure only
            he = float("nan")
            print(f"(albumentations HEStain not measured: {exc})")
    n = n_batches * args.batch_size
    print(f"{n} view pairs at 224 px, batch {args.batch_size}, 1 thread (per CPU core)")
    print(f"  ours (geometric on uint8 + batched stain/colour/blur): {ours:8.1f} pairs/s")
    print(f"  ours without stain jitter:                            {ours_ns:8.1f} pairs/s")
    print(f"  lightly SimCLRTransform (PIL, per image):             {lightly:8.1f} pairs/s")
    print(f"  ratio ours / lightly: {ours / lightly:.2f}x (target >= 4x)")
    print(f"  batched stain jitter cost: {1000 / ours - 1000 / ours_ns:.2f} ms per pair "
          f"(albumentations HEStain: {he:.1f} ms per image, {2 * he:.1f} ms per pair)")


if __name__ == "__main__":
    main()
