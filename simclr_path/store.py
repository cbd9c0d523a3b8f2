"""HDF5 formats shared by every stage: the patch store and the embedding store.

Patch store (format_version 2; 1 wrote None attributes as the text "none")::

    /patches   uint8  (N, S, S, 3)  RGB patches, one patch per chunk, LZF-compressed
    /coords    int64  (N, 2)        level-0 top-left (x, y) of each patch; (-1, -1) for imported tiles
    /labels    int64  (N,)          optional: class index into attribute ``label_names``
    /groups    str    (N,)          optional: group (patient / source image) of each patch
    /names     str    (N,)          optional: source file of each imported tile
    /thumbnail uint8  (h, w, 3)     optional: the whole slide, longer side <= 1024 px (tiled
                                    slides; heatmaps are drawn on it without the slide file)
    attrs: format_version, kind ("slide" | "patches"), slide_id, source_path, level0_mpp, mpp,
           mpp_effective (tiled slides: the patches' exact um/px, within 2 % of mpp: a level that
           close is read without resampling), bounds_x, bounds_y (top-left of the scanned region
           in level-0 pixels, where the slide states them: MIRAX, Leica...; coords are in OpenSlide's
           level-0 frame, which includes that offset), patch_size, stride, tissue parameters
           (``tissue.*``), simclr_path_version, n_patches

LZF with one patch per chunk: a random read decompresses exactly one patch, and LZF decodes at
several hundred MB/s (gzip is 3-5x slower to read), which keeps the training loader fed.

Embedding store (format_version 2, as the patch store)::

    /features  float32 (N, D)
    /coords    int64   (N, 2)
    /labels, /groups   as in the patch store, when the source store has them
    attrs: format_version, slide_id, source_store, encoder_sha256, layer, image_size, ...

Both are written to a temporary name and renamed when complete (:mod:`simclr_path.outputs`).
"""

from __future__ import annotations

import errno
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from simclr_path import __version__
from simclr_path.errors import SimclrPathError, need_file
from simclr_path.outputs import atomic_output, raise_pending_signal

# 2: None is an empty attribute (format 1 wrote the string "none", so a string "none" read back as None)
FORMAT_VERSION = 2
_STR = h5py.string_dtype("utf-8")


def _attr_value(v: Any) -> Any:
    """HDF5 attributes cannot hold None or nested containers: None becomes an empty attribute,
    anything else that is not a number, a string or a list of strings its text."""
    if v is None:
        return h5py.Empty("f")
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return np.array(v, dtype=_STR)
    if isinstance(v, (bool, int, float, str, np.bool_, np.integer, np.floating)):
        return v
    return str(v)


def read_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """A store's HDF5 attributes as Python values (None, str, list[str], numbers)."""
    try:
        legacy = int(attrs.get("format_version", FORMAT_VERSION)) < 2
    except (TypeError, ValueError):  # not a store of ours: its callers say so
        legacy = False
    return {k: _read_attr(v, legacy) for k, v in attrs.items()}


# the ``kind`` attribute of the project's HDF5 files, as messages name them
KINDS = {"slide": "a patch store of a tiled slide", "patches": "a patch store of imported tiles",
         "embeddings": "an embedding file"}


def check_replaces_kind(path: str | os.PathLike, kind: str) -> None:
    """``--force`` replaces an existing HDF5 output only if it is of ``kind`` (a key of
    :data:`KINDS`, its ``kind`` attribute): a mistyped ``--out`` must not turn a slide's patch
    store into an embedding file."""
    p = Path(path)
    if not p.is_file():
        return
    if not h5py.is_hdf5(p):
        found = None
        why = "is not an HDF5 file"
    else:
        try:
            with h5py.File(p, "r") as f:
                found = read_attrs(f.attrs).get("kind")
        except Exception as exc:  # noqa: BLE001 - h5py raises several types for a damaged file
            raise SimclrPathError(f"{p}: exists and cannot be read as an HDF5 file ({exc}); "
                                  "--force only replaces this command's own outputs, so delete it "
                                  "yourself if it is a damaged one, or choose another path") from None
        why = (f"is {KINDS[found]}" if found in KINDS else
               "is an HDF5 file that simclr-path did not write")
    if found != kind:
        raise SimclrPathError(f"{p}: {why}, not {KINDS[kind]}; --force only replaces this "
                              "command's own outputs, so choose another path")


def _check_version(path: Path, attrs: dict[str, Any], what: str) -> None:
    v = attrs.get("format_version")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise SimclrPathError(f"{path}: format_version {v!r} is not a version number; recreate the "
                              "file with simclr-path (--force)")
    if int(v) > FORMAT_VERSION:
        raise SimclrPathError(f"{path}: {what} format {int(v)} is newer than this simclr-path "
                              f"({FORMAT_VERSION}); upgrade simclr-path")


def _read_attr(v: Any, legacy: bool = False) -> Any:
    if isinstance(v, h5py.Empty):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")  # a foreign file's bytes: shown, not a crash
    if legacy and isinstance(v, str) and v == "none":
        return None
    if isinstance(v, np.ndarray) and v.dtype.kind in ("O", "S", "U"):
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# what reading a foreign or hand-made file can raise (a group where a dataset belongs, text
# where numbers do): each is "damaged", one line
_DAMAGED = (OSError, KeyError, TypeError, ValueError, AttributeError)


def _read_groups(f: h5py.File) -> list[str]:
    return [g.decode("utf-8", "replace") if isinstance(g, bytes) else str(g) for g in f["groups"][:]]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _patch_layout_problem(shape: tuple, dtype, coords_shape: tuple, size: Any,
                          mpp: Any) -> str | None:
    """What is wrong with a patch store's /patches and /coords shapes and its patch_size and
    mpp attributes (None: nothing): a file written by other code, checked before any read."""
    if not _is_int(size) or not 1 <= int(size) <= 4096:
        return f"attribute patch_size is {size!r}, not a whole number between 1 and 4096"
    s = int(size)
    if len(shape) != 4 or tuple(shape[1:]) != (s, s, 3) or dtype != np.uint8:
        return f"/patches holds {dtype} of shape {tuple(shape)}, expected (N, {s}, {s}, 3) uint8"
    if tuple(coords_shape) != (shape[0], 2):
        return f"/coords has shape {tuple(coords_shape)}, expected ({shape[0]}, 2)"
    if mpp is not None and (isinstance(mpp, (bool, np.bool_)) or not isinstance(
            mpp, (int, float, np.integer, np.floating)) or not np.isfinite(mpp) or mpp <= 0):
        return f"attribute mpp is {mpp!r}, not a positive number of microns per pixel"
    return None


def layout_problem(n: int, labels: np.ndarray | None, groups: list[str] | None,
                    attrs: dict[str, Any]) -> str | None:
    """What is wrong with a store's or embedding file's labels, groups and class names for
    ``n`` patches (None: nothing), before a reader fails deep inside numpy."""
    names = attrs.get("label_names")
    if labels is not None and (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)):
        return f"/labels holds {labels.dtype} of shape {labels.shape}, expected {n} integers"
    if groups is not None and len(groups) != n:
        return f"/groups holds {len(groups)} entries for {n} patches"
    if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        return f"attribute label_names is {names!r}, expected a list of class names"
    # text attributes the stages compare between files: an array there (a file written by other
    # code) was a numpy traceback ("truth value of an array is ambiguous")
    for key in ("slide_id", "layer", "arch", "encoder_sha256", "kind", "store_kind"):
        v = attrs.get(key)
        if v is not None and not isinstance(v, str):
            return f"attribute {key} is {v!r}, expected text"
    # (a negative index is the readers' own check: info says what it is)
    if labels is not None and len(labels) and names and labels.max() >= len(names):
        return (f"/labels holds class index {int(labels.max())} but label_names has "
                f"{len(names)} classes")
    # text that becomes cells of the CSVs the project writes must not be a spreadsheet formula
    # (a store from elsewhere; the project's writers refuse such names)
    from simclr_path.samples import FORMULA_START, formula_problem

    sid = attrs.get("slide_id")
    for what, values in (("slide_id", [sid] if isinstance(sid, str) else []),
                         ("class name", names or []), ("group", groups or [])):
        for v in values:  # the cheap test first: groups may be millions
            if str(v).startswith(FORMULA_START) and (problem := formula_problem(v, what)):
                return problem
    return None


def encode_patch(patch: np.ndarray) -> tuple[bytes, int]:
    """One (S, S, 3) uint8 patch as a ``/patches`` chunk: (LZF bytes, 0), or (raw bytes, 1) when
    LZF does not shrink it (filter mask 1 = LZF skipped, as h5py's filter does). Releases the GIL,
    so writers can compress in parallel threads (:meth:`PatchStoreWriter.append_encoded`)."""
    import imagecodecs

    raw = np.ascontiguousarray(patch, dtype=np.uint8).tobytes()
    data = imagecodecs.lzf_encode(raw)
    return (data, 0) if len(data) < len(raw) else (raw, 1)


THUMBNAIL_SIDE = 1024  # longer side of a store's slide thumbnail (heatmaps' default size)


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` (h, w, 3) uint8 with its longer side at most ``side`` (box filter: an area
    average, as for a downsampled slide level)."""
    from PIL import Image

    h, w = image.shape[:2]
    f = side / max(h, w)
    if f >= 1:
        return image
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


class PatchStoreWriter:
    """Append patches to a new store; the file appears under its final name only on success.

    Use as a context manager::

        with PatchStoreWriter("S1.h5", patch_size=224, attrs={...}) as w:
            w.append(patches, coords)             # patches: (n, S, S, 3) uint8, coords: (n, 2)

    Args:
        path: final store path.
        patch_size: side S of every patch.
        attrs: metadata written as HDF5 attributes (None becomes an empty attribute).
        label_names: class names when patches carry labels (imported patch sets).
        force: overwrite an existing file.
    """

    def __init__(self, path: str | os.PathLike, patch_size: int, attrs: Mapping[str, Any] | None = None,
                 label_names: Sequence[str] | None = None, force: bool = False) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.path = Path(path)
        self.patch_size = int(patch_size)
        self.attrs = dict(attrs or {})
        self.label_names = list(label_names) if label_names is not None else None
        self.force = force
        self._ctx = None
        self._f: h5py.File | None = None
        self.n = 0

    def __enter__(self) -> PatchStoreWriter:  # noqa: PYI034  (final classes)
        self._ctx = atomic_output(self.path, force=self.force)
        tmp = self._ctx.__enter__()
        try:
            self._f = h5py.File(tmp, "w")
            s = self.patch_size
            self._f.create_dataset("patches", shape=(0, s, s, 3), maxshape=(None, s, s, 3),
                                   dtype=np.uint8, chunks=(1, s, s, 3), compression="lzf")
            self._f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64,
                                   chunks=(4096, 2))
            if self.label_names is not None:
                for name, dtype in (("labels", np.int64), ("groups", _STR), ("names", _STR)):
                    self._f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                           chunks=(4096,))
        except BaseException as err:  # no temporary file left behind
            if self._f is not None:
                self._f.close()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def append(self, patches: np.ndarray, coords: np.ndarray, labels: np.ndarray | None = None,
               groups: Sequence[str] | None = None, names: Sequence[str] | None = None) -> None:
        """Append ``patches`` (n, S, S, 3) uint8 with ``coords`` (n, 2) level-0 (x, y)."""
        assert self._f is not None, "use PatchStoreWriter as a context manager"
        patches = np.asarray(patches)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(patches)
        if n == 0:
            return
        if patches.shape[1:] != (self.patch_size, self.patch_size, 3) or patches.dtype != np.uint8:
            raise ValueError(f"patches must be (n, {self.patch_size}, {self.patch_size}, 3) uint8, "
                             f"got {patches.shape} {patches.dtype}")
        if len(coords) != n:
            raise ValueError("patches and coords differ in length")
        lo, hi = self.n, self.n + n
        for name, data in (("patches", patches), ("coords", coords)):
            ds = self._f[name]
            ds.resize(hi, axis=0)
            ds[lo:hi] = data
        if self.label_names is not None:
            if labels is None:
                raise ValueError("this store has labels: pass labels with every append")
            extra = {"labels": np.asarray(labels, dtype=np.int64),
                     "groups": list(groups) if groups is not None else [""] * n,
                     "names": list(names) if names is not None else [""] * n}
            for name, data in extra.items():
                ds = self._f[name]
                ds.resize(hi, axis=0)
                ds[lo:hi] = data
        self.n = hi

    def set_thumbnail(self, image: np.ndarray) -> None:
        """Store a picture of the whole slide: (h, w, 3) uint8, covering level-0 (0, 0) to
        (slide_width, slide_height); shrunk to a longer side of ``THUMBNAIL_SIDE``."""
        assert self._f is not None, "use PatchStoreWriter as a context manager"
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"thumbnail must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
        image = shrink(image, THUMBNAIL_SIDE)
        if "thumbnail" in self._f:
            del self._f["thumbnail"]
        self._f.create_dataset("thumbnail", data=image, compression="gzip", compression_opts=4)

    def append_encoded(self, chunks: Sequence[tuple[bytes, int]], coords: np.ndarray) -> None:
        """Append patches already compressed by :func:`encode_patch` (e.g. in worker threads).

        ``chunks``: one ``(data, filter_mask)`` per patch; ``coords``: (n, 2) level-0 (x, y).
        Stores without labels only.
        """
        assert self._f is not None and self.label_names is None
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(chunks)
        if n == 0:
            return
        if len(coords) != n:
            raise ValueError("chunks and coords differ in length")
        lo, hi = self.n, self.n + n
        ds = self._f["patches"]
        ds.resize(hi, axis=0)
        for i, (data, mask) in enumerate(chunks):
            ds.id.write_direct_chunk((lo + i, 0, 0, 0), data, filter_mask=mask)
        c = self._f["coords"]
        c.resize(hi, axis=0)
        c[lo:hi] = coords
        self.n = hi

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._f is not None and self._ctx is not None
        try:
            try:
                if exc_type is None:
                    raise_pending_signal()  # one discarded while h5py wrote: no complete store
                    attrs = {"format_version": FORMAT_VERSION, "simclr_path_version": __version__,
                             "patch_size": self.patch_size, "n_patches": self.n, **self.attrs}
                    if self.label_names is not None:
                        attrs["label_names"] = self.label_names
                    for k, v in attrs.items():
                        self._f.attrs[k] = _attr_value(v)
            finally:
                self._f.close()
        except BaseException as err:  # e.g. a full disk on the last flush: remove the temporary file
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def open_h5(path: str | os.PathLike, what: str = "HDF5 file") -> h5py.File:
    """``path`` opened read-only. A file that cannot be locked or read gets one clear error; any
    other failure (a damaged or foreign file) is an OSError for the caller to word."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock file" in str(exc).lower():  # HDF5's "unable to lock file": NFS/Lustre, a live writer
            raise SimclrPathError(f"{path}: cannot lock the {what} ({exc}); if its file system has "
                                  "no file locks, set HDF5_USE_FILE_LOCKING=FALSE") from None
        if not os.access(path, os.R_OK):
            raise SimclrPathError(f"{path}: cannot read the {what} (permission denied); check "
                                  "the file's permissions") from None
        raise


def damaged_rows(path: str | os.PathLike, progress: bool = True) -> dict[str, list[tuple[int, int]]]:
    """Every data set of the HDF5 file at ``path`` read chunk by chunk: the row ranges
    (first, last; inclusive) of each whose chunks cannot be decoded (a disk or copy error that
    only a read finds: opening the file and its metadata do not), or of floating-point data,
    whose rows hold values no writer gives (:func:`unusable_rows`). Empty when all read."""
    from tqdm.auto import tqdm

    damaged: dict[str, list[tuple[int, int]]] = {}
    with open_h5(path) as f:
        sets = [ds for ds in f.values() if isinstance(ds, h5py.Dataset) and ds.size]
        total = sum(ds.size * ds.dtype.itemsize for ds in sets)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"check {Path(path).name}",
                  disable=None if progress else True, leave=False) as bar:
            for ds in sets:
                name = ds.name.lstrip("/")
                # a chunk at a time, so one bad chunk names its own rows, not the whole set
                parts = ds.iter_chunks() if ds.chunks else [tuple(slice(0, n) for n in ds.shape)]
                for sel in parts:
                    rows = sel[0] if ds.ndim else slice(0, 1)
                    try:
                        block = ds[sel]
                    except OSError:
                        damaged.setdefault(name, []).append((rows.start, rows.stop - 1))
                        block = None
                    if block is not None and block.dtype.kind == "f" and ds.ndim:
                        # features written before their chunks had checksums (and foreign
                        # files): damage reads as values embed never writes (random bytes are
                        # NaN, inf or beyond 1e12 in nearly every row of 64 or more features)
                        bad = unusable_rows(block.reshape(len(block), -1))
                        damaged.setdefault(name, []).extend(
                            (rows.start + int(i), rows.start + int(i)) for i in np.flatnonzero(bad))
                    size = np.prod([r.stop - r.start for r in sel]) if ds.ndim else 1
                    bar.update(int(size) * ds.dtype.itemsize)
                    del block
    # chunks side by side along the rows (one patch's chunks) merge into one range
    for name, ranges in list(damaged.items()):
        if not ranges:
            del damaged[name]
            continue
        merged: list[tuple[int, int]] = []
        for a, b in sorted(set(ranges)):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        damaged[name] = merged
    return damaged


def _max_open_files() -> int:
    """How many store files one process keeps open at once: its open-file limit (raised to the
    hard limit where the soft one is lower, as a cohort of 1000+ slides needs) less a reserve
    for everything else a process opens (libraries, sockets, pipes to workers)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit for files opened by the C runtime here
        return 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    # no higher than this process can use (children inherit it); macOS refuses more than
    # kern.maxfilesperproc (10240) even where the hard limit says unlimited
    for want in (65536 + 256, 10240):
        want = want if hard == inf else min(want, hard)
        if soft != inf and want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
            break
        except (ValueError, OSError):
            continue
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(16, min(65536, soft - 256) if soft > 512 else soft // 2)


# The stores whose file this process holds open, least recently used first (cleared in a forked
# worker, whose inherited handles belong to the parent). Beyond the limit the oldest is closed
# and reopened when next read: the open-file limit (1024 on many systems) stopped pretraining
# on a cohort of 1100 stores with "Too many open files".
_OPEN: OrderedDict[int, weakref.ref[_LazyH5]] = OrderedDict()  # weak: a dropped store closes
_OPEN_PID: list[int] = [0]
_MAX_OPEN: list[int] = []  # computed on first use (it may raise the soft limit)


def _track_open(h5: _LazyH5) -> None:
    if _OPEN_PID[0] != os.getpid():
        # a forked child: drop the handles it inherited (h5py closes its copies), or it would
        # hold the parent's share of the limit on top of its own
        for ref in _OPEN.values():
            other = ref()
            if other is not None and other._pid != os.getpid():
                other._f = None
        _OPEN.clear()
        _OPEN_PID[0] = os.getpid()
    if not _MAX_OPEN:
        _MAX_OPEN.append(_max_open_files())
    _OPEN[id(h5)] = weakref.ref(h5)
    _OPEN.move_to_end(id(h5))
    while len(_OPEN) > _MAX_OPEN[0]:
        _, ref = _OPEN.popitem(last=False)
        oldest = ref()
        if oldest is not None:
            oldest.close()


def close_open_files() -> None:
    """Close every store file this process holds open (each reopens when next read): before
    forking loader workers, which would otherwise inherit them on top of their own."""
    if _OPEN_PID[0] != os.getpid():
        return
    for ref in list(_OPEN.values()):
        h5 = ref()
        if h5 is not None:
            h5.close()
    _OPEN.clear()


class _LazyH5:
    """An HDF5 file opened on first use in each process, so DataLoader workers never share a
    handle; at most :func:`_max_open_files` of them are open in a process at once."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self._what = what
        self._f: h5py.File | None = None
        self._pid: int | None = None
        if self.path.is_dir():
            thing = what if what.endswith("file") else f"{what} file"
            raise SimclrPathError(f"{self.path}: is a folder; give the {thing} (.h5)")
        need_file(self.path, what)
        self._open()  # validate now, in the parent, so errors surface before any worker starts

    def _open(self) -> h5py.File:
        try:
            f = open_h5(self.path, self._what)
        except OSError as exc:
            if getattr(exc, "errno", None) in (errno.EMFILE, errno.ENFILE) \
                    or "Too many open files" in str(exc):
                raise SimclrPathError(
                    f"{self.path}: too many open files; raise the limit (ulimit -n 4096) or "
                    "give fewer stores to one command") from None
            if not h5py.is_hdf5(self.path):  # no HDF5 signature: a slide or image given, say
                made = ("'simclr-path embed' writes one from a patch store"
                        if "embedding" in self._what else
                        "a slide is tiled into one by 'simclr-path tile'")
                raise SimclrPathError(
                    f"{self.path}: not an HDF5 file; give the {self._what} (.h5) that "
                    f"simclr-path wrote ({made})") from None
            raise SimclrPathError(f"{self.path}: not a readable HDF5 {self._what} ({exc}); "
                                  "it may be truncated: recreate it with --force") from None
        self._f, self._pid = f, os.getpid()
        _track_open(self)
        return f

    @property
    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            return self._open()
        if id(self) in _OPEN:
            _OPEN.move_to_end(id(self))  # most recently used: the last to be closed
        return self._f

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
            _OPEN.pop(id(self), None)
        self._f = None

    def __del__(self) -> None:  # a store dropped unclosed leaves the open list (h5py closes it)
        ref = _OPEN.get(id(self))
        if ref is not None and ref() in (self, None):
            _OPEN.pop(id(self), None)

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-started workers
        return {"path": self.path, "_what": self._what, "_f": None, "_pid": None}


class PatchStore:
    """Read a patch store: ``len(store)``, ``store[i]`` -> (S, S, 3) uint8, ``store[a:b]``, metadata.

    The file is opened lazily per process, so a store can be handed to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._h5 = _LazyH5(path, "patch store")
        f = self._h5.file
        missing = [k for k in ("patches", "coords") if k not in f]
        if missing or "format_version" not in f.attrs:
            raise SimclrPathError(f"{self.path}: not a simclr-path patch store (missing "
                                  f"{', '.join(missing) or 'format_version'}); create it with "
                                  "'simclr-path tile' or 'simclr-path import-patches'")
        try:
            self.attrs: dict[str, Any] = read_attrs(f.attrs)
            _check_version(self.path, self.attrs, "store")  # before what a version may change
            shape, dtype = f["patches"].shape, f["patches"].dtype
            self._len = int(shape[0]) if len(shape) else 0
            size = self.attrs.get("patch_size")
            # the shapes before any read: a crafted /coords of 1e11 rows was allocated
            problem = _patch_layout_problem(shape, dtype, f["coords"].shape, size,
                                            self.attrs.get("mpp"))
            if problem is None:  # the arrays are read only once their shapes are sane
                self.coords: np.ndarray = f["coords"][:]
                self.labels: np.ndarray | None = f["labels"][:] if "labels" in f else None
                self.groups: list[str] | None = _read_groups(f) if "groups" in f else None
        except _DAMAGED as exc:
            raise SimclrPathError(f"{self.path}: patch store is damaged ({exc}); recreate it with --force") from None
        problem = problem or layout_problem(self._len, self.labels, self.groups, self.attrs)
        if problem:
            raise SimclrPathError(f"{self.path}: not a valid patch store: {problem}; recreate it "
                                  "with 'simclr-path tile' or 'import-patches' (--force)")

    @property
    def path(self) -> Path:
        return self._h5.path

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or self.path.stem)

    @property
    def mpp(self) -> float | None:
        return self.attrs.get("mpp")

    @property
    def label_names(self) -> list[str] | None:
        return self.attrs.get("label_names")

    @property
    def names(self) -> list[str] | None:
        f = self._h5.file
        if "names" not in f:
            return None
        return [n.decode() if isinstance(n, bytes) else n for n in f["names"][:]]

    @property
    def thumbnail(self) -> np.ndarray | None:
        """The stored picture of the whole slide, (h, w, 3) uint8, or None (imported tiles,
        stores written before it was stored)."""
        f = self._h5.file
        if "thumbnail" not in f:
            return None
        try:
            return f["thumbnail"][:]
        except OSError as exc:
            raise self.damaged("its slide thumbnail", exc) from None

    def damaged(self, what: str, exc: BaseException) -> SimclrPathError:
        """The error for data that cannot be decoded (a damaged chunk: a disk or copy error),
        which h5py and the LZF codec report as a traceback deep inside a stage."""
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        return SimclrPathError(f"{self.path}: {what} cannot be read ({detail}): the file is "
                               f"damaged ('simclr-path info {self.path} --check' names every "
                               "damaged row); make it again ('simclr-path tile' or "
                               "'import-patches' with --force)")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int | slice | np.ndarray) -> np.ndarray:
        """``int`` -> (S, S, 3); ``slice``, index array or boolean mask (N,) -> (n, S, S, 3), uint8
        RGB."""
        try:
            return self._read(idx)
        except OSError as exc:
            # a read of many patches fails as a whole: which of them is damaged, it cannot say
            what = (f"patch {_which(idx, self._len)}" if isinstance(idx, (int, np.integer))
                    else f"one or more of patches {_which(idx, self._len)}")
            raise self.damaged(what, exc) from None

    def _read(self, idx: int | slice | np.ndarray) -> np.ndarray:
        ds = self._h5.file["patches"]
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            if i < 0:
                i += self._len
            if not 0 <= i < self._len:
                raise IndexError(idx)
            return ds[i]
        if isinstance(idx, slice):
            return ds[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:  # a mask (as numpy): cast to int64 it would read rows 0 and 1
            if idx.shape != (self._len,):
                raise IndexError(f"a boolean mask of shape {idx.shape} for {self._len} patches")
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"patch indices must be integers or a boolean mask, got {idx.dtype}")
        idx = idx.astype(np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5py needs increasing unique indices
        return ds[uniq][inverse]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> PatchStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, n={len(self)}, patch_size={self.patch_size})"


# features an encoder writes are O(1)-O(1e4); at 3e38 (float32's largest) sklearn's float32 sums
# overflow into ~300 lines of warnings and NaN scores, so a damaged or foreign file stops at once
MAX_FEATURE_MAGNITUDE = 1e12
BAD_FEATURES = f"NaN, infinite or implausibly large (above {MAX_FEATURE_MAGNITUDE:.0e}) features"


def unusable_rows(features: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of ``features`` (N, D) that hold NaN, inf or values beyond
    :data:`MAX_FEATURE_MAGNITUDE` (``BAD_FEATURES`` words it for a message)."""
    f = np.asarray(features)
    if f.size == 0:
        return np.zeros(len(f), dtype=bool)
    if f.dtype.itemsize < 4:  # float16 (a foreign file): 1e12 does not fit it
        f = f.astype(np.float32)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & (np.abs(f) <= MAX_FEATURE_MAGNITUDE)
    return ~ok.reshape(len(f), -1).all(axis=1)


def _which(idx: Any, n: int) -> str:
    """A short description of the indices ``idx`` of ``n`` patches for an error message."""
    if isinstance(idx, (int, np.integer)):
        return str(int(idx))
    if isinstance(idx, slice):
        idx = np.arange(*idx.indices(n))
    idx = np.asarray(idx)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    return f"{int(idx.min())}-{int(idx.max())}" if idx.size else "none"


def write_embeddings(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray,
                     attrs: Mapping[str, Any], labels: np.ndarray | None = None,
                     groups: Sequence[str] | None = None, label_names: Sequence[str] | None = None,
                     force: bool = False) -> Path:
    """Write an embedding store atomically. ``features``: (N, D) float32, ``coords``: (N, 2)."""
    features = np.asarray(features, dtype=np.float32)
    chunks = ((min(max(len(features), 1), 1024), features.shape[1])
              if features.ndim == 2 and features.shape[1] > 0 and len(features) > 0 else None)
    with atomic_output(path, force=force) as tmp, h5py.File(tmp, "w") as f:
        # a checksum per chunk: damage that still reads as plausible floats is a read error
        f.create_dataset("features", data=features, chunks=chunks, fletcher32=chunks is not None)
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        if labels is not None:
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        if groups is not None:
            f.create_dataset("groups", data=list(groups), dtype=_STR)
        all_attrs = {"format_version": FORMAT_VERSION, "simclr_path_version": __version__, **attrs}
        if label_names is not None:
            all_attrs["label_names"] = list(label_names)
        for k, v in all_attrs.items():
            f.attrs[k] = _attr_value(v)
        raise_pending_signal()  # one discarded while h5py wrote: no complete file
    return Path(path)


class EmbeddingStore:
    """Read an embedding store into memory (features are small: N x D float32).

    ``features=False`` leaves the features on disk (``.features`` is None; ``.shape`` is (N, D)
    and :meth:`read_rows` reads a subset), for callers that sample a few rows of many files.
    """

    def __init__(self, path: str | os.PathLike, features: bool = True) -> None:
        h5 = _LazyH5(path, "embedding file")
        f = h5.file
        if "features" not in f or "format_version" not in f.attrs:
            h5.close()
            raise SimclrPathError(f"{path}: not a simclr-path embedding file; create it with 'simclr-path embed'")
        try:
            self.path = Path(path)
            self.attrs: dict[str, Any] = read_attrs(f.attrs)
            _check_version(self.path, self.attrs, "embedding")  # before reading what may differ
            self.shape: tuple[int, int] = tuple(f["features"].shape)  # (N, D)
            n = self.shape[0] if self.shape else 0
            if "coords" in f and tuple(f["coords"].shape) != (n, 2):  # before reading it
                raise SimclrPathError(
                    f"{path}: not a valid embedding file: /coords has shape "
                    f"{tuple(f['coords'].shape)}, expected ({n}, 2); recreate it with "
                    "'simclr-path embed --force'")
            self.features: np.ndarray | None = f["features"][:] if features else None
            self.coords: np.ndarray = f["coords"][:]
            self.labels: np.ndarray | None = f["labels"][:] if "labels" in f else None
            self.groups: list[str] | None = _read_groups(f) if "groups" in f else None
        except _DAMAGED as exc:
            raise SimclrPathError(f"{path}: embedding file is damaged ({exc}); recreate it with --force") from None
        finally:
            h5.close()
        self._check_layout()

    def _check_layout(self) -> None:
        """One clear error for datasets of the wrong shape or type (a file written by other
        code), before a reader fails deep inside numpy or sklearn."""
        n = self.shape[0] if self.shape else 0
        problem = (
            f"/features has shape {self.shape}, expected (patches, features >= 1)"
            if len(self.shape) != 2 or self.shape[1] < 1 else
            f"/coords has shape {self.coords.shape}, expected ({n}, 2)"
            if self.coords.shape != (n, 2) else
            layout_problem(n, self.labels, self.groups, self.attrs))
        if problem is None and not isinstance(self.attrs.get("tta", False), (bool, np.bool_)):
            problem = f"attribute tta is {self.attrs['tta']!r}, not true or false"
        if problem:
            raise SimclrPathError(f"{self.path}: not a valid embedding file: {problem}; recreate it "
                                  "with 'simclr-path embed --force'")

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or self.path.stem)

    @property
    def label_names(self) -> list[str] | None:
        return self.attrs.get("label_names")

    def __len__(self) -> int:
        return self.shape[0]

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 features of the given row indices, read from the file."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)  # h5py wants increasing rows
        h5 = _LazyH5(self.path, "embedding file")
        try:
            got = h5.file["features"][uniq] if len(uniq) else np.empty((0, self.shape[1]), np.float32)
        except (OSError, KeyError, IndexError, TypeError) as exc:
            raise SimclrPathError(f"{self.path}: embedding file is damaged ({exc}); recreate it "
                                  "with --force") from None
        finally:
            h5.close()
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        out[order] = got[inverse]
        return out
