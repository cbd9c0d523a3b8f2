"""Import a folder of labelled tiles (one subfolder per class) as a patch store.

``DIR/<class>/**/*.png|jpg|jpeg|tif|tiff`` becomes a store of ``kind="patches"`` with ``/labels``
(index into the ``label_names`` attribute, classes sorted by name), ``/names`` (paths relative to
``DIR``), ``/groups`` from an optional CSV of ``path,group`` (the patient or source image of each
tile; grouped evaluation keeps a group on one side of every split) and ``/coords`` of (-1, -1).
Tiles are stored in sorted order of class then relative path, so the store is deterministic.
"""

from __future__ import annotations

import io
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from simclr_path.errors import SimclrPathError
from simclr_path.outputs import check_can_write
from simclr_path.store import PatchStoreWriter

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_CHUNK_BYTES = 256 * 2**20  # decoded tiles held at a time: 1783 of 224 px, 5 of 4096 px


def _nfc(name: str) -> str:
    """Names compared in one Unicode form: a Mac folder or zip may spell 'é' as 'e' + accent."""
    return unicodedata.normalize("NFC", name)


@dataclass
class ImportResult:
    """What :func:`import_patches` wrote."""

    path: Path
    n_patches: int
    patch_size: int
    label_names: list[str]
    counts: dict[str, int]  # tiles per class
    n_groups: int  # distinct groups (0 without a groups CSV)
    bit_depth: int | None = None  # depth 16-bit samples were scaled from (None: no 16-bit tiles)


def list_tiles(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolders) and (relative path, label) of every tile, sorted."""
    if folder.is_file():
        raise SimclrPathError(f"{folder}: is a file; give the folder with one subfolder of tiles per class")
    if not folder.is_dir():
        raise SimclrPathError(f"{folder}: folder not found")
    classes = sorted((d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=_nfc)  # the label order must not depend on how a copy spells names
    if not classes:
        raise SimclrPathError(f"{folder}: no class subfolders; put the tiles of each class in "
                              f"its own subfolder (e.g. {folder}/SCC/*.png, {folder}/normal/*.png)")
    tiles: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            (p.relative_to(folder).as_posix() for p in (folder / name).rglob("*")
             if p.is_file() and p.suffix.lower() in EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)), key=_nfc)
        for f in files:  # names are stored as UTF-8 text in the store
            try:
                f.encode("utf-8")
            except UnicodeEncodeError:
                raise SimclrPathError(f"{folder / f!s}: file name is not valid UTF-8 (e.g. from a "
                                      "Latin-1 zip); rename it") from None
        if not files:  # a class without tiles would be a class the classifier never sees
            raise SimclrPathError(f"{folder / name}: class folder has no PNG/JPEG/TIFF tiles; add "
                                  "its tiles or remove the folder")
        tiles += [(f, label) for f in files]
    if not tiles:
        raise SimclrPathError(f"{folder}: no PNG/JPEG/TIFF tiles in the class subfolders "
                              f"{', '.join(classes)}")
    return classes, tiles


def read_groups(csv: str | os.PathLike, tiles: list[str]) -> list[str]:
    """Group of each tile from a CSV with columns ``path`` (relative to the folder) and ``group``."""
    import pandas as pd

    p = Path(csv)
    if not p.is_file():
        raise SimclrPathError(f"{p}: groups CSV not found")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SimclrPathError(f"{p}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("path", "group") if c not in df.columns]
    if missing:
        raise SimclrPathError(f"{p}: missing column(s) {', '.join(missing)}; expected columns "
                              f"path,group (found {', '.join(map(str, df.columns))})")
    paths = df["path"].str.strip().str.replace("\\", "/", regex=False).map(
        lambda s: s.removeprefix("./"))
    groups = df["group"].str.strip()
    clash = groups.groupby(paths).nunique()
    if (clash > 1).any():
        raise SimclrPathError(f"{p}: tile {clash[clash > 1].index[0]!r} has rows with different "
                              "groups; give each tile one group")
    mapping = dict(zip(paths.map(_nfc), groups))
    absent = [t for t in tiles if not mapping.get(_nfc(t))]
    if absent:
        raise SimclrPathError(f"{p}: no group for {len(absent)} tile(s), e.g. {absent[0]!r}; add a "
                              "row path,group for every tile (path relative to the folder)")
    return [mapping[_nfc(t)] for t in tiles]


# a tile is one training image: larger sides are a typo, and would allocate gigabytes per tile
MAX_PATCH_SIZE = 4096


_PNG = b"\x89PNG\r\n\x1a\n"


def _on_white_16(buf: np.ndarray, bits: int | None, where: Path) -> np.ndarray | None:
    """RGB uint8 of a 16-bit PNG with an alpha channel (IHDR bit depth 16, colour type 4 or 6),
    colour scaled by its depth as ``_to_uint8`` does, composited onto white."""
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # BGRA uint16 (grey + alpha comes as BGRA too)
    if img is None or img.ndim != 3 or img.shape[2] != 4:
        return None
    alpha = img[..., 3:].astype(np.float32) / 65535.0
    rgb = _to_uint8(np.ascontiguousarray(img[..., 2::-1]), bits, where).astype(np.float32)
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _on_white(buf: np.ndarray, bits: int | None, where: Path) -> np.ndarray | None:
    """RGB uint8 of an image with transparency (alpha channel or a transparent palette colour),
    composited onto white, as slide background is; None for an image without (OpenCV's
    decoder, which drops alpha and would leave transparent pixels black, reads those)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:  # reads the header only
            if im.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in im.info:
                return None
            if im.mode.startswith(("I", "F")):  # 16-bit / float: Pillow would clip, not scale
                return None
            if buf[:8].tobytes() == _PNG and buf.size > 25 and buf[24] == 16 and buf[25] in (4, 6):
                return _on_white_16(buf, bits, where)  # Pillow would read it at 8 bits
            rgba = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"), dtype=np.float32)
    except Exception:  # noqa: BLE001 -- not an image Pillow reads: OpenCV decides
        return None
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


DEPTHS = (8, 10, 12, 14, 16)  # sample depths of cameras that write 16-bit files


def _depth_of(top: int) -> int:
    """The smallest camera depth whose range holds the sample ``top``."""
    return next(b for b in DEPTHS if top < 1 << b)


def _to_uint8(img: np.ndarray, bits: int | None = None, where: Path | None = None) -> np.ndarray:
    """8-bit samples of a decoded image. 16-bit files often hold 10-, 12- or 14-bit camera
    samples, which a plain shift by 8 bits would leave nearly black, so 16-bit samples are
    scaled from ``bits`` (the dataset's depth, see :func:`scan_depth`; None: this tile's own,
    from its largest sample). Float images are taken as 0-1 (0-255 where a sample exceeds 1)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        top = int(img.max())
        if bits is None:
            bits = _depth_of(top)
        elif top >= 1 << bits:
            raise SimclrPathError(f"{where}: sample {top} does not fit {bits} bits; pass a larger "
                                  f"--bit-depth (at least {_depth_of(top)}) or leave it out")
        scale = 255.0 / ((1 << bits) - 1)
    else:
        img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if float(img.max()) <= 1.0 else 1.0
    return np.clip(np.rint(img.astype(np.float32, copy=False) * scale), 0, 255).astype(np.uint8)


_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _sixteen_bit(path: Path) -> bool:
    """Whether a tile holds 16-bit integer samples, from its header alone (PNG IHDR, TIFF tags)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
        if head[:8] == _PNG:
            return len(head) > 24 and head[24] == 16
        if head[:4] in _TIFF:
            from PIL import Image

            with Image.open(path) as im:  # reads the first IFD, not the pixels
                tags = im.tag_v2
                bps = tags.get(258, 1)
                fmt = tags.get(339, 1)  # SampleFormat: 1 unsigned integer, 3 float
                return 16 in (bps if isinstance(bps, tuple) else (bps,)) and \
                    (fmt if isinstance(fmt, int) else fmt[0]) == 1
    except Exception:  # noqa: BLE001 -- unreadable here: the decoder reports it when importing
        return False
    return False


def scan_depth(folder: Path, names: list[str], workers: int = 2, progress: bool = True) -> int | None:
    """The sample depth of a dataset's 16-bit tiles (10, 12, 14 or 16), from the largest sample
    over all of them; None when no tile is 16-bit. One depth for the whole dataset keeps tiles
    comparable: a tile's own largest sample would brighten a genuinely dark tile 4-fold."""
    from tqdm.auto import tqdm

    def top(name: str) -> int:
        path = folder / name
        if not _sixteen_bit(path):
            return -1
        try:  # np.fromfile: cv2.imread cannot open non-ASCII paths on Windows
            img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        except OSError:
            return -1
        if img is None or img.dtype != np.uint16:
            return -1  # the import reports an unreadable tile with its path
        if img.ndim == 3 and img.shape[2] in (2, 4):
            img = img[..., :-1]  # alpha is not a colour sample
        return int(img.max())

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tops = list(tqdm(pool.map(top, names), total=len(names), unit="tile",
                         desc=f"sample depth {folder.name}", disable=None if progress else True,
                         dynamic_ncols=True))
    best = max(tops, default=-1)
    return _depth_of(best) if best >= 0 else None


def _read_tile(path: Path, patch_size: int | None, bits: int | None = None) -> np.ndarray:
    """RGB uint8 (S, S, 3); centre-cropped to a square and resized when ``patch_size`` is set;
    16-bit samples scaled from ``bits`` (see :func:`_to_uint8`)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SimclrPathError(f"{path}: cannot read tile ({exc.strerror})") from None
    img = _on_white(buf, bits, path) if buf[:3].tobytes() != b"\xff\xd8\xff" else None  # JPEG
    if img is None:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if buf.size else None
        if img is None:
            raise SimclrPathError(f"{path}: not a readable image; remove or replace this tile")
        img = cv2.cvtColor(_to_uint8(img, bits, path), cv2.COLOR_BGR2RGB)
    if patch_size is None:
        return img
    h, w = img.shape[:2]
    if h != w:  # keep the physical scale isotropic: crop the centre square, then resize
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        img = img[y0:y0 + s, x0:x0 + s]
    if img.shape[0] != patch_size:
        interp = cv2.INTER_AREA if img.shape[0] > patch_size else cv2.INTER_LINEAR
        img = cv2.resize(img, (patch_size, patch_size), interpolation=interp)
    return img


def import_patches(folder: str | os.PathLike, out: str | os.PathLike,
                   patch_size: int | None = None, groups_csv: str | os.PathLike | None = None,
                   force: bool = False, progress: bool = True, workers: int = 2,
                   bit_depth: int | None = None) -> ImportResult:
    """Write a patch store from a folder of labelled tiles.

    Args:
        folder: one subfolder per class holding PNG/JPEG/TIFF tiles (nested folders allowed).
        out: patch store path (written atomically).
        patch_size: resize every tile to this side; without it all tiles must be squares of one
            size.
        groups_csv: CSV with columns ``path`` (relative to ``folder``) and ``group``; extra columns
            are ignored. Every tile needs a group.
        force: overwrite ``out``.
        progress: progress bar on stderr.
        workers: decoding threads.
        bit_depth: depth of the samples in 16-bit tiles (e.g. 12 for a 12-bit camera); None
            reads every 16-bit tile's largest sample first and takes the smallest of 10, 12, 14
            and 16 bits that holds them all.

    Store: ``/patches`` (N, S, S, 3) uint8, ``/coords`` (N, 2) = -1, ``/labels`` (N,),
    ``/groups`` (N,) ("" without a CSV), ``/names`` (N,); attrs ``kind="patches"``,
    ``label_names``, ``source_path``, ``bit_depth``.
    """
    from tqdm.auto import tqdm

    folder = Path(folder)
    if patch_size is not None and not 8 <= patch_size <= MAX_PATCH_SIZE:
        raise SimclrPathError(f"--patch-size must be between 8 and {MAX_PATCH_SIZE}, got {patch_size}")
    if bit_depth is not None and not 8 <= bit_depth <= 16:
        raise SimclrPathError(f"--bit-depth must be between 8 and 16, got {bit_depth}")
    check_can_write(out, force)
    classes, tiles = list_tiles(folder)
    names = [t for t, _ in tiles]
    labels = np.array([lab for _, lab in tiles], dtype=np.int64)
    groups = read_groups(groups_csv, names) if groups_csv is not None else [""] * len(names)
    bits = bit_depth if bit_depth is not None else scan_depth(folder, names, workers, progress)

    first = _read_tile(folder / names[0], patch_size, bits)
    size = patch_size if patch_size is not None else first.shape[0]
    if patch_size is None and first.shape[0] != first.shape[1]:
        raise SimclrPathError(f"{folder / names[0]}: tile is {first.shape[1]}x{first.shape[0]}, "
                              "not square; pass --patch-size to crop and resize every tile")
    if size > MAX_PATCH_SIZE:
        raise SimclrPathError(f"{folder / names[0]}: tile is {size}x{size} px, larger than "
                              f"{MAX_PATCH_SIZE}; pass --patch-size to resize every tile")
    chunk_n = max(1, _CHUNK_BYTES // (size * size * 3))
    attrs = {"kind": "patches", "slide_id": _store_id(out, folder),
             "source_path": str(folder.resolve()), "mpp": None, "level0_mpp": None,
             "stride": None, "groups_csv": str(groups_csv) if groups_csv else None,
             "bit_depth": bits}

    def load(name: str) -> np.ndarray:
        img = _read_tile(folder / name, patch_size, bits)
        if img.shape[:2] != (size, size):
            raise SimclrPathError(
                f"{folder / name}: tile is {img.shape[1]}x{img.shape[0]} but {names[0]} is "
                f"{size}x{size}; pass --patch-size to resize every tile to one size")
        return img

    bar = tqdm(total=len(names), unit="tile", desc=f"import {folder.name}",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        with PatchStoreWriter(out, size, attrs=attrs, label_names=classes, force=force) as w, \
                ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for lo in range(0, len(names), chunk_n):
                chunk = names[lo:lo + chunk_n]
                patches = np.stack(list(pool.map(load, chunk)))
                w.append(patches, np.full((len(chunk), 2), -1, dtype=np.int64),
                         labels=labels[lo:lo + chunk_n], groups=groups[lo:lo + chunk_n],
                         names=chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    n_groups = len(set(groups)) if groups_csv is not None else 0
    return ImportResult(Path(out), len(names), size, classes, counts, n_groups, bits)


def _store_id(out: str | os.PathLike, folder: Path) -> str:
    """The store's id: the output file's stem when it is a safe name, else the folder's name."""
    from simclr_path.slide import validate_slide_id

    for cand in (Path(out).stem, folder.resolve().name):
        try:
            return validate_slide_id(cand)
        except SimclrPathError:
            continue
    return "patches"
