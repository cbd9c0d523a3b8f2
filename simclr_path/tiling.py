"""Cut a slide into tissue patches at a chosen physical resolution and write a patch store.

The grid is laid out in target pixels (``mpp`` um/px): patch ``(i, j)`` covers target pixels
``[j * stride, j * stride + patch_size)`` horizontally (same vertically), i.e. level-0 top-left
``round(j * stride * f)`` with ``f = mpp / level0_mpp``. ``mpp`` is ``cfg.mpp``, or where the
read level's mpp times a whole number k is within 2 % of it, exactly that (:func:`snapped_mpp`,
the store's ``mpp_effective``): the level is then shrunk by k without resampling. A patch is kept
when its tissue fraction on a low-resolution mask (:mod:`simclr_path.tissue`) is at least
``cfg.min_tissue`` (and, with ``cfg.remove_pen``, its share of pen ink is at most ``cfg.max_pen``).

Pixels are read in blocks of ``block_patches x block_patches`` grid cells (fewer where a stride
far above the patch size would make a block mostly gap, :func:`block_cells`): one
``read_region`` per block at the coarsest pyramid level at least as fine as the target, one resize
of the whole block to the target resolution, then the patches are cut out with NumPy. Compared with
one ``read_region`` per patch this decodes every JPEG tile of the slide about once instead of
once per overlapping patch and amortises OpenSlide's per-call overhead
(``benchmarks/bench_tiling.py``). Blocks are read by ``cfg.workers`` threads, each with its own
OpenSlide handle (OpenSlide, OpenCV and the NumPy copies release the GIL); results are consumed in
order, so the output is deterministic: patches in row-major order of the grid.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from simclr_path.config import TileConfig, section_cfg
from simclr_path.errors import SimclrPathError
from simclr_path.outputs import (
    check_apart,
    check_can_write,
    check_hdf5_name,
)
from simclr_path.slide import (
    LevelChoice,
    Slide,
    TiffTiles,
    open_openslide,
    read_rgb,
    validate_slide_id,
)
from simclr_path.store import THUMBNAIL_SIDE, PatchStoreWriter, check_replaces_kind, encode_patch
from simclr_path.tissue import (
    any_patch_filter,
    ink_mask,
    patch_keep,
    pen_mask,
    tissue_fractions,
    tissue_mask,
)

_QC_SIDE = 1600  # longer side of the QC thumbnail in pixels
#: A level within this share of the target's scale (or of an integer multiple of it) is read at
#: that exact factor, without resampling (:func:`snapped_mpp`); as the slide module's tolerance
#: for a target slightly finer than the scan
SNAP_TOLERANCE = 0.02
#: Without ``remove_pen``, kept patches with more pen ink than this share are counted in a
#: warning (ink over glass passes the tissue threshold as tissue would)
INK_WARN_SHARE = 0.25


class NoTissueWarning(UserWarning):
    """A slide gave no patches: the store is written empty (the CLI prints one warning line)."""


@dataclass
class TileResult:
    """What :func:`tile_slide` wrote."""

    path: Path
    slide_id: str
    n_patches: int
    n_grid: int  # grid cells considered
    n_tissue: int  # grid cells with enough tissue and no ink (before optional patch filters)
    level: int  # pyramid level read
    level_mpp: float
    level0_mpp: float
    mpp_source: str
    mpp: float
    patch_size: int
    stride: int
    seconds: float
    qc: Path | None = None
    n_pen: int = 0  # grid cells with enough tissue dropped for pen ink (remove_pen, max_pen)


@dataclass(frozen=True)
class Grid:
    """The patch grid of one slide.

    ``xs``/``ys``: level-0 top-left of each column/row; ``f``: level-0 pixels per target pixel;
    ``size0``: patch side in level-0 pixels.
    """

    xs: np.ndarray  # (nx,) int64
    ys: np.ndarray  # (ny,) int64
    f: float
    patch_size: int
    stride: int

    @property
    def size0(self) -> float:
        return self.patch_size * self.f


def make_grid(width: int, height: int, level0_mpp: float, mpp: float, patch_size: int,
              stride: int, path: str | os.PathLike = "slide", asked_mpp: float | None = None
              ) -> Grid:
    """Grid of patches of ``patch_size`` target pixels every ``stride`` target pixels
    (``asked_mpp``: the --mpp that messages name, where ``mpp`` is its snapped scale)."""
    f = mpp / level0_mpp
    tw, th = width / f, height / f  # slide size in target pixels
    if patch_size > tw or patch_size > th:
        mpp = asked_mpp or mpp
        raise SimclrPathError(
            f"{path}: a {patch_size} px patch at {mpp:g} um/px ({patch_size * mpp:g} um) is larger "
            f"than the slide ({width}x{height} px at {level0_mpp:g} um/px = "
            f"{width * level0_mpp:.0f}x{height * level0_mpp:.0f} um); use a smaller --patch-size "
            "or a finer --mpp (in the workflow: tile.patch_size, tile.mpp)")
    nx = math.floor((tw - patch_size) / stride) + 1
    ny = math.floor((th - patch_size) / stride) + 1
    xs = np.round(np.arange(nx) * stride * f).astype(np.int64)
    ys = np.round(np.arange(ny) * stride * f).astype(np.int64)
    return Grid(xs, ys, f, patch_size, stride)


def snapped_mpp(choice: LevelChoice) -> float:
    """The patches' real um/px: the target's, unless the chosen level's um/px times a whole
    number k is within :data:`SNAP_TOLERANCE` of it; then exactly that.

    Resampling by a factor near 1 (a scan of 0.499 um/px tiled at 0.5: 1796 level pixels to
    1792) blends neighbouring pixels in a phase that drifts across the block, which halved the
    sharpness of real patches and made it depend on the scanner's rounding; near 2 (0.2502 to
    0.5) an exact 2 x 2 box is sharper than a 1.998 area filter. Such levels are read at an
    exact integer factor (1: native pixels) and patches cover that much more or less tissue
    (<= 2 %), recorded in the store as ``mpp_effective``. (Exact where the level's own pixels
    are read: tiled TIFF/SVS decoded directly, or a level whose downsample is a whole number;
    OpenSlide interpolates a region placed between the pixels of a level such as 2.0016.)
    """
    k = round(choice.scale)
    if k >= 1 and abs(choice.scale / k - 1) <= SNAP_TOLERANCE:
        return choice.level_mpp * k
    return choice.level_mpp * choice.scale


def tissue_attrs(cfg: TileConfig) -> dict[str, object]:
    """The tissue-detection parameters as ``tissue.<name>`` store attributes."""
    names = ("min_tissue", "tissue_mpp", "saturation_floor", "median_blur", "closing_um",
             "min_object_um2", "min_hole_um2", "remove_pen", "max_pen", "drop_white", "drop_black",
             "drop_blur")
    return {f"tissue.{n}": getattr(cfg, n) for n in names}


class _Reader:
    """Reads blocks of patches; one OpenSlide handle per thread."""

    def __init__(self, path: Path, grid: Grid, choice: LevelChoice, direct: bool = True) -> None:
        self.path, self.grid, self.choice = path, grid, choice
        self._local = threading.local()
        self._handles: list = []
        self._lock = threading.Lock()
        # tiled TIFF (SVS, generic TIFF): decode tiles directly, shared by all threads
        self.tiles = TiffTiles.open(path, self._osr(), [choice.level]) if direct else None

    def _osr(self):
        osr = getattr(self._local, "osr", None)
        if osr is None:
            osr = open_openslide(self.path)
            self._local.osr = osr
            with self._lock:
                self._handles.append(osr)
        return osr

    def read_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Patches of the grid cells ``rows x cols`` (increasing indices into the grid).

        One region read at the chosen level covering the cells' bounding box, one resize to the
        target resolution, then slicing. Returns (len(rows) * len(cols), S, S, 3) uint8 in
        row-major order.
        """
        g, ch = self.grid, self.choice
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        # block extent in target pixels (exact) and in level-0 pixels
        tx0, ty0 = c0 * g.stride, r0 * g.stride
        tw = (c1 - c0) * g.stride + g.patch_size
        th = (r1 - r0) * g.stride + g.patch_size
        x0, y0 = int(g.xs[c0]), int(g.ys[r0])
        # level pixels covering the block; resized to exactly (tw, th) target pixels
        lw = max(1, round(tw * g.f / ch.downsample))
        lh = max(1, round(th * g.f / ch.downsample))
        if self.tiles is not None:
            img = self.tiles.read(ch.level, round(x0 / ch.downsample), round(y0 / ch.downsample),
                                  lw, lh)
        else:
            img = read_rgb(self._osr(), x0, y0, ch.level, lw, lh, self.path)
        if (lw, lh) != (tw, th):
            interp = cv2.INTER_AREA if lw > tw else cv2.INTER_LINEAR
            img = cv2.resize(img, (tw, th), interpolation=interp)
        s = g.patch_size
        out = np.empty((len(rows) * len(cols), s, s, 3), dtype=np.uint8)
        k = 0
        for r in rows:
            oy = int(r) * g.stride - ty0
            for c in cols:
                ox = int(c) * g.stride - tx0
                out[k] = img[oy:oy + s, ox:ox + s]
                k += 1
        return out

    def close(self) -> None:
        if self.tiles is not None:
            self.tiles.close()
            self.tiles = None
        for h in self._handles:
            h.close()
        self._handles.clear()


def block_cells(block_patches: int, patch_size: int, stride: int) -> int:
    """Grid cells per side of a read block: ``block_patches``, or fewer when the stride leaves gaps.

    A block is read whole, gaps between its cells included, so its side is ``(b - 1) * stride +
    patch_size`` target pixels. Keeping that within ``block_patches * patch_size`` bounds the
    pixels read per block by those of ``block_patches**2`` abutting patches, whatever the stride:
    a stride far above the patch size reads patch by patch (``b = 1``) instead of mostly gap.
    """
    fit = (block_patches - 1) * patch_size // stride + 1  # largest b with the side in budget
    return max(1, min(block_patches, fit))


def _blocks(keep: np.ndarray, bp: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(block row, rows, cols) of every block holding a kept cell, row-major, trimmed to them."""
    ny, nx = keep.shape
    for bi, r0 in enumerate(range(0, ny, bp)):
        for c0 in range(0, nx, bp):
            sub = keep[r0:r0 + bp, c0:c0 + bp]
            if not sub.any():
                continue
            rr = np.flatnonzero(sub.any(axis=1)) + r0
            cc = np.flatnonzero(sub.any(axis=0)) + c0
            yield bi, np.arange(rr[0], rr[-1] + 1), np.arange(cc[0], cc[-1] + 1)


def tile_slide(slide_path: str | os.PathLike, out: str | os.PathLike,
               cfg: TileConfig | None = None, *, slide_id: str | None = None,
               slide_mpp: float | None = None, qc: str | os.PathLike | None = None,
               force: bool = False, progress: bool = True) -> TileResult:
    """Tile one slide into a patch store (and optionally a QC picture).

    Args:
        slide_path: any slide OpenSlide reads.
        out: patch store path (HDF5, written atomically; see :mod:`simclr_path.store`).
        cfg: tiling parameters (default :class:`~simclr_path.config.TileConfig`).
        slide_id: id stored in the file (default: the slide file's stem); must be a safe name.
        slide_mpp: level-0 um/px, overriding the slide's metadata.
        qc: optional PNG path for the QC picture (:func:`simclr_path.qc.plot_qc`).
        force: overwrite existing outputs.
        progress: show a progress bar on stderr.

    Returns:
        :class:`TileResult`. A slide without tissue gives an empty store and a
        :class:`NoTissueWarning`.

    Store content: ``/patches`` (N, S, S, 3) uint8 RGB at ``cfg.mpp`` (exactly: ``mpp_effective``,
    :func:`snapped_mpp`); ``/coords`` (N, 2) level-0
    top-left (x, y), row-major grid order.
    """
    t_start = time.perf_counter()
    cfg = section_cfg(cfg, TileConfig, "tile_slide")
    path = Path(slide_path)
    slide_id = validate_slide_id(slide_id) if slide_id is not None else _id_from_name(path)
    check_apart({"out": out, "qc": qc}, {"slide_path": slide_path})
    if slide_mpp is not None and (isinstance(slide_mpp, bool)
                                  or not isinstance(slide_mpp, numbers.Real)):
        # (its range is the slide's check, which names the slide's own mpp)
        raise SimclrPathError(f"tile_slide: slide_mpp must be a number of level-0 microns per "
                              f"pixel, got {slide_mpp!r}")
    check_can_write(out, force)
    check_hdf5_name(out, "a patch store")
    check_replaces_kind(out, "slide")
    if qc is not None:
        from simclr_path.figures import figure_format

        figure_format(qc)  # a suffix matplotlib cannot write fails now, not after the tiling
        check_can_write(qc, force)
    stride = int(cfg.stride or cfg.patch_size)
    if cfg.max_pen > 0 and not cfg.remove_pen:
        warnings.warn(f"tile.max_pen {cfg.max_pen:g} has no effect without tile.remove_pen "
                      "(--remove-pen), which finds the ink", stacklevel=2)

    with Slide(path, slide_mpp=slide_mpp, mpp_from_objective=cfg.mpp_from_objective) as slide:
        choice = slide.level_for(cfg.mpp)
        width, height = slide.dimensions
        patch_mpp = snapped_mpp(choice)
        grid = make_grid(width, height, slide.mpp, patch_mpp, cfg.patch_size, stride, path,
                         asked_mpp=cfg.mpp)
        thumb, thumb_mpp = slide.read_at_mpp(cfg.tissue_mpp, direct=cfg.tiff_direct)
        level0_mpp, mpp_source = slide.mpp, slide.mpp_source
        try:
            bounds = [int(slide.properties[f"openslide.bounds-{a}"]) for a in "xy"]
        except (KeyError, ValueError):
            bounds = None
        # a sharper picture for people than the mask needs: the QC picture and, shrunk, the
        # store's thumbnail, on which heatmaps are drawn without the slide file. Without --qc
        # only the thumbnail is needed, whose smaller side often comes from a coarser level (a
        # 20,480 px slide: 1,280 px instead of 5,120 px of level 1, which doubled the time to
        # tile it). No second read where the mask's picture is sharp enough (slides longer than
        # side x 8 um), nor, without --qc, a second pass over the level 0 of a slide without a
        # pyramid, which would cost as much as the mask did
        want = max(width, height) * slide.mpp / (_QC_SIDE if qc is not None else THUMBNAIL_SIDE)
        if want < thumb_mpp and (qc is not None or slide.level_count > 1):
            qc_img, qc_mpp = slide.read_at_mpp(want, direct=cfg.tiff_direct)
        else:
            qc_img, qc_mpp = thumb, thumb_mpp
    pen = pen_mask(thumb, thumb_mpp)  # the ink itself; with its margin, what remove_pen takes
    ink = ink_mask(thumb, thumb_mpp, pen=pen)  # the tissue threshold leaves it out in any case
    mask = tissue_mask(thumb, thumb_mpp, cfg, ink=ink)
    gx, gy = np.meshgrid(grid.xs, grid.ys)  # (ny, nx)

    def cell_share(m: np.ndarray) -> np.ndarray:  # (ny, nx) share of each grid cell in mask m
        return tissue_fractions(m, thumb_mpp, gx.ravel(), gy.ravel(), grid.size0, level0_mpp,
                                level0_size=(width, height)).reshape(gy.shape)

    keep = (cell_share(mask) >= cfg.min_tissue) & mask.any()
    if not cfg.remove_pen:
        # ink is tissue then: no patch is dropped for it and the QC picture draws none, but
        # patches mostly of marker (a stroke over glass passes the tissue threshold) are counted,
        # by the ink itself, not its margin
        n_inked = int((keep & (cell_share(pen) > INK_WARN_SHARE)).sum()) if pen.any() else 0
        if n_inked:
            warnings.warn(f"{path}: {n_inked} kept patches are over {INK_WARN_SHARE:.0%} pen ink; "
                          "--remove-pen (tile.remove_pen in the workflow) leaves ink out",
                          stacklevel=2)
        ink = None
    n_pen = 0
    pen_cells = np.zeros((0, 2), np.int64)
    if ink is not None and ink.any():
        # the mask lost the ink, but a cell beside a stroke can still hold enough tissue, and its
        # pixels would carry the ink into training and scoring
        inked = cell_share(ink) > cfg.max_pen
        n_pen = int((keep & inked).sum())
        pen_cells = np.stack([gx[keep & inked], gy[keep & inked]], axis=1)
        keep &= ~inked
    n_tissue = int(keep.sum())

    reader = _Reader(path, grid, choice, direct=cfg.tiff_direct)
    attrs = {"kind": "slide", "slide_id": slide_id, "source_path": str(path.resolve()),
             "level0_mpp": level0_mpp, "mpp_source": mpp_source, "mpp": cfg.mpp,
             "mpp_effective": patch_mpp,
             "stride": stride, "level": choice.level, "level_mpp": choice.level_mpp,
             "slide_width": width, "slide_height": height, **tissue_attrs(cfg)}
    attrs["reader"] = "tifffile" if reader.tiles is not None else "openslide"
    if bounds is not None:  # viewers that crop to these (QuPath on MIRAX) place patches offset
        attrs["bounds_x"], attrs["bounds_y"] = bounds
    kept_coords: list[np.ndarray] = []
    filt = any_patch_filter(cfg)
    try:
        with PatchStoreWriter(out, cfg.patch_size, attrs=attrs, force=force) as writer:
            writer.set_thumbnail(qc_img)
            if n_tissue:
                _read_all(reader, keep, cfg, writer, kept_coords, filt, progress, slide_id)
            n = writer.n
    finally:
        reader.close()
    coords = np.concatenate(kept_coords) if kept_coords else np.zeros((0, 2), np.int64)
    if n == 0:
        empty = f"wrote an empty store {out}"
        if n_tissue:
            msg = (f"all {n_tissue} tissue patches were dropped by the white/black/blur filters; "
                   f"{empty} (check --drop-white/--drop-black/--drop-blur, tile.drop_* in the "
                   "workflow, and the QC picture)")
        elif n_pen:
            msg = (f"all {n_pen} tissue patches touch pen ink (--max-pen {cfg.max_pen:g}); "
                   f"{empty} (check the QC picture; raise --max-pen, tile.max_pen in the workflow, to "
                   "keep patches beside ink)")
        elif mask.any():  # tissue, but no grid cell holds the required share of it
            area_mm2 = float(mask.sum()) * thumb_mpp * thumb_mpp * 1e-6
            # a stride far above the patch size leaves a sparse grid that may miss the tissue
            sparse = (f"; --stride {stride} leaves {len(grid.xs) * len(grid.ys)} grid cell(s), "
                      "lower it (tile.stride)" if stride > cfg.patch_size else "")
            msg = (f"tissue found ({area_mm2:.2g} mm²) but no patch reached --min-tissue "
                   f"{cfg.min_tissue:g}; lower it or use a smaller --patch-size/--mpp (in the workflow: "
                   f"tile.min_tissue, tile.patch_size, tile.mpp){sparse}; {empty}")
        else:
            msg = f"no tissue found; {empty} (check the QC picture or the slide itself)"
        warnings.warn(f"{path}: {msg}", NoTissueWarning, stacklevel=2)
    qc_path = None
    if qc is not None:
        from simclr_path.qc import plot_qc

        # tissue cells the white/black/blur filters left out, drawn so as not to read as glass
        kept = set(map(tuple, coords.tolist()))
        tissue_cells = np.stack([gx[keep], gy[keep]], axis=1)
        filtered = tissue_cells[[tuple(c) not in kept for c in tissue_cells.tolist()]] \
            if len(tissue_cells) else tissue_cells
        dropped = {"dropped by --drop-white/black/blur": filtered, "dropped for pen ink": pen_cells}
        # a level-0 mpp the user gave, or one guessed from the objective power, is a guess the
        # reader should see
        source = {"--slide-mpp": " from --slide-mpp",
                  "openslide.objective-power": ", guessed from the objective power"}.get(mpp_source, "")
        qc_path = plot_qc(qc_img, qc_mpp, mask, thumb_mpp, coords, grid.size0, level0_mpp, qc,
                          title=f"{slide_id}: {n} patches of {cfg.patch_size} px at "
                                f"{cfg.mpp:g} um/px (level-0 {level0_mpp:.4g} um/px{source})",
                          force=force, ink=ink, dropped=dropped)
    return TileResult(Path(out), slide_id, n, grid.xs.size * grid.ys.size, n_tissue,
                      choice.level, choice.level_mpp, level0_mpp, mpp_source, cfg.mpp,
                      cfg.patch_size, stride, time.perf_counter() - t_start, qc_path, n_pen)


def _id_from_name(path: Path) -> str:
    """The slide id from the file name, or one error that says so and suggests a safe
    ``--slide-id`` (the name is the user's choice, so the rule alone would puzzle)."""
    try:
        return validate_slide_id(path.stem)
    except SimclrPathError:
        suggestion = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("_.-") or "slide"
        raise SimclrPathError(
            f"{path}: the slide id taken from its file name, {path.stem!r}, is not a safe file "
            "name (letters, digits, '.', '_' and '-' only, no leading '.' or '-'); pass an id, "
            f"e.g. --slide-id {suggestion}") from None


def _block_job(reader: _Reader, rows: np.ndarray, cols: np.ndarray, keep: np.ndarray,
               cfg: TileConfig, filt: bool) -> tuple[np.ndarray, list[tuple[bytes, int]], int]:
    """Worker thread: read a block, keep its tissue cells, filter, compress each patch.

    Returns level-0 coords (n, 2), the compressed ``/patches`` chunks and the block's tissue-cell
    count. Compression runs here, in parallel, because a single writer thread compressing
    every patch would be the bottleneck (LZF costs about as much as decoding the JPEG tiles).
    """
    grid = reader.grid
    patches = reader.read_block(rows, cols)
    sel = keep[np.ix_(rows, cols)].ravel()  # the block is a rectangle; keep its tissue cells
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    coords = np.stack([grid.xs[cc.ravel()[sel]], grid.ys[rr.ravel()[sel]]], axis=1)
    patches = patches[sel]
    n_tissue = len(patches)
    if filt:
        ok = patch_keep(patches, cfg)
        patches, coords = patches[ok], coords[ok]
    return coords, [encode_patch(p) for p in patches], n_tissue


def _read_all(reader: _Reader, keep: np.ndarray, cfg: TileConfig, writer: PatchStoreWriter,
              kept_coords: list[np.ndarray], filt: bool, progress: bool, slide_id: str) -> None:
    """Read every block with ``cfg.workers`` threads; write patches in row-major grid order."""
    from tqdm.auto import tqdm

    g = reader.grid
    blocks = list(_blocks(keep, block_cells(cfg.block_patches, g.patch_size, g.stride)))
    window = 2 * cfg.workers  # blocks in flight: bounded memory, readers never starve
    bar = tqdm(total=int(keep.sum()), unit="patch", desc=f"tile {slide_id}",
               disable=None if progress else True, dynamic_ncols=True)
    pending: list[tuple[np.ndarray, list[tuple[bytes, int]]]] = []  # blocks of one block row
    current_row = blocks[0][0] if blocks else 0

    def flush() -> None:
        """Write the finished block row: its patches sorted row-major across its blocks."""
        if not pending:
            return
        coords = np.concatenate([c for c, _ in pending])
        chunks = [ch for _, block in pending for ch in block]
        order = np.lexsort((coords[:, 0], coords[:, 1]))
        writer.append_encoded([chunks[i] for i in order], coords[order])
        kept_coords.append(coords[order])
        pending.clear()

    futures: list[tuple[int, Future]] = []
    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="tile") as pool:
        try:
            for i, (block_row, rows, cols) in enumerate(blocks):
                futures.append((block_row, pool.submit(_block_job, reader, rows, cols, keep,
                                                       cfg, filt)))
                if len(futures) < window and i < len(blocks) - 1:
                    continue
                while futures and (len(futures) >= window or i == len(blocks) - 1):
                    row, fut = futures.pop(0)
                    coords, chunks, n_tissue = fut.result()
                    if row != current_row:
                        flush()
                        current_row = row
                    pending.append((coords, chunks))
                    bar.update(n_tissue)
            flush()
        finally:
            for _, fut in futures:
                fut.cancel()
            bar.close()
