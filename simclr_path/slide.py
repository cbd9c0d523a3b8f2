"""Whole-slide access: opening any OpenSlide format, level-0 resolution (mpp), level choice, reads.

OpenSlide (Goode et al. 2013, "OpenSlide: a vendor-neutral software foundation for digital
pathology") reads Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Philips, Leica, Ventana and generic
tiled TIFF. Physical resolution comes from the slide's metadata in a fixed order
(:data:`MPP_SOURCES`); a slide without it is an error, never a silent guess.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from simclr_path.config import magnification_hint
from simclr_path.errors import SimclrPathError

# (property key(s), scale to microns): tried in this order after an explicit --slide-mpp
_MPP_KEYS: list[tuple[tuple[str, str | None], float]] = [
    (("openslide.mpp-x", "openslide.mpp-y"), 1.0),
    (("aperio.MPP", None), 1.0),
    (("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X",
      "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y"), 1.0),
    (("philips.DICOM_PIXEL_SPACING", None), 1000.0),  # "dy dx" in millimetres
]
#: Every source of level-0 mpp, in the order they are tried (for messages and the README).
MPP_SOURCES = ["--slide-mpp"] + [k for (keys, _) in _MPP_KEYS for k in keys if k] + [
    "tiff.XResolution/tiff.ResolutionUnit"]
# plausible level-0 resolutions of a microscope scan; a TIFF saying 72 dpi is not one
_MPP_RANGE = (0.01, 50.0)
# --slide-mpp this far (relative) from the metadata's own value is warned about: scanners round
# their mpp a little (0.2527 vs 0.25), a wrong magnification is off by 2x or more
MPP_DISAGREE = 0.1
# x and y pixel sizes of one scan further apart than this are an error (scanners state equal
# or nearly equal ones: 0.2527 and 0.2528); within it, their mean is off by half of it at most
MPP_ANISOTROPY = 0.1
# ... and further apart than this are tiled with their mean and a warning (patches off their
# scale by half of it on each axis)
MPP_ANISOTROPY_WARN = 0.01
# a target this much finer than the scan still reads level 0 (rounding in metadata, e.g. 0.499)
_FINER_TOLERANCE = 1.02


def validate_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is a safe file name, else raise :class:`SimclrPathError`.

    Slide ids become file names (``results/patches/{slide_id}.h5``), so they may only hold
    letters, digits, ``.``, ``_`` and ``-``, must not start with ``.`` and hold no ``..``: the
    samples sheet's rule (:func:`simclr_path.samples.is_safe_id`), the one rule for both.
    """
    from simclr_path.samples import is_safe_id

    if not isinstance(slide_id, str):  # an mpp passed where the id goes must not become one
        raise SimclrPathError(f"slide id {slide_id!r} is a {type(slide_id).__name__}, not text; "
                              "give the id as a string (slide_id='S01')")
    s = slide_id
    if not is_safe_id(s):
        raise SimclrPathError(
            f"slide id {s!r} is not a safe file name; use letters, digits, '.', '_' and '-' only "
            "(no '/', no leading '.' or '-', no '..')")
    return s


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        v = float(str(value).replace('"', ' ').split()[0])  # Philips quotes its values
    except (ValueError, IndexError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _metadata_mpp(properties: dict[str, str]
                  ) -> tuple[float, str, tuple[float, float]] | None:
    """The level-0 mpp the slide's own metadata states, its key, and its x and y pixel sizes in
    um (the same twice where only one is stated); None where it states none."""
    lo, hi = _MPP_RANGE
    for (kx, ky), scale in _MPP_KEYS:
        x = _float(properties.get(kx))
        if x is None:
            continue
        y = _float(properties.get(ky)) if ky else None
        mpp = (x + y) / 2 * scale if y is not None else x * scale
        if lo <= mpp <= hi:
            return mpp, kx, (x * scale, (y if y is not None else x) * scale)
    xres = _float(properties.get("tiff.XResolution"))
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if xres is not None and per_unit is not None:
        yres = _float(properties.get("tiff.YResolution"))
        mpp = per_unit / (xres if yres is None else (xres + yres) / 2)
        if lo <= mpp <= hi:
            return mpp, "tiff.XResolution", (per_unit / xres, per_unit / (yres or xres))
    return None


def resolve_mpp(properties: dict[str, str], path: str | os.PathLike, slide_mpp: float | None = None,
                mpp_from_objective: bool = False) -> tuple[float, str]:
    """Level-0 microns per pixel of a slide and where it came from.

    Order: ``slide_mpp``; ``openslide.mpp-x/y``; vendor keys (``aperio.MPP``, MIRAX
    ``MICROMETER_PER_PIXEL_X/Y``, ``philips.DICOM_PIXEL_SPACING``); TIFF ``XResolution`` with
    ``ResolutionUnit`` centimeter or inch; ``openslide.objective-power`` (mpp = 10 / objective)
    only when ``mpp_from_objective``.

    Returns:
        (mpp, source) where source names the key used.
    """
    found = _metadata_mpp(properties)
    stated = found[:2] if found else None
    if slide_mpp is not None:
        hint = magnification_hint(float(slide_mpp))
        if hint:
            known = f"; the slide itself says {stated[0]:.4g} um/px" if stated else ""
            raise SimclrPathError(f"{path}: --slide-mpp {hint}{known}")
        if not _MPP_RANGE[0] <= slide_mpp <= _MPP_RANGE[1]:  # NaN fails too
            raise SimclrPathError(
                f"--slide-mpp must be a positive number of level-0 microns per pixel between "
                f"{_MPP_RANGE[0]:g} and {_MPP_RANGE[1]:g} (0.25 for a 40x scan, 0.5 for 20x), "
                f"got {slide_mpp}")
        # a slip (0.25 for a 20x scan) would tile every patch at the wrong scale without a word:
        # a patch spans patch um / slide_mpp pixels, each really stated um wide
        if stated is not None and abs(slide_mpp / stated[0] - 1) > MPP_DISAGREE:
            warnings.warn(
                f"{path}: --slide-mpp {slide_mpp:g} overrides the slide's own {stated[0]:.4g} um/px "
                f"({stated[1]}); if the metadata is right, patches cover {stated[0] / slide_mpp:.2g}x "
                "the intended width of tissue (leave --slide-mpp out to use it; in the workflow, "
                "empty the samples sheet's mpp cell)", stacklevel=2)
        return float(slide_mpp), "--slide-mpp"
    if found is not None:
        # patches are square in microns only where pixels are: x and y far apart would cut
        # every patch at a wrong scale on both axes (their mean is right on neither)
        (x, y), key = found[2], found[1]
        if abs(x / y - 1) > MPP_ANISOTROPY:
            raise SimclrPathError(
                f"{path}: its metadata ({key} and its y counterpart) gives pixels of {x:.4g} x "
                f"{y:.4g} um, not square; the tiler needs square pixels, so check the metadata "
                "and pass the right level-0 mpp as --slide-mpp")
        if abs(x / y - 1) > MPP_ANISOTROPY_WARN:
            warnings.warn(
                f"{path}: its pixels are {x:.4g} x {y:.4g} um ({abs(x / y - 1):.1%} apart); "
                f"patches use their mean, {stated[0]:.4g} um, so each axis is up to "
                f"{abs(x - y) / (x + y):.1%} off the intended scale (pass --slide-mpp to choose "
                "another)", stacklevel=2)
        return stated
    objective = _float(properties.get("openslide.objective-power"))
    if mpp_from_objective and objective is not None:
        return 10.0 / objective, "openslide.objective-power"
    hint = (f"; it reports objective power {objective:g}x, so --mpp-from-objective would use "
            f"{10.0 / objective:g}" if objective is not None else "")
    raise SimclrPathError(
        f"{path}: level-0 microns per pixel unknown (tried {', '.join(MPP_SOURCES[1:])}"
        f"{', openslide.objective-power' if mpp_from_objective else ''}); pass --slide-mpp "
        f"(e.g. --slide-mpp 0.25 for a 40x scan, 0.5 for 20x; in the workflow, the samples "
        f"sheet's mpp column){hint}")


@dataclass(frozen=True)
class LevelChoice:
    """Where to read pixels for a target resolution.

    ``level``: pyramid level read; ``level_mpp``: its microns per pixel; ``scale``: level pixels
    per target pixel (>= about 1: the read is shrunk by this factor); ``downsample``: level-0
    pixels per level pixel.
    """

    level: int
    level_mpp: float
    downsample: float
    scale: float


class Slide:
    """An open whole-slide image with a known level-0 resolution.

    Args:
        path: any file OpenSlide reads.
        slide_mpp: level-0 microns per pixel, overriding the metadata.
        mpp_from_objective: allow mpp = 10 / objective power when nothing better exists.
    """

    def __init__(self, path: str | os.PathLike, slide_mpp: float | None = None,
                 mpp_from_objective: bool = False) -> None:
        self.path = Path(path)
        self._osr = open_openslide(self.path)
        self.properties: dict[str, str] = dict(self._osr.properties)
        self.mpp, self.mpp_source = resolve_mpp(self.properties, self.path, slide_mpp,
                                                mpp_from_objective)
        self._tiles: dict[int, TiffTiles | None] = {}  # direct decoders by level, made on use
        self._strip: tuple[tuple[int, int], np.ndarray] | None = None  # (level, tile row), pixels

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return tuple(self._osr.dimensions)

    @property
    def level_count(self) -> int:
        return int(self._osr.level_count)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._osr.level_dimensions)

    def level_for(self, target_mpp: float) -> LevelChoice:
        """The coarsest level still at least as fine as ``target_mpp`` (then resize the rest)."""
        if target_mpp * _FINER_TOLERANCE < self.mpp:
            raise SimclrPathError(
                f"{self.path}: target {target_mpp:g} um/px is finer than the scan "
                f"({self.mpp:g} um/px from {self.mpp_source}); choose --mpp {self.mpp:.4g} or "
                "coarser (in the workflow: tile.mpp)")
        best = 0
        for lv, ds in enumerate(self.level_downsamples):
            # 0.1% slack: downsamples such as 2.0005 still count as exactly 2
            if self.mpp * ds <= target_mpp * 1.001:
                best = lv
        ds = self.level_downsamples[best]
        return LevelChoice(best, self.mpp * ds, ds, target_mpp / (self.mpp * ds))

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``; (x, y) is the level-0 top-left.

        Transparent pixels (outside the scanned area) are composited on white.
        """
        return read_rgb(self._osr, x, y, level, width, height, self.path)

    def _level_rows(self, level: int, y: int, height: int, direct: bool) -> np.ndarray:
        """RGB uint8 (height, level width, 3): ``height`` whole rows of ``level`` from level row
        ``y``; decoded directly where the level is a tiled TIFF page (:class:`TiffTiles`)."""
        if direct and level not in self._tiles:
            self._tiles[level] = TiffTiles.open(self.path, self._osr, [level])
        tiles = self._tiles.get(level) if direct else None
        w_l, h_l = self.level_dimensions[level]
        if tiles is not None:
            # whole tile rows, the last one kept: read_at_mpp's bands rarely end on a tile row,
            # and the row they share was decoded twice (1.5x the decode for ~300-row bands, as
            # a 100,000 px wide slide's 64 M pixel bands are)
            th = tiles.tile_height(level)
            out = np.empty((height, w_l, 3), dtype=np.uint8)
            for ty in range(y // th, (y + height - 1) // th + 1):
                key = (level, ty)
                if self._strip is None or self._strip[0] != key:
                    top = ty * th
                    self._strip = (key, tiles.read(level, 0, top, w_l, min(th, h_l - top)))
                strip, top = self._strip[1], ty * th
                a, b = max(y, top), min(y + height, top + len(strip))
                out[a - y:b - y] = strip[a - top:b - top]
            return out
        return self.read_region(0, round(y * self.level_downsamples[level]), level, w_l, height)

    def read_at_mpp(self, mpp: float, max_pixels: int = 1 << 26,
                    direct: bool = True) -> tuple[np.ndarray, float]:
        """The whole slide as RGB at about ``mpp`` um/px (clamped to the scan): (image, its mpp).

        Reads the coarsest level at least that fine, in bands of about ``max_pixels`` level
        pixels (64 M: 256 MB of RGBA; at least the level rows of one output row, whatever that
        costs), so a slide without a pyramid never needs its full level 0 in memory however wide
        it is, and shrinks each band with area interpolation. ``direct``: decode a tiled-TIFF
        level's tiles without OpenSlide (the same pixels, checked; 5x faster, which matters for a
        slide without a pyramid, read whole at level 0).
        """
        mpp = max(mpp, self.mpp)
        choice = self.level_for(mpp)
        w_l, h_l = self.level_dimensions[choice.level]
        w0, h0 = self.dimensions
        w = max(1, round(w0 * self.mpp / mpp))
        h = max(1, round(h0 * self.mpp / mpp))
        try:
            if (w, h) == (w_l, h_l):
                return self._level_rows(choice.level, 0, h_l, direct), w0 * self.mpp / w
            out = np.empty((h, w, 3), dtype=np.uint8)
            rows_per_out = h_l / h  # level rows per output row
            max_rows = max(1, max_pixels // w_l)  # level rows per band
            step = max(1, int(max_rows // max(rows_per_out, 1)))  # output rows per band
            for r0 in range(0, h, step):
                r1 = min(h, r0 + step)
                ly0 = round(r0 * rows_per_out)
                ly1 = h_l if r1 == h else round(r1 * rows_per_out)
                band = self._level_rows(choice.level, ly0, max(1, ly1 - ly0), direct)
                out[r0:r1] = cv2.resize(band, (w, r1 - r0), interpolation=cv2.INTER_AREA)
            return out, w0 * self.mpp / w
        finally:
            self._strip = None  # a tile row of a wide level: tens of MB

    def close(self) -> None:
        for tiles in self._tiles.values():
            if tiles is not None:
                tiles.close()
        self._tiles.clear()
        self._strip = None
        self._osr.close()

    def __enter__(self) -> Slide:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_openslide(path: str | os.PathLike):
    """``openslide.OpenSlide(path)`` with one clear error for a missing, corrupt or unknown file."""
    import openslide

    p = Path(path)
    if not p.exists():
        raise SimclrPathError(f"{p}: slide not found")
    if not p.is_file():
        raise SimclrPathError(f"{p}: not a file (for MIRAX give the .mrxs file, not its folder)")
    try:
        return openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SimclrPathError(
            f"{p}: not a slide OpenSlide can read (unsupported format or corrupt file); check "
            "the file is complete and is .svs, .ndpi, .mrxs, .scn, .bif, .vms or tiled .tiff"
        ) from None
    except (openslide.OpenSlideError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SimclrPathError(f"{p}: slide cannot be read ({msg}); the file may be corrupt or "
                              "truncated") from None


def read_rgb(osr, x: int, y: int, level: int, width: int, height: int,
             path: str | os.PathLike = "slide") -> np.ndarray:
    """``osr.read_region`` as RGB uint8 (height, width, 3), composited on white."""
    import openslide

    try:
        rgba = np.asarray(osr.read_region((int(x), int(y)), int(level), (int(width), int(height))))
    except openslide.OpenSlideError as exc:
        raise SimclrPathError(f"{path}: read failed at level {level}, ({x}, {y}) size "
                              f"{width}x{height} ({exc}); the file may be corrupt") from None
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # fast path: fully scanned region
        return np.ascontiguousarray(rgba[..., :3])
    # in 16-bit integers, rounded (max 255 * 255 + 127 fits): float32 took 5x a band's RGBA
    a = alpha[..., None].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16) * a
    rgb += (255 - a) * 255 + 127
    rgb //= 255
    return rgb.astype(np.uint8)


class TiffTiles:
    """Direct tile decoding for tiled-TIFF slides (Aperio .svs, generic tiled TIFF).

    OpenSlide's ``read_region`` spends most of its time after decoding (compositing into a
    premultiplied ARGB canvas, converting to RGBA, copying into PIL and NumPy): on this machine
    about 25 ns per output pixel against 4 ns per pixel for the JPEG decode itself
    (``benchmarks/bench_tiling.py``).
    For slides whose pyramid levels are tiled TIFF pages, this reader decodes the tiles a region
    needs with tifffile / imagecodecs (the same libjpeg-turbo / OpenJPEG decoders) and pastes them
    into an RGB array. :meth:`open` checks that it reproduces OpenSlide's pixels on a sample region
    and returns None otherwise (other formats always go through OpenSlide).
    """

    def __init__(self, path: Path, pages: dict[int, object], tf) -> None:
        self.path, self._pages, self._tf = path, pages, tf
        self._fd = os.open(path, os.O_RDONLY)  # os.pread: thread-safe, no shared file position

    @classmethod
    def open(cls, path: str | os.PathLike, osr, levels: list[int]) -> TiffTiles | None:
        """A reader for ``levels`` of the OpenSlide handle ``osr``, or None if not applicable."""
        try:
            import tifffile

            tf = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001  (not a TIFF at all: MIRAX, DICOM ...)
            return None
        try:
            pages = {}
            for lv in levels:
                w, h = osr.level_dimensions[lv]
                page = next((p for p in tf.pages if p.is_tiled and p.imagewidth == w
                             and p.imagelength == h and p.samplesperpixel == 3
                             and p.bitspersample == 8 and p.planarconfig == 1
                             and p.imagedepth == 1), None)
                if page is None:
                    tf.close()
                    return None
                pages[lv] = page
            reader = cls(Path(path), pages, tf)
            if not all(reader._agrees(osr, lv) for lv in levels):
                reader.close()
                return None
            return reader
        except Exception:  # noqa: BLE001  (an unusual TIFF: fall back to OpenSlide)
            tf.close()
            return None

    def _agrees(self, osr, level: int) -> bool:
        """Same pixels as OpenSlide on a region around the level centre (across tile seams)."""
        w, h = osr.level_dimensions[level]
        ds = osr.level_downsamples[level]
        page = self._pages[level]
        rw, rh = min(w, 96), min(h, 96)
        lx = max(0, min(w - rw, (w // 2 // page.tilewidth) * page.tilewidth - rw // 2))
        ly = max(0, min(h - rh, (h // 2 // page.tilelength) * page.tilelength - rh // 2))
        ref = read_rgb(osr, round(lx * ds), round(ly * ds), level, rw, rh)
        mine = self.read(level, lx, ly, rw, rh)
        # a non-integer downsample (e.g. 2.0005) makes OpenSlide interpolate at a sub-pixel
        # offset; a wrong colour space or tile layout differs by far more than that
        tol = 1.0 if abs(ds - round(ds)) < 1e-9 else 12.0
        return float(np.abs(ref.astype(np.int16) - mine.astype(np.int16)).mean()) < tol

    def tile_height(self, level: int) -> int:
        return int(self._pages[level].tilelength)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level`` with top-left (x, y) in LEVEL pixels."""
        page = self._pages[level]
        tw, th = page.tilewidth, page.tilelength
        iw, ih = page.imagewidth, page.imagelength
        ntx = -(-iw // tw)
        out = np.full((height, width, 3), 255, dtype=np.uint8)  # outside the image: white
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, iw), min(y + height, ih)
        if x0 >= x1 or y0 >= y1:
            return out
        decode, tables = page.decode, page.jpegtables
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                idx = ty * ntx + tx
                n = page.databytecounts[idx]
                if n == 0:
                    continue  # sparse tile: nothing scanned there
                data = os.pread(self._fd, n, page.dataoffsets[idx])
                try:
                    tile = decode(data, idx, jpegtables=tables)[0]
                except Exception as exc:  # noqa: BLE001  (codec errors have many types)
                    raise SimclrPathError(
                        f"{self.path}: tile {idx} of level {level} cannot be decoded "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''});"
                        " the file may be corrupt or truncated") from None
                tile = tile.reshape(tile.shape[-3], tile.shape[-2], tile.shape[-1])
                # overlap of this tile with the requested region, in level pixels
                ax, ay = max(x0, tx * tw), max(y0, ty * th)
                bx, by = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay - y:by - y, ax - x:bx - x] = tile[ay - ty * th:by - ty * th,
                                                         ax - tx * tw:bx - tx * tw, :3]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tf.close()
