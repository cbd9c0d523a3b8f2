"""The one exception type for errors a user can cause (bad input, bad config, existing output).

Library code raises :class:`SimclrPathError` with a message that names the input, says what is
wrong and how to fix it. Only :mod:`simclr_path.cli` turns it into one stderr line and a non-zero
exit code; programming errors keep raising normally so they stay debuggable.
"""

from __future__ import annotations

import os
from pathlib import Path


class SimclrPathError(Exception):
    """A user-facing error: one line naming the input, the problem and the fix."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def check_int(value: object, caller: str, name: str, minimum: int = 0) -> int:
    """``value`` as an int, or one clear error: Python callers pass what YAML and argparse
    never would (a float, a string, a bool), which failed deep inside numpy or OpenCV."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SimclrPathError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(value: object, caller: str, name: str) -> float:
    """``value`` as a finite float > 0, or one clear error (see :func:`check_int`)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise SimclrPathError(f"{caller}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def need_file(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """``path`` when it is a regular file; else one clear error saying which of three things is
    wrong: nothing there (with ``fix``, how to make it), a folder, or something that is not a file
    (a pipe from ``<(...)`` or a device: readers open inputs more than once, and were told "not
    found" of a path that exists)."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise SimclrPathError(f"{p}: {what} is a link to {os.readlink(p)}, which does not "
                                  "exist; fix the link or give the file itself")
        raise SimclrPathError(f"{p}: {what} not found" + (f"; {fix}" if fix else ""))
    if p.is_dir():
        raise SimclrPathError(f"{p}: is a folder; give the {what}")
    if not p.is_file():
        raise SimclrPathError(f"{p}: is not a regular file (a pipe or a device?), as the {what} "
                              "must be (it is read more than once); save it to disk and give "
                              "that path")
    return p
