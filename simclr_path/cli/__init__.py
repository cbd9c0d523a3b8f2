"""The ``simclr-path`` command line: one subcommand per stage.

Each subcommand lives in its own module ``simclr_path/cli/<name>.py`` that defines ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. Those modules import only argparse and
:mod:`simclr_path.config` at top level; the heavy stage code (torch, OpenSlide ...) is imported
inside ``run``, so ``simclr-path info`` or ``--help`` starts in a fraction of a second.

User errors (:class:`~simclr_path.errors.SimclrPathError`) become one line on stderr and a
non-zero exit code, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from simclr_path import __version__
from simclr_path.errors import SimclrPathError
from simclr_path.outputs import check_apart, check_writable

# subcommand -> module under simclr_path.cli (pipeline order, which is also the --help order)
COMMANDS: dict[str, str] = {
    "demo-slide": "demo_slide",
    "tile": "tile",
    "import-patches": "import_patches",
    "info": "info",
    "preview": "preview",
    "pretrain": "pretrain",
    "embed": "embed",
    "classify": "classify",
    "predict": "predict",
    "plot-tsne": "plot_tsne",
    "plot-curves": "plot_curves",
    "plot-confusion": "plot_confusion",
    "plot-heatmap": "plot_heatmap",
    "plot-loss": "plot_loss",
    "finetune": "finetune",
    "schema": "schema",
    "with-gpus": "with_gpus",
}


def _load(module: str):
    try:
        return importlib.import_module(f"simclr_path.cli.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"simclr_path.cli.{module}":
            return None  # stage not built into this version
        raise


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for real defaults: an option defaulting to None means "not
    given" (e.g. tile options that fall back to the config, whose value the help already states
    as [config: ...]), and "(default: None)" there would contradict it; "(default: )" says
    nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == "":
            return action.help
        return super()._get_help_string(action)


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, as every other bad input (argparse prints the usage block
    first); the subcommands' parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_run_name(p: argparse.ArgumentParser) -> None:
    """The figure commands' --run-name (figures.with_run)."""
    p.add_argument("--run-name", default=None, metavar="NAME",
                   help="run named at the start of the titles (the workflow gives its run's name)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="simclr-path",
        description="Self-supervised SimCLR pipeline for histopathology whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"simclr-path {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: dict[str, argparse.ArgumentParser] = {}
    parser.commands = commands  # type: ignore[attr-defined]  # for parse_args' messages
    for name, module in COMMANDS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=_DefaultsHelpFormatter)
        mod.add_arguments(p)
        out_is_folder = getattr(mod, "OUT_IS_FOLDER", False)
        for action in p._actions:  # an empty path was "." (the current folder) in messages
            if action.type is Path:
                file_out = action.dest in ("out", "qc") or action.dest.startswith("out_")
                action.type = file_output_arg if file_out and not out_is_folder else path_arg
        # a command whose --out folder --force replaces whole (outputs.atomic_dir) says so
        p.set_defaults(_run=mod.run, _replaces_out_dir=getattr(mod, "REPLACES_OUT_DIR", False),
                       _figures_only=getattr(mod, "FIGURES_ONLY", False),
                       _distributed=getattr(mod, "DISTRIBUTED", False))
        commands[name] = p
    return parser


def path_arg(text: str) -> Path:
    """A path option's value; an empty one (an unset shell variable) is refused: as a Path it
    is ".", and 'embed "" ...' said the output was inside the input folder "."."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); give a file or "
                                         "folder name")
    return Path(text)


def file_output_arg(text: str) -> Path:
    """A file output's value: one ending in "/" (or "/.") names a folder (Path drops the
    ending, so 'tile --qc qc/' wrote a PNG file called qc)."""
    last = text.replace(os.altsep or os.sep, os.sep).split(os.sep)[-1]
    if text.strip() and last in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder (it ends with {last or text[-1]!r}), "
                                         "but this output is a file; give a file name")
    return path_arg(text)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with arguments no option takes reported by the command's parser
    (argparse reports them from the top one, pointing at a help without the command's options),
    and a misspelt option's nearest name."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.commands[args.command]  # type: ignore[attr-defined]
        known = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        near = [m for e in extra if e.startswith("--")
                for m in difflib.get_close_matches(e.split("=")[0], known, n=1)]
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _is_output(dest: str) -> bool:
    return dest in ("out", "qc") or dest.startswith("out_")


def check_output_paths(args: argparse.Namespace) -> None:
    """Before a command runs: :func:`outputs.check_apart` on its Path-typed arguments (a
    ``--title`` or ``--slide-id`` is text, whatever it says)."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    outs = {f"--{k.replace('_', '-')}": v for k, v in values.items()
            if _is_output(k) and isinstance(v, os.PathLike)}
    ins = {k.replace("_", "-"): v for k, v in values.items() if not _is_output(k) and (
        isinstance(v, os.PathLike) or
        (isinstance(v, (list, tuple)) and all(isinstance(i, os.PathLike) for i in v)))}
    for v in outs.values():  # before any work: a second output (a QC picture) must not fail
        # after the first is complete; an existing folder (a run directory) is written in
        check_writable(v, v if Path(v).is_dir() else None)
    check_apart(outs, ins, replaces_dir=bool(values.get("force")) and
                getattr(args, "_replaces_out_dir", False),
                figures_only=getattr(args, "_figures_only", False))


# what the file system says about the user's disk, not about a bug: one line, no traceback
_FULL = {errno.ENOSPC, errno.EDQUOT}
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, *_FULL}

# what to lower when a GPU runs out of memory, by command
_GPU_MEMORY_HINTS = {
    "pretrain": "lower train.batch_size (--batch-size, pairs per process; add processes with "
                "torchrun to keep the global batch) or augment.image_size",
    "embed": "lower embed.batch_size (--batch-size)",
    "finetune": "lower finetune.batch_size in the config",
}


def _gpu_out_of_memory(exc: BaseException) -> BaseException | None:
    """The CUDA out-of-memory error behind ``exc`` (itself, or what it was raised from, as
    torch.compile's backend errors are), or None."""
    torch = sys.modules.get("torch")  # never imported here: only a command that used it can fail so
    seen = set()
    while torch is not None and exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM: unwinding runs every cleanup (``finally``, the
    ``except BaseException`` of :mod:`simclr_path.outputs`) that the default action, an immediate
    exit, would skip, leaving a large hidden temporary file beside the output."""

    def __init__(self) -> None:
        super().__init__(143)  # 128 + SIGTERM, as a shell reports a process killed by it


def _raise_terminated(signum, frame) -> None:
    _record(Terminated)
    raise Terminated()


def _raise_interrupted(signum, frame) -> None:
    _record(KeyboardInterrupt)
    raise KeyboardInterrupt


def _record(kind) -> None:
    """Keep the signal for the HDF5 writers (outputs.PENDING_SIGNAL): Python discards what a
    handler raises inside a weakref callback, as h5py runs one during a large write."""
    from simclr_path.outputs import PENDING_SIGNAL, stopping_on_a_signal

    if not PENDING_SIGNAL:
        PENDING_SIGNAL.append(kind)
    stopping_on_a_signal()  # the loader workers got it too: their end is no error


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` and Ctrl-C KeyboardInterrupt inside the block, each
    recorded as well; the previous handlers come back after. Only the main thread may set
    handlers (main() called from another thread keeps the default). An ignored SIGINT (a job
    started in the background) stays ignored."""
    from simclr_path.outputs import PENDING_SIGNAL, raise_pending_signal

    PENDING_SIGNAL.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
    hook = sys.unraisablehook

    def quiet_signal(u) -> None:
        # what the handler raised inside a weakref callback (h5py's): Python discards it and
        # prints "Exception ignored in ..." with a traceback; it is recorded (above), so the
        # command still stops, with its one line
        if isinstance(u.exc_value, (Terminated, KeyboardInterrupt)) and PENDING_SIGNAL:
            return
        hook(u)

    sys.unraisablehook = quiet_signal
    try:
        yield
        # a discarded signal that no loop or writer raised again: the command was asked to
        # stop, so it exits as stopped (143 / 130), whatever it finished is complete
        raise_pending_signal()
    finally:
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        PENDING_SIGNAL.clear()


_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """The package's own warnings print as ``simclr-path <command>: warning: <message>``.

    Python's default form names a source file and line of the package and repeats that line,
    which tells a user nothing. Only the formatter is replaced, so code that records warnings
    (``warnings.catch_warnings(record=True)``, pytest) still gets them; other libraries' warnings
    keep the default form, whose location helps to report them.
    """
    import warnings

    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(_PACKAGE_DIR):
            return f"simclr-path {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: Sequence[str] | None = None) -> int:
    from simclr_path.outputs import worker_reports_back

    try:
        return _main(argv)
    finally:
        # the command's loaders went with its frames (its exception is handled): PyTorch's
        # report of a dead worker comes back for a process that goes on (an API caller, tests)
        worker_reports_back()


def _check_one_process(args: argparse.Namespace) -> None:
    """Only pretrain splits its work over torchrun's processes: any other command started by
    torchrun ran whole in every process, each writing the same outputs over the others'."""
    world = os.environ.get("WORLD_SIZE", "1")
    if args._distributed or not world.isdigit() or int(world) <= 1:
        return
    rank = os.environ.get("RANK", "?")
    raise SimclrPathError(
        f"{args.command} runs in one process (process {rank} of {world} here: started by "
        f"torchrun?); only pretrain uses several; run 'simclr-path {args.command} ...' without "
        "torchrun (on a GPU machine it uses one GPU: pick it with CUDA_VISIBLE_DEVICES)")


def _one_line(exc: SimclrPathError) -> str:
    """The error's own message. One raised in a DataLoader worker comes back re-raised with
    PyTorch's "Caught SimclrPathError in DataLoader worker process 0. Original Traceback ..."
    around it: its last line is the message."""
    text = str(exc)
    if "Original Traceback" in text:  # the message follows the traceback's last "Error: "
        text = text.rstrip().rsplit("SimclrPathError: ", 1)[-1]
    return text


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        with _sigterm_unwinds(), _warnings_as_lines(args.command):
            _check_one_process(args)
            check_output_paths(args)
            code = int(args._run(args) or 0)
            sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
            return code
    except SimclrPathError as exc:
        print(f"simclr-path {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"simclr-path {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"simclr-path {args.command}: terminated (SIGTERM); unfinished outputs removed",
              file=sys.stderr)
        return int(exc.code)
    except BrokenPipeError:
        # the reader of our output went away (`| head`): stop quietly, as Unix tools do on
        # SIGPIPE; stdout goes to /dev/null so that the exit's flush does not fail again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRORS:
            raise
        fix = ("free space or choose another output folder" if exc.errno in _FULL else
               "check its permissions")  # an input that cannot be read lands here too
        print(f"simclr-path {args.command}: error: {exc.filename or 'a file'}: {exc.strerror}; "
              f"{fix}", file=sys.stderr)
        return SimclrPathError.exit_code
    except Exception as exc:
        oom = _gpu_out_of_memory(exc)
        if oom is None:
            raise
        hint = _GPU_MEMORY_HINTS.get(args.command, "lower the batch size")
        detail = (str(oom).splitlines() or [""])[0][:200]
        print(f"simclr-path {args.command}: error: the GPU ran out of memory ({detail}); {hint}",
              file=sys.stderr)
        return SimclrPathError.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
