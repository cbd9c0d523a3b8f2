"""Benchmark: patches/s of ``tile_slide`` against a naive one-``read_region``-per-patch loop.

A large synthetic slide (default 20,480 x 20,480 px at 0.25 um/px, 256 px JPEG tiles, pyramid
levels 1x / 4x / 16x like an Aperio 40x scan) is made once with :func:`make_demo_slide` and cached
under ``benchmarks/out/``. It is tiled at 0.5 um/px into 224 px patches (so level 0 is read and
shrunk by 2, as for a 40x slide tiled at 20x):

* ``tile_slide``: block reads (``block_patches`` x ``block_patches`` patches per read), one
  resize per block, ``--workers`` reader threads; tiles decoded directly (tiled TIFF) and, for
  comparison, through OpenSlide's ``read_region`` (``tiff_direct=False``).
* naive: the same grid and kept patches, one ``read_region`` + one resize per patch, in one thread
  (and, to separate the gain of block reads from the gain of threads, in ``--workers`` threads);
  these two only read. A third, complete naive tiler also appends each patch to a patch store.

Both give the same pixels (checked on a sample of patches). The JPEG decode limit is the time to
decode every level-0 tile under the kept patches once (imagecodecs, as OpenSlide's libjpeg would),
with one and with ``--workers`` threads: no tiler that decodes the slide can beat it.

    python benchmarks/bench_tiling.py [--size 20480] [--workers 2] [--block-patches 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def make_slide(size: int) -> Path:
    from simclr_path.demo import make_demo_slide

    path = OUT / f"bench_slide_{size}.tiff"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        make_demo_slide(path, kind="scc", seed=0, width=size, height=size, mpp=0.25,
                        level_factor=4)
        print(f"made {path.name} in {time.perf_counter() - t0:.0f} s")
    return path


def naive(slide: Path, coords: np.ndarray, level: int, read_size: int, patch_size: int,
          workers: int, store: Path | None = None) -> tuple[float, np.ndarray]:
    """One read_region and one resize per patch; with ``store``, each patch is also appended
    to a patch store (as a complete naive tiler would). Returns (seconds, first 16 patches)."""
    import threading

    import openslide

    from simclr_path.store import PatchStoreWriter

    local = threading.local()

    def read(xy):
        osr = getattr(local, "osr", None)
        if osr is None:
            osr = local.osr = openslide.OpenSlide(str(slide))
        rgba = np.asarray(osr.read_region((int(xy[0]), int(xy[1])), level, (read_size, read_size)))
        rgb = np.ascontiguousarray(rgba[..., :3])
        if read_size != patch_size:
            rgb = cv2.resize(rgb, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
        return rgb

    t0 = time.perf_counter()
    first = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if store is None:
            for i, p in enumerate(pool.map(read, coords)):
                if i < 16:
                    first.append(p)
        else:
            with PatchStoreWriter(store, patch_size, force=True) as w:
                for i, (p, xy) in enumerate(zip(pool.map(read, coords), coords)):
                    w.append(p[None], xy[None])
                    if i < 16:
                        first.append(p)
    return time.perf_counter() - t0, np.stack(first)


def decode_limit(slide: Path, level: int, coords: np.ndarray, size0: float,
                 workers: int) -> tuple[int, float, float]:
    """Decode every tile of ``level`` under the kept patches once: (tiles, s 1 thread, s N)."""
    import tifffile

    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[level]
        th, tw = page.tilelength, page.tilewidth
        ntx = -(-page.imagewidth // tw)
        ds = tf.pages[0].imagewidth / page.imagewidth
        need = set()
        for x, y in coords:
            for ty in range(int(y / ds) // th, int((y + size0) / ds - 1) // th + 1):
                for tx in range(int(x / ds) // tw, int((x + size0) / ds - 1) // tw + 1):
                    need.add(ty * ntx + tx)
        fh = tf.filehandle
        raw = []
        for idx in sorted(need):
            fh.seek(page.dataoffsets[idx])
            raw.append((fh.read(page.databytecounts[idx]), idx))
        decode, tables = page.decode, page.jpegtables

        def dec(item):
            return decode(item[0], item[1], jpegtables=tables)[0]

        times = []
        for n in (1, workers):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=n) as pool:
                for _ in pool.map(dec, raw):
                    pass
            times.append(time.perf_counter() - t0)
    return len(raw), times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20480, help="slide side in pixels (0.25 um/px)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-patches", type=int, default=8)
    args = ap.parse_args()

    from simclr_path.config import TileConfig
    from simclr_path.store import PatchStore
    from simclr_path.tiling import tile_slide

    slide = make_slide(args.size)
    cfg = TileConfig(mpp=args.mpp, patch_size=args.patch_size, workers=args.workers,
                     block_patches=args.block_patches)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        out = Path(tmp) / "bench.h5"
        # warm the page cache for both contenders alike
        tile_slide(slide, out, cfg, progress=False, force=True)
        res = tile_slide(slide, out, cfg, progress=False, force=True)
        cfg_os = dataclasses.replace(cfg, tiff_direct=False)
        res_os = tile_slide(slide, Path(tmp) / "os.h5", cfg_os, progress=False, force=True)
        store = PatchStore(out)
        assert PatchStore(Path(tmp) / "os.h5").attrs["reader"] == "openslide"
        reader = store.attrs["reader"]
        # the scale the patches were cut at: a level near the target is read without resampling
        mpp = float(store.attrs.get("mpp_effective") or args.mpp)
        coords, n = store.coords, len(store)
        first = store[:16]
        store.close()
    f = mpp / res.level0_mpp  # level-0 pixels per patch pixel
    read_size = round(args.patch_size * mpp / res.level_mpp)  # level pixels per patch
    t_naive1, p_naive = naive(slide, coords, res.level, read_size, args.patch_size, 1)
    t_naiveN, _ = naive(slide, coords, res.level, read_size, args.patch_size, args.workers)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        t_naiveW, _ = naive(slide, coords, res.level, read_size, args.patch_size, 1,
                            store=Path(tmp) / "naive.h5")
    diff = np.abs(first.astype(int) - p_naive.astype(int))
    n_tiles, t_dec1, t_decN = decode_limit(slide, res.level, coords, args.patch_size * f,
                                           args.workers)

    rate = n / res.seconds
    print(f"slide {args.size}x{args.size} px at 0.25 um/px -> {n} patches of "
          f"{args.patch_size} px at {args.mpp} um/px (level {res.level}, shrink x{f:g}); "
          f"{args.workers} workers, blocks of {args.block_patches}x{args.block_patches}")
    print(f"same pixels: mean |tile_slide - naive| = {diff.mean():.3f}, max {diff.max()}")
    print(f"tile_slide ({reader}): {res.seconds:7.1f} s  {rate:8.1f} patches/s")
    print(f"tile_slide (openslide blocks): {res_os.seconds:7.1f} s  "
          f"{n / res_os.seconds:8.1f} patches/s")
    print(f"naive, 1 thread      : {t_naive1:7.1f} s  {n / t_naive1:8.1f} patches/s  "
          f"-> tile_slide is {t_naive1 / res.seconds:.2f}x faster")
    print(f"naive, {args.workers} threads     : {t_naiveN:7.1f} s  {n / t_naiveN:8.1f} patches/s  "
          f"-> tile_slide is {t_naiveN / res.seconds:.2f}x faster")
    print(f"naive + store, 1 thr.: {t_naiveW:7.1f} s  {n / t_naiveW:8.1f} patches/s  "
          f"-> tile_slide is {t_naiveW / res.seconds:.2f}x faster")
    print(f"JPEG decode limit    : {n_tiles} tiles under the kept patches decode in "
          f"{t_dec1:.1f} s (1 thread), {t_decN:.1f} s ({args.workers} threads) -> "
          f"{n / t_decN:.1f} patches/s; tile_slide reaches {t_decN / res.seconds:.0%} of it")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_tiling.json").write_text(json.dumps({
        "size": args.size, "patches": n, "workers": args.workers,
        "block_patches": args.block_patches, "tile_slide_s": res.seconds, "reader": reader,
        "tile_slide_openslide_s": res_os.seconds,
        "naive_1_thread_s": t_naive1, "naive_n_threads_s": t_naiveN,
        "naive_with_store_s": t_naiveW, "decode_tiles": n_tiles,
        "decode_1_thread_s": t_dec1, "decode_n_threads_s": t_decN,
        "mean_abs_diff": float(diff.mean())}, indent=2))


if __name__ == "__main__":
    main()
