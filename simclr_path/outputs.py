"""Output files that never look complete before they are: temporary name, then rename.

Every stage writes through :func:`atomic_output` (a file) or :func:`atomic_dir` (a folder), so an
interrupted or failed run leaves nothing under the final name, and nothing a user already has is
overwritten without ``force``; :func:`check_apart` keeps ``force`` off a call's own inputs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from simclr_path.errors import SimclrPathError

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def check_hdf5_name(path: str | os.PathLike, what: str) -> None:
    """Refuse an HDF5 output named as another kind of file (``--out slide.png`` wrote a patch
    store called .png, which every later command then reads by its name)."""
    p = Path(path)
    if p.suffix.lower() not in HDF5_SUFFIXES:
        raise SimclrPathError(f"{p}: {what} is an HDF5 file; name it with .h5 (or .hdf5), "
                              f"not {p.suffix or 'no suffix'}")


def check_can_write(path: str | os.PathLike, force: bool, kind: str = "file",
                    markers: Sequence[str] = (), owned: Sequence[str] = ()) -> Path:
    """Return ``path`` as a Path, ready to be written; raise one clear error where it cannot be.

    Args:
        path: the output, a file (``kind="file"``) or a folder (``kind="dir"``).
        force: replace an existing output.
        markers: for folders, files that this command writes (e.g. ``metrics.json``):
            ``force`` never replaces a non-empty folder that holds none of them, so a mistyped
            ``--out`` cannot delete an unrelated folder. Any one is enough: Snakemake deletes
            a rule's declared outputs before rerunning it and leaves the others. Nor one that
            holds anything besides ``markers`` and ``owned`` (other names the command writes
            there, such as tracking folders): replacing the folder would delete it.
    """
    p = Path(path)
    if kind == "dir" and (not p.name or Path(os.path.abspath(p)) == Path.cwd()):
        raise SimclrPathError(f"{p}: cannot write results over the current folder; "
                              "give a new folder name")
    if p.is_symlink() and not p.exists() and not force:  # a dangling link is something too
        raise SimclrPathError(f"{p}: a link (to {os.readlink(p)}, which does not exist) is in "
                              "the way; pass --force to replace the link (its target is not "
                              "written), or choose another path")
    if p.exists():
        # the kind first: --force, the other advice, could not help with a wrong kind
        if kind == "file" and p.is_dir():
            raise SimclrPathError(f"{p}: is a folder, but this output is a file; give a file path")
        if kind == "file" and not p.is_file():
            # a device or a pipe: the rename at the end would replace it (/dev/null as root)
            raise SimclrPathError(f"{p}: is not a regular file (a device or a pipe?); outputs are "
                                  "written to a new file and renamed into place, so give a file "
                                  "path")
        if kind == "dir" and not p.is_dir():
            raise SimclrPathError(f"{p}: is a file, but this output is a folder; give a folder path")
        if not force:
            raise SimclrPathError(f"{p}: output already exists; pass --force to overwrite it "
                                  "(force=True in Python)")
        if kind == "dir" and markers and any(p.iterdir()) and \
                not any((p / m).exists() for m in markers):
            raise SimclrPathError(f"{p}: exists and is not a results folder of this command (none "
                                  f"of {', '.join(markers)}); --force only replaces earlier "
                                  "results, so choose another folder")
        if kind == "dir" and markers and not p.is_symlink():  # a link is replaced, not emptied
            others = sorted(e.name for e in p.iterdir()
                            if e.name not in {*markers, *owned} and not _os_metadata(e.name))
            if others:
                raise SimclrPathError(
                    f"{p}: also holds {len(others)} file(s) or folder(s) this command did not "
                    f"write (first: {others[0]}); --force replaces the whole results folder, so "
                    "move them out or choose another folder")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:  # the first ancestor that exists
        parent = parent.parent
    if not parent.is_dir():
        raise SimclrPathError(f"{p}: {parent} is a file, not a folder; give an output path in a folder")
    check_writable(p, parent)
    return p  # missing folders are made by atomic_output / atomic_dir, when there is a result


def _os_metadata(name: str) -> bool:
    """Files an operating system or file server leaves in any folder (Finder, Explorer, NFS)."""
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith(("._", ".nfs"))


def check_writable(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> None:
    """One clear error when nothing can be written in ``folder`` (default: the first existing
    folder above ``path``), found by making a nameless temporary file there: permissions, a
    read-only or immutable file system (root passes ``os.access`` checks on those)."""
    p = Path(path)
    if folder is None:
        folder = p.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not Path(folder).is_dir():
        raise SimclrPathError(f"{p}: {folder} is a file, not a folder; give an output path in a "
                              "folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise SimclrPathError(f"{p}: cannot write in {folder} ({exc.strerror or exc}); choose "
                              "another output folder or make this one writable") from None


def first_repeat(paths: Sequence[str | os.PathLike | None]) -> tuple[int, int] | None:
    """Indices (first, again) of the first file named twice (links resolved; None entries are
    skipped), or None."""
    seen: dict[str, int] = {}
    for i, p in enumerate(paths):
        if p is None:
            continue
        real = os.path.realpath(p)
        if real in seen:
            return seen[real], i
        seen[real] = i
    return None


def check_distinct(paths: Iterable[str | os.PathLike], what: str) -> None:
    """Refuse one file given twice (under two names, links resolved): it would count twice."""
    paths = list(paths)
    pair = first_repeat(paths)
    if pair is not None:
        first, again = (str(paths[i]) for i in pair)
        also = "" if again == first else f" (also as {first})"
        raise SimclrPathError(f"{again}: given twice{also}; pass each {what} once")


def as_paths(value: str | os.PathLike | Iterable[str | os.PathLike], what: str) -> list[Path]:
    """A sequence of paths as a list; one path (a str or Path) as a one-item list, never its
    characters. ``what`` names the argument in the error for anything else."""
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    try:
        items = list(value)
    except TypeError:
        raise SimclrPathError(f"{what}: expected a path or a list of paths, got "
                              f"{type(value).__name__}") from None
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise SimclrPathError(f"{what}: expected paths, got {type(item).__name__} {item!r}")
    return [Path(item) for item in items]


def check_apart(outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, Any], *,
                replaces_dir: bool = False, figures_only: bool = False) -> None:
    """Before a command or API call runs: no two outputs share a path, no output is one of its
    inputs, and (unless ``figures_only``) none lies inside a folder input, so that ``force``
    never replaces what the call reads.

    Args:
        outputs: output label (as the user gave it: ``--out`` or ``out_dir``) -> path or None.
        inputs: input label -> a path, a sequence of paths, or anything else (ignored).
        replaces_dir: ``force`` replaces an existing output folder whole (:func:`atomic_dir`),
            so no input may lie inside it either.
        figures_only: the outputs are figures, which may be written inside a folder input
            (a run's ``loss.png``) without replacing any file that the call reads.
    """
    outs = {k: v for k, v in outputs.items() if isinstance(v, (str, os.PathLike))}
    seen: dict[str, str] = {}
    for label, path in outs.items():
        key = os.path.realpath(path)  # one file reached through a link is one output too
        if key in seen:
            raise SimclrPathError(f"{path}: given for both {seen[key]} and {label}; give each "
                                  "output its own path")
        seen[key] = label
    existing = {label: path for label, path in outs.items() if os.path.exists(path)}
    for in_label, value in inputs.items():
        items = [value] if isinstance(value, (str, os.PathLike)) else \
            value if isinstance(value, (list, tuple)) else []
        for item in items:
            if not isinstance(item, (str, os.PathLike)) or not os.path.exists(item):
                continue
            for label, path in existing.items():
                if os.path.samefile(item, path):
                    raise SimclrPathError(f"{path}: is an input of this command ({in_label}) and "
                                          f"its {label} output; write the output elsewhere")
                # force replaces such an output folder whole: an input inside it would go too
                if replaces_dir and os.path.isdir(path) and \
                        Path(item).resolve().is_relative_to(Path(path).resolve()):
                    raise SimclrPathError(f"{item}: is an input of this command ({in_label}) "
                                          f"inside its {label} folder {path}; write the output "
                                          "elsewhere")
            # a folder input (a run, a classifier) is read file by file: an output inside it,
            # with force, replaces one of those files (embed --out RUN/encoder.pt)
            if os.path.isdir(item) and not figures_only:
                for label, path in outs.items():
                    if Path(path).resolve().is_relative_to(Path(item).resolve()):
                        raise SimclrPathError(f"{path}: is inside the input folder {item} of this "
                                              f"command ({in_label}); write the {label} output "
                                              "elsewhere")


# a hidden file every run writes first (never a workflow output, so never deleted by one): what
# marks a folder as a run's. Not metrics.csv, loss.png, config.yaml, encoder.json ... (any
# project folder may hold such names, or copies of a run's), nor mlflow.db (MLflow's default
# store in any working folder)
RUN_MARKER = ".simclr-path-run"
# a hidden file every finetune folder holds: the workflow deletes a rerun job's declared outputs
# and, without a final model, left only tensorboard/, which --force then refused as not ours
FINETUNE_MARKER = ".simclr-path-finetune"

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), else
    set and restored under a lock (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _default_mode(tmp: Path, mode: int) -> None:
    """Give ``tmp`` the permissions open()/mkdir() would have given ``final`` (``mode`` less the
    umask): mkstemp and mkdtemp make it private (0600/0700), and the rename would keep that."""
    os.chmod(tmp, mode & ~current_umask())


# The exception type of a signal the CLI's handler raised (Ctrl-C, SIGTERM). Raised inside a
# weakref callback, which h5py runs while it writes a large block, Python discards it and the
# run went on to a complete store and exit 0: the HDF5 writers call raise_pending_signal()
# before their rename.
PENDING_SIGNAL: list[Callable[[], BaseException]] = []


def raise_pending_signal() -> None:
    """Raise the recorded signal's exception again, if one was recorded."""
    if PENDING_SIGNAL:
        raise PENDING_SIGNAL[0]()


def stopping_on_a_signal() -> None:
    """Call from a SIGTERM / SIGINT handler of a process that stops on it: DataLoader worker
    deaths are no longer reported.

    A signal sent to the whole process group (timeout, `kill -- -PGID`, a scheduler's time limit)
    kills the workers too, and PyTorch's SIGCHLD handler then raised "DataLoader worker ... is
    killed by signal" in the main process: pretraining lost the checkpoint it was saving, embed
    and finetune printed tracebacks while their loaders shut down. Handlers run in the main
    thread, and the SIGTERM one always before SIGCHLD's (the workers die after they get it).
    """
    import signal

    if hasattr(signal, "SIGCHLD") and signal.getsignal(signal.SIGCHLD) is not _no_op:
        # a Python no-op, not SIG_DFL: one already pending would print "Signal 17 ignored due
        # to race condition"
        _REPLACED_SIGCHLD[:] = [signal.signal(signal.SIGCHLD, _no_op)]


def worker_reports_back() -> None:
    """Undo :func:`stopping_on_a_signal` once every loader is shut down, for a process that
    goes on (an API user's Ctrl-C in pretrain, ``cli.main`` called in a process). Not before: a
    worker the signal killed, not yet reaped, would be reported again while its loader shuts
    down."""
    import signal

    if _REPLACED_SIGCHLD and signal.getsignal(signal.SIGCHLD) is _no_op:
        previous = _REPLACED_SIGCHLD.pop()
        if previous is not None:  # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGCHLD, previous)


_REPLACED_SIGCHLD: list[Any] = []


def _no_op(signum: int, frame: object) -> None:
    pass


_LEFTOVERS_WARNED: set[Path] = set()


def _warn_leftovers(final: Path, min_age_s: float = 60.0) -> None:
    """Warn (once per output and process) about temporary files or folders of ``final`` that a
    run killed outright (SIGKILL, the out-of-memory killer, a power cut) left: no cleanup ran,
    and a hidden copy of a large store would fill the disk unseen. Not deleted: another command
    may be writing the same output; those untouched for ``min_age_s`` are named."""
    if final in _LEFTOVERS_WARNED:
        return
    import time

    now, old, size = time.time(), [], 0
    for q in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        try:
            if now - q.lstat().st_mtime < min_age_s:
                continue
            parts = [q] if not q.is_dir() else [e for e in q.rglob("*") if e.is_file()]
            size += sum(e.lstat().st_size for e in parts)
        except OSError:
            continue
        old.append(q.name)
    if old:
        _LEFTOVERS_WARNED.add(final)
        import warnings

        warnings.warn(f"{final.parent}: {len(old)} temporary output(s) of {final.name} left by "
                      f"a run that was killed ({', '.join(sorted(old)[:3])}"
                      f"{', ...' if len(old) > 3 else ''}; {size / 1e6:.1f} MB); delete them "
                      "unless another command is writing it now", stacklevel=4)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary file is in the same folder (same file system, so the rename is atomic) and is
    removed when the block raises.
    """
    final = check_can_write(path, force, kind="file")
    final.parent.mkdir(parents=True, exist_ok=True)
    _warn_leftovers(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_mode(tmp_path, 0o666)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False,
               markers: Sequence[str] = (), owned: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds.
    ``markers``, ``owned``: see :func:`check_can_write`."""
    final = check_can_write(path, force, kind="dir", markers=markers, owned=owned)
    final.parent.mkdir(parents=True, exist_ok=True)
    _warn_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _default_mode(tmp, 0o777)
        if final.is_symlink():  # --force replaces the link, never its target's contents
            final.unlink()
            os.replace(tmp, final)
        elif final.exists():
            # a fresh name for the old results: a fixed '.NAME.old' deleted a user's folder of
            # that name; renamed onto the empty folder, then removed with it
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def logged_to(log: str | os.PathLike) -> Iterator[None]:
    """stdout and stderr, and the traceback of a failure, go to ``log`` inside the block (the
    Snakemake script rules' ``log:`` files)."""
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            yield
        except Exception:
            traceback.print_exc()
            raise
