"""Benchmark: reading a whole slide without a pyramid at the tissue mask's scale.

``tile`` reads the whole slide twice at a coarse scale (the tissue mask's picture at
``tile.tissue_mpp`` and the QC picture / thumbnail). A slide with a pyramid has a small level for
that; a slide without one (a single-level tiled TIFF, as some scanners and exporters write) is
read whole at level 0 and shrunk band by band. This script makes such a slide (once, cached under
``benchmarks/out/``: a demo slide's level 0 written as one tiled JPEG TIFF page) and times, in the
same run, :meth:`simclr_path.slide.Slide.read_at_mpp` with the tiles decoded directly
(``direct=True``, the default, as ``tile.tiff_direct``) against OpenSlide's ``read_region``
(``direct=False``, the baseline), and checks both give the same pixels.

    python benchmarks/bench_slide_read.py [--size 16384] [--mpp 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def make_single_level(size: int) -> Path:
    """A ``size`` x ``size`` px single-level tiled JPEG TIFF at 0.25 um/px (cached)."""
    import tifffile

    from simclr_path.demo import make_demo_slide

    path = OUT / f"bench_single_level_{size}.tiff"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pyramid = OUT / f".pyramid_{size}.tiff"
    make_demo_slide(pyramid, kind="scc", seed=0, width=size, height=size, mpp=0.25, force=True)
    level0 = tifffile.imread(pyramid, key=0)
    res = 1e4 / 0.25  # pixels per centimetre
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
        tw.write(level0, tile=(256, 256), compression="jpeg", compressionargs={"level": 90},
                 photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                 metadata=None, software="simclr-path bench", maxworkers=2)
    tmp.rename(path)
    pyramid.unlink()
    print(f"made {path.name} in {time.perf_counter() - t0:.0f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="slide side in pixels (0.25 um/px)")
    ap.add_argument("--mpp", type=float, default=8.0,
                    help="scale read (um/px; tile.tissue_mpp's default is 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--band-rows", type=int, default=None,
                    help="level rows per band (default: read_at_mpp's 64 M pixels); about 670 "
                         "is what a 100,000 px wide slide gets, whose bands end inside tile rows")
    args = ap.parse_args()

    from simclr_path.slide import Slide

    path = make_single_level(args.size)
    band = {} if args.band_rows is None else {"max_pixels": args.band_rows * args.size}
    times: dict[bool, list[float]] = {True: [], False: []}
    images: dict[bool, np.ndarray] = {}
    for _ in range(args.repeats):
        for direct in (True, False):  # interleaved: a slow spell hits both alike
            with Slide(path) as s:
                assert s.level_count == 1, "the benchmark slide must have one level"
                t0 = time.perf_counter()
                images[direct], _ = s.read_at_mpp(args.mpp, direct=direct, **band)
                times[direct].append(time.perf_counter() - t0)
    diff = np.abs(images[True].astype(np.int16) - images[False].astype(np.int16))
    mpx = args.size * args.size / 1e6
    print(f"slide {args.size} x {args.size} px, one level; read at {args.mpp:g} um/px "
          f"({images[True].shape[1]} x {images[True].shape[0]} px) in bands of "
          f"{args.band_rows or (1 << 26) // args.size} level rows; {args.repeats} repeats")
    for direct, name in ((True, "tiles decoded directly"), (False, "OpenSlide read_region")):
        best = min(times[direct])
        print(f"  {name:24s} best {best:6.2f} s  ({mpx / best:7.1f} Mpx/s of level 0)  "
              f"all {', '.join(f'{t:.2f}' for t in times[direct])}")
    print(f"speed-up (best direct / best OpenSlide): {min(times[False]) / min(times[True]):.2f}x; "
          f"pixels: mean |difference| {diff.mean():.3f}, max {int(diff.max())}")


if __name__ == "__main__":
    main()
