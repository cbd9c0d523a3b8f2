"""Import a folder of labelled tiles (one subfolder per class) as a patch store.

``DIR/<class>/**/*.png|jpg|jpeg|tif|tiff|bmp|webp`` becomes a store of ``kind="patches"`` with ``/labels``
(index into the ``label_names`` attribute, classes sorted by name), ``/names`` (paths relative to
``DIR``), ``/groups`` from an optional CSV of ``path,group`` (the patient or source image of each
tile; grouped evaluation keeps a group on one side of every split) and ``/coords`` of (-1, -1).
Tiles are stored in sorted order of class then relative path, so the store is deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import numbers
import os
import unicodedata
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from simclr_path.config import BIT_DEPTHS
from simclr_path.errors import SimclrPathError, check_int, need_file
from simclr_path.outputs import (
    check_apart,
    check_can_write,
    check_hdf5_name,
)
from simclr_path.store import PatchStoreWriter, check_replaces_kind

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")  # OpenCV and Pillow read all
FORMATS = "PNG/JPEG/TIFF/BMP/WebP"
# images in formats not imported: skipped with a warning, not in silence (other files, e.g. a
# README or groups.csv, are skipped quietly)
OTHER_IMAGES = (".gif", ".jp2", ".j2k", ".jpx", ".jxl", ".avif", ".heic", ".heif", ".ppm",
                ".pgm", ".pnm", ".pbm", ".exr", ".hdr", ".svg", ".psd", ".ico", ".dcm", ".svs",
                ".ndpi", ".mrxs", ".scn", ".vms", ".czi", ".qptiff")
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
    depth_tile: str | None = None  # the tile with the largest 16-bit sample (None: depth stated)
    n_duplicates: int = 0  # tiles pixel-identical to an earlier tile (after any resize)


def _points_above(link: str | os.PathLike, top: str) -> bool:
    """Whether ``link`` is a link to the folder ``top`` (a real path) or a folder above it."""
    if not os.path.islink(link):
        return False
    target = os.path.realpath(link)
    return os.path.commonpath([top, target]) == target


def _files_under(root: Path, broken: list[Path] | None = None,
                 above: list[Path] | None = None, top: Path | None = None) -> list[Path]:
    """Every file below ``root``, through linked folders too (as linked class folders and linked
    files are; ``Path.rglob`` skipped linked subfolders without a word), each real folder
    once. Links whose target is gone are added to ``broken``, and links to ``top`` (default
    ``root``; the dataset folder for a class folder) or a folder above it, which are not
    followed (they would loop, or take in every class's tiles), to ``above``, where given."""
    # os.scandir's entries know their type without a stat (d_type) except for links: the
    # workflow lists a tile set at every DAG build, and os.walk plus isfile and exists per file
    # made four stats a tile (13 s for 200,000 tiles)
    out: list[Path] = []
    seen: set[str] = set()
    top_real = os.path.realpath(top if top is not None else root)
    stack = [os.fspath(root)]
    linked: list[str] = []  # folders reached through a link: walked after every real one, so
    # that a folder reachable both ways keeps its own name, not the link's
    while stack or linked:
        here = stack.pop() if stack else linked.pop()
        real = os.path.realpath(here)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(here))
        except OSError:  # unreadable, as os.walk skips it
            continue
        below, below_links = [], []
        for e in entries:
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # through links, as os.walk's
            except OSError:
                is_dir = is_file = False
            if is_dir:
                if not e.is_symlink():
                    below.append(e.path)
                elif _points_above(e.path, top_real):
                    if above is not None:
                        above.append(Path(e.path))
                else:
                    below_links.append(e.path)
            elif is_file:
                out.append(Path(e.path))
            elif broken is not None and e.is_symlink() and not os.path.exists(e.path):
                broken.append(Path(e.path))
        stack += sorted(below, reverse=True)  # depth first, in name order
        linked += sorted(below_links, reverse=True)
    return out


def folder_digest(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """A digest of every file below ``folder`` (relative path and contents): the workflow reruns
    an import when a tile is added, removed or replaced, which the folder's own time does not
    show (it changes only for entries directly in it), and not when the folder was only copied
    or unpacked again (new modification times: a digest of the times retrained everything).

    Only the files an import reads count (tile formats, no hidden path part): a .DS_Store,
    notes or an archive kept beside the tiles rerun nothing and are not read.

    ``cache``: a JSON file of each file's content hash by (size, modification and change
    times; no inode, which network and FUSE mounts renumber), so that only new or changed files
    are read again (the first digest reads every tile once).
    """
    root = Path(folder)
    known: dict[str, list] = {}
    if cache is not None:
        try:
            loaded = json.loads(Path(cache).read_text())
            known = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            known = {}  # none yet, or damaged: hashed again
    fresh: dict[str, list] = {}
    h = hashlib.blake2b(digest_size=16)
    if root.is_dir():
        for p in sorted(_files_under(root)):
            if not _is_tile(p.relative_to(root)):
                continue
            rel = p.relative_to(root).as_posix()
            st = p.stat()
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            entry = known.get(rel)
            if isinstance(entry, list) and len(entry) == 4 and entry[:3] == key:
                content = entry[3]
            else:
                try:
                    content = _file_hash(p)
                except OSError:  # unreadable: the import says so in one line, not the DAG build
                    content = f"unreadable {st.st_mtime_ns}"
            fresh[rel] = [*key, content]
            h.update(f"{rel}\0{st.st_size}\0{content}\n".encode("utf-8", "surrogateescape"))
    if cache is not None and fresh != known:
        try:  # best effort: a read-only place only costs the hashing again next time
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache).with_name(f".{Path(cache).name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache)
        except OSError:
            pass
    return h.hexdigest()


def _is_tile(rel: Path) -> bool:
    """Whether a file at ``rel`` (below the dataset folder) is a tile the import reads: a tile
    format, no hidden part (.DS_Store, .git/)."""
    return rel.suffix.lower() in EXTENSIONS and not any(x.startswith(".") for x in rel.parts)


def _file_hash(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in 1 MB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_tiles(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolders) and (relative path, label) of every tile, sorted."""
    if folder.is_file():
        raise SimclrPathError(f"{folder}: is a file; give the folder with one subfolder of tiles per class")
    if not folder.is_dir():
        raise SimclrPathError(f"{folder}: folder not found")
    top = os.path.realpath(folder)
    subfolders = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    # links to the folder or above: every class's tiles under one label
    above = [d for d in subfolders if _points_above(d, top)]
    classes = sorted((d.name for d in subfolders if d not in above),
                     key=_nfc)  # the label order must not depend on how a copy spells names
    from simclr_path.samples import case_clash, formula_problem

    for name in classes:  # class names become CSV cells and column names (prob_<class>)
        problem = formula_problem(name, "class folder")
        if problem:
            raise SimclrPathError(f"{folder / name}: {problem}")
    clash = case_clash(classes)
    if clash:
        raise SimclrPathError(f"{folder}: class folders {clash[0]!r} and {clash[1]!r} differ only "
                              "in case (one class spelt two ways?); merge them into one folder, "
                              "or name them apart")
    if not classes:
        raise SimclrPathError(f"{folder}: no class subfolders; put the tiles of each class in "
                              f"its own subfolder (e.g. {folder}/SCC/*.png, {folder}/normal/*.png)")
    tiles: list[tuple[str, int]] = []
    skipped: list[str] = []
    broken: list[Path] = []  # links whose target is gone: a tile lost without a word
    for label, name in enumerate(classes):
        found = [p.relative_to(folder)
                 for p in _files_under(folder / name, broken, above, top=folder)]
        found = [r for r in found if not any(part.startswith(".") for part in r.parts)]
        files = sorted((r.as_posix() for r in found if _is_tile(r)), key=_nfc)
        skipped += [r.as_posix() for r in found if r.suffix.lower() in OTHER_IMAGES]
        for f in files:  # names are stored as UTF-8 text in the store
            try:
                f.encode("utf-8")
            except UnicodeEncodeError:
                raise SimclrPathError(f"{folder / f!s}: file name is not valid UTF-8 (e.g. from a "
                                      "Latin-1 zip); rename it") from None
        if not files:  # a class without tiles would be a class the classifier never sees
            other = [f for f in skipped if f.split("/", 1)[0] == name]
            gone = [b for b in broken if b.relative_to(folder).parts[0] == name]
            why = (f" (only {len(other)} file(s) of unsupported formats, e.g. {other[0]}: convert "
                   f"them to PNG)" if other else
                   f" (only {len(gone)} link(s) whose target is gone, e.g. "
                   f"{gone[0].relative_to(folder).as_posix()})" if gone else "")
            raise SimclrPathError(f"{folder / name}: class folder has no {FORMATS} tiles{why}; add "
                                  "its tiles or remove the folder")
        tiles += [(f, label) for f in files]
    if above:
        names = sorted((b.relative_to(folder).as_posix() for b in above), key=_nfc)
        warnings.warn(f"{folder}: {len(names)} link(s) to a folder above them not followed (e.g. "
                      f"{names[0]}): they would take in the tiles of every class, or loop; "
                      "link the tile folders themselves", stacklevel=2)
    if broken:
        names = sorted((b.relative_to(folder).as_posix() for b in broken), key=_nfc)
        warnings.warn(f"{folder}: {len(names)} link(s) whose target is gone skipped (e.g. "
                      f"{names[0]}); restore their targets or remove the links", stacklevel=2)
    if skipped:
        skipped.sort(key=_nfc)
        warnings.warn(f"{folder}: {len(skipped)} image file(s) of unsupported formats skipped "
                      f"(e.g. {skipped[0]}); import reads {FORMATS}: convert them to import them",
                      stacklevel=2)
    if not tiles:
        raise SimclrPathError(f"{folder}: no {FORMATS} tiles in the class subfolders "
                              f"{', '.join(classes)}")
    return classes, tiles


def read_groups(csv: str | os.PathLike, tiles: list[str]) -> list[str]:
    """Group of each tile from a CSV with columns ``path`` (relative to the folder) and ``group``."""
    import pandas as pd

    p = Path(csv)
    if p.is_dir():
        raise SimclrPathError(f"{p}: is a folder; give the groups CSV file (columns path, group)")
    need_file(p, "groups CSV")
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
    from simclr_path.samples import formula_problem

    for i, g in enumerate(groups):  # groups are the patients of the predictions CSVs
        problem = formula_problem(g, "group")
        if problem:
            raise SimclrPathError(f"{p}: row {i + 2}: {problem}")
    mapping = dict(zip(paths.map(_nfc), groups))
    absent = [t for t in tiles if not mapping.get(_nfc(t))]
    if absent:
        raise SimclrPathError(f"{p}: no group for {len(absent)} tile(s), e.g. {absent[0]!r}; add a "
                              "row path,group for every tile (path relative to the folder)")
    return [mapping[_nfc(t)] for t in tiles]


# a tile is one training image: larger sides are a typo, and would allocate gigabytes per tile
MAX_PATCH_SIZE = 4096
MIN_PATCH_SIZE = 8  # tile's and the image sizes' least too


_PNG = b"\x89PNG\r\n\x1a\n"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _on_white(buf: np.ndarray) -> np.ndarray | None:
    """RGB uint8 of an 8-bit image with transparency (alpha channel or a transparent palette
    colour), composited onto white, as slide background is; None for an image without (OpenCV's
    decoder, which drops alpha and would leave transparent pixels black, reads those)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:  # reads the header only
            if im.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in im.info:
                return None
            if im.mode.startswith(("I", "F")):  # 16-bit / float: Pillow would clip, not scale
                return None
            rgba = np.asarray(ImageOps.exif_transpose(im).convert("RGBA"), dtype=np.float32)
    except Exception:  # noqa: BLE001 -- not an image Pillow reads: OpenCV decides
        return None
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _sixteen_bit(path: Path, buf: np.ndarray | None = None) -> str | None:
    """``"png"`` or ``"tiff"`` when a tile holds 16-bit unsigned samples, from its header alone
    (PNG IHDR; TIFF BitsPerSample and SampleFormat, via tifffile), else None. ``buf``: the
    file's bytes when already read (the import), else only the header is read (the scan)."""
    try:
        if buf is None:
            with open(path, "rb") as fh:
                head = fh.read(26)
        else:
            head = buf[:26].tobytes()
        if head[:8] == _PNG:
            return "png" if len(head) > 24 and head[24] == 16 else None
        if head[:4] in _TIFF:
            import tifffile

            src = path if buf is None else io.BytesIO(buf.tobytes())
            with tifffile.TiffFile(src) as tf:  # reads the first IFD, not the pixels
                page = tf.pages.first
                return ("tiff" if page.bitspersample == 16 and page.sampleformat == 1
                        and page.photometric in (0, 1, 2) else None)  # grey or RGB, not CMYK
    except Exception:  # noqa: BLE001 -- unreadable here: the decoder reports it when importing
        return None
    return None


def _tiff_samples(buf: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], int]:
    """The first page of a TIFF through tifffile: samples (h, w, S), its ExtraSamples and its
    Photometric tag."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(buf.tobytes())) as tf:
        page = tf.pages.first
        arr = page.asarray()
        if page.planarconfig == 2 and arr.ndim == 3:  # separate planes: (S, h, w)
            arr = np.moveaxis(arr, 0, -1)
        return arr.reshape(*arr.shape[:2], -1), tuple(page.extrasamples or ()), int(page.photometric)


def _decode16(path: Path, kind: str,
              buf: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, bool, bool]:
    """A 16-bit tile's RGB samples (h, w, 3) uint16, its alpha (h, w, 1) float32 in 0-1 or
    None, whether the colour is premultiplied by the alpha (TIFF associated alpha) and whether
    the samples are inverted (TIFF MinIsWhite: 0 is white; inverted after scaling, because the
    depth is not known here). ``buf``: the file's bytes when already read."""
    if buf is None:  # np.fromfile: cv2.imread fails on non-ASCII paths
        buf = np.fromfile(path, dtype=np.uint8)
    img, alpha, premultiplied, inverted = None, None, False, False
    if kind == "tiff":  # tifffile: OpenCV reads planar TIFFs wrong and grey + alpha at 8 bits
        try:
            arr, extra, photometric = _tiff_samples(buf)
            colour = arr.shape[2] - len(extra)
            if extra and extra[0] in (1, 2) and colour in (1, 3):  # 1 associated, 2 straight
                alpha = arr[..., colour:colour + 1].astype(np.float32) / 65535.0
                premultiplied = extra[0] == 1
            img, inverted = arr[..., :max(colour, 1)], photometric == 0
        except Exception:  # noqa: BLE001 -- a compression tifffile lacks: OpenCV tries below
            img = None
    if img is None:
        dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if dec is None or dec.dtype != np.uint16:
            raise SimclrPathError(f"{path}: not a readable 16-bit image; remove or replace this tile")
        dec = dec.reshape(*dec.shape[:2], -1)  # OpenCV: grey, BGR or BGRA (grey + alpha too)
        if dec.shape[2] in (2, 4):
            alpha = dec[..., -1:].astype(np.float32) / 65535.0
            dec = dec[..., :-1]
        img = dec[..., ::-1] if dec.shape[2] == 3 else dec
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    # tifffile and OpenCV's IMREAD_UNCHANGED ignore the orientation tag, which 8-bit tiles
    # honour (their decoders apply it): a non-square tile would be cropped on the other axis
    turn = _ORIENT.get(_orientation(buf))
    if turn is not None:
        img = turn(img)
        alpha = turn(alpha) if alpha is not None else None
    return np.ascontiguousarray(img[..., :3]), alpha, premultiplied, inverted


# EXIF / TIFF orientation (tag 274) -> the turn that shows the image upright, on (h, w, c)
# arrays, as PIL.ImageOps.exif_transpose
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _orientation(buf: np.ndarray) -> int:
    """A file's orientation tag (1, upright, where it has none or Pillow cannot read it)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:  # the header and EXIF only
            return int(im.getexif().get(274, 1))
    except Exception:  # noqa: BLE001 -- no tag to honour
        return 1


def _depth_of(top: int) -> int:
    """The smallest camera depth whose range holds the sample ``top``."""
    return next(b for b in BIT_DEPTHS if top < 1 << b)


def _to_uint8(img: np.ndarray, bits: int | None = None, where: Path | None = None,
              stated: bool = False) -> np.ndarray:
    """8-bit samples of a decoded image. 16-bit files often hold 10-, 12- or 14-bit camera
    samples, which a plain shift by 8 bits would leave nearly black, so 16-bit samples are
    scaled from ``bits`` (the dataset's depth, see :func:`scan_depth`, or ``--bit-depth`` when
    ``stated``; None: this tile's own, from its largest sample). Float images are taken as 0-1
    (0-255 where a sample exceeds 1)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        top = int(img.max())
        if bits is None:
            bits = _depth_of(top)
        elif top >= 1 << bits:
            fix = (f"pass a larger --bit-depth (at least {_depth_of(top)}) or leave it out"
                   if stated else f"pass --bit-depth {_depth_of(top)}")
            raise SimclrPathError(f"{where}: sample {top} does not fit {bits} bits; {fix}")
        scale = 255.0 / ((1 << bits) - 1)
    elif img.dtype.kind == "f":
        img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if float(img.max()) <= 1.0 else 1.0
    else:  # signed or 32-bit integers: no brightfield camera writes them
        raise SimclrPathError(f"{where}: {img.dtype} samples are not supported; save the tile "
                              "with 8- or 16-bit unsigned (or float) samples")
    return np.clip(np.rint(img.astype(np.float32, copy=False) * scale), 0, 255).astype(np.uint8)


@dataclass
class DepthScan:
    """What :func:`scan_depth` found: how many tiles are 16-bit, and their largest sample."""

    n_tiles: int  # 16-bit tiles
    top: int = -1  # largest colour sample over them (-1: not read)
    top_tile: str | None = None  # the tile that holds it

    @property
    def bits(self) -> int | None:
        """The dataset's depth: the smallest of 8-16 bits holding ``top`` (None: no 16-bit tile)."""
        return _depth_of(self.top) if self.n_tiles and self.top >= 0 else None


def scan_depth(folder: Path, names: list[str], workers: int = 2, progress: bool = True,
               read: bool = True) -> DepthScan:
    """Find a dataset's 16-bit tiles (from their headers) and, with ``read``, the largest sample
    over all of them. One depth for the whole dataset keeps tiles comparable: a tile's own
    largest sample would brighten a genuinely dark tile 4-fold."""
    from tqdm.auto import tqdm

    def top(name: str) -> int | None:  # None: not 16-bit; -1: 16-bit, not read
        path = folder / name
        kind = _sixteen_bit(path)
        if kind is None:
            return None
        if not read:
            return -1
        buf = np.fromfile(path, dtype=np.uint8)
        _check_tile_size(path, buf)  # before decoding it
        return int(_decode16(path, kind, buf)[0].max())  # MinIsWhite too: the raw samples

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        tops = list(tqdm(pool.map(top, names), total=len(names), unit="tile",
                         desc=f"sample depth {folder.name}", disable=None if progress else True,
                         dynamic_ncols=True))
    found = [(t, n) for t, n in zip(tops, names) if t is not None]
    if not found:
        return DepthScan(0)
    t, n = max(found, key=lambda x: x[0])
    return DepthScan(len(found), t, n if t >= 0 else None)


def _read_tile(path: Path, patch_size: int | None, bits: int | None = None,
               stated: bool = False) -> np.ndarray:
    """RGB uint8 (S, S, 3); centre-cropped to a square and resized when ``patch_size`` is set;
    16-bit samples scaled from ``bits`` (see :func:`_to_uint8`), transparent pixels white."""
    img = _decode_tile(path, bits, stated)
    return img if patch_size is None else _fit(img, patch_size)


# Pixels a tile may have, read from its header before it is decoded: a 535 KB compressed
# 16000 x 16000 TIFF took 8.4 GB to decode (a decompression bomb); tiles are patches
MAX_TILE_PIXELS = 64_000_000


def _header_size(buf: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from an image's header without decoding it; None where unknown."""
    import io

    data = buf.tobytes()
    try:
        if data[:4] in _TIFF:
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tf:
                page = tf.pages[0]
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except Exception:  # noqa: BLE001 -- decoding says what is wrong with the file
        return None


def _check_tile_size(path: Path, buf: np.ndarray) -> None:
    size = _header_size(buf) if buf.size else None
    if size is not None and size[0] * size[1] > MAX_TILE_PIXELS:
        raise SimclrPathError(f"{path}: {size[0]} x {size[1]} pixels is no tile (at most "
                              f"{MAX_TILE_PIXELS // 1_000_000} million); tile the image first, "
                              "or remove it")


def _decode_tile(path: Path, bits: int | None = None, stated: bool = False) -> np.ndarray:
    """A tile's RGB uint8 (H, W, 3) as stored (see :func:`_read_tile`)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SimclrPathError(f"{path}: cannot read tile ({exc.strerror})") from None
    _check_tile_size(path, buf)
    kind = _sixteen_bit(path, buf) if buf[:3].tobytes() != b"\xff\xd8\xff" else None  # JPEG: 8 bits
    if kind is not None:
        rgb, alpha, premultiplied, inverted = _decode16(path, kind, buf)
        img = _to_uint8(rgb, bits, path, stated)
        if inverted:
            img = 255 - img
        if alpha is not None:
            c = img.astype(np.float32)
            c = c + 255.0 * (1.0 - alpha) if premultiplied else c * alpha + 255.0 * (1.0 - alpha)
            img = np.clip(np.rint(c), 0, 255).astype(np.uint8)
    else:
        img = _on_white(buf) if buf[:3].tobytes() != b"\xff\xd8\xff" else None  # JPEG: no alpha
    if img is None:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if buf.size else None
        if img is not None:
            img = cv2.cvtColor(_to_uint8(img, bits, path, stated), cv2.COLOR_BGR2RGB)
        elif buf[:4].tobytes() in _TIFF:  # e.g. float16 samples, which OpenCV refuses
            try:
                arr, _, photometric = _tiff_samples(buf)
            except Exception:  # noqa: BLE001 -- reported below as unreadable
                arr, photometric = None, -1
            if arr is not None and photometric in (1, 2) and arr.shape[2] in (1, 3, 4):
                img = _to_uint8(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3],
                                bits, path, stated)
        if img is None:
            raise SimclrPathError(f"{path}: not a readable image; remove or replace this tile")
    return img


def _fit(img: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, 3) -> (patch_size, patch_size, 3): the centre square, resized."""
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
        folder: one subfolder per class holding PNG/JPEG/TIFF/BMP/WebP tiles (nested folders allowed).
        out: patch store path (written atomically).
        patch_size: resize every tile to this side; without it all tiles must be squares of one
            size.
        groups_csv: CSV with columns ``path`` (relative to ``folder``) and ``group``; extra columns
            are ignored. Every tile needs a group.
        force: overwrite ``out``.
        progress: progress bar on stderr.
        workers: decoding threads.
        bit_depth: depth of the samples in 16-bit tiles (e.g. 12 for a 12-bit camera); None
            reads every 16-bit tile's largest sample first and takes the smallest of 8, 10,
            12, 14 and 16 bits that holds them all.

    Store: ``/patches`` (N, S, S, 3) uint8, ``/coords`` (N, 2) = -1, ``/labels`` (N,),
    ``/groups`` (N,) ("" without a CSV), ``/names`` (N,); attrs ``kind="patches"``,
    ``label_names``, ``source_path``, ``bit_depth``.
    """
    check_apart({"out": out}, {"folder": folder, "groups_csv": groups_csv})
    with _quiet_opencv():  # a bad tile gets one line from us, not OpenCV's log on top
        return _import_patches(Path(folder), out, patch_size, groups_csv, force, progress, workers,
                               bit_depth)


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    prev = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(prev)


def _import_patches(folder: Path, out: str | os.PathLike, patch_size: int | None,
                    groups_csv: str | os.PathLike | None, force: bool, progress: bool,
                    workers: int, bit_depth: int | None) -> ImportResult:
    from tqdm.auto import tqdm

    # (Python callers pass what argparse never would: 64.0 or "64" failed deep inside OpenCV)
    # the type here, the range below (in the options' words: -1 was "an integer >= 0")
    for name, value in (("patch_size", patch_size), ("bit_depth", bit_depth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise SimclrPathError(f"import_patches: {name} must be an integer, got {value!r}")
    patch_size = None if patch_size is None else int(patch_size)
    bit_depth = None if bit_depth is None else int(bit_depth)
    workers = check_int(workers, "import_patches", "workers")
    if patch_size is not None and not MIN_PATCH_SIZE <= patch_size <= MAX_PATCH_SIZE:
        raise SimclrPathError(f"--patch-size must be between {MIN_PATCH_SIZE} and {MAX_PATCH_SIZE}, "
                              f"got {patch_size}")
    if bit_depth is not None and not 8 <= bit_depth <= 16:
        raise SimclrPathError(f"--bit-depth must be between 8 and 16, got {bit_depth}")
    check_can_write(out, force)
    check_hdf5_name(out, "a patch store")
    check_replaces_kind(out, "patches")
    classes, tiles = list_tiles(folder)
    names = [t for t, _ in tiles]
    labels = np.array([lab for _, lab in tiles], dtype=np.int64)
    groups = read_groups(groups_csv, names) if groups_csv is not None else [""] * len(names)
    scan = scan_depth(folder, names, workers, progress, read=bit_depth is None)
    stated = bit_depth is not None
    bits = bit_depth if stated else scan.bits

    first = _decode_tile(folder / names[0], bits, stated)
    size = patch_size if patch_size is not None else first.shape[0]
    if patch_size is None and first.shape[0] != first.shape[1]:
        raise SimclrPathError(f"{folder / names[0]}: tile is {first.shape[1]}x{first.shape[0]}, "
                              "not square; pass --patch-size to crop and resize every tile")
    if size < MIN_PATCH_SIZE:  # as tile's and pretrain's least: nothing could train on them
        raise SimclrPathError(f"{folder / names[0]}: tile is {size}x{size} px, smaller than "
                              f"{MIN_PATCH_SIZE}; pass --patch-size to enlarge every tile")
    if size > MAX_PATCH_SIZE:
        raise SimclrPathError(f"{folder / names[0]}: tile is {size}x{size} px, larger than "
                              f"{MAX_PATCH_SIZE}; pass --patch-size to resize every tile")
    chunk_n = max(1, _CHUNK_BYTES // (size * size * 3))
    attrs = {"kind": "patches", "slide_id": _store_id(out, folder),
             "source_path": str(folder.resolve()), "mpp": None, "level0_mpp": None,
             "stride": None, "groups_csv": str(Path(groups_csv).resolve()) if groups_csv else None,
             "bit_depth": bits if scan.n_tiles else None}

    smaller: list[tuple[int, str, tuple[int, int]]] = []  # (side, name, (w, h)) of enlarged tiles

    def load(name: str) -> np.ndarray:
        img = _decode_tile(folder / name, bits, stated)
        if patch_size is not None:
            if min(img.shape[:2]) < patch_size:
                smaller.append((min(img.shape[:2]), name, (img.shape[1], img.shape[0])))
            img = _fit(img, patch_size)
        if img.shape[:2] != (size, size):
            raise SimclrPathError(
                f"{folder / name}: tile is {img.shape[1]}x{img.shape[0]} but {names[0]} is "
                f"{size}x{size}; pass --patch-size to resize every tile to one size")
        return img

    def load_hashed(name: str) -> tuple[np.ndarray, bytes]:
        # the digest in the decoding threads (hashlib releases the GIL): copies are found
        # without a serial pass over the pixels
        img = load(name)
        return img, hashlib.blake2b(img.tobytes(), digest_size=16).digest()

    bar = tqdm(total=len(names), unit="tile", desc=f"import {folder.name}",
               disable=None if progress else True, dynamic_ncols=True)
    seen: dict[bytes, list[int]] = {}  # pixel digest -> the tiles with those pixels so far
    # (earlier tile, copy): every earlier one, so that a copy is checked against each of them
    # (one in another class must not hide one in another group)
    copies: list[tuple[int, int]] = []
    try:
        with PatchStoreWriter(out, size, attrs=attrs, label_names=classes, force=force) as w, \
                ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for lo in range(0, len(names), chunk_n):
                chunk = names[lo:lo + chunk_n]
                done = list(pool.map(load_hashed, chunk))
                patches = np.stack([img for img, _ in done])
                for i, (_, digest) in enumerate(done, lo):
                    earlier = seen.setdefault(digest, [])
                    copies += [(j, i) for j in earlier]
                    earlier.append(i)
                w.append(patches, np.full((len(chunk), 2), -1, dtype=np.int64),
                         labels=labels[lo:lo + chunk_n], groups=groups[lo:lo + chunk_n],
                         names=chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    n_groups = len(set(groups)) if groups_csv is not None else 0
    _warn_copies(folder, names, labels, groups, classes, copies)
    if smaller:
        side, name, (w, h) = min(smaller)
        # --patch-size has a floor: below it the advice is to look at the tile, not the option
        fix = (f"give --patch-size {side} or less to keep the tiles' pixels"
               if side >= MIN_PATCH_SIZE else
               f"a tile under {MIN_PATCH_SIZE} px is hardly tissue: check {name} (a damaged file "
               "or an icon?) and remove it")
        warnings.warn(f"{folder}: {len(smaller)} tile(s) smaller than --patch-size {patch_size} "
                      f"were enlarged (the smallest, {name}, is {w}x{h} px: {patch_size / side:.2g}x),"
                      f" which adds no detail and makes every step slower; {fix}", stacklevel=2)
    return ImportResult(Path(out), len(names), size, classes, counts, n_groups,
                        bits if scan.n_tiles else None, scan.top_tile,
                        len({b for _, b in copies}))


def _warn_copies(folder: Path, names: list[str], labels: np.ndarray, groups: list[str],
                 classes: list[str], copies: list[tuple[int, int]]) -> None:
    """One warning per kind of pixel-identical tile pair: across classes (one image, two
    labels), across groups (a grouped split can put the copies on both sides of it, which
    inflates the test figures) and within one group (the image weighs double)."""
    kinds = [
        ([(a, b) for a, b in copies if labels[a] != labels[b]],
         lambda a, b: f"{classes[labels[a]]} and {classes[labels[b]]}",
         "of another class: one image cannot carry two labels; keep the right copy"),
        ([(a, b) for a, b in copies if labels[a] == labels[b] and groups[a] != groups[b]],
         lambda a, b: f"groups {groups[a]!r} and {groups[b]!r}",
         ("of another group: a grouped split can put the copies on both sides and inflate the "
         "test figures; remove one copy or give both one group")),
        ([(a, b) for a, b in copies if labels[a] == labels[b] and groups[a] == groups[b]],
         lambda a, b: f"group {groups[a]!r}" if groups[a] else classes[labels[a]],
         "in the same class: the image weighs double in training and evaluation; remove one copy"),
    ]
    for pairs, where, what in kinds:
        if pairs:
            a, b = pairs[0]
            n = len({b for _, b in pairs})  # tiles with such an earlier copy
            warnings.warn(f"{folder}: {n} tile(s) are pixel-identical to a tile {what} "
                          f"(first: {names[a]} and {names[b]}, {where(a, b)})", stacklevel=4)


def _store_id(out: str | os.PathLike, folder: Path) -> str:
    """The store's id: the output file's stem when it is a safe name, else the folder's name."""
    from simclr_path.slide import validate_slide_id

    for cand in (Path(out).stem, folder.resolve().name):
        try:
            return validate_slide_id(cand)
        except SimclrPathError:
            continue
    return "patches"
